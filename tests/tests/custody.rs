//! Issue 3, custody of the master key: `uninitialized → locked ⇄ unlocked`,
//! passphrase and key-file slots, back-off on wrong secrets, restarts, the
//! keystore file, and locking by itself.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    process::Output,
    thread,
    time::{Duration, Instant},
};

use hsmd_tests::check::{ok, refused};
use hsmd_tests::Daemon;
use nix::sys::signal::Signal;
use protocol::{ErrorCode, Operation, SecretBytes, ServiceState, UnlockSecret};

const PASS: &str = "correct horse battery staple";

fn state(d: &Daemon) -> ServiceState {
    d.client().status().expect("status").state
}

fn init_with_passphrase(d: &Daemon) {
    let out = d.hsmctl_with_stdin(&["init", "--passphrase-file", "-"], format!("{PASS}\n").as_bytes());
    assert!(ok(&out).contains("initialized"), "{out:?}");
}

/// Waits out the back-off a wrong secret started.
fn unlock_when_allowed(d: &Daemon, args: &[&str], stdin: &[u8]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = d.hsmctl_with_stdin(args, stdin);
        if !String::from_utf8_lossy(&out.stderr).contains("(rate-limited)") || Instant::now() > deadline {
            return out;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn init_lock_unlock_with_passphrase_and_keyfile_and_the_last_slot_stays() {
    let d = Daemon::start();
    assert_eq!(state(&d), ServiceState::Uninitialized);
    refused(&d.hsmctl(&["lock"]), "not-initialized");
    refused(&d.hsmctl_with_stdin(&["unlock"], b"whatever\n"), "not-initialized");

    init_with_passphrase(&d);
    assert_eq!(state(&d), ServiceState::Unlocked);
    refused(
        &d.hsmctl_with_stdin(&["init", "--passphrase-file", "-"], b"another passphrase\n"),
        "already-initialized",
    );

    let keyfile = d.dir().join("unlock.key");
    let out = ok(&d.hsmctl(&[
        "slot",
        "add",
        "--keyfile-out",
        keyfile.to_str().expect("utf-8"),
        "--label",
        "boot",
    ]));
    assert!(out.contains("added unlock slot 2"), "{out}");
    let meta = fs::metadata(&keyfile).expect("key file written");
    assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (32, 0o600));

    let out = ok(&d.hsmctl(&["--json", "slot", "list"]));
    let slots: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(slots[0]["kind"], "passphrase");
    assert_eq!(slots[0]["kdf"], "argon2id m=19456 t=2 p=1");
    assert_eq!(
        (slots[1]["kind"].as_str(), slots[1]["label"].as_str()),
        (Some("keyfile"), Some("boot"))
    );

    assert!(ok(&d.hsmctl(&["lock"])).contains("locked"));
    assert_eq!(state(&d), ServiceState::Locked);
    refused(
        &d.hsmctl_with_stdin(&["slot", "add"], b"yet another passphrase\n"),
        "locked",
    );

    // A wrong passphrase is refused clearly; an immediate retry meets the back-off.
    let err = refused(
        &d.hsmctl_with_stdin(&["unlock"], b"not the passphrase\n"),
        "unlock-failed",
    );
    assert!(err.contains("no passphrase slot accepts this passphrase"), "{err}");
    let err = refused(
        &d.hsmctl_with_stdin(&["unlock"], format!("{PASS}\n").as_bytes()),
        "rate-limited",
    );
    assert!(err.contains("try again in"), "{err}");
    assert_eq!(state(&d), ServiceState::Locked);

    let out = unlock_when_allowed(
        &d,
        &["unlock", "--passphrase-file", "-"],
        format!("{PASS}\n").as_bytes(),
    );
    assert!(ok(&out).contains("unlocked (slot 1)"));
    assert_eq!(state(&d), ServiceState::Unlocked);

    ok(&d.hsmctl(&["lock"]));
    let out = ok(&d.hsmctl(&["unlock", "--keyfile", keyfile.to_str().expect("utf-8")]));
    assert!(out.contains("unlocked (slot 2)"), "{out}");

    // Slots go only while unlocked, and never the last one.
    ok(&d.hsmctl(&["slot", "remove", "1"]));
    let err = refused(&d.hsmctl(&["slot", "remove", "2"]), "failed-precondition");
    assert!(err.contains("last unlock slot"), "{err}");
    refused(&d.hsmctl(&["slot", "remove", "9"]), "not-found");
    ok(&d.hsmctl(&["lock"]));
    refused(&d.hsmctl(&["slot", "remove", "2"]), "locked");
}

#[test]
fn a_slot_added_by_passphrase_unlocks_and_a_short_passphrase_is_refused_with_the_rule() {
    let d = Daemon::start();
    let err = refused(
        &d.hsmctl_with_stdin(&["init", "--passphrase-file", "-"], b"short\n"),
        "invalid-argument",
    );
    assert!(err.contains("8 to 1024 bytes"), "{err}");
    init_with_passphrase(&d);
    ok(&d.hsmctl_with_stdin(&["slot", "add", "--label", "backup"], b"the backup passphrase\n"));
    ok(&d.hsmctl(&["lock"]));
    let out = ok(&d.hsmctl_with_stdin(&["unlock"], b"the backup passphrase\n"));
    assert!(out.contains("slot 2"), "{out}");
}

#[test]
fn a_wrong_length_keyfile_is_refused_before_it_is_sent() {
    let d = Daemon::start();
    init_with_passphrase(&d);
    let short = d.dir().join("short.key");
    fs::write(&short, [1u8; 31]).expect("write");
    let out = d.hsmctl(&["unlock", "--keyfile", short.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exactly 32"), "{out:?}");
}

#[test]
fn back_off_doubles_with_each_wrong_secret() {
    let d = Daemon::start();
    init_with_passphrase(&d);
    ok(&d.hsmctl(&["lock"]));
    let mut c = d.client();
    let wrong = || Operation::Unlock {
        secret: UnlockSecret::Passphrase(SecretBytes::new(b"wrong passphrase".to_vec())),
    };
    let mut failed_sent = Instant::now();
    let err = c.call(wrong()).expect_err("wrong");
    assert_eq!(err.code(), Some(ErrorCode::UnlockFailed), "{err}");
    // How long the daemon refuses to try again after each failure: from when
    // the failing attempt was sent (its back-off starts later, when hsmd has
    // run Argon2 and counted it; its answer may come later still, after its
    // audit line is on disk) until the last refusal, so that neither a slow
    // answer nor the Argon2 run of the attempt then let through counts
    // against the back-off.
    let mut waits = Vec::new();
    for _ in 0..3 {
        let mut refused_until = failed_sent;
        loop {
            let sent = Instant::now();
            match c.call(wrong()) {
                Err(e) if e.code() == Some(ErrorCode::RateLimited) => {
                    refused_until = Instant::now();
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) if e.code() == Some(ErrorCode::UnlockFailed) => {
                    waits.push(refused_until - failed_sent);
                    failed_sent = sent;
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(waits[0] >= Duration::from_millis(150), "{waits:?}");
    assert!(waits[1] > waits[0] && waits[2] > waits[1], "waits grow: {waits:?}");
    assert!(d.log().contains("unlock failed uid=0"), "{}", d.log());
}

#[test]
fn a_restarted_daemon_comes_up_locked_and_unlocks_with_the_same_secret() {
    let mut d = Daemon::start();
    init_with_passphrase(&d);
    d.restart(false);
    assert_eq!(state(&d), ServiceState::Locked);
    ok(&d.hsmctl_with_stdin(&["unlock"], format!("{PASS}\n").as_bytes()));
    // An acknowledged init survives SIGKILL (every commit is durable).
    let fresh = Daemon::start();
    init_with_passphrase(&fresh);
    let mut fresh = fresh;
    fresh.restart(true);
    assert_eq!(state(&fresh), ServiceState::Locked);
    ok(&fresh.hsmctl_with_stdin(&["unlock"], format!("{PASS}\n").as_bytes()));
}

#[test]
fn keystore_files_are_private_and_hold_no_secret_in_clear() {
    let d = Daemon::start();
    init_with_passphrase(&d);
    let state_dir = d.dir().join("state");
    assert_eq!(
        fs::metadata(&state_dir).expect("state dir").permissions().mode() & 0o777,
        0o700
    );
    let mut seen = 0;
    for entry in fs::read_dir(&state_dir).expect("read state dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            // The file store's directory: private to hsmd, like the state dir.
            assert_eq!(
                fs::metadata(&path).expect("stat").permissions().mode() & 0o777,
                0o700,
                "{}",
                path.display()
            );
            continue;
        }
        assert_eq!(
            fs::metadata(&path).expect("stat").permissions().mode() & 0o777,
            0o600,
            "{}",
            path.display()
        );
        let bytes = fs::read(&path).expect("read");
        assert!(
            !bytes.windows(PASS.len()).any(|w| w == PASS.as_bytes()),
            "{}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen >= 1);
}

fn slot_column(d: &Daemon, sql: &str) {
    let conn = rusqlite::Connection::open(d.dir().join("state/keystore.sqlite")).expect("open");
    conn.execute_batch(sql).expect("edit");
}

#[test]
fn an_edited_slot_no_longer_unlocks_and_an_inflated_cost_is_refused_unrun() {
    let mut d = Daemon::start();
    init_with_passphrase(&d);
    let keyfile = d.dir().join("k.key");
    ok(&d.hsmctl(&["slot", "add", "--keyfile-out", keyfile.to_str().expect("utf-8")]));
    d.signal(Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    // Flip a byte of slot 1's sealed master key; make slot 2 claim a 4 TiB Argon2 cost.
    slot_column(
        &d,
        "UPDATE slots SET wrapped = CAST(substr(wrapped, 1, 20) || x'00' || substr(wrapped, 22) AS BLOB) WHERE id = 1;
         UPDATE slots SET kind = 'passphrase', params = replace(params, '\"kdf\":\"hkdf-sha256\"', '\"kdf\":\"argon2id\",\"memory_kib\":4294967295,\"iterations\":3,\"parallelism\":1') WHERE id = 2;",
    );
    d.restart(true);
    let started = Instant::now();
    // Slot 1's seal fails under the right passphrase (its check value says
    // the passphrase is right), and slot 2's parameters cannot even be tried:
    // both named as tampering, not as a wrong passphrase, and not counted
    // toward the back-off.
    for _ in 0..3 {
        let err = refused(
            &d.hsmctl_with_stdin(&["unlock"], format!("{PASS}\n").as_bytes()),
            "tampered",
        );
        assert!(err.contains("slot 2") && err.contains("edited"), "{err}");
        assert!(err.contains("slot 1's sealed master key was edited"), "{err}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no 4 TiB Argon2 run, no back-off"
    );
    assert!(d.log().contains("keystore record tampered"), "{}", d.log());
    assert_eq!(state(&d), ServiceState::Locked);
}

#[test]
fn a_slot_whose_seal_was_edited_is_tampering_for_its_own_secret_and_a_wrong_secret_for_others() {
    let mut d = Daemon::start();
    let keyfile = d.dir().join("k.key");
    let key = keyfile.to_str().expect("utf-8");
    ok(&d.hsmctl(&["init", "--keyfile-out", key]));
    d.signal(Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    // One byte of the sealed master key (past the 16-byte check value and the nonce).
    slot_column(
        &d,
        "UPDATE slots SET wrapped = CAST(substr(wrapped, 1, 40) || x'00' || substr(wrapped, 42) AS BLOB) WHERE id = 1;",
    );
    d.restart(true);
    let started = Instant::now();
    for _ in 0..3 {
        let err = refused(&d.hsmctl(&["unlock", "--keyfile", key]), "tampered");
        assert!(err.contains("slot 1's sealed master key was edited"), "{err}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not counted toward the back-off"
    );
    let stranger = d.dir().join("stranger.key");
    fs::write(&stranger, [7u8; 32]).expect("write");
    refused(
        &d.hsmctl(&["unlock", "--keyfile", stranger.to_str().expect("utf-8")]),
        "unlock-failed",
    );
    assert!(d.log().contains("keystore record tampered"), "{}", d.log());

    // A slot cut to another length is named too.
    d.signal(Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    slot_column(
        &d,
        "UPDATE slots SET wrapped = CAST(substr(wrapped, 1, 70) AS BLOB) WHERE id = 1;",
    );
    d.restart(true);
    let err = refused(&d.hsmctl(&["unlock", "--keyfile", key]), "tampered");
    assert!(err.contains("wrong length"), "{err}");
}

#[test]
fn a_slot_made_before_check_values_still_unlocks() {
    let mut d = Daemon::start();
    let keyfile = d.dir().join("k.key");
    let key = keyfile.to_str().expect("utf-8");
    ok(&d.hsmctl(&["init", "--keyfile-out", key]));
    ok(&d.hsmctl(&["key", "create", "k", "--type", "ed25519"]));
    d.signal(Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    // The seal alone, as slots were stored before: 60 bytes.
    slot_column(
        &d,
        "UPDATE slots SET wrapped = CAST(substr(wrapped, 17) AS BLOB) WHERE id = 1;",
    );
    let conn = rusqlite::Connection::open(d.dir().join("state/keystore.sqlite")).expect("open");
    let len: i64 = conn
        .query_row("SELECT length(wrapped) FROM slots WHERE id = 1", [], |r| r.get(0))
        .expect("slot");
    assert_eq!(len, 60);
    drop(conn);
    d.restart(true);
    ok(&d.hsmctl(&["unlock", "--keyfile", key]));
    ok(&d.hsmctl(&["key", "info", "k"]));
}

#[test]
fn unlock_keyfile_in_the_config_unlocks_at_start() {
    let d = Daemon::start();
    init_with_passphrase(&d);
    let keyfile = d.dir().join("boot.key");
    ok(&d.hsmctl(&["slot", "add", "--keyfile-out", keyfile.to_str().expect("utf-8")]));
    // The same daemon, restarted with a config that names the key file.
    let mut d = d;
    let config = d.dir().join("hsmd.toml");
    let mut text = fs::read_to_string(&config).expect("config");
    text = text.replacen(
        "[unlock]\n",
        &format!("[unlock]\nkeyfile = {:?}\n", keyfile.to_str().expect("utf-8")),
        1,
    );
    fs::write(&config, text).expect("config");
    d.restart(false);
    assert_eq!(state(&d), ServiceState::Unlocked);
    assert!(d.log().contains("unlocked at start with unlock.keyfile"), "{}", d.log());
}

#[test]
fn the_daemon_locks_by_itself_after_max_unlocked() {
    let d = Daemon::builder().unlock("max_unlocked", "\"1s\"").start();
    init_with_passphrase(&d);
    assert_eq!(state(&d), ServiceState::Unlocked);
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(&d) != ServiceState::Locked {
        assert!(Instant::now() < deadline, "still unlocked");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        d.log().contains("locked automatically: unlocked for longer than 1s"),
        "{}",
        d.log()
    );
}

#[test]
fn dev_mode_comes_up_unlocked_with_a_keyfile_to_unlock_again() {
    let d = Daemon::builder().dev().start();
    assert_eq!(state(&d), ServiceState::Unlocked);
    let keyfile = d.dir().join("state/dev.key");
    assert_eq!(
        fs::metadata(&keyfile).expect("dev key").permissions().mode() & 0o777,
        0o600
    );
    ok(&d.hsmctl(&["lock"]));
    assert_eq!(state(&d), ServiceState::Locked);
    ok(&d.hsmctl(&["unlock", "--keyfile", keyfile.to_str().expect("utf-8")]));
    assert_eq!(state(&d), ServiceState::Unlocked);
}

#[test]
fn secrets_never_reach_the_log() {
    let d = Daemon::start();
    init_with_passphrase(&d);
    ok(&d.hsmctl(&["lock"]));
    let _ = d.hsmctl_with_stdin(&["unlock"], b"a wrong passphrase here\n");
    let log = d.log();
    assert!(!log.contains(PASS) && !log.contains("a wrong passphrase here"), "{log}");
}

#[test]
fn parallel_guesses_get_one_try_and_the_rest_wait_their_turn() {
    let d = Daemon::start();
    init_with_passphrase(&d);
    ok(&d.hsmctl(&["lock"]));
    let mut clients: Vec<_> = (0..4).map(|_| d.client()).collect();
    // All four guesses are in the daemon before any answer comes back.
    for c in &mut clients {
        c.send(Operation::Unlock {
            secret: UnlockSecret::Passphrase(SecretBytes::new(b"guess guess guess".to_vec())),
        })
        .expect("send");
    }
    let mut codes: Vec<_> = clients
        .iter_mut()
        .map(|c| match c.recv().expect("answer").result {
            Err(e) => e.code,
            Ok(r) => panic!("a guess unlocked: {r:?}"),
        })
        .collect();
    codes.sort_by_key(|c| c.number());
    assert_eq!(
        codes,
        [
            ErrorCode::UnlockFailed,
            ErrorCode::RateLimited,
            ErrorCode::RateLimited,
            ErrorCode::RateLimited
        ],
        "only one guess may run the KDF; the others meet the back-off"
    );
}
