//! The audit log under ordinary faults and real tampering: SIGKILL at random
//! moments under load, torn tails, a full disk, `audit verify` on a busy
//! daemon whose log rotates, lines and files and key rows removed, events of
//! the daemon's own (scheduled rotation, purge, expiry, start, stop), and the
//! policy watcher reloading once per change.

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use hsmd_tests::check::{ok, p};
use hsmd_tests::{Daemon, DaemonBuilder, Prepared, SmallDisk};
use nix::sys::signal::Signal;
use protocol::{Client, ErrorCode, KeyOptions, KeyType, Operation, Reply};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// A dev daemon whose state survives restarts and that unlocks itself at
/// start with the dev key file.
fn restartable(builder: DaemonBuilder) -> Daemon {
    restartable_in(builder.dev().prepare())
}

fn restartable_in(prepared: Prepared) -> Daemon {
    let keyfile = prepared.dir.path().join("state").join("dev.key");
    let text = fs::read_to_string(&prepared.config).expect("config");
    let text = text.replacen("[unlock]\n", &format!("[unlock]\nkeyfile = {:?}\n", p(&keyfile)), 1);
    fs::write(&prepared.config, text).expect("config");
    prepared.start()
}

fn state(d: &Daemon) -> PathBuf {
    d.dir().join("state")
}

/// Every line of every audit file, oldest first, parsed.
fn lines(state: &Path) -> Vec<Value> {
    let mut files: Vec<(u32, PathBuf)> = fs::read_dir(state)
        .expect("state dir")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_str()?.to_owned();
            let n = if name == "audit.log" {
                0
            } else {
                name.strip_prefix("audit.log.")?.parse().ok()?
            };
            Some((n, path))
        })
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    files
        .iter()
        .flat_map(|(_, f)| {
            fs::read_to_string(f)
                .expect("read audit file")
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).expect("every audit line is JSON"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `hsmctl --json audit show ARGS`: one JSON line per event.
fn shown(d: &Daemon, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json", "audit", "show"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(&d.hsmctl(&all))).expect("one JSON array of events")
}

fn verify(c: &mut Client) -> Result<(u64, Vec<String>), String> {
    match c.call(Operation::AuditVerify) {
        Ok(Reply::AuditVerified {
            last_seq, recoveries, ..
        }) => Ok((last_seq, recoveries)),
        Ok(other) => Err(format!("unexpected reply {}", other.name())),
        Err(e) => Err(e.to_string()),
    }
}

fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("random");
    u64::from_le_bytes(b) % n
}

fn create(c: &mut Client, name: &str, key_type: KeyType, options: KeyOptions) -> Result<Reply, protocol::ClientError> {
    c.call(Operation::KeyCreate {
        name: name.into(),
        key_type,
        usages: Vec::new(),
        options,
    })
}

/// What the load of one round got acknowledged.
#[derive(Debug, Default)]
struct Acked {
    /// Signatures answered, by connection number.
    signs: HashMap<u64, u64>,
    created: Vec<String>,
    rotated: Vec<u32>,
}

#[test]
fn sigkill_at_random_moments_under_load_never_breaks_the_chain_or_loses_an_acknowledged_line() {
    let mut d = restartable(
        Daemon::builder()
            .keys("maintenance_interval", "\"100ms\"")
            .keys("min_rotation_period", "\"1s\""),
    );
    let mut c = d.client();
    create(&mut c, "s", KeyType::Ed25519, KeyOptions::default()).expect("create");
    create(&mut c, "r", KeyType::Ed25519, KeyOptions::default()).expect("create");
    create(
        &mut c,
        "auto",
        KeyType::Ed25519,
        KeyOptions {
            rotate_every_secs: Some(1),
            ..KeyOptions::default()
        },
    )
    .expect("create");
    drop(c);
    let (mut recovered_rounds, mut total_signs, mut total_lines) = (0, 0u64, 0usize);
    for round in 0..22 {
        let base = d.client().status().expect("status").audit.last_seq;
        let acked = Arc::new(Mutex::new(Acked::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for worker in 0..4 {
            let (socket, acked, stop) = (d.socket.clone(), Arc::clone(&acked), Arc::clone(&stop));
            workers.push(thread::spawn(move || {
                let Ok(mut c) = Client::connect(&socket) else { return };
                let conn = c.server().connection_id;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let result = match worker {
                        0 | 1 => c
                            .call(Operation::Sign(protocol::SignArgs {
                                name: "s".into(),
                                digest: vec![worker as u8; 64],
                            }))
                            .map(|_| *acked.lock().expect("lock").signs.entry(conn).or_default() += 1),
                        2 => {
                            let name = format!("c-{round}-{n}");
                            create(&mut c, &name, KeyType::HmacSha256, KeyOptions::default())
                                .map(|_| acked.lock().expect("lock").created.push(name))
                        }
                        _ => c.call(Operation::KeyRotate { name: "r".into() }).map(|reply| {
                            if let Reply::KeyUpdated(k) = reply {
                                acked.lock().expect("lock").rotated.push(k.version);
                            }
                        }),
                    };
                    if result.is_err() {
                        // The daemon died: anything not answered was not acknowledged.
                        return;
                    }
                }
            }));
        }
        thread::sleep(Duration::from_millis(50 + random_below(450)));
        d.signal(Signal::SIGKILL);
        d.wait_exit(Duration::from_secs(10));
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().expect("worker");
        }
        d.restart(true);
        let mut c = d.client();
        let (_, recoveries) = verify(&mut c).unwrap_or_else(|e| panic!("round {round}: audit verify failed: {e}"));
        let all = lines(&state(&d));
        // This round's lines: after `base`, up to the restarted daemon's start.
        let round_lines: Vec<&Value> = all
            .iter()
            .filter(|l| l["seq"].as_u64().expect("seq") > base)
            .take_while(|l| l["event_type"] != "DAEMON_STARTED")
            .collect();
        let acked = acked.lock().expect("lock");
        for (conn, n) in &acked.signs {
            let logged = round_lines
                .iter()
                .filter(|l| l["event_type"] == "SIGN" && l["connection"] == *conn && l["result"] == "success")
                .count() as u64;
            assert!(
                logged >= *n,
                "round {round}: connection {conn} had {n} signatures answered but only {logged} SIGN lines"
            );
            total_signs += n;
        }
        for name in &acked.created {
            assert!(
                round_lines
                    .iter()
                    .any(|l| l["event_type"] == "KEY_CREATED" && l["resource"] == format!("key:{name}")),
                "round {round}: key {name} was created and acknowledged but has no KEY_CREATED line"
            );
        }
        for v in &acked.rotated {
            assert!(
                round_lines.iter().any(|l| l["event_type"] == "KEY_ROTATED"
                    && l["resource"] == "key:r"
                    && l["metadata"]["version"] == *v),
                "round {round}: key r was rotated to version {v} (acknowledged) but has no KEY_ROTATED line"
            );
        }
        assert!(
            !all.iter().any(|l| l["event_type"] == "AUDIT_TAMPERED"),
            "round {round}: a crash was taken for tampering: {recoveries:?}"
        );
        if all
            .iter()
            .any(|l| l["event_type"] == "AUDIT_RECOVERED" && l["seq"].as_u64().expect("seq") > base)
        {
            recovered_rounds += 1;
        }
        total_lines = all.len();
    }
    eprintln!(
        "22 SIGKILLs: {total_signs} acknowledged signatures all logged, {recovered_rounds} restarts recovered \
         lines written after the last recorded head, {total_lines} lines verified"
    );
    // Rounds differ in timing; under a sustained load most kills land with
    // lines written past the keystore's head, which start-up adopts.
    assert!(recovered_rounds > 0, "no restart had anything to recover");
}

fn stop(d: &mut Daemon) {
    d.signal(Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
}

#[test]
fn a_torn_tail_is_cut_at_start_and_recorded_as_a_recovery_not_tampering() {
    let mut d = restartable(Daemon::builder());
    ok(&d.hsmctl(&["key", "create", "k", "--type", "ed25519"]));
    stop(&mut d);
    let log = state(&d).join("audit.log");
    let text = fs::read(&log).expect("log");
    let last_line = text[..text.len() - 1]
        .rsplit(|&b| b == b'\n')
        .next()
        .expect("a line")
        .to_vec();
    // 1. A write that stopped half-way through a line: the first half of one.
    let torn = last_line[..last_line.len() / 2].to_vec();
    // 2. Garbage without a newline, as a crash of the file system may leave.
    let garbage = b"\0\0\0\0\x07garbage".to_vec();
    for (what, tail) in [("half a line", torn), ("garbage", garbage)] {
        fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("open")
            .write_all(&tail)
            .expect("append");
        d.restart(false);
        let v: Value = serde_json::from_str(&ok(&d.hsmctl(&["--json", "audit", "verify"]))).expect("json");
        assert_eq!(v["valid"], true, "{what}: {v}");
        let recovered: Vec<Value> = lines(&state(&d))
            .into_iter()
            .filter(|l| l["event_type"] == "AUDIT_RECOVERED")
            .collect();
        let last = recovered.last().expect("an AUDIT_RECOVERED line");
        assert_eq!(last["metadata"]["cut_bytes"], tail.len() as u64, "{what}: {last}");
        assert_eq!(
            last["metadata"]["cut_sha256"],
            hex::encode(Sha256::digest(&tail)),
            "{what}: {last}"
        );
        let recoveries = v["recoveries"].as_array().expect("recoveries");
        assert!(
            recoveries.iter().any(|r| r
                .as_str()
                .is_some_and(|r| r.contains(&format!("cut {} bytes", tail.len())))),
            "{what}: verify does not report the recovery: {v}"
        );
        assert!(
            fs::read(&log).expect("log").ends_with(b"\n"),
            "{what}: the log does not end in a whole line"
        );
        stop(&mut d);
    }
    // A line the keystore recorded, cut: that is lines lost, not a torn write.
    let text = fs::read(&log).expect("log");
    fs::write(&log, &text[..text.len() - 20]).expect("cut");
    d.restart(false);
    let out = d.hsmctl(&["audit", "verify"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("(tampered)"), "{out:?}");
    assert!(
        lines(&state(&d)).iter().any(|l| l["event_type"] == "AUDIT_TAMPERED"),
        "no AUDIT_TAMPERED line for a cut recorded line"
    );
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what} did not happen within {limit:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn a_full_disk_refuses_audited_requests_with_audit_unavailable_and_service_resumes_by_itself() {
    hsmd_tests::require_root("mounting a small tmpfs");
    // Only the state directory is on the small disk (the daemon's own log is not).
    let prepared = Daemon::builder().dev().prepare();
    let disk = SmallDisk::mount(&prepared.dir.path().join("state"), "24m");
    let mut d = restartable_in(prepared);
    let mut c = d.client();
    create(&mut c, "k", KeyType::Ed25519, KeyOptions::default()).expect("create");
    let sign = |c: &mut Client| {
        c.call(Operation::Sign(protocol::SignArgs {
            name: "k".into(),
            digest: vec![1; 64],
        }))
    };
    sign(&mut c).expect("sign");
    let filler = disk.fill();

    // Audited requests are refused with the new code, naming the cause; the
    // first may still be served (its line goes into the space hsmd reserved).
    let mut refused = None;
    for _ in 0..50 {
        match sign(&mut c) {
            Ok(_) => thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("signing went on with the disk full");
    assert_eq!(refused.code(), Some(ErrorCode::AuditUnavailable), "{refused}");
    assert!(refused.to_string().contains("no space left on device"), "{refused}");
    let err = create(&mut c, "k2", KeyType::Ed25519, KeyOptions::default()).expect_err("create while full");
    assert_eq!(err.code(), Some(ErrorCode::AuditUnavailable), "{err}");
    // Liveness answers, and says what is wrong.
    c.ping(vec![1, 2, 3]).expect("ping");
    c.whoami().expect("whoami");
    let status = c.status().expect("status");
    assert!(!status.audit.healthy, "{:?}", status.audit);
    assert!(
        status.audit.detail.contains("no space left on device"),
        "{:?}",
        status.audit
    );
    let shown = ok(&d.hsmctl(&["status"]));
    assert!(
        shown.contains("audit:        FAILING: ") && shown.contains("no space left on device"),
        "{shown}"
    );
    let Reply::Metrics { text } = c.call(Operation::Metrics).expect("metrics") else {
        panic!("metrics")
    };
    assert!(text.contains("hsmd_audit_up 0"), "{text}");
    // The panic button still works; unlocking (audited) waits for the log.
    ok(&d.hsmctl(&["lock"]));
    let keyfile = state(&d).join("dev.key");
    let out = d.hsmctl(&["unlock", "--keyfile", p(&keyfile)]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(audit-unavailable)"),
        "{out:?}"
    );
    // Nothing half-written: every line whole.
    let log = fs::read(state(&d).join("audit.log")).expect("log");
    assert!(log.ends_with(b"\n"));
    for l in log.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        serde_json::from_slice::<Value>(l).expect("a whole JSON line");
    }

    // Space comes back: service resumes without a restart.
    fs::remove_file(&filler).expect("free space");
    wait_until("audit resuming", Duration::from_secs(10), || {
        c.status().is_ok_and(|s| s.audit.healthy)
    });
    ok(&d.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
    sign(&mut c).expect("sign after space came back");
    verify(&mut c).expect("verify after resuming");
    let resumed: Vec<Value> = lines(&state(&d))
        .into_iter()
        .filter(|l| l["event_type"] == "AUDIT_RESUMED")
        .collect();
    let resumed = resumed.last().expect("an AUDIT_RESUMED line");
    assert!(
        resumed["metadata"]["refused_requests"].as_u64().expect("refused") >= 2,
        "{resumed}"
    );
    assert!(
        resumed["metadata"]["message"]
            .as_str()
            .expect("message")
            .contains("no space left on device"),
        "{resumed}"
    );
    drop(c);
    d.restart(false);
    let mut c = d.client();
    verify(&mut c).expect("verify after a restart");
    sign(&mut c).expect("sign after a restart");
    drop(c);
    drop(d);
    drop(disk);

    // With the audit log off, a keystore write on a full disk says so too.
    let prepared = Daemon::builder().dev().extra("[audit]\nenabled = false\n").prepare();
    let disk = SmallDisk::mount(&prepared.dir.path().join("state"), "24m");
    let d = prepared.start();
    let mut c = d.client();
    create(&mut c, "a", KeyType::Ed25519, KeyOptions::default()).expect("create");
    create(&mut c, "files", KeyType::Aes256Gcm, KeyOptions::default()).expect("create");
    let data = d.dir().join("data");
    fs::write(&data, vec![7u8; 256 * 1024]).expect("write");
    let filler = disk.fill();
    let mut err = None;
    for i in 0..200 {
        if let Err(e) = create(&mut c, &format!("b{i}"), KeyType::Ed25519, KeyOptions::default()) {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("keys were created on a full disk");
    assert_eq!(err.code(), Some(ErrorCode::StorageUnavailable), "{err}");
    assert!(err.to_string().contains("no space left on device in"), "{err}");
    // A file stored on the full disk: the same code and words, nothing kept.
    let err = hsmd_tests::check::refused(&d.hsmctl(&["file", "store", p(&data)]), "storage-unavailable");
    assert!(err.contains("no space left on device in"), "{err}");
    fs::remove_file(filler).expect("free");
    create(&mut c, "after", KeyType::Ed25519, KeyOptions::default()).expect("create after space came back");
    assert!(
        !ok(&d.hsmctl(&["file", "list"])).contains("data"),
        "a file half stored is listed"
    );
    ok(&d.hsmctl(&["file", "store", p(&data)]));
    drop(c);
    drop(d);
}

fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().expect(cmd);
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn a_state_directory_gone_read_only_refuses_audited_requests_until_it_is_writable_again() {
    hsmd_tests::require_root("mounting");
    let prepared = Daemon::builder().dev().prepare();
    let st = prepared.dir.path().join("state");
    let disk = SmallDisk::mount(&st, "24m");
    let d = restartable_in(prepared);
    let mut c = d.client();
    create(&mut c, "k", KeyType::Ed25519, KeyOptions::default()).expect("create");
    // As an ext4 with errors=remount-ro does after an I/O error: the file
    // system hsmd writes to turns read-only under it.
    run("mount", &["--bind", p(&st), p(&st)]);
    run("mount", &["-o", "remount,ro,bind", p(&st)]);
    let sign = |c: &mut Client| {
        c.call(Operation::Sign(protocol::SignArgs {
            name: "k".into(),
            digest: vec![3; 64],
        }))
    };
    let mut refused = None;
    for _ in 0..50 {
        match sign(&mut c) {
            Ok(_) => thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("signing went on with a read-only state directory");
    assert_eq!(refused.code(), Some(ErrorCode::AuditUnavailable), "{refused}");
    assert!(refused.to_string().contains("is read-only"), "{refused}");
    c.status().expect("status");
    run("umount", &[p(&st)]);
    wait_until("audit resuming", Duration::from_secs(10), || {
        c.status().is_ok_and(|s| s.audit.healthy)
    });
    sign(&mut c).expect("sign once writable again");
    verify(&mut c).expect("verify");
    drop(c);
    drop(d);
    drop(disk);
}

#[test]
fn verify_on_a_busy_daemon_whose_log_rotates_never_reports_tampering() {
    let d = Daemon::builder()
        .dev()
        .extra("[audit]\nmax_file_bytes = 65536\nkeep_files = 3\n")
        .start();
    create(&mut d.client(), "k", KeyType::Ed25519, KeyOptions::default()).expect("create");
    let stop = Arc::new(AtomicBool::new(false));
    let signers: Vec<_> = (0..4)
        .map(|_| {
            let (socket, stop) = (d.socket.clone(), Arc::clone(&stop));
            thread::spawn(move || {
                let mut c = Client::connect(&socket).expect("connect");
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    c.call(Operation::Sign(protocol::SignArgs {
                        name: "k".into(),
                        digest: vec![2; 64],
                    }))
                    .expect("sign");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut c = d.client();
    let mut seen_first = Vec::new();
    for i in 0..100 {
        match c.call(Operation::AuditVerify) {
            Ok(Reply::AuditVerified { first_seq, .. }) => seen_first.push(first_seq),
            other => panic!("verify {i} under load: {other:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let signed: u64 = signers.into_iter().map(|s| s.join().expect("signer")).sum();
    let rotated_away = seen_first.iter().filter(|&&f| f > 1).count();
    eprintln!("100 verifies while 4 clients made {signed} signatures; {rotated_away} saw old files dropped");
    assert!(
        seen_first.last() > seen_first.first(),
        "the log never rotated files away during the run: {seen_first:?}"
    );
}

fn verify_fails_at(d: &Daemon, seq: u64, words: &str) -> String {
    let out = d.hsmctl(&["audit", "verify"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "went unnoticed: {out:?}");
    assert!(
        err.contains(&format!("audit log broken at seq {seq}:")) && err.contains(words) && err.contains("(tampered)"),
        "expected seq {seq} and {words:?}: {err}"
    );
    err
}

#[test]
fn lines_removed_from_the_front_a_removed_rotated_file_and_a_removed_log_are_named() {
    let mut d = restartable(Daemon::builder().extra("[audit]\nmax_file_bytes = 4096\nkeep_files = 50\n"));
    ok(&d.hsmctl(&["key", "create", "k", "--type", "hmac-sha256"]));
    let data = d.dir().join("d");
    fs::write(&data, "x").expect("write");
    // Enough lines for at least three rotated files whatever the paths' lengths.
    for i in 0..60 {
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
    stop(&mut d);
    let st = state(&d);
    // The current file may have just rotated; it needs lines for the case below.
    while fs::metadata(st.join("audit.log")).expect("log").len() == 0 {
        d.restart(false);
        stop(&mut d);
    }
    let saved = d.dir().join("saved");
    fs::create_dir_all(&saved).expect("mkdir");
    for e in fs::read_dir(&st).expect("state") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            fs::copy(e.path(), saved.join(e.file_name())).expect("copy");
        }
    }
    let restore = || {
        for e in fs::read_dir(&st).expect("state") {
            let path = e.expect("entry").path();
            if path.is_file() {
                fs::remove_file(path).expect("rm");
            }
        }
        for e in fs::read_dir(&saved).expect("saved") {
            let e = e.expect("entry");
            fs::copy(e.path(), st.join(e.file_name())).expect("copy");
        }
    };
    let rotated: Vec<PathBuf> = (1..50)
        .map(|i| st.join(format!("audit.log.{i}")))
        .filter(|p| p.exists())
        .collect();
    assert!(rotated.len() >= 3, "the log rotated: {rotated:?}");

    // The first lines of the oldest file.
    let oldest = rotated.last().expect("oldest").clone();
    let text = fs::read_to_string(&oldest).expect("oldest");
    fs::write(
        &oldest,
        text.lines().skip(2).map(|l| format!("{l}\n")).collect::<String>(),
    )
    .expect("write");
    d.restart(false);
    verify_fails_at(&d, 1, "removed from its front");
    stop(&mut d);

    // A whole rotated file in the middle.
    restore();
    let middle = &rotated[rotated.len() / 2];
    let first_missing: Value = serde_json::from_str(
        fs::read_to_string(middle)
            .expect("middle")
            .lines()
            .next()
            .expect("line"),
    )
    .expect("json");
    fs::remove_file(middle).expect("rm");
    d.restart(false);
    verify_fails_at(&d, first_missing["seq"].as_u64().expect("seq"), "are missing");
    stop(&mut d);

    // The oldest rotated file: the front of the retained log.
    restore();
    fs::remove_file(&oldest).expect("rm");
    d.restart(false);
    verify_fails_at(&d, 1, "removed from its front");
    stop(&mut d);

    // The whole current log, while stopped.
    restore();
    let current: Vec<Value> = fs::read_to_string(st.join("audit.log"))
        .expect("log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let first_current = current.first().expect("line")["seq"].as_u64().expect("seq");
    fs::remove_file(st.join("audit.log")).expect("rm");
    d.restart(false);
    verify_fails_at(&d, first_current, "are missing");
    assert!(lines(&st).iter().any(|l| l["event_type"] == "AUDIT_TAMPERED"));
    stop(&mut d);

    // Every file, while stopped.
    restore();
    for e in fs::read_dir(&st).expect("state") {
        let path = e.expect("entry").path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("audit.log"))
        {
            fs::remove_file(path).expect("rm");
        }
    }
    d.restart(false);
    verify_fails_at(&d, 1, "removed from its front");
    stop(&mut d);

    // The current log while hsmd runs: noticed at the next write.
    restore();
    d.restart(false);
    fs::remove_file(st.join("audit.log")).expect("rm");
    ok(&d.hsmctl(&["mac", "--force", "k", "-i", p(&data), "-o", p(&d.dir().join("t"))]));
    let tampered = lines(&st);
    assert!(
        tampered.iter().any(|l| l["event_type"] == "AUDIT_TAMPERED"
            && l["metadata"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("was removed or replaced while hsmd ran"))),
        "no AUDIT_TAMPERED line for a log removed under hsmd"
    );
    verify_fails_at(&d, first_current, "are missing");
}

#[test]
fn a_key_row_or_version_row_removed_while_stopped_is_named_at_unlock_and_other_keys_work() {
    let mut d = restartable(Daemon::builder());
    for k in ["keep", "gone", "old"] {
        ok(&d.hsmctl(&["key", "create", k, "--type", "ed25519"]));
    }
    ok(&d.hsmctl(&["key", "rotate", "old"]));
    ok(&d.hsmctl(&["key", "rotate", "old"]));
    stop(&mut d);
    {
        let db = rusqlite::Connection::open(state(&d).join("keystore.sqlite")).expect("open keystore");
        db.execute("PRAGMA foreign_keys=ON", []).expect("fk");
        assert_eq!(
            db.execute("DELETE FROM keys WHERE name = 'gone'", []).expect("delete"),
            1
        );
        let id: String = db
            .query_row("SELECT id FROM keys WHERE name = 'old'", [], |r| r.get(0))
            .expect("id");
        assert_eq!(
            db.execute("DELETE FROM key_versions WHERE key_id = ?1 AND version = 2", [&id])
                .expect("delete"),
            1
        );
    }
    d.restart(false);
    ok(&d.hsmctl(&["lock"]));
    let out = d.hsmctl(&["unlock", "--keyfile", p(&state(&d).join("dev.key"))]);
    ok(&out);
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(
        warned.contains("key \"gone\"") && warned.contains("removed from the keystore outside hsmd"),
        "{warned}"
    );
    assert!(warned.contains("version 2 of key \"old\" was removed"), "{warned}");
    // The same was found at start (unlocked by the key file) and audited.
    assert!(
        lines(&state(&d)).iter().any(|l| l["event_type"] == "UNLOCK"
            && l["metadata"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("key \"gone\""))),
        "the unlock's audit line does not name the removed key"
    );
    let data = d.dir().join("d");
    fs::write(&data, "x").expect("write");
    ok(&d.hsmctl(&["sign", "--force", "keep", "-i", p(&data), "-o", p(&d.dir().join("s1"))]));
    ok(&d.hsmctl(&["sign", "--force", "old", "-i", p(&data), "-o", p(&d.dir().join("s2"))]));
    let out = d.hsmctl(&["sign", "--force", "gone", "-i", p(&data), "-o", p(&d.dir().join("s3"))]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("removed from the keystore outside hsmd") && err.contains("(tampered)"),
        "{out:?}"
    );
    // Forgetting it ends the warning.
    ok(&d.hsmctl(&["key", "purge", "gone", "--yes"]));
    ok(&d.hsmctl(&["lock"]));
    let out = d.hsmctl(&["unlock", "--keyfile", p(&state(&d).join("dev.key"))]);
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(!warned.contains("\"gone\""), "{warned}");
    assert!(warned.contains("\"old\""), "{warned}");
}

#[test]
fn scheduled_rotation_purge_expiry_start_and_stop_are_audit_lines() {
    let mut d = restartable(
        Daemon::builder()
            .keys("maintenance_interval", "\"100ms\"")
            .keys("min_rotation_period", "\"1s\"")
            .keys("recovery_window", "\"7d\""),
    );
    ok(&d.hsmctl(&["key", "create", "ar", "--type", "ed25519", "--rotate-every", "2s"]));
    let created = shown(&d, &["--key", "ar", "--event", "KEY_CREATED"]);
    let meta = &created.first().expect("KEY_CREATED")["metadata"];
    assert_eq!(meta["key_type"], "ed25519", "{meta}");
    assert_eq!(meta["usages"], "sign,verify", "{meta}");
    assert_eq!(meta["rotate_every_secs"], 2, "{meta}");
    let mut c = d.client();
    let now = c.call(Operation::DebugClock { advance_secs: 0 }).expect("clock");
    let Reply::Clock { now_unix } = now else {
        panic!("{now:?}")
    };
    create(
        &mut c,
        "short",
        KeyType::Ed25519,
        KeyOptions {
            expire_at_unix: Some(now_unix + 3600),
            ..KeyOptions::default()
        },
    )
    .expect("create");
    ok(&d.hsmctl(&["key", "create", "doomed", "--type", "ed25519"]));
    ok(&d.hsmctl(&["key", "delete", "doomed"]));
    thread::sleep(Duration::from_millis(5000));
    let rotated = shown(&d, &["--key", "ar", "--event", "KEY_ROTATED"]);
    assert!(
        rotated.len() >= 2,
        "scheduled rotations are not in the log: {rotated:?}"
    );
    assert!(
        rotated.iter().all(|l| l["user"] == "hsmd" && l["connection"] == 0),
        "{rotated:?}"
    );
    let info: Value = serde_json::from_str(&ok(&d.hsmctl(&["--json", "key", "info", "ar"]))).expect("json");
    let version = info["version"].as_u64().expect("version");
    assert_eq!(
        rotated.last().expect("line")["metadata"]["version"],
        version,
        "the newest KEY_ROTATED names the key's version"
    );
    // The recovery window and the expiry time pass.
    c.call(Operation::DebugClock {
        advance_secs: 8 * 86_400,
    })
    .expect("clock");
    wait_until("the purge", Duration::from_secs(10), || {
        !d.hsmctl(&["key", "info", "doomed"]).status.success()
    });
    // Maintenance writes the line just after the purge commits: wait for it
    // rather than race it.
    wait_until(
        "the purge line (end of the recovery window)",
        Duration::from_secs(10),
        || {
            lines(&state(&d)).iter().any(|l| {
                l["event_type"] == "KEY_PURGED"
                    && l["resource"] == "key:doomed"
                    && l["user"] == "hsmd"
                    && l["result"] == "success"
            })
        },
    );
    wait_until("the expiry line", Duration::from_secs(10), || {
        lines(&state(&d))
            .iter()
            .any(|l| l["event_type"] == "KEY_STATE_CHANGED" && l["resource"] == "key:short" && l["action"] == "expire")
    });
    stop(&mut d);
    d.restart(false);
    let table = ok(&d.hsmctl(&["audit", "show", "--limit", "100000"]));
    for event in [
        "DAEMON_STARTED",
        "DAEMON_STOPPED",
        "KEY_ROTATED",
        "KEY_PURGED",
        "KEY_STATE_CHANGED",
    ] {
        assert!(table.contains(event), "audit show lacks {event}:\n{table}");
    }
    let starts = shown(&d, &["--event", "DAEMON_STARTED"]);
    let start = &starts.last().expect("start")["metadata"];
    assert_eq!(start["daemon_version"], env!("CARGO_PKG_VERSION"), "{start}");
    assert_eq!(
        start["config_sha256"],
        hex::encode(Sha256::digest(fs::read(d.dir().join("hsmd.toml")).expect("config"))),
        "{start}"
    );
}

fn count(state: &Path, event: &str) -> usize {
    lines(state).iter().filter(|l| l["event_type"] == event).count()
}

#[test]
fn one_change_of_the_policy_file_is_one_reload_and_a_bad_edit_one_error() {
    let uid = nix::unistd::getuid().as_raw();
    let policy = format!(
        "[roles.signer]\npermissions = [ {{ resource = \"keys\", action = \"*\", keys = \"*\" }}, \
         {{ resource = \"audit\", action = \"read\" }}, {{ resource = \"policy\", action = \"read\" }} ]\n\n\
         [[bind]]\nusers = [\"{uid}\"]\nroles = [\"signer\"]\n"
    );
    let prepared = Daemon::builder().policy(&policy).prepare();
    let path = prepared.dir.path().join("policy.toml");
    let mut d = prepared.start();
    let st = state(&d);
    thread::sleep(Duration::from_millis(500));
    let before = count(&st, "POLICY_RELOADED");
    // touch: one reload, and no more in the next 3 s (no reload loop).
    let out = std::process::Command::new("touch").arg(&path).output().expect("touch");
    assert!(out.status.success());
    thread::sleep(Duration::from_secs(3));
    assert_eq!(count(&st, "POLICY_RELOADED") - before, 1, "one touch, one reload");
    // An invalid edit: one CONFIG_ERROR, and the old policy stays.
    fs::write(&path, "this is = = not toml").expect("write");
    thread::sleep(Duration::from_secs(3));
    assert_eq!(count(&st, "CONFIG_ERROR"), 1, "one bad edit, one error");
    assert_eq!(count(&st, "POLICY_RELOADED") - before, 1);
    let shown = ok(&d.hsmctl(&["policy", "show"]));
    assert!(shown.contains("[roles.signer]"), "the previous policy stays: {shown}");
    // SIGHUP reloads at once and checks the config file.
    fs::write(&path, &policy).expect("fix");
    thread::sleep(Duration::from_secs(1));
    let reloaded = count(&st, "POLICY_RELOADED");
    d.signal(Signal::SIGHUP);
    wait_until("SIGHUP's reload", Duration::from_secs(5), || {
        count(&st, "CONFIG_CHECKED") == 1
    });
    assert_eq!(count(&st, "POLICY_RELOADED"), reloaded + 1);
    assert!(d.is_running(), "SIGHUP stopped hsmd");
}
