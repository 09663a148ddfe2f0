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
