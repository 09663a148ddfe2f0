//! `hsmctl --json`: every command prints exactly one JSON document on
//! standard output, whether it succeeds or fails, and every failure carries a
//! stable code. The commands are read from hsmctl's own `--help`, so a new
//! command that is not exercised here fails this test.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
    process::Output,
};

use hsmd_tests::{bin, Daemon, SoftHsm};
use serde_json::Value;

/// Every leaf command path hsmctl's `--help` lists (`["key", "create"]`, …).
fn commands(prefix: &[String]) -> Vec<Vec<String>> {
    let out = std::process::Command::new(bin("hsmctl"))
        .args(prefix)
        .arg("--help")
        .output()
        .expect("run hsmctl --help");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let names: Vec<String> = text
        .lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // A command's line is indented two spaces; its wrapped description more.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(|n| n.trim_end_matches(',').to_owned()))
        .filter(|n| n != "help")
        .collect();
    if names.is_empty() {
        return vec![prefix.to_vec()];
    }
    names
        .into_iter()
        .flat_map(|n| {
            let mut path = prefix.to_vec();
            path.push(n);
            commands(&path)
        })
        .collect()
}

/// The one JSON document of an hsmctl run; fails the test if stdout holds
/// anything else (a second document, text before or after it, nothing).
fn document(args: &[&str], out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "hsmctl --json {args:?} did not print exactly one JSON document ({e}):\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

struct Walk<'a> {
    d: &'a Daemon,
    /// Command path → (successes, failures) seen.
    seen: BTreeMap<String, (u32, u32)>,
    leaves: BTreeSet<String>,
}

impl Walk<'_> {
    fn path_of(&self, args: &[&str]) -> String {
        // The longest prefix of the words that is a command.
        (1..=args.len().min(3))
            .rev()
            .map(|n| args[..n].join(" "))
            .find(|p| self.leaves.contains(p))
            .unwrap_or_else(|| panic!("{args:?} names no command hsmctl lists"))
    }

    /// Runs `hsmctl --json ARGS` (with `stdin`), checks it printed one JSON
    /// document and exited `exit`; a failure's document must be an error with
    /// a code. Returns the document.
    fn run(&mut self, args: &[&str], stdin: &[u8], exit: i32) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.d.hsmctl_with_stdin(&all, stdin);
        let doc = document(args, &out);
        assert_eq!(out.status.code(), Some(exit), "hsmctl --json {args:?}: {doc}");
        let path = self.path_of(args);
        let entry = self.seen.entry(path).or_default();
        if exit == 0 || (exit == 2 && args == ["status"]) {
            entry.0 += 1;
            assert!(doc.get("error").is_none(), "{args:?} succeeded with an error: {doc}");
        } else {
            entry.1 += 1;
            let code = doc["error"]["code"].as_str().unwrap_or_default();
            assert!(!code.is_empty(), "{args:?} failed without a code: {doc}");
            assert!(
                doc["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{args:?}: {doc}"
            );
        }
        doc
    }

    fn ok(&mut self, args: &[&str]) -> Value {
        self.run(args, b"", 0)
    }

    /// A failure with this code.
    fn fails(&mut self, args: &[&str], exit: i32, code: &str) -> Value {
        let doc = self.run(args, b"", exit);
        assert_eq!(doc["error"]["code"], code, "{args:?}: {doc}");
        doc
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn every_command_prints_one_json_document_on_success_and_on_failure() {
    let leaves: BTreeSet<String> = commands(&[]).into_iter().map(|c| c.join(" ")).collect();
    assert!(leaves.len() > 40, "hsmctl lists only {leaves:?}");
    let hsm = SoftHsm::new("hsmd-json");
    // No pin_file: the PIN comes from `backend pkcs11 set-pin` below.
    let config: String = hsm
        .config("")
        .lines()
        .filter(|l| !l.starts_with("pin_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    let d = Daemon::builder()
        .env("SOFTHSM2_CONF", &hsm.conf().display().to_string())
        .extra(&config)
        .start();
    let dir = d.dir();
    let kf = dir.join("unlock.key");
    let data = dir.join("data");
    let other = dir.join("other");
    fs::write(&data, b"the data").expect("write");
    fs::write(&other, b"other data").expect("write");
    let mut w = Walk {
        d: &d,
        seen: BTreeMap::new(),
        leaves: leaves.clone(),
    };

    // Before init: status exits 2 with its document; most things fail.
    assert_eq!(w.run(&["status"], b"", 2)["state"], "uninitialized");
    w.fails(&["key", "list"], 1, "not-initialized");
    w.ok(&["init", "--keyfile-out", p(&kf)]);
    w.fails(
        &["init", "--keyfile-out", p(&dir.join("second.key"))],
        1,
        "already-initialized",
    );
    assert_eq!(w.ok(&["status"])["state"], "unlocked");
    w.ok(&["whoami"]);
    w.ok(&["ping", "-c", "2"]);

    // Slots.
    w.ok(&["slot", "list"]);
    let slot = w.ok(&["slot", "add", "--keyfile-out", p(&dir.join("second.key"))])["slot"]
        .as_u64()
        .expect("slot id");
    w.ok(&["slot", "remove", &slot.to_string()]);
    w.fails(&["slot", "remove", "99"], 1, "not-found");
    w.fails(&["slot", "add", "--keyfile-out", p(&kf)], 1, "local-file");

    // Keys and their lives.
    w.ok(&["key", "create", "s", "--type", "ed25519"]);
    w.ok(&[
        "key",
        "create",
        "e",
        "--type",
        "aes256-gcm",
        "--allow-plaintext-datakey",
    ]);
    w.ok(&["key", "create", "m", "--type", "hmac-sha256"]);
    w.ok(&["key", "create", "x", "--type", "ed25519"]);
    w.fails(&["key", "create", "s", "--type", "ed25519"], 1, "already-exists");
    w.ok(&["key", "list"]);
    w.ok(&["key", "info", "s"]);
    w.fails(&["key", "info", "nosuch"], 1, "not-found");
    assert_eq!(w.ok(&["key", "exists", "s"])["exists"], true);
    assert_eq!(w.fails(&["key", "exists", "nosuch"], 1, "absent")["exists"], false);
    let public = w.ok(&["key", "public", "s"]);
    assert!(
        public["pem"]
            .as_str()
            .is_some_and(|t| t.starts_with("-----BEGIN PUBLIC KEY-----")),
        "{public}"
    );
    assert!(
        public["openssh"]
            .as_str()
            .is_some_and(|t| t.starts_with("ssh-ed25519 ")),
        "{public}"
    );
    w.fails(&["key", "public", "e"], 1, "invalid-argument");
    w.ok(&["key", "rotate", "s"]);
    w.fails(&["key", "rotate", "nosuch"], 1, "not-found");
    w.ok(&["key", "set", "s", "--rotate-every", "90d"]);
    let floor = w.fails(&["key", "set", "s", "--rotate-every", "1s"], 1, "invalid-argument");
    assert!(
        floor["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("at least 1h")),
        "{floor}"
    );
    assert_eq!(w.ok(&["key", "info", "s"])["rotate_every_secs"], 90 * 86_400);
    w.ok(&["key", "disable", "x"]);
    w.fails(&["key", "disable", "nosuch"], 1, "not-found");
    w.ok(&["key", "enable", "x"]);
    w.fails(&["key", "enable", "nosuch"], 1, "not-found");
    w.ok(&["key", "deactivate", "x"]);
    w.fails(&["key", "deactivate", "nosuch"], 1, "not-found");
    w.ok(&["key", "compromise", "x"]);
    w.fails(&["key", "compromise", "nosuch"], 1, "not-found");
    w.fails(&["key", "destroy", "x"], 1, "not-confirmed");
    w.ok(&["key", "destroy", "x", "--yes"]);
    w.ok(&["key", "delete", "x"]);
    w.fails(&["key", "delete", "nosuch"], 1, "not-found");
    w.ok(&["key", "restore", "x"]);
    w.fails(&["key", "restore", "nosuch"], 1, "not-found");
    w.ok(&["key", "delete", "x"]);
    w.fails(&["key", "purge", "x"], 1, "not-confirmed");
    w.ok(&["key", "purge", "x", "--yes"]);

    // Signatures: the document carries the signature when it goes nowhere else.
    let sig = dir.join("data.sig");
    let signed = w.ok(&["sign", "s", "-i", p(&data)]);
    assert!(signed["signature"].as_str().is_some_and(|s| !s.is_empty()), "{signed}");
    w.ok(&["sign", "s", "-i", p(&data), "-o", p(&sig)]);
    w.fails(&["sign", "s", "-i", p(&data), "-o", p(&sig)], 1, "output-exists");
    w.fails(&["sign", "s", "-i", p(&data), "-o", p(&data)], 1, "unsafe-output");
    assert_eq!(w.ok(&["verify", "s", "-i", p(&data), "-s", p(&sig)])["valid"], true);
    let bad = w.run(&["verify", "s", "-i", p(&other), "-s", p(&sig)], b"", 1);
    assert_eq!(
        (&bad["valid"], &bad["error"]["code"]),
        (&Value::Bool(false), &Value::from("invalid-signature"))
    );
    let sig_text = fs::read(&sig).expect("sig");
    w.run(&["verify", "s", "-i", p(&data), "-s", "-"], &sig_text, 0);

    // Encryption: the data goes to a file, the summary to stdout.
    let ct = dir.join("data.enc");
    w.ok(&["encrypt", "e", "-i", p(&data), "-o", p(&ct)]);
    w.fails(&["encrypt", "e", "-i", p(&data)], 2, "usage");
    let opened = w.ok(&["decrypt", "-i", p(&ct), "-o", p(&dir.join("data.out"))]);
    assert_eq!(
        (&opened["key"], &opened["plaintext_bytes"]),
        (&Value::from("e"), &Value::from(8))
    );
    assert_eq!(fs::read(dir.join("data.out")).expect("out"), b"the data");
    w.fails(
        &["decrypt", "e", "-i", p(&data), "-o", p(&dir.join("x.out"))],
        1,
        "bad-input",
    );
    w.ok(&["rewrap", "e", "-i", p(&ct), "-o", p(&dir.join("data.enc2"))]);
    w.fails(
        &["rewrap", "e", "-i", p(&ct), "-o", p(&dir.join("data.enc2"))],
        1,
        "output-exists",
    );
    w.ok(&[
        "datakey",
        "e",
        "-o",
        p(&dir.join("dk.enc")),
        "--plaintext-out",
        p(&dir.join("dk")),
    ]);
    w.fails(&["datakey", "nosuch", "-o", p(&dir.join("dk2.enc"))], 1, "not-found");

    // MACs.
    let tag = dir.join("data.mac");
    w.ok(&["mac", "m", "-i", p(&data), "-o", p(&tag)]);
    w.fails(
        &["mac", "s", "-i", p(&data), "-o", p(&dir.join("t2"))],
        1,
        "failed-precondition",
    );
    assert_eq!(w.ok(&["mac-verify", "m", "-i", p(&data), "-t", p(&tag)])["valid"], true);
    let bad = w.run(&["mac-verify", "m", "-i", p(&other), "-t", p(&tag)], b"", 1);
    assert_eq!(bad["error"]["code"], "invalid-tag");

    // Policy, audit, metrics.
    w.ok(&["policy", "show"]);
    w.ok(&["policy", "check", "root", "sign", "s"]);
    w.fails(&["policy", "check", "no-such-user-here", "sign", "s"], 1, "not-found");
    w.ok(&["audit", "verify"]);
    let events = w.ok(&["audit", "show", "--event", "SIGN"]);
    assert!(events.as_array().is_some_and(|a| !a.is_empty()), "{events}");
    w.fails(&["audit", "show", "--event", "BOGUS"], 1, "invalid-argument");
    assert!(w.ok(&["metrics"])["text"].as_str().is_some_and(|t| t.contains("hsmd_")));

    // The file store.
    let token = w.ok(&["file", "store", p(&data), "--key", "e"])["token"]
        .as_str()
        .expect("token")
        .to_owned();
    w.fails(&["file", "store", p(&data), "--key", "nosuch"], 1, "not-found");
    w.ok(&["file", "list"]);
    w.ok(&["file", "info", &token]);
    w.fails(&["file", "info", "nosuch"], 1, "invalid-argument");
    let back = dir.join("back");
    w.ok(&["file", "retrieve", &token, "-o", p(&back)]);
    w.fails(&["file", "retrieve", &token, "-o", p(&back)], 1, "output-exists");
    w.fails(&["file", "delete", &token], 1, "not-confirmed");
    w.ok(&["file", "delete", &token, "--yes"]);

    // The token's PIN, sealed in the keystore.
    w.run(
        &["backend", "pkcs11", "set-pin", "--pin-file", "-"],
        format!("{}\n", hsm.pin).as_bytes(),
        0,
    );
    w.fails(
        &["backend", "pkcs11", "set-pin", "--pin-file", "/nonexistent/pin"],
        1,
        "secret-unreadable",
    );

    // Backups; a restore leaves hsmd locked.
    let archive = dir.join("b.hsmdbak");
    w.ok(&["backup", "create", p(&archive)]);
    w.fails(&["backup", "create", p(&archive)], 1, "output-exists");
    w.ok(&["backup", "verify", p(&archive)]);
    // Not an archive at all: hsmctl says so by its first bytes.
    w.fails(&["backup", "verify", p(&data)], 1, "bad-input");
    w.fails(
        &["backup", "restore", p(&archive), "--keyfile", p(&kf)],
        1,
        "already-initialized",
    );
    w.ok(&["backup", "restore", p(&archive), "--keyfile", p(&kf), "--force"]);
    w.fails(&["unlock", "--keyfile", p(&data)], 1, "secret-unreadable");
    w.ok(&["unlock", "--keyfile", p(&kf)]);
    w.ok(&["lock"]);

    // What needs no daemon.
    w.ok(&["completions", "bash"]);
    w.fails(&["completions", "nosuchshell"], 2, "usage");
    let man = dir.join("man");
    let pages = w.ok(&["generate-man", p(&man)]);
    assert!(pages["pages"].as_array().is_some_and(|a| a.len() > 40), "{pages}");
    w.fails(&["generate-man", p(&data.join("x"))], 1, "local-file");
    w.ok(&["hardware", "scan"]);

    // A usage error of every command is a JSON document too, and with the
    // daemon gone every command that needs it says so in one.
    for leaf in &leaves {
        let mut args: Vec<&str> = leaf.split(' ').collect();
        args.push("--no-such-flag");
        w.fails(&args, 2, "usage");
    }
    for args in [
        &["status"][..],
        &["lock"],
        &["whoami"],
        &["ping"],
        &["metrics"],
        &["audit", "verify"],
        &["policy", "show"],
        &["slot", "list"],
        &["file", "list"],
    ] {
        let mut all = vec!["--socket", "/nonexistent/hsmd.sock", "--json"];
        all.extend_from_slice(args);
        let out = std::process::Command::new(bin("hsmctl"))
            .args(&all)
            .output()
            .expect("run");
        let doc = document(args, &out);
        assert_eq!(
            (out.status.code(), &doc["error"]["code"]),
            (Some(3), &Value::from("unreachable")),
            "{doc}"
        );
        w.seen.entry(args.join(" ")).or_default().1 += 1;
    }

    let missing: Vec<String> = leaves
        .iter()
        // `hardware scan` reports what it cannot probe inside its document;
        // only its usage errors fail.
        .filter(|l| {
            let needed = if l.as_str() == "hardware scan" { 1 } else { 2 };
            w.seen.get(*l).is_none_or(|(ok, failed)| *ok == 0 || *failed < needed)
        })
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "commands without a JSON success and a failure besides the usage error here: {missing:?}"
    );
}
