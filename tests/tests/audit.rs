//! The audit log (issue 5, must-show 4): after a mixed workload `audit verify`
//! passes; an edited field, a deleted line, two swapped lines and a cut-off
//! tail each make it fail naming the first bad sequence number; and no line
//! holds a passphrase, key-file bytes, a data key or plaintext.

use std::{fs, path::Path};

use base64::Engine as _;
use hsmd_tests::check::{ok, p};
use hsmd_tests::Daemon;

const PASSPHRASE: &str = "correct horse battery staple";
const PLAINTEXT: &str = "TOP-SECRET-PLAINTEXT-4242";

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn the_chain_verifies_and_each_kind_of_tampering_is_named_by_sequence_number() {
    let mut d = Daemon::start();
    let dir = d.dir().to_owned();
    let pass = dir.join("pass");
    fs::write(&pass, PASSPHRASE).expect("write");
    ok(&d.hsmctl(&["init", "--passphrase-file", p(&pass)]));
    let keyfile = dir.join("unlock.key");
    ok(&d.hsmctl(&["slot", "add", "--keyfile-out", p(&keyfile)]));
    let data = dir.join("data");
    fs::write(&data, PLAINTEXT).expect("write");
    ok(&d.hsmctl(&["key", "create", "signer", "--type", "ed25519"]));
    ok(&d.hsmctl(&[
        "key",
        "create",
        "box",
        "--type",
        "aes256-gcm",
        "--allow-plaintext-datakey",
    ]));
    for i in 0..5 {
        ok(&d.hsmctl(&[
            "sign",
            "--force",
            "signer",
            "-i",
            p(&data),
            "-o",
            p(&dir.join(format!("s{i}"))),
        ]));
    }
    ok(&d.hsmctl(&["encrypt", "--force", "box", "-i", p(&data), "-o", p(&dir.join("ct"))]));
    ok(&d.hsmctl(&[
        "decrypt",
        "--force",
        "box",
        "-i",
        p(&dir.join("ct")),
        "-o",
        p(&dir.join("pt")),
    ]));
    let dk = dir.join("dk.bin");
    ok(&d.hsmctl(&[
        "datakey",
        "--force",
        "box",
        "-o",
        p(&dir.join("dk.enc")),
        "--plaintext-out",
        p(&dk),
    ]));
    ok(&d.hsmctl(&["key", "rotate", "signer"]));
    ok(&d.hsmctl(&["lock"]));
    let wrong = dir.join("wrong");
    fs::write(&wrong, "not the passphrase").expect("write");
    assert!(!d.hsmctl(&["unlock", "--passphrase-file", p(&wrong)]).status.success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    ok(&d.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
    ok(&d.hsmctl(&["key", "compromise", "signer"]));
    let v: serde_json::Value = serde_json::from_str(&ok(&d.hsmctl(&["--json", "audit", "verify"]))).expect("json");
    assert_eq!(v["valid"], true);
    assert!(v["lines"].as_u64().expect("lines") >= 18, "{v}");

    // Stop (which writes everything buffered) and keep the state to start over from.
    d.restart(false);
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit(std::time::Duration::from_secs(10));
    let state = dir.join("state");
    let saved = dir.join("saved-state");
    copy_dir(&state, &saved);
    let log = state.join("audit.log");
    let text = fs::read_to_string(&log).expect("audit log");

    // No secret in any line.
    let key_bytes = fs::read(&keyfile).expect("keyfile");
    let dk_bytes = fs::read(&dk).expect("data key");
    for (what, needle) in [
        ("passphrase", PASSPHRASE.to_owned()),
        ("plaintext", PLAINTEXT.to_owned()),
        ("key file (hex)", hex::encode(&key_bytes)),
        (
            "key file (base64)",
            base64::engine::general_purpose::STANDARD.encode(&key_bytes),
        ),
        ("data key (hex)", hex::encode(&dk_bytes)),
        (
            "data key (base64)",
            base64::engine::general_purpose::STANDARD.encode(&dk_bytes),
        ),
    ] {
        assert!(!text.contains(&needle), "the audit log holds the {what}");
    }
    for event in [
        "KEYSTORE_INITIALIZED",
        "SLOT_ADDED",
        "KEY_CREATED",
        "SIGN",
        "ENCRYPT",
        "DECRYPT",
        "DATAKEY",
        "KEY_ROTATED",
        "LOCK",
        "UNLOCK_FAILED",
        "UNLOCK",
        "KEY_STATE_CHANGED",
        "AUDIT_READ",
    ] {
        assert!(
            text.contains(&format!("\"event_type\":\"{event}\"")),
            "no {event} event:\n{text}"
        );
    }

    let lines: Vec<&str> = text.lines().collect();
    let seq_of = |i: usize| -> u64 {
        serde_json::from_str::<serde_json::Value>(lines[i]).expect("json")["seq"]
            .as_u64()
            .expect("seq")
    };
    let n = lines.len();
    let cases: Vec<(&str, Vec<String>, u64)> = vec![
        (
            "an edited field",
            lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    if i == 6 {
                        l.replace("\"uid\":0", "\"uid\":1000")
                    } else {
                        (*l).to_owned()
                    }
                })
                .collect(),
            seq_of(6),
        ),
        (
            "a deleted line",
            lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 6)
                .map(|(_, l)| (*l).to_owned())
                .collect(),
            seq_of(6),
        ),
        (
            "two swapped lines",
            {
                let mut v: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
                v.swap(6, 7);
                v
            },
            seq_of(6),
        ),
        (
            "a cut-off tail",
            lines[..n - 3].iter().map(|l| (*l).to_owned()).collect(),
            seq_of(n - 3),
        ),
    ];
    for (what, tampered, bad_seq) in cases {
        fs::remove_dir_all(&state).expect("rm");
        copy_dir(&saved, &state);
        fs::write(&log, tampered.join("\n") + "\n").expect("write");
        d.restart(false);
        let out = d.hsmctl(&["audit", "verify"]);
        assert_eq!(out.status.code(), Some(1), "{what} went unnoticed: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("audit log broken at seq {bad_seq}:")) && err.contains("(tampered)"),
            "{what}: expected seq {bad_seq}: {err}"
        );
        d.signal(nix::sys::signal::Signal::SIGTERM);
        d.wait_exit(std::time::Duration::from_secs(10));
    }
}

#[test]
fn audit_lines_rotate_and_the_chain_continues_across_files() {
    let d = Daemon::builder()
        .dev()
        .extra("[audit]\nmax_file_bytes = 4096\nflush_interval = \"50ms\"\n")
        .start();
    ok(&d.hsmctl(&["key", "create", "k", "--type", "hmac-sha256"]));
    let data = d.dir().join("d");
    fs::write(&data, "x").expect("write");
    for i in 0..20 {
        ok(&d.hsmctl(&[
            "mac",
            "--force",
            "k",
            "-i",
            p(&data),
            "-o",
            p(&d.dir().join(format!("t{i}"))),
        ]));
    }
    let v: serde_json::Value = serde_json::from_str(&ok(&d.hsmctl(&["--json", "audit", "verify"]))).expect("json");
    assert!(v["files"].as_array().expect("files").len() > 1, "rotated: {v}");
    assert_eq!(v["first_seq"], 1);
}
