//! hsmd survives what is around it: a stderr whose reader died or stopped
//! reading, signals at any time, a second hsmd started on the same state.

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use hsmd_tests::{bin, Daemon};
use nix::sys::signal::Signal;
use protocol::{Client, KeyOptions, KeyType, Operation, Reply};

fn create(c: &mut Client, name: &str) {
    c.call(Operation::KeyCreate {
        name: name.into(),
        key_type: KeyType::Ed25519,
        usages: Vec::new(),
        options: KeyOptions::default(),
    })
    .expect("key create answered");
}

fn sign(c: &mut Client, name: &str, message: &[u8]) {
    use sha2::Digest as _;
    c.call(Operation::Sign(protocol::SignArgs {
        name: name.into(),
        // Ed25519 keys sign a SHA-512 digest.
        digest: sha2::Sha512::digest(message).to_vec(),
    }))
    .expect("sign answered");
}

/// The value of `hsmd_log_lines_dropped_total{reason=…}`.
fn dropped(d: &Daemon, reason: &str) -> f64 {
    let mut c = d.client();
    let Reply::Metrics { text } = c.call(Operation::Metrics).expect("metrics") else {
        panic!("metrics answer")
    };
    let needle = format!("hsmd_log_lines_dropped_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {needle} in metrics:\n{text}"))
}

/// Connections and requests that each log a few lines (the test config logs
/// at debug); every one must be answered promptly.
fn busy_and_answered(d: &Daemon, rounds: usize) {
    let mut c = d.client();
    let name = format!("s{rounds}");
    create(&mut c, &name);
    for i in 0..rounds {
        let started = Instant::now();
        let mut fresh = d.client();
        sign(&mut fresh, &name, format!("message {i}").as_bytes());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "round {i}: a connect and a signature took {:?}",
            started.elapsed()
        );
    }
}

fn stops_cleanly_on_sigterm(d: &mut Daemon) {
    let started = Instant::now();
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(2));
    assert!(status.success(), "hsmd exited {status} after SIGTERM");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_stderr_whose_reader_was_killed_costs_log_lines_not_service() {
    // As `hsmd 2>&1 | tee log`, then Ctrl-C on tee.
    let mut reader = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn cat");
    let pipe = reader.stdin.take().expect("cat's stdin");
    let mut d = Daemon::builder().dev().prepare().start_with_stderr(pipe.into());
    busy_and_answered(&d, 5);
    reader.kill().expect("kill the reader");
    reader.wait().expect("reap the reader");
    busy_and_answered(&d, 200);
    let failed = dropped(&d, "write_failed");
    assert!(failed > 0.0, "no log line counted as failed after the reader died");
    // A signal arriving while the daemon logs is still honoured.
    let mut c = d.client();
    assert_eq!(c.status().expect("status").pid, d.pid());
    stops_cleanly_on_sigterm(&mut d);
}

#[test]
fn a_stderr_nobody_reads_fills_and_hsmd_keeps_answering() {
    // A reader that is alive but never reads: the pipe fills after 64 KiB.
    let mut reader = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let pipe = reader.stdin.take().expect("sleep's stdin");
    let mut d = Daemon::builder().dev().prepare().start_with_stderr(pipe.into());
    // Well over what a pipe and the log queue hold together.
    busy_and_answered(&d, 1500);
    let full = dropped(&d, "queue_full");
    assert!(full > 0.0, "no log line counted as dropped with stderr full");
    stops_cleanly_on_sigterm(&mut d);
    let _ = reader.kill();
    let _ = reader.wait();
}

#[test]
fn a_second_hsmd_on_the_same_state_directory_refuses_naming_the_first() {
    let d = Daemon::builder().dev().start();
    let mut c = d.client();
    create(&mut c, "k");
    // Its own socket, so only the state directory is shared.
    let other_socket = d.dir().join("second.sock");
    let started = Instant::now();
    let out = Command::new(bin("hsmd"))
        .arg("--config")
        .arg(d.dir().join("hsmd.toml"))
        .arg("--socket")
        .arg(&other_socket)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .output()
        .expect("run a second hsmd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "second hsmd: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        stderr.contains(&format!("pid {}", d.pid())) && stderr.contains("state directory"),
        "the refusal names the first's pid and the directory: {stderr}"
    );
    assert!(!other_socket.exists(), "the second hsmd bound its socket");
    // The first keeps serving, and nothing the second did shows in its log.
    for i in 0..20 {
        sign(&mut c, "k", format!("after {i}").as_bytes());
    }
    thread::sleep(Duration::from_millis(100));
    let verify = d.hsmctl(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "audit verify after the refused second daemon: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}
