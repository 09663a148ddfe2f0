//! Must show 6: under `systemd-socket-activate` hsmd serves on the inherited
//! socket; with NOTIFY_SOCKET pointing at a test datagram socket the test receives
//! READY=1 once the socket accepts, WATCHDOG=1 at half of WATCHDOG_USEC, and
//! STOPPING=1 on SIGTERM. Also: a live daemon's socket is never stolen, a stale
//! one is replaced.

use std::{
    os::unix::net::{UnixDatagram, UnixListener},
    process::Command,
    time::{Duration, Instant},
};

use hsmd_tests::Daemon;
use nix::sys::signal::Signal;

const ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// Collects notification datagrams until one contains `want`.
fn wait_for(notify: &UnixDatagram, seen: &mut Vec<String>, want: &str, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {want} within {limit:?}; got {seen:?}");
        notify.set_read_timeout(Some(left)).expect("timeout");
        if let Ok(n) = notify.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return Instant::now();
            }
        }
    }
}

#[test]
fn socket_activation_readiness_watchdog_and_stopping() {
    assert!(
        std::path::Path::new(ACTIVATE).exists(),
        "{ACTIVATE} is missing: install Debian's systemd package (.ci/run does)"
    );
    let prepared = Daemon::builder().prepare();
    let dir = prepared.dir.path().to_owned();
    let activated_socket = dir.join("activated.sock");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");

    let mut cmd = Command::new(ACTIVATE);
    cmd.arg("-l")
        .arg(&activated_socket)
        .arg("--fdname=hsmd")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg("--setenv=WATCHDOG_USEC=400000")
        .arg(hsmd_tests::bin("hsmd"))
        .arg("--config")
        .arg(&prepared.config);
    let configured_socket = prepared.socket.clone();
    // `spawn` waits until a hello is answered, which is the first connection that
    // makes systemd-socket-activate start hsmd on the socket it already holds.
    let mut d = prepared.spawn(&mut cmd, &activated_socket);
    let mut seen = Vec::new();
    wait_for(&notify, &mut seen, "READY=1", Duration::from_secs(10));
    assert!(
        seen.iter().any(|m| m.contains("STATUS=serving on")),
        "a STATUS line accompanies readiness: {seen:?}"
    );

    let mut c = d.client();
    let status = c.status().expect("serves on the inherited socket");
    assert_eq!(status.pid, d.pid(), "systemd-socket-activate execs hsmd in place");
    assert!(!configured_socket.exists(), "hsmd bound nothing of its own");
    assert!(d.log().contains("activated=true"), "{}", d.log());

    // Pings at half of the 400 ms the manager asked for.
    let first = wait_for(&notify, &mut seen, "WATCHDOG=1", Duration::from_secs(2));
    let second = wait_for(&notify, &mut seen, "WATCHDOG=1", Duration::from_secs(2));
    let gap = second - first;
    assert!(
        gap >= Duration::from_millis(120) && gap <= Duration::from_millis(390),
        "watchdog gap {gap:?}"
    );

    d.signal(Signal::SIGTERM);
    wait_for(&notify, &mut seen, "STOPPING=1", Duration::from_secs(5));
    assert!(d.wait_exit(Duration::from_secs(10)).success());
    assert!(
        activated_socket.exists(),
        "the activated socket belongs to systemd and is left in place"
    );
}

#[test]
fn ready_is_sent_only_once_the_socket_accepts() {
    let prepared = Daemon::builder().prepare();
    let notify_path = prepared.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind");
    let socket = prepared.socket.clone();
    let mut cmd = prepared.command();
    cmd.env("NOTIFY_SOCKET", &notify_path);
    let log = std::fs::File::create(prepared.dir.path().join("log")).expect("log");
    let mut child = cmd.stderr(log).spawn().expect("spawn");
    let mut seen = Vec::new();
    wait_for(&notify, &mut seen, "READY=1", Duration::from_secs(20));
    // Connect only after READY: it must succeed at once, with no retry.
    let status = protocol::Client::connect(&socket).and_then(|mut c| c.status());
    let _ = child.kill();
    let _ = child.wait();
    assert!(status.is_ok(), "{status:?}");
}

#[test]
fn a_live_daemons_socket_is_never_stolen() {
    let d = Daemon::start();
    // Its own state directory (the same one is refused before the socket is
    // looked at), the same socket.
    let second = Command::new(hsmd_tests::bin("hsmd"))
        .arg("--config")
        .arg(d.dir().join("hsmd.toml"))
        .arg("--state-dir")
        .arg(d.dir().join("second-state"))
        .output()
        .expect("run second hsmd");
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another hsmd is running on"), "{err}");
    assert_eq!(d.client().status().expect("first still serves").pid, d.pid());
}

#[test]
fn a_stale_socket_is_replaced_and_a_non_socket_is_left_alone() {
    let prepared = Daemon::builder().prepare();
    // A socket file whose daemon is gone.
    drop(UnixListener::bind(&prepared.socket).expect("bind"));
    assert!(prepared.socket.exists());
    let d = prepared.start();
    assert_eq!(d.client().status().expect("serves").pid, d.pid());
    drop(d);

    let prepared = Daemon::builder().prepare();
    std::fs::write(&prepared.socket, "not a socket").expect("write");
    let out = prepared.command().output().expect("run hsmd");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&prepared.socket).expect("still there"),
        "not a socket"
    );
}

#[test]
fn the_socket_gets_the_configured_mode() {
    use std::os::unix::fs::PermissionsExt;
    for mode in ["0600", "0660", "0666"] {
        let d = Daemon::builder().socket_mode(mode).start();
        let got = std::fs::metadata(&d.socket).expect("stat").permissions().mode() & 0o777;
        assert_eq!(format!("{got:04o}"), mode);
    }
}
