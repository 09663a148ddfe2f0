//! Must show 2: a uid that is not allowed gets `PermissionDenied`, and the daemon
//! keeps serving others. The test acts as `nobody` (uid 65534) in a child process
//! through `setpriv`, so it needs root; as any other user it says so and stops.

use std::{fs, os::unix::fs::PermissionsExt, path::PathBuf};

use hsmd_tests::{bin, Daemon};

const NOBODY: &str = "65534";

/// A copy of hsmctl that `nobody` can execute wherever the checkout lives.
fn hsmctl_for_nobody(d: &Daemon) -> PathBuf {
    let copy = d.dir().join("hsmctl");
    fs::copy(bin("hsmctl"), &copy).expect("copy hsmctl");
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod");
    copy
}

fn as_nobody(hsmctl: &PathBuf, d: &Daemon, args: &[&str]) -> std::process::Output {
    hsmd_tests::as_uid(65534, hsmctl)
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .output()
        .expect("run setpriv (util-linux)")
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn nobody_is_refused_by_the_daemon_itself_and_others_are_still_served() {
    hsmd_tests::require_root("acting as another uid");
    // The socket is world-accessible, so only the daemon's own check stands
    // between nobody and the daemon: defence in depth is what is tested.
    let d = Daemon::builder()
        .socket_mode("0666")
        .users(&[])
        .groups(&["hsmd-no-such-group"])
        .start();
    let hsmctl = hsmctl_for_nobody(&d);
    let mut root_client = d.client();

    let out = as_nobody(&hsmctl, &d, &["status"]);
    assert_eq!(out.status.code(), Some(1), "refused, not unreachable: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission-denied"), "{err}");
    assert!(err.contains("nobody (uid 65534) may not use hsmd"), "{err}");

    let out = as_nobody(&hsmctl, &d, &["--json", "whoami"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON error");
    assert_eq!(v["error"]["code"], "permission-denied");
    assert_eq!(v["error"]["number"], 7);

    // The refusal is logged with who tried.
    assert!(d.log().contains("connection refused"), "{}", d.log());
    // Root, connected before and after, is unaffected.
    root_client
        .ping(b"still here".to_vec())
        .expect("existing connection still served");
    assert_eq!(d.client().status().expect("new connection served").pid, d.pid());
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn access_users_and_groups_admit_nobody_when_configured() {
    hsmd_tests::require_root("acting as another uid");
    let by_user = Daemon::builder().socket_mode("0666").users(&["nobody"]).start();
    let hsmctl = hsmctl_for_nobody(&by_user);
    let out = as_nobody(&hsmctl, &by_user, &["--json", "whoami"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["uid"], 65534);
    assert!(
        v["admitted_because"].as_str().expect("reason").contains("access.users"),
        "{v}"
    );

    // nobody's primary group is 65534 (nogroup on Debian).
    let by_group = Daemon::builder()
        .socket_mode("0666")
        .users(&[])
        .groups(&[NOBODY])
        .start();
    let hsmctl = hsmctl_for_nobody(&by_group);
    let out = as_nobody(&hsmctl, &by_group, &["--json", "whoami"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(
        v["admitted_because"]
            .as_str()
            .expect("reason")
            .contains("access.groups"),
        "{v}"
    );
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn root_can_be_shut_out_too() {
    hsmd_tests::require_root("shutting root out");
    let prepared = Daemon::builder().allow_root(false).users(&[NOBODY]).prepare();
    let socket = prepared.socket.clone();
    let mut cmd = prepared.command();
    let log = prepared.dir.path().join("log");
    let mut child = cmd.stderr(fs::File::create(&log).expect("log")).spawn().expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let err = loop {
        match protocol::Client::connect(&socket) {
            Err(e) if e.code().is_some() => break e,
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(20)),
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    assert_eq!(err.code(), Some(protocol::ErrorCode::PermissionDenied));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn dev_mode_serves_only_its_owner_and_root_whatever_the_config_says() {
    hsmd_tests::require_root("acting as another uid");
    // The config would admit nobody, and the socket is open to all: --dev ignores [access].
    let d = Daemon::builder().dev().socket_mode("0666").users(&["nobody"]).start();
    let hsmctl = hsmctl_for_nobody(&d);
    let out = as_nobody(&hsmctl, &d, &["status"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission-denied"));
    assert!(d.client().status().expect("owner served").dev_mode);
}
