//! Backup and restore (issue 4, must-show 6): an archive made from a live
//! keystore restores into a fresh daemon with every key, version, state and
//! counter; a damaged archive is refused by verify and restore and changes
//! nothing; a live keystore is replaced only with --force.

use std::{fs, path::Path};

use hsmd_tests::check::{json, ok, p, refused};
use hsmd_tests::Daemon;
use serde_json::Value;

/// Key metadata that a restore must bring back exactly (use times aside,
/// since the daemon keeps counting while the test runs).
fn keys_summary(d: &Daemon) -> Vec<Value> {
    let list = json(&d.hsmctl(&["--json", "key", "list"]));
    list.as_array()
        .expect("array")
        .iter()
        .map(|k| {
            serde_json::json!({
                "name": k["name"], "id": k["id"], "type": k["key_type"], "version": k["version"],
                "state": k["state"], "deleted": k["deleted_unix"], "labels": k["labels"],
                "rotate": k["rotate_every_secs"], "min_decrypt": k["min_decrypt_version"],
                "uses": k["versions"].as_array().expect("versions").iter().map(|v| v["use_count"].clone()).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// `hsmctl --json status`, which exits 2 while hsmd is locked or uninitialized.
fn status(d: &Daemon) -> Value {
    let out = d.hsmctl(&["--json", "status"]);
    assert!(matches!(out.status.code(), Some(0 | 2)), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("json")
}

/// A fresh daemon on an empty state directory, as on another machine.
fn fresh() -> Daemon {
    let d = Daemon::start();
    assert_eq!(status(&d)["state"], "uninitialized");
    d
}

#[test]
fn a_backup_restores_every_key_version_state_and_counter_into_a_fresh_daemon() {
    let d = Daemon::start();
    let dir = d.dir().to_owned();
    let keyfile = dir.join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", p(&keyfile)]));
    let data = dir.join("data");
    fs::write(&data, b"ledger").expect("write");
    ok(&d.hsmctl(&[
        "key",
        "create",
        "rel",
        "--type",
        "ed25519",
        "--label",
        "team=ci",
        "--rotate-every",
        "90d",
    ]));
    ok(&d.hsmctl(&["key", "create", "p384", "--type", "ecdsa-p384"]));
    ok(&d.hsmctl(&["key", "create", "vault", "--type", "aes256-gcm"]));
    ok(&d.hsmctl(&["key", "create", "tags", "--type", "hmac-sha256"]));
    ok(&d.hsmctl(&["key", "create", "old", "--type", "ed25519"]));
    ok(&d.hsmctl(&["key", "create", "trash", "--type", "ecdsa-p256"]));
    ok(&d.hsmctl(&[
        "sign",
        "--force",
        "rel",
        "-i",
        p(&data),
        "-o",
        p(&dir.join("rel.v1.sig")),
    ]));
    ok(&d.hsmctl(&["key", "rotate", "rel"]));
    ok(&d.hsmctl(&[
        "sign",
        "--force",
        "rel",
        "-i",
        p(&data),
        "-o",
        p(&dir.join("rel.v2.sig")),
    ]));
    ok(&d.hsmctl(&[
        "sign",
        "--force",
        "p384",
        "-i",
        p(&data),
        "-o",
        p(&dir.join("p384.sig")),
    ]));
    ok(&d.hsmctl(&[
        "encrypt",
        "--force",
        "vault",
        "-i",
        p(&data),
        "-o",
        p(&dir.join("data.enc")),
    ]));
    ok(&d.hsmctl(&["key", "rotate", "vault"]));
    ok(&d.hsmctl(&["key", "set", "vault", "--min-decrypt-version", "2"]));
    ok(&d.hsmctl(&[
        "encrypt",
        "--force",
        "vault",
        "-i",
        p(&data),
        "-o",
        p(&dir.join("data.v2.enc")),
    ]));
    ok(&d.hsmctl(&["mac", "--force", "tags", "-i", p(&data), "-o", p(&dir.join("data.mac"))]));
    ok(&d.hsmctl(&["sign", "--force", "old", "-i", p(&data), "-o", p(&dir.join("old.sig"))]));
    ok(&d.hsmctl(&["key", "deactivate", "old"]));
    ok(&d.hsmctl(&["key", "delete", "trash"]));
    let before = keys_summary(&d);

    let by_master = dir.join("master.hsmdbak");
    let by_pass = dir.join("pass.hsmdbak");
    let pass_file = dir.join("backup-pass");
    fs::write(&pass_file, "correct horse battery staple\n").expect("write");
    let made = json(&d.hsmctl(&["--json", "backup", "create", "--format", "2", p(&by_master)]));
    assert_eq!(made["keys"], 6);
    assert_eq!(made["protection"], "master-key");
    ok(&d.hsmctl(&[
        "backup",
        "create",
        "--format",
        "2",
        "--force",
        p(&by_pass),
        "--passphrase-file",
        p(&pass_file),
    ]));
    let out = d.hsmctl(&["backup", "create", p(&by_pass)]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("it exists; add --force to replace it"),
        "{out:?}"
    );
    // The archives reveal nothing: no key name in the sealed part, no material.
    let raw = fs::read(&by_pass).expect("read");
    assert!(!raw.windows(6).any(|w| w == b"ledger"));

    // Verify: checksum only, then with secrets.
    let v = json(&d.hsmctl(&["--json", "backup", "verify", p(&by_master)]));
    assert_eq!(v["authenticated"], false);
    let v = json(&d.hsmctl(&["--json", "backup", "verify", p(&by_master), "--keyfile", p(&keyfile)]));
    assert_eq!(v["authenticated"], true);
    let v = json(&d.hsmctl(&[
        "--json",
        "backup",
        "verify",
        p(&by_pass),
        "--passphrase-file",
        p(&pass_file),
    ]));
    assert_eq!(v["authenticated"], true);

    // A live keystore is replaced only with --force.
    let err = refused(
        &d.hsmctl(&["backup", "restore", p(&by_master), "--keyfile", p(&keyfile)]),
        "already-initialized",
    );
    assert!(err.contains("--force"), "{err}");

    // Another machine: a fresh daemon restores the master-key archive with the
    // old slot's key file, and a third one the passphrase archive.
    for (archive, secret) in [
        (&by_master, ["--keyfile", p(&keyfile)]),
        (&by_pass, ["--passphrase-file", p(&pass_file)]),
    ] {
        let other = fresh();
        let copy = other.dir().join("in.hsmdbak");
        fs::copy(archive, &copy).expect("copy");
        let out = ok(&other.hsmctl(&["backup", "restore", p(&copy), secret[0], secret[1]]));
        assert!(out.contains("hsmd is locked"), "{out}");
        assert_eq!(status(&other)["state"], "locked");
        ok(&other.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
        assert_eq!(keys_summary(&other), before, "same keys, versions, states, counters");
        let sig = |n: &str| dir.join(n);
        for (key, s) in [
            ("rel", "rel.v1.sig"),
            ("rel", "rel.v2.sig"),
            ("p384", "p384.sig"),
            ("old", "old.sig"),
        ] {
            ok(&other.hsmctl(&["verify", key, "-i", p(&data), "-s", p(&sig(s))]));
        }
        ok(&other.hsmctl(&["mac-verify", "tags", "-i", p(&data), "-t", p(&dir.join("data.mac"))]));
        let out = other.dir().join("plain");
        ok(&other.hsmctl(&[
            "decrypt",
            "--force",
            "vault",
            "-i",
            p(&dir.join("data.v2.enc")),
            "-o",
            p(&out),
        ]));
        assert_eq!(fs::read(&out).expect("read"), b"ledger");
        // States came along: the v1 ciphertext stays below the minimum, the
        // deactivated key does not sign, the deleted key can be restored.
        refused(
            &other.hsmctl(&[
                "decrypt",
                "vault",
                "-i",
                p(&dir.join("data.enc")),
                "-o",
                p(&out),
                "--force",
            ]),
            "key-state",
        );
        refused(
            &other.hsmctl(&["sign", "old", "-i", p(&data), "-o", p(&out), "--force"]),
            "key-state",
        );
        ok(&other.hsmctl(&["key", "restore", "trash"]));
        ok(&other.hsmctl(&[
            "sign",
            "--force",
            "rel",
            "-i",
            p(&data),
            "-o",
            p(&other.dir().join("new.sig")),
        ]));
    }

    // With --force the live keystore is replaced and the old file kept aside.
    ok(&d.hsmctl(&["key", "create", "after-backup", "--type", "ed25519"]));
    ok(&d.hsmctl(&["backup", "restore", p(&by_master), "--keyfile", p(&keyfile), "--force"]));
    ok(&d.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
    refused(&d.hsmctl(&["key", "info", "after-backup"]), "not-found");
    let kept = fs::read_dir(dir.join("state"))
        .expect("state dir")
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("keystore.sqlite.before-restore-")
        });
    assert!(kept, "the replaced keystore is kept aside");

    // A wrong backup passphrase is refused. It counts toward the uid's unlock
    // back-off (custody.rs shows the back-off), so it comes last: a fast
    // machine would otherwise reach the restore above inside the 250 ms wait.
    let wrong = dir.join("wrong");
    fs::write(&wrong, "not the passphrase at all").expect("write");
    refused(
        &d.hsmctl(&["backup", "verify", p(&by_pass), "--passphrase-file", p(&wrong)]),
        "unlock-failed",
    );
}

#[test]
fn a_damaged_archive_fails_verify_and_restore_and_changes_nothing() {
    let d = Daemon::start();
    let dir = d.dir().to_owned();
    let keyfile = dir.join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", p(&keyfile)]));
    ok(&d.hsmctl(&["key", "create", "k", "--type", "ed25519"]));
    let archive = dir.join("b.hsmdbak");
    ok(&d.hsmctl(&["backup", "create", "--format", "2", "--force", p(&archive)]));
    let bytes = fs::read(&archive).expect("read");

    let other = fresh();
    let state_before: Vec<_> = fs::read_dir(other.dir().join("state"))
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    // One flipped byte in the header, the sealed keystore, and the checksum.
    for at in [20, bytes.len() / 2, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x10;
        let path = other.dir().join(format!("bad-{at}.hsmdbak"));
        fs::write(&path, &bad).expect("write");
        let err = refused(&other.hsmctl(&["backup", "verify", p(&path)]), "invalid-argument");
        assert!(err.contains("checksum does not match"), "{err}");
        refused(
            &other.hsmctl(&["backup", "verify", p(&path), "--keyfile", p(&keyfile)]),
            "invalid-argument",
        );
        let err = refused(
            &other.hsmctl(&["backup", "restore", p(&path), "--keyfile", p(&keyfile)]),
            "invalid-argument",
        );
        assert!(err.contains("not a usable hsmd backup"), "{err}");
        assert_eq!(status(&other)["state"], "uninitialized");
    }
    let truncated = other.dir().join("short.hsmdbak");
    fs::write(&truncated, &bytes[..bytes.len() - 100]).expect("write");
    refused(
        &other.hsmctl(&["backup", "restore", p(&truncated), "--keyfile", p(&keyfile)]),
        "invalid-argument",
    );
    let state_after: Vec<_> = fs::read_dir(other.dir().join("state"))
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        state_before, state_after,
        "no file added or removed in the state directory"
    );
    // The good archive still restores there.
    let good = other.dir().join("good.hsmdbak");
    fs::write(&good, &bytes).expect("write");
    ok(&other.hsmctl(&["backup", "restore", p(&good), "--keyfile", p(&keyfile)]));
    ok(&other.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
    ok(&other.hsmctl(&["key", "info", "k"]));
}

#[test]
fn a_backup_needs_the_keystore_unlocked_and_the_right_slot_secret() {
    let d = Daemon::start();
    let dir = d.dir().to_owned();
    let keyfile = dir.join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", p(&keyfile)]));
    ok(&d.hsmctl(&["lock"]));
    refused(
        &d.hsmctl(&["backup", "create", "--force", p(&dir.join("x.hsmdbak"))]),
        "locked",
    );
    assert!(!dir.join("x.hsmdbak").exists());
    ok(&d.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
    let archive = dir.join("b.hsmdbak");
    ok(&d.hsmctl(&["backup", "create", "--format", "2", "--force", p(&archive)]));
    let other = fresh();
    let stranger = other.dir().join("stranger.key");
    fs::write(&stranger, [7u8; 32]).expect("write");
    let err = refused(
        &other.hsmctl(&["backup", "restore", p(&archive), "--keyfile", p(&stranger)]),
        "unlock-failed",
    );
    assert!(err.contains("no keyfile slot of the backup accepts"), "{err}");
    assert_eq!(status(&other)["state"], "uninitialized");
}

/// `archive` with one byte of its sealed keystore flipped and its checksum
/// recomputed, so that only the seal can tell.
fn edited_with_checksum_recomputed(archive: &[u8]) -> Vec<u8> {
    use sha2::{Digest as _, Sha256};
    let header_len = u32::from_be_bytes(archive[8..12].try_into().expect("4 bytes")) as usize;
    let sealed_at = 12 + header_len;
    let mut bad = archive[..archive.len() - 32].to_vec();
    // Past the nonce, inside the ciphertext.
    bad[sealed_at + 40] ^= 0x01;
    let sum = Sha256::digest(&bad);
    bad.extend_from_slice(&sum);
    bad
}

#[test]
fn an_archive_edited_under_a_recomputed_checksum_is_named_as_tampering_not_a_wrong_secret() {
    let d = Daemon::start();
    let dir = d.dir().to_owned();
    let keyfile = dir.join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", p(&keyfile)]));
    ok(&d.hsmctl(&["key", "create", "k", "--type", "ed25519"]));
    let pass_file = dir.join("backup-pass");
    fs::write(&pass_file, "correct horse battery staple\n").expect("write");
    let wrong = dir.join("wrong");
    fs::write(&wrong, "not the passphrase at all\n").expect("write");
    let by_master = dir.join("master.hsmdbak");
    let by_pass = dir.join("pass.hsmdbak");
    ok(&d.hsmctl(&["backup", "create", "--format", "2", "--force", p(&by_master)]));
    ok(&d.hsmctl(&[
        "backup",
        "create",
        "--format",
        "2",
        "--force",
        p(&by_pass),
        "--passphrase-file",
        p(&pass_file),
    ]));
    let header = |path: &Path| -> Value {
        let bytes = fs::read(path).expect("read");
        let len = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        serde_json::from_slice(&bytes[12..12 + len]).expect("header")
    };
    assert_eq!(header(&by_pass)["manifest"]["format"], 2);
    assert_eq!(header(&by_pass)["check"].as_str().map(str::len), Some(32));

    let other = fresh();
    for (archive, secret) in [
        (&by_master, ["--keyfile", p(&keyfile)]),
        (&by_pass, ["--passphrase-file", p(&pass_file)]),
    ] {
        let bad = other.dir().join("edited.hsmdbak");
        fs::write(&bad, edited_with_checksum_recomputed(&fs::read(archive).expect("read"))).expect("write");
        // The checksum alone finds nothing.
        ok(&other.hsmctl(&["backup", "verify", p(&bad)]));
        // Tampering is not a wrong secret, so it is not counted: asking
        // again at once is not held back.
        for cmd in ["verify", "restore", "verify"] {
            let err = refused(
                &other.hsmctl(&["backup", cmd, p(&bad), secret[0], secret[1]]),
                "tampered",
            );
            assert!(
                err.contains("backup archive tampered") && err.contains("recomputed"),
                "{err}"
            );
        }
        assert_eq!(status(&other)["state"], "uninitialized");
    }
    // A wrong passphrase is still a wrong passphrase.
    let bad = other.dir().join("edited.hsmdbak");
    fs::write(
        &bad,
        edited_with_checksum_recomputed(&fs::read(&by_pass).expect("read")),
    )
    .expect("write");
    refused(
        &other.hsmctl(&["backup", "verify", p(&bad), "--passphrase-file", p(&wrong)]),
        "unlock-failed",
    );
    assert!(other.log().contains("backup archive tampered"), "{}", other.log());
}

/// A whole-state archive (format 3) written to a descriptor through the
/// client library, and checked back through one.
mod whole_state {
    use std::{fs, os::fd::AsFd as _, path::Path};

    use hsmd_tests::check::{json, ok, p, refused};
    use hsmd_tests::Daemon;
    use protocol::{ArchiveSummary, BackupContents, BackupProtection, Operation, Reply, SecretBytes, UnlockSecret};

    fn write(d: &Daemon, out: &Path, contents: BackupContents) -> ArchiveSummary {
        let file = fs::File::create(out).expect("create the archive");
        let op = Operation::BackupWrite {
            protection: BackupProtection::MasterKey,
            contents,
        };
        match d.client().call_with_fd(op, file.as_fd()).expect("backup-write") {
            Reply::BackupWritten(s) => s,
            other => panic!("{other:?}"),
        }
    }

    /// Hidden files beside the keystore (scratch copies are `.NAME.tmp`).
    fn scratch_files(d: &Daemon) -> Vec<String> {
        fs::read_dir(d.dir().join("state"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    fn check(d: &Daemon, archive: &[u8], secret: Option<UnlockSecret>) -> Result<ArchiveSummary, String> {
        let path = d.dir().join("to-check");
        fs::write(&path, archive).expect("write");
        let file = fs::File::open(&path).expect("open");
        match d.client().call_with_fd(Operation::BackupCheck { secret }, file.as_fd()) {
            Ok(Reply::BackupChecked(s)) => Ok(s),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn an_archive_of_keys_files_and_audit_log_checks_clean_and_names_any_damaged_part() {
        let d = Daemon::start();
        let keyfile = d.dir().join("unlock.key");
        ok(&d.hsmctl(&["init", "--keyfile-out", p(&keyfile)]));
        let secret = || UnlockSecret::Keyfile(SecretBytes::new(fs::read(&keyfile).expect("keyfile")));
        ok(&d.hsmctl(&["key", "create", "files", "--type", "aes256-gcm"]));
        let mut sizes = Vec::new();
        for (i, size) in [0usize, 1000, 200 * 1024].into_iter().enumerate() {
            let src = d.dir().join(format!("f{i}"));
            fs::write(&src, vec![i as u8; size]).expect("write");
            ok(&d.hsmctl(&["file", "store", p(&src), "--key", "files"]));
            sizes.push(size);
        }
        let out = d.dir().join("state.hsmdbak");
        let all = BackupContents {
            files: true,
            audit: true,
        };
        let written = write(&d, &out, all);
        assert_eq!(written.files, 3);
        assert!(written.audit_files >= 1 && written.audit_bytes > 0, "{written:?}");
        // Each stored file is its header, its metadata and one segment.
        assert_eq!(written.parts, 1 + 3 * 3 + written.audit_files, "{written:?}");
        let archive = fs::read(&out).expect("read");
        assert_eq!(written.archive_bytes, archive.len() as u64);
        // Sealed: no stored file's bytes and no audit line in clear.
        let audit_line = fs::read_to_string(d.dir().join("state/audit.log")).expect("audit log");
        let first_line = audit_line.lines().next().expect("a line");
        assert!(!archive.windows(first_line.len()).any(|w| w == first_line.as_bytes()));
        assert!(!archive.windows(1000).any(|w| w.iter().all(|b| *b == 1)));

        let unkeyed = check(&d, &archive, None).expect("checks without a secret");
        assert!(!unkeyed.manifest.authenticated);
        assert_eq!(
            (unkeyed.files, unkeyed.parts, unkeyed.file_bytes),
            (3, written.parts, written.file_bytes)
        );
        let keyed = check(&d, &archive, Some(secret())).expect("checks with the key file");
        assert!(keyed.manifest.authenticated);
        assert_eq!(keyed.audit_bytes, written.audit_bytes);

        // A byte flipped in each kind of part, and the archive cut short:
        // refused with and without the secret, naming the part.
        for (what, damaged) in damaged_parts(&archive) {
            for s in [None, Some(secret())] {
                let keyed = s.is_some();
                let e = check(&d, &damaged, s).unwrap_err();
                assert!(
                    e.contains(&format!("({what} ")) && (e.contains("damaged") || e.contains("does not open")),
                    "a flip in the {what} part (keyed: {keyed}): {e}"
                );
            }
        }
        let cut = &archive[..archive.len() / 2];
        let e = check(&d, cut, Some(secret())).unwrap_err();
        assert!(e.contains("truncated") && e.contains("part"), "{e}");
        let e = check(&d, &archive[..archive.len() - 1], None).unwrap_err();
        assert!(e.contains("truncated: it ends inside the end record"), "{e}");
        // Checking wrote nothing beside the keystore.
        assert_eq!(scratch_files(&d), Vec::<String>::new());

        // Only what was asked for: the keystore alone.
        let keystore_only = write(&d, &out, BackupContents::default());
        assert_eq!(
            (keystore_only.parts, keystore_only.files, keystore_only.audit_files),
            (1, 0, 0)
        );
        assert!(check(&d, &fs::read(&out).expect("read"), Some(secret())).is_ok());
        // (Last: a wrong secret counts toward the uid's back-off.)
        let wrong = check(&d, &archive, Some(UnlockSecret::Keyfile(SecretBytes::new(vec![9; 32])))).unwrap_err();
        assert!(wrong.contains("no keyfile slot of the backup accepts"), "{wrong}");
    }

    #[test]
    fn a_backup_killed_midway_leaves_an_archive_check_refuses_and_nothing_in_the_state_directory() {
        use std::io::Read as _;
        let mut d = Daemon::start();
        let keyfile = d.dir().join("unlock.key");
        ok(&d.hsmctl(&["init", "--keyfile-out", p(&keyfile)]));
        ok(&d.hsmctl(&["key", "create", "files", "--type", "aes256-gcm"]));
        let src = d.dir().join("big");
        fs::write(&src, vec![7u8; 16 << 20]).expect("write");
        ok(&d.hsmctl(&["file", "store", p(&src), "--key", "files"]));
        // The archive goes into a pipe this test drains slowly, so hsmd is
        // still writing it when it is killed.
        let (mut from, into) = std::io::pipe().expect("pipe");
        let socket = d.socket.clone();
        let writer = std::thread::spawn(move || {
            let mut c = protocol::Client::connect(&socket).expect("connect");
            let op = Operation::BackupWrite {
                protection: BackupProtection::MasterKey,
                contents: BackupContents {
                    files: true,
                    audit: true,
                },
            };
            let answer = c.call_with_fd(op, into.as_fd());
            drop(into);
            answer
        });
        let mut partial = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while partial.len() < 2 << 20 {
            let n = from.read(&mut buf).expect("read the pipe");
            assert!(n > 0, "the archive ended after {} bytes", partial.len());
            partial.extend_from_slice(&buf[..n]);
        }
        d.restart(true);
        // What hsmd wrote before it died, and nothing after.
        from.read_to_end(&mut partial).expect("drain");
        assert!(writer.join().expect("thread").is_err(), "the killed backup answered");
        let e = check(&d, &partial, None).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        // No scratch copy is left (one a kill leaves is removed at start).
        assert_eq!(scratch_files(&d), Vec::<String>::new());
        ok(&d.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
        assert!(ok(&d.hsmctl(&["file", "list"])).contains("big"));
    }

    /// Every entry under `dir` with its size (directories as 0), sorted.
    fn tree(dir: &Path) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).expect("ls").map(|e| e.expect("entry")) {
                let m = e.metadata().expect("stat");
                let name = e.path().strip_prefix(dir).expect("inside").display().to_string();
                if m.is_dir() {
                    todo.push(e.path());
                    out.push((name, 0));
                } else {
                    out.push((name, m.len()));
                }
            }
        }
        out.sort();
        out
    }

    /// `hsmctl --json backup restore ARCHIVE --keyfile KEY MORE…`, which must
    /// succeed: its JSON answer.
    fn restore_json(d: &Daemon, archive: &Path, keyfile: &Path, more: &[&str]) -> serde_json::Value {
        let mut args = vec!["--json", "backup", "restore", p(archive), "--keyfile", p(keyfile)];
        args.extend_from_slice(more);
        json(&d.hsmctl(&args))
    }

    /// The names under `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        tree(dir).into_iter().map(|(n, _)| n).collect()
    }

    /// `archive` with one byte flipped inside the first chunk of its
    /// keystore part, of a file segment and of the audit log, each named
    /// by its kind.
    fn damaged_parts(archive: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
        // The record's name, then its size (8) and 40 bytes into the chunk.
        let at = |name: &str| {
            archive
                .windows(name.len())
                .position(|w| w == name.as_bytes())
                .unwrap_or_else(|| panic!("{name} is not in the archive"))
                + name.len()
                + 8
                + 40
        };
        [
            ("keystore", at("keystore.sqlite")),
            ("file", at("seg-000000")),
            ("audit", at("audit/audit.log")),
        ]
        .into_iter()
        .map(|(what, offset)| {
            let mut damaged = archive.to_vec();
            damaged[offset] ^= 0x40;
            (what, damaged)
        })
        .collect()
    }

    /// A daemon with keys, stored files and history, and its archive
    /// written by `hsmctl backup create` (files and audit by default).
    struct Source {
        d: Daemon,
        keyfile: std::path::PathBuf,
        archive: std::path::PathBuf,
        /// (token, bytes) of each stored file.
        stored: Vec<(String, Vec<u8>)>,
    }

    fn source(sizes: &[usize]) -> Source {
        let d = Daemon::start();
        let keyfile = d.dir().join("unlock.key");
        ok(&d.hsmctl(&["init", "--keyfile-out", p(&keyfile)]));
        ok(&d.hsmctl(&["key", "create", "files", "--type", "aes256-gcm"]));
        ok(&d.hsmctl(&["key", "create", "before-backup", "--type", "ed25519"]));
        let mut stored = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let src = d.dir().join(format!("f{i}"));
            let bytes: Vec<u8> = (0..*size).map(|j| (j * 7 + i) as u8).collect();
            fs::write(&src, &bytes).expect("write");
            let out = json(&d.hsmctl(&["--json", "file", "store", p(&src), "--key", "files"]));
            stored.push((out["token"].as_str().expect("token").to_owned(), bytes));
        }
        let archive = d.dir().join("state.hsmdbak");
        ok(&d.hsmctl(&["backup", "create", p(&archive)]));
        Source {
            d,
            keyfile,
            archive,
            stored,
        }
    }

    fn fresh() -> Daemon {
        let d = Daemon::start();
        assert_eq!(super::status(&d)["state"], "uninitialized");
        d
    }

    #[test]
    fn a_whole_state_archive_restores_keys_files_and_the_audit_history_into_a_fresh_daemon() {
        let src = source(&[0, 1000, 200 * 1024, 3 << 20]);
        let v = json(&src.d.hsmctl(&[
            "--json",
            "backup",
            "verify",
            p(&src.archive),
            "--keyfile",
            p(&src.keyfile),
        ]));
        assert_eq!(
            (v["files"].as_u64(), v["manifest"]["authenticated"].as_bool()),
            (Some(4), Some(true)),
            "{v}"
        );
        assert_eq!(v["contents"], serde_json::json!({"files": true, "audit": true}));

        let other = fresh();
        let out = restore_json(&other, &src.archive, &src.keyfile, &[]);
        assert_eq!(out["state"], "locked", "{out}");
        assert_eq!(out["unusable"], serde_json::json!([]));
        // The fresh daemon's own log is kept aside, never dropped.
        let kept = out["kept"].as_array().expect("kept");
        assert!(
            kept.iter()
                .any(|k| k.as_str().is_some_and(|k| k.contains("audit.log.before-restore-"))),
            "{out}"
        );
        assert_eq!(super::status(&other)["state"], "locked");
        ok(&other.hsmctl(&["unlock", "--keyfile", p(&src.keyfile)]));
        ok(&other.hsmctl(&["key", "info", "before-backup"]));
        for (token, bytes) in &src.stored {
            let to = other.dir().join(format!("back-{token}"));
            ok(&other.hsmctl(&["file", "retrieve", token, "-o", p(&to)]));
            assert!(fs::read(&to).expect("read") == *bytes, "{token} differs");
        }
        // The chain goes on from the archive's head: the whole history, and
        // the restore as the event after it.
        let v = json(&other.hsmctl(&["--json", "audit", "verify"]));
        assert_eq!(v["valid"], true, "{v}");
        assert_eq!(v["first_seq"], 1, "{v}");
        let shown = json(&other.hsmctl(&["--json", "audit", "show", "--key", "before-backup"]));
        assert!(
            shown
                .as_array()
                .expect("events")
                .iter()
                .any(|e| e["event_type"] == "KEY_CREATED"),
            "the key's creation, from before the backup: {shown}"
        );
        let created = shown
            .as_array()
            .and_then(|a| a.iter().find(|e| e["event_type"] == "KEY_CREATED"))
            .map(|e| e["seq"].as_u64().expect("seq"))
            .expect("created");
        let restored = json(&other.hsmctl(&["--json", "audit", "show", "--event", "BACKUP_RESTORED"]));
        let restored = restored.as_array().expect("events");
        assert_eq!(restored.len(), 1, "{restored:?}");
        assert!(restored[0]["seq"].as_u64().expect("seq") > created);
        // Nothing of the restore is left behind.
        let hidden: Vec<String> = tree(&other.dir().join("state"))
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with(".restore") || n.contains("/.restore"))
            .collect();
        assert_eq!(hidden, Vec::<String>::new());

        // It has keys and files now: a second restore needs --force, and
        // keeps what it replaces.
        let e = refused(
            &other.hsmctl(&["backup", "restore", p(&src.archive), "--keyfile", p(&src.keyfile)]),
            "already-initialized",
        );
        assert!(
            e.contains("a keystore and 4 stored files") && e.contains("--force"),
            "{e}"
        );
        let out = restore_json(&other, &src.archive, &src.keyfile, &["--force"]);
        let kept: Vec<&str> = out["kept"]
            .as_array()
            .expect("kept")
            .iter()
            .filter_map(|k| k.as_str())
            .collect();
        for what in [
            "keystore.sqlite.before-restore-",
            "files.before-restore-",
            "audit.log.before-restore-",
        ] {
            assert!(kept.iter().any(|k| k.contains(what)), "{what} not kept: {kept:?}");
            assert!(kept.iter().all(|k| Path::new(k).exists()), "{kept:?}");
        }
        ok(&other.hsmctl(&["unlock", "--keyfile", p(&src.keyfile)]));
        assert_eq!(json(&other.hsmctl(&["--json", "audit", "verify"]))["valid"], true);
        assert_eq!(
            json(&other.hsmctl(&["--json", "file", "list"]))
                .as_array()
                .expect("files")
                .len(),
            4
        );

        // The keystore alone, from the first daemon, under a backup passphrase:
        // restored over this one, whose own log goes on and still verifies.
        let pass = other.dir().join("backup-pass");
        fs::write(&pass, "correct horse battery staple").expect("write");
        let keys_only = other.dir().join("keys.hsmdbak");
        ok(&src.d.hsmctl(&[
            "backup",
            "create",
            p(&keys_only),
            "--include",
            "keystore",
            "--passphrase-file",
            p(&pass),
        ]));
        let v = json(&other.hsmctl(&[
            "--json",
            "backup",
            "verify",
            p(&keys_only),
            "--passphrase-file",
            p(&pass),
        ]));
        assert_eq!(
            v["contents"],
            serde_json::json!({"files": false, "audit": false}),
            "{v}"
        );
        assert_eq!(
            (v["parts"].as_u64(), v["manifest"]["protection"].as_str()),
            (Some(1), Some("passphrase"))
        );
        let seq_before = json(&other.hsmctl(&["--json", "audit", "verify"]))["last_seq"]
            .as_u64()
            .expect("seq");
        ok(&other.hsmctl(&[
            "backup",
            "restore",
            p(&keys_only),
            "--passphrase-file",
            p(&pass),
            "--force",
        ]));
        ok(&other.hsmctl(&["unlock", "--keyfile", p(&src.keyfile)]));
        let v = json(&other.hsmctl(&["--json", "audit", "verify"]));
        assert_eq!(v["valid"], true, "{v}");
        assert!(v["last_seq"].as_u64().expect("seq") > seq_before, "{v}");
    }

    #[test]
    fn a_damaged_or_cut_archive_is_refused_by_verify_and_restore_naming_the_part_and_nothing_is_written() {
        let src = source(&[5000, 300 * 1024]);
        let archive = fs::read(&src.archive).expect("read");
        let other = fresh();
        // Names only: the daemon's own log and WAL grow as it answers.
        let before = names(&other.dir().join("state"));
        let mut cases: Vec<(String, Vec<u8>)> = damaged_parts(&archive)
            .into_iter()
            .map(|(what, damaged)| (format!("({what} "), damaged))
            .collect();
        cases.push(("truncated".into(), archive[..archive.len() * 2 / 3].to_vec()));
        for (named, bytes) in &cases {
            let path = other.dir().join("damaged.hsmdbak");
            fs::write(&path, bytes).expect("write");
            let e = refused(&other.hsmctl(&["backup", "verify", p(&path)]), "invalid-argument");
            assert!(e.contains(named.as_str()), "verify: {named}: {e}");
            let keyfile = ["--keyfile", p(&src.keyfile)];
            let out = other.hsmctl(&[&["backup", "verify", p(&path)][..], &keyfile[..]].concat());
            assert!(!out.status.success(), "verify with the key file accepted {named}");
            let out = other.hsmctl(&[&["backup", "restore", p(&path)][..], &keyfile[..]].concat());
            let e = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!out.status.success(), "restore accepted {named}");
            assert!(
                e.contains(named.as_str()) || (named.starts_with('(') && e.contains("was changed after it was made")),
                "restore: {named}: {e}"
            );
            assert_eq!(
                names(&other.dir().join("state")),
                before,
                "restore of {named} wrote something"
            );
            assert_eq!(super::status(&other)["state"], "uninitialized");
        }
        // The archive itself still restores there.
        ok(&other.hsmctl(&["backup", "restore", p(&src.archive), "--keyfile", p(&src.keyfile)]));
    }

    #[test]
    fn a_restore_killed_midway_leaves_the_state_as_it_was_and_can_be_run_again() {
        let src = source(&[40 << 20]);
        let mut other = fresh();
        let state = other.dir().join("state");
        let before = names(&state);
        let mut restore = std::process::Command::new(hsmd_tests::bin("hsmctl"))
            .args([
                "--socket",
                p(&other.socket),
                "backup",
                "restore",
                "--quiet",
                p(&src.archive),
            ])
            .args(["--keyfile", p(&src.keyfile)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("hsmctl");
        // Killed while it stages: some of the archive is on disk beside the state.
        let started = std::time::Instant::now();
        loop {
            let staged: u64 = tree(&state)
                .into_iter()
                .filter(|(n, _)| n.starts_with(".restore-"))
                .map(|(_, len)| len)
                .sum();
            if staged > 4 << 20 {
                break;
            }
            assert!(started.elapsed().as_secs() < 60, "nothing staged");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        other.restart(true);
        let _ = restore.wait();
        assert_eq!(names(&state), before, "the state directory after the kill");
        assert_eq!(super::status(&other)["state"], "uninitialized");
        ok(&other.hsmctl(&["backup", "restore", p(&src.archive), "--keyfile", p(&src.keyfile)]));
        ok(&other.hsmctl(&["unlock", "--keyfile", p(&src.keyfile)]));
        let to = other.dir().join("back");
        ok(&other.hsmctl(&["file", "retrieve", &src.stored[0].0, "-o", p(&to)]));
        assert!(fs::read(&to).expect("read") == src.stored[0].1);
        assert_eq!(json(&other.hsmctl(&["--json", "audit", "verify"]))["valid"], true);
    }

    #[test]
    fn a_backup_create_killed_midway_leaves_nothing_verify_accepts_whichever_side_dies() {
        let mut src = source(&[]);
        ok(&src.d.hsmctl(&["key", "create", "more", "--type", "aes256-gcm"]));
        let big = src.d.dir().join("big");
        fs::write(&big, vec![3u8; 48 << 20]).expect("write");
        ok(&src.d.hsmctl(&["file", "store", p(&big), "--key", "more"]));
        let dir = src.d.dir().to_owned();
        let partials = || -> Vec<std::path::PathBuf> {
            fs::read_dir(&dir)
                .expect("ls")
                .map(|e| e.expect("entry").path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(".hsmctl-"))
                })
                .collect()
        };
        // `hsmctl backup create OUT`, once it has written 1 MiB.
        let creating = |out: &Path| {
            let child = std::process::Command::new(hsmd_tests::bin("hsmctl"))
                .args(["--socket", p(&src.d.socket), "backup", "create", "--quiet", p(out)])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("hsmctl");
            let started = std::time::Instant::now();
            while !partials()
                .iter()
                .any(|p| fs::metadata(p).map_or(0, |m| m.len()) > 1 << 20)
            {
                assert!(started.elapsed().as_secs() < 60, "no archive being written");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            child
        };

        // hsmctl killed: hsmd's next write fails and it stops; what is left
        // under the temporary name stays cut short.
        let out = dir.join("killed.hsmdbak");
        let mut create = creating(&out);
        create.kill().expect("SIGKILL hsmctl");
        let _ = create.wait();
        let started = std::time::Instant::now();
        while !src.d.log().contains("the descriptor passed for the archive") {
            assert!(
                started.elapsed().as_secs() < 60,
                "hsmd went on writing: {}",
                src.d.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!out.exists(), "a killed backup left {}", out.display());
        let left = partials();
        assert_eq!(left.len(), 1, "{left:?}");
        let e = refused(&src.d.hsmctl(&["backup", "verify", p(&left[0])]), "invalid-argument");
        assert!(e.contains("truncated"), "{e}");
        fs::remove_file(&left[0]).expect("rm");

        // hsmd killed: hsmctl is told, and removes its temporary file.
        let mut create = creating(&out);
        src.d.restart(true);
        assert!(!create.wait().expect("wait").success());
        assert!(!out.exists(), "a killed backup left {}", out.display());
        assert_eq!(partials(), Vec::<std::path::PathBuf>::new());
    }

    #[test]
    fn a_restore_where_the_pkcs11_token_is_absent_names_its_keys_before_changing_anything() {
        let hsm = hsmd_tests::SoftHsm::new("hsmd-backup");
        let d = hsm.daemon("").start();
        let keyfile = d.dir().join("unlock.key");
        ok(&d.hsmctl(&["init", "--keyfile-out", p(&keyfile)]));
        ok(&d.hsmctl(&[
            "key",
            "create",
            "on-token",
            "--type",
            "ecdsa-p256",
            "--backend",
            "pkcs11",
        ]));
        ok(&d.hsmctl(&["key", "create", "in-software", "--type", "ed25519"]));
        let archive = d.dir().join("state.hsmdbak");
        ok(&d.hsmctl(&["backup", "create", p(&archive)]));

        // Another machine: no token configured.
        let other = fresh();
        let before = names(&other.dir().join("state"));
        let e = refused(
            &other.hsmctl(&["backup", "restore", p(&archive), "--keyfile", p(&keyfile)]),
            "failed-precondition",
        );
        assert!(
            e.contains("1 key on the pkcs11 backend (on-token)")
                && e.contains("no pkcs11 backend is configured here")
                && e.contains("--accept-unusable")
                && !e.contains("in-software"),
            "{e}"
        );
        assert_eq!(names(&other.dir().join("state")), before, "the refusal wrote something");
        assert_eq!(super::status(&other)["state"], "uninitialized");

        // Taken anyway: the software key works, the token's says why not.
        let out = restore_json(&other, &archive, &keyfile, &["--accept-unusable"]);
        let unusable = out["unusable"].as_array().expect("unusable");
        assert_eq!(unusable.len(), 1, "{out}");
        ok(&other.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
        let data = other.dir().join("data");
        fs::write(&data, b"signed after a restore").expect("write");
        ok(&other.hsmctl(&["sign", "in-software", "-i", p(&data), "-o", p(&other.dir().join("sig"))]));
        let out = other.hsmctl(&["sign", "on-token", "-i", p(&data), "-o", p(&other.dir().join("sig2"))]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("pkcs11"), "{out:?}");
    }

    /// The token's PIN is sealed in the keystore (no PIN file): the restored
    /// keystore brings it, and the token's keys sign once hsmd is unlocked.
    #[test]
    fn the_sealed_token_pin_comes_back_with_the_keystore() {
        let hsm = hsmd_tests::SoftHsm::new("hsmd-pin");
        let token = format!(
            "[backends.pkcs11]\nmodule = {:?}\ntoken_label = {:?}\n",
            hsmd_tests::SOFTHSM_MODULE,
            hsm.label
        );
        let conf = hsm.conf().display().to_string();
        let daemon = || Daemon::builder().env("SOFTHSM2_CONF", &conf).extra(&token).start();
        let d = daemon();
        let keyfile = d.dir().join("unlock.key");
        ok(&d.hsmctl(&["init", "--keyfile-out", p(&keyfile)]));
        ok(&d.hsmctl_with_stdin(
            &["backend", "pkcs11", "set-pin", "--pin-file", "-"],
            format!("{}\n", hsm.pin).as_bytes(),
        ));
        // The helper opens the token with the PIN on its own thread.
        let started = std::time::Instant::now();
        loop {
            let out = d.hsmctl(&[
                "key",
                "create",
                "on-token",
                "--type",
                "ecdsa-p256",
                "--backend",
                "pkcs11",
            ]);
            if out.status.success() {
                break;
            }
            assert!(started.elapsed().as_secs() < 20, "the token never opened: {out:?}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let archive = d.dir().join("state.hsmdbak");
        ok(&d.hsmctl(&["backup", "create", p(&archive)]));
        let other = daemon();
        assert_eq!(super::status(&other)["state"], "uninitialized");
        let (copy, kept_key) = (other.dir().join("copy.hsmdbak"), other.dir().join("unlock.key"));
        fs::copy(&archive, &copy).expect("copy");
        fs::copy(&keyfile, &kept_key).expect("copy");
        // The first machine is gone; its token is not.
        drop(d);
        let (archive, keyfile) = (copy, kept_key);
        let out = restore_json(&other, &archive, &keyfile, &[]);
        assert_eq!(out["unusable"], serde_json::json!([]), "{out}");
        ok(&other.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
        let data = other.dir().join("data");
        fs::write(&data, b"signed by the token after a restore").expect("write");
        // The helper logs in with the PIN handed over at unlock.
        let started = std::time::Instant::now();
        loop {
            let out = other.hsmctl(&["sign", "on-token", "-i", p(&data), "-o", p(&other.dir().join("sig"))]);
            if out.status.success() {
                break;
            }
            assert!(started.elapsed().as_secs() < 20, "the token key never signed: {out:?}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}
