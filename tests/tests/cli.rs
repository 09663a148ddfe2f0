//! hsmctl behaves as the Unix tools around it do.

use std::{
    os::unix::process::ExitStatusExt as _,
    process::{Command, Stdio},
};

use hsmd_tests::{bin, Daemon};

/// Runs hsmctl with its stdout on a pipe whose reader is already gone, as
/// `hsmctl … | head -1` is once head has its line.
fn into_a_closed_pipe(d: Option<&Daemon>, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut cmd = Command::new(bin("hsmctl"));
    if let Some(d) = d {
        cmd.arg("--socket").arg(&d.socket);
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run hsmctl")
}

#[test]
fn output_into_a_closed_pipe_ends_hsmctl_quietly() {
    let d = Daemon::start();
    let key = d.dir().join("unlock.key");
    let out = d.hsmctl(&["init", "--keyfile-out", key.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{out:?}");
    for i in 0..3 {
        let out = d.hsmctl(&["key", "create", &format!("k{i}"), "--type", "ed25519"]);
        assert!(out.status.success(), "{out:?}");
    }
    for args in [
        &["key", "list"][..],
        &["metrics"],
        &["status"],
        &["--json", "key", "list"],
    ] {
        let out = into_a_closed_pipe(Some(&d), args);
        assert_eq!(
            out.status.signal(),
            Some(nix::sys::signal::Signal::SIGPIPE as i32),
            "hsmctl {args:?}: {out:?}"
        );
        assert!(
            out.stderr.is_empty(),
            "hsmctl {args:?} said: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = into_a_closed_pipe(None, &["completions", "bash"]);
    assert_eq!(
        out.status.signal(),
        Some(nix::sys::signal::Signal::SIGPIPE as i32),
        "{out:?}"
    );
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // The daemon saw nothing wrong and still serves.
    assert!(d.hsmctl(&["status"]).status.success());
}

#[test]
fn status_exits_0_unlocked_2_locked_or_uninitialized_and_names_the_profile() {
    let d = Daemon::start();
    let code = |args: &[&str]| {
        let out = d.hsmctl(args);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (c, text) = code(&["status"]);
    assert_eq!(c, Some(2), "uninitialized: {text}");
    assert!(text.contains("state:        uninitialized"), "{text}");
    // The harness runs the development profile, not --dev.
    assert!(text.contains("mode:         development profile"), "{text}");
    let (c, json) = code(&["--json", "status"]);
    assert_eq!(c, Some(2));
    let v: serde_json::Value = serde_json::from_str(&json).expect("one JSON document");
    assert_eq!(
        (v["state"].as_str(), v["profile"].as_str()),
        (Some("uninitialized"), Some("development"))
    );

    let key = d.dir().join("unlock.key");
    assert!(d
        .hsmctl(&["init", "--keyfile-out", key.to_str().expect("utf-8")])
        .status
        .success());
    assert_eq!(code(&["status"]).0, Some(0), "unlocked");
    assert_eq!(code(&["--json", "status"]).0, Some(0));
    assert!(d.hsmctl(&["lock"]).status.success());
    assert_eq!(code(&["status"]).0, Some(2), "locked");
    assert_eq!(code(&["--json", "status"]).0, Some(2));
}

#[test]
fn audit_show_filters_with_a_typo_are_errors_that_list_what_is_valid() {
    let d = Daemon::start();
    let key = d.dir().join("unlock.key");
    assert!(d
        .hsmctl(&["init", "--keyfile-out", key.to_str().expect("utf-8")])
        .status
        .success());
    let refused = |args: &[&str]| {
        let out = d.hsmctl(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("(invalid-argument)"), "{err}");
        err
    };
    let err = refused(&["audit", "show", "--event", "BOGUS"]);
    assert!(
        err.contains("unknown event type \"BOGUS\"") && err.contains("SIGN") && err.contains("KEY_CREATED"),
        "{err}"
    );
    let err = refused(&["audit", "show", "--user", "no-such-user-here"]);
    assert!(err.contains("no user named \"no-such-user-here\""), "{err}");
    // hsmctl knows the results itself: a usage error naming them.
    let out = d.hsmctl(&["audit", "show", "--result", "maybe"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("[possible values: success, failure]"));
    // Valid values, in any case for the event type, still answer.
    let out = d.hsmctl(&[
        "audit",
        "show",
        "--event",
        "keystore_initialized",
        "--user",
        "0",
        "--result",
        "success",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("KEYSTORE_INITIALIZED"),
        "{out:?}"
    );
}

#[test]
fn what_cannot_be_undone_needs_yes_when_there_is_no_terminal_to_ask_on() {
    let d = Daemon::builder().dev().start();
    let out = d.hsmctl(&["key", "create", "files", "--type", "aes256-gcm"]);
    assert!(out.status.success(), "{out:?}");
    let data = d.dir().join("data");
    std::fs::write(&data, b"kept").expect("write");
    let stored = d.hsmctl(&["file", "store", data.to_str().expect("utf-8")]);
    let text = String::from_utf8_lossy(&stored.stdout).into_owned();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("Token: "))
        .unwrap_or_else(|| panic!("no token: {stored:?}"))
        .trim()
        .to_owned();
    let refused = |args: &[&str]| {
        let out = d.hsmctl(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            err.contains("add --yes to go ahead (there is no terminal to ask on)"),
            "{err}"
        );
    };
    refused(&["file", "delete", &token]);
    assert!(d.hsmctl(&["file", "info", &token]).status.success(), "still there");
    assert!(d.hsmctl(&["key", "create", "k", "--type", "ed25519"]).status.success());
    refused(&["key", "destroy", "k"]);
    assert!(d.hsmctl(&["key", "delete", "k"]).status.success());
    refused(&["key", "purge", "k"]);
    assert!(d.hsmctl(&["key", "restore", "k"]).status.success(), "not purged");
    // --yes goes ahead.
    assert!(d.hsmctl(&["file", "delete", &token, "--yes"]).status.success());
    assert!(!d.hsmctl(&["file", "info", &token]).status.success(), "gone");
}

/// Runs `script` (a shell command line) under `script(1)`, so hsmctl's
/// standard input, output and error are a terminal; `input` is typed at it.
fn on_a_terminal(d: &Daemon, command: &str, input: &[u8]) -> (Option<i32>, String) {
    use std::io::Write as _;
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", command, "/dev/null"])
        .env("HSMD_SOCKET", &d.socket)
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", bin("hsmctl").parent().expect("dir").display()),
        )
        .current_dir(d.dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script(1) (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    // Typed after the prompt is up; script passes it on once the pty exists.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = stdin.write_all(input);
    drop(stdin);
    let out = child.wait_with_output().expect("script");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn sign_encrypt_and_decrypt_stream_through_pipes_and_keep_binary_off_a_terminal() {
    let d = Daemon::builder().dev().start();
    for (name, t) in [("s", "ed25519"), ("e", "aes256-gcm"), ("m", "hmac-sha256")] {
        let out = d.hsmctl(&["key", "create", name, "--type", t]);
        assert!(out.status.success(), "{out:?}");
    }
    std::fs::write(d.dir().join("data"), b"data").expect("write");
    let sh = |line: &str| {
        let out = Command::new("sh")
            .args(["-c", line])
            .env("HSMD_SOCKET", &d.socket)
            .env("H", bin("hsmctl"))
            .current_dir(d.dir())
            .output()
            .expect("sh");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Signatures: from stdin to stdout, and back in through `-s -`.
    let (c, out, err) = sh("printf data | \"$H\" sign s | \"$H\" verify s -s - -i data");
    assert_eq!(c, Some(0), "{out}{err}");
    assert!(out.contains("signature valid (key s, version 1)"), "{out}");
    let (c, _, err) = sh("printf other > other; printf data | \"$H\" sign s | \"$H\" verify s -s - -i other");
    assert_eq!(c, Some(1), "{err}");
    assert!(err.contains("signature INVALID"), "{err}");
    let (c, _, err) = sh("printf data | \"$H\" sign s | \"$H\" verify s -s -");
    assert_eq!(c, Some(2), "data and signature both on stdin: {err}");
    // Encryption, armored and not, and a decrypt that finds its key in the file.
    let (c, out, err) = sh("printf secret | \"$H\" encrypt e --armor | tee ct.asc | \"$H\" decrypt");
    assert_eq!((c, out.as_str()), (Some(0), "secret"), "{err}");
    let armored = std::fs::read_to_string(d.dir().join("ct.asc")).expect("armored");
    assert!(
        armored.starts_with("-----BEGIN HSMD ENCRYPTED FILE-----\n")
            && armored.ends_with("-----END HSMD ENCRYPTED FILE-----\n"),
        "{armored}"
    );
    let (c, out, err) = sh("printf secret | \"$H\" encrypt e | \"$H\" decrypt e -o -");
    assert_eq!((c, out.as_str()), (Some(0), "secret"), "{err}");
    let (c, out, err) = sh("printf tagged | \"$H\" mac m | \"$H\" mac-verify m -t - -i /dev/null");
    assert_eq!(c, Some(1), "{out}{err}");
    assert!(err.contains("tag INVALID"), "{err}");

    // On a terminal: binary output is refused unless -o - asks for it; text
    // (an hsmd signature, armor) is written.
    let (c, out) = on_a_terminal(&d, "hsmctl encrypt e -i data", b"");
    assert_eq!(c, Some(1), "{out}");
    assert!(out.contains("refusing to write binary data to a terminal"), "{out}");
    let (c, out) = on_a_terminal(&d, "hsmctl sign s -i data --format raw", b"");
    assert_eq!(c, Some(1), "{out}");
    assert!(out.contains("refusing to write binary data to a terminal"), "{out}");
    let (c, out) = on_a_terminal(&d, "hsmctl decrypt -i ct.asc", b"");
    assert_eq!(c, Some(1), "{out}");
    let (c, out) = on_a_terminal(&d, "hsmctl decrypt -i ct.asc -o -", b"");
    assert_eq!(c, Some(0), "{out}");
    assert!(out.contains("secret"), "{out}");
    let (c, out) = on_a_terminal(&d, "hsmctl sign s -i data", b"");
    assert_eq!(c, Some(0), "{out}");
    assert!(out.contains("hsmd-signature v1"), "{out}");
    let (c, out) = on_a_terminal(&d, "hsmctl encrypt e -i data --armor", b"");
    assert_eq!(c, Some(0), "{out}");
    assert!(out.contains("-----BEGIN HSMD ENCRYPTED FILE-----"), "{out}");

    // What cannot be undone asks on a terminal: only `yes` goes ahead.
    let (c, out) = on_a_terminal(
        &d,
        "hsmctl key create gone --type ed25519 && hsmctl key destroy gone",
        b"no\n",
    );
    assert_eq!(c, Some(1), "{out}");
    assert!(
        out.contains("Type yes to go ahead") && out.contains("not confirmed"),
        "{out}"
    );
    let (c, out) = on_a_terminal(&d, "hsmctl key destroy gone", b"yes\n");
    assert_eq!(c, Some(0), "{out}");
    assert!(out.contains("key gone is now destroyed"), "{out}");
}

#[test]
fn mistakes_are_named_for_what_they_are() {
    let d = Daemon::start();
    let run = |args: &[&str]| {
        let out = d.hsmctl(args);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // A directory or a regular file given as the socket is not "left over".
    for (path, says) in [
        (d.dir().to_path_buf(), "it is a directory, not a socket"),
        (d.dir().join("config.toml"), "it is not a socket"),
    ] {
        std::fs::write(d.dir().join("config.toml"), b"").ok();
        let out = Command::new(bin("hsmctl"))
            .arg("--socket")
            .arg(&path)
            .arg("status")
            .output()
            .expect("hsmctl");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(err.contains(says) && !err.contains("left over"), "{err}");
    }
    // A new passphrase that is too short is refused before it is asked again.
    let (c, out) = on_a_terminal(&d, "hsmctl init", b"short\n");
    assert_eq!(c, Some(1), "{out}");
    assert!(
        out.contains("8 to 1024 bytes; this one is 5") && !out.contains("Repeat"),
        "{out}"
    );
    // Unlocking a keystore that has only a key-file slot names the option to use
    // instead of asking for a passphrase no slot takes.
    let key = d.dir().join("unlock.key");
    assert_eq!(run(&["init", "--keyfile-out", key.to_str().expect("utf-8")]).0, Some(0));
    assert_eq!(run(&["lock"]).0, Some(0));
    let out = d.hsmctl_with_stdin(&["unlock"], b"a passphrase\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("has no passphrase slot (its slots are keyfile); unlock with --keyfile FILE"),
        "{err}"
    );
    assert_eq!(run(&["unlock", "--keyfile", key.to_str().expect("utf-8")]).0, Some(0));
    // Grammar, and an output directory that does not exist (named as such, not
    // by a temporary file's name).
    assert_eq!(run(&["key", "create", "box", "--type", "aes256-gcm"]).0, Some(0));
    let (c, err) = run(&["key", "public", "box"]);
    assert_eq!(c, Some(1));
    assert!(err.contains("is an aes256-gcm key"), "{err}");
    let data = d.dir().join("data");
    std::fs::write(&data, b"x").expect("write");
    let missing = d.dir().join("no/such/dir/out");
    let (c, err) = run(&[
        "encrypt",
        "box",
        "-i",
        data.to_str().expect("utf-8"),
        "-o",
        missing.to_str().expect("utf-8"),
    ]);
    assert_eq!(c, Some(1));
    assert!(err.contains("does not exist") && !err.contains(".hsmctl-"), "{err}");
    // policy check about someone the connection gate refuses says so.
    let (c, _) = run(&["policy", "check", "nobody", "sign", "box"]);
    let out = d.hsmctl(&["policy", "check", "nobody", "sign", "box"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(c, Some(1), "{text}");
    assert!(text.contains("DENIED") && text.contains("may not use hsmd"), "{text}");
}
