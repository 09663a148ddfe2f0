//! Memory hardening at start (issue 3, Memory): all memory locked where the
//! process may lock it, no core dumps, not dumpable; where locking is impossible,
//! production refuses to start and `require_lock = false` warns.

use std::{
    fs,
    os::unix::fs::{chown, MetadataExt, PermissionsExt},
    process::Command,
};

use hsmd_tests::{bin, is_root, Daemon, Prepared};

fn proc_status_field(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

#[test]
fn a_daemon_that_may_lock_memory_locks_all_of_it_and_cannot_dump_core() {
    if !is_root() {
        eprintln!("skipped: locking all memory needs CAP_IPC_LOCK (root in CI)");
        return;
    }
    let d = Daemon::builder().require_lock(true).start();
    let status = d.client().status().expect("status");
    assert!(status.memory_locked, "status reports locked memory");
    let locked = proc_status_field(d.pid(), "VmLck:");
    assert!(locked > 1024, "VmLck is {locked} kB");
    let limits = fs::read_to_string(format!("/proc/{}/limits", d.pid())).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    assert_eq!(core.split_whitespace().collect::<Vec<_>>()[4..6], ["0", "0"], "{core}");
    let text = String::from_utf8(d.hsmctl(&["status"]).stdout).expect("utf-8");
    assert!(text.contains("memory:       locked"), "{text}");
}

/// Prepares a daemon dir that `nobody` owns, with a copy of hsmd it can run.
fn prepared_for_nobody(require_lock: bool) -> (Prepared, std::path::PathBuf) {
    let prepared = Daemon::builder().require_lock(require_lock).prepare();
    chown(prepared.dir.path(), Some(65534), Some(65534)).expect("chown");
    let hsmd = prepared.dir.path().join("hsmd");
    fs::copy(bin("hsmd"), &hsmd).expect("copy hsmd");
    fs::set_permissions(&hsmd, fs::Permissions::from_mode(0o755)).expect("chmod");
    (prepared, hsmd)
}

fn as_nobody_with_small_memlock(hsmd: &std::path::Path, prepared: &Prepared) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["prlimit", "--memlock=65536:65536", "--"])
        .arg(hsmd)
        .arg("--config")
        .arg(&prepared.config);
    cmd
}

#[test]
fn production_refuses_to_start_when_memory_cannot_be_locked() {
    if !is_root() {
        eprintln!("skipped: needs root to act as nobody");
        return;
    }
    let (prepared, hsmd) = prepared_for_nobody(true);
    let out = as_nobody_with_small_memlock(&hsmd, &prepared).output().expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot lock memory"), "{err}");
    assert!(err.contains("RLIMIT_MEMLOCK is 64 KiB"), "{err}");
    assert!(err.contains("LimitMEMLOCK=infinity"), "the fix is named: {err}");
    assert!(!prepared.socket.exists(), "it never listened");
}

#[test]
fn without_require_lock_it_warns_serves_and_is_still_not_dumpable() {
    if !is_root() {
        eprintln!("skipped: needs root to act as nobody");
        return;
    }
    let (prepared, hsmd) = prepared_for_nobody(false);
    let socket = prepared.socket.clone();
    let mut cmd = as_nobody_with_small_memlock(&hsmd, &prepared);
    let d = prepared.spawn(&mut cmd, &socket);
    let status = d.client().status().expect("status");
    assert!(!status.memory_locked);
    assert!(d.log().contains("memory is NOT locked"), "{}", d.log());
    assert_eq!(proc_status_field(d.pid(), "VmLck:"), 0);
    assert_eq!(proc_status_field(d.pid(), "Uid:"), 65534, "really runs as nobody");
    // A non-dumpable process's /proc entries belong to root, not to its own uid,
    // so other processes of the same user cannot read or ptrace it.
    let owner = fs::metadata(format!("/proc/{}/environ", d.pid())).expect("stat").uid();
    assert_eq!(owner, 0, "/proc/PID/environ of a non-dumpable process is root's");
}
