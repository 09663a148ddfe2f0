//! Must show 1: `hsmd --dev` starts; `hsmctl status` and `hsmctl --json status`
//! report it.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use hsmd_tests::{bin, Daemon};
use nix::sys::signal::{kill, Signal};

/// Starts a bare `hsmd --dev` (no config, no overrides) and returns it with the
/// socket path it printed.
fn start_bare_dev() -> (std::process::Child, PathBuf, String) {
    let mut child = Command::new(bin("hsmd"))
        .arg("--dev")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hsmd --dev");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read export line");
    let socket = line
        .trim()
        .strip_prefix("export HSMD_SOCKET=")
        .unwrap_or_else(|| panic!("first stdout line should be the export line, got {line:?}"))
        .into();
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut banner = String::new();
    // Log lines come first; the banner follows them.
    for _ in 0..40 {
        if stderr.read_line(&mut banner).expect("read banner") == 0 || banner.contains("hsmctl unlock --keyfile") {
            break;
        }
    }
    // Keep draining stderr so the daemon never blocks on a full pipe.
    std::thread::spawn(move || for _ in stderr.lines() {});
    (child, socket, banner)
}

#[test]
fn dev_instance_prints_its_socket_and_a_loud_banner_and_answers_status() {
    let (mut child, socket, banner) = start_bare_dev();
    assert!(banner.contains("NOT FOR PRODUCTION"), "banner: {banner}");
    assert!(banner.contains("and is deleted when hsmd exits"), "banner: {banner}");
    assert!(
        socket.starts_with(std::env::temp_dir()),
        "dev socket {socket:?} should be in a temp dir"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let out = Command::new(bin("hsmctl"))
            .arg("status")
            .env("HSMD_SOCKET", &socket)
            .output()
            .expect("hsmctl");
        if out.status.success() {
            break String::from_utf8(out.stdout).expect("utf-8");
        }
        assert!(Instant::now() < deadline, "hsmctl status never succeeded: {out:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(text.contains("state:        unlocked"), "{text}");
    assert!(text.contains(&format!("hsmd {}", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(text.contains("dev (throw-away"), "{text}");
    assert!(text.contains(&format!("pid:          {}", child.id())), "{text}");

    let out = Command::new(bin("hsmctl"))
        .args(["--json", "status"])
        .env("HSMD_SOCKET", &socket)
        .output()
        .expect("hsmctl");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(v["state"], "unlocked", "--dev comes up initialized and unlocked");
    assert_eq!(v["dev_mode"], true);
    assert_eq!(v["pid"], child.id());
    assert_eq!(v["protocol_version"], protocol::PROTOCOL_VERSION);
    assert_eq!(v["connections"], 1, "only hsmctl's own connection is open: {v}");
    assert!(v["uptime_secs"].as_u64().is_some());

    // The dev socket is private to its owner.
    let mode = std::fs::metadata(&socket).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    assert_eq!(mode.expect("socket metadata") & 0o777, 0o600);

    kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "dev instance should exit 0 on SIGTERM: {status}");
    assert!(!socket.exists(), "socket removed at exit");
    assert!(
        !socket.parent().expect("parent").exists(),
        "dev scratch dir removed at exit"
    );
}

#[test]
fn whoami_reports_the_kernel_identity_and_why_it_was_admitted() {
    let d = Daemon::start();
    let out = d.hsmctl(&["--json", "whoami"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["uid"], nix::unistd::getuid().as_raw());
    assert_eq!(v["group"]["gid"], nix::unistd::getgid().as_raw());
    let exe = v["executable"].as_str().expect("executable known");
    assert!(exe.ends_with("/hsmctl"), "{exe}");
    assert!(v["admitted_because"].as_str().is_some_and(|s| !s.is_empty()));

    let text = d.hsmctl(&["whoami"]);
    let text = String::from_utf8(text.stdout).expect("utf-8");
    assert!(
        text.contains(&format!("uid:          {}", nix::unistd::getuid())),
        "{text}"
    );
}

#[test]
fn ping_round_trips_echo_the_payload() {
    let d = Daemon::start();
    let mut c = d.client();
    for size in [0usize, 1, 1000, 60_000] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        assert_eq!(c.ping(payload.clone()).expect("ping"), payload);
    }
    let out = d.hsmctl(&["--json", "ping", "-c", "5", "--size", "32"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["round_trips"], 5);
}

#[test]
fn hsmctl_names_the_cause_and_exits_3_when_hsmd_is_not_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no.sock");
    let out = Command::new(bin("hsmctl"))
        .arg("--socket")
        .arg(&missing)
        .arg("status")
        .output()
        .expect("hsmctl");
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8(out.stderr).expect("utf-8");
    assert!(
        err.contains(&format!("cannot connect to {}", missing.display())),
        "{err}"
    );
    assert!(err.contains("is hsmd running?"), "{err}");

    // A left-over socket file with nobody behind it.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let out = Command::new(bin("hsmctl"))
        .arg("--socket")
        .arg(&stale)
        .arg("status")
        .output()
        .expect("hsmctl");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no longer running"));

    let out = Command::new(bin("hsmctl"))
        .arg("no-such-command")
        .output()
        .expect("hsmctl");
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn dev_mode_told_where_its_state_and_socket_go_makes_no_scratch_dir() {
    // A scratch dir with no use would outlive a killed daemon in TMPDIR.
    let tmp = tempfile::tempdir().expect("tempdir");
    let tmp_path = tmp.path().to_str().expect("utf-8").to_owned();
    let mut d = Daemon::builder().dev().env("TMPDIR", &tmp_path).start();
    let status = String::from_utf8_lossy(&d.hsmctl(&["status"]).stdout).into_owned();
    assert!(status.contains("dev (throw-away"), "{status}");
    // The banner does not promise to delete a state directory it was given.
    let log = d.log();
    assert!(
        log.contains("and is kept when hsmd exits (--state-dir)") && !log.contains("is deleted when hsmd exits"),
        "{log}"
    );
    d.signal(Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(10));
    let left: Vec<_> = std::fs::read_dir(tmp.path()).expect("read tmp").collect();
    assert!(
        left.is_empty(),
        "hsmd --dev --state-dir --socket left {left:?} in TMPDIR"
    );
}
