//! Issue 3, keys of the software backend: create, list, info, public, delete,
//! sign and verify; OpenSSL as the independent checker; tampering; crash safety.

use std::{
    collections::BTreeSet,
    fs,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use hsmd_tests::check::{ok, p as path, refused};
use hsmd_tests::{openssl_verifies, Daemon};
use protocol::{Client, ErrorCode, KeyType, Operation, Reply, ServiceState, Usage};

/// A daemon initialized with a key-file slot (fast to unlock after restarts).
fn initialized() -> (Daemon, std::path::PathBuf) {
    let d = Daemon::start();
    let keyfile = d.dir().join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&keyfile)]));
    (d, keyfile)
}

#[test]
fn raw_signatures_verify_with_openssl_and_a_flipped_bit_fails_both_checkers() {
    let (d, _) = initialized();
    let data = d.dir().join("data.bin");
    let bytes: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&data, &bytes).expect("write data");
    for t in ["ed25519", "ecdsa-p256", "ecdsa-p384"] {
        let name = format!("k-{t}");
        ok(&d.hsmctl(&["key", "create", &name, "--type", t]));
        let public = d.dir().join(format!("{t}.pem"));
        ok(&d.hsmctl(&[
            "key",
            "public",
            "--force",
            &name,
            "--format",
            "pem",
            "-o",
            path(&public),
        ]));
        let sig = d.dir().join(format!("{t}.sig"));
        ok(&d.hsmctl(&[
            "sign",
            "--force",
            &name,
            "-i",
            path(&data),
            "-o",
            path(&sig),
            "--format",
            "raw",
        ]));
        let sig_bytes = fs::read(&sig).expect("sig");
        if t == "ed25519" {
            assert_eq!(sig_bytes.len(), 64);
        } else {
            assert_eq!(sig_bytes[0], 0x30, "ECDSA signatures are DER");
        }
        assert!(
            openssl_verifies(t, &public, &data, &sig),
            "openssl rejects hsmd's {t} signature"
        );
        ok(&d.hsmctl(&["verify", &name, "-i", path(&data), "-s", path(&sig), "--format", "raw"]));

        // A flipped bit in the data.
        let mut other = bytes.clone();
        other[12_345] ^= 0x10;
        let tampered = d.dir().join(format!("{t}.data2"));
        fs::write(&tampered, &other).expect("write");
        assert!(
            !openssl_verifies(t, &public, &tampered, &sig),
            "{t}: openssl accepted changed data"
        );
        let out = d.hsmctl(&[
            "verify",
            &name,
            "-i",
            path(&tampered),
            "-s",
            path(&sig),
            "--format",
            "raw",
        ]);
        assert_eq!(out.status.code(), Some(1), "{t}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("INVALID"));

        // A flipped bit in the signature (inside r or the Ed25519 R point).
        let mut bad = sig_bytes.clone();
        bad[if t == "ed25519" { 5 } else { 10 }] ^= 0x01;
        let bad_sig = d.dir().join(format!("{t}.badsig"));
        fs::write(&bad_sig, &bad).expect("write");
        assert!(
            !openssl_verifies(t, &public, &data, &bad_sig),
            "{t}: openssl accepted a bad signature"
        );
        assert_eq!(
            d.hsmctl(&[
                "verify",
                &name,
                "-i",
                path(&data),
                "-s",
                path(&bad_sig),
                "--format",
                "raw"
            ])
            .status
            .code(),
            Some(1)
        );
    }
}

#[test]
fn signature_files_name_key_and_version_and_pipes_work() {
    let (d, _) = initialized();
    ok(&d.hsmctl(&["key", "create", "release", "--type", "ed25519"]));
    let out = d.hsmctl_with_stdin(&["sign", "--force", "release", "-i", "-", "-o", "-"], b"hello world");
    let text = ok(&out);
    assert!(
        text.starts_with("hsmd-signature v1\nkey: release\nversion: 1\ntype: ed25519\ndigest: sha512\n"),
        "{text}"
    );
    let sig = d.dir().join("hello.sig");
    fs::write(&sig, &text).expect("write");
    let out = d.hsmctl_with_stdin(&["verify", "release", "-i", "-", "-s", path(&sig)], b"hello world");
    assert!(ok(&out).contains("signature valid (key release, version 1)"));
    let out = d.hsmctl_with_stdin(&["verify", "release", "-i", "-", "-s", path(&sig)], b"hello World");
    assert_eq!(out.status.code(), Some(1));
    // Another key's name in the file is caught before asking hsmd.
    ok(&d.hsmctl(&["key", "create", "other", "--type", "ed25519"]));
    let out = d.hsmctl_with_stdin(&["verify", "other", "-i", "-", "-s", path(&sig)], b"hello world");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("made by key \"release\""),
        "{out:?}"
    );
}

#[test]
fn names_usages_and_duplicates_are_checked_with_the_rule_given() {
    let (d, _) = initialized();
    let err = refused(
        &d.hsmctl(&["key", "create", "bad name", "--type", "ed25519"]),
        "invalid-argument",
    );
    assert!(err.contains("A-Z a-z 0-9 . _ -"), "{err}");
    ok(&d.hsmctl(&["key", "create", "dup", "--type", "ecdsa-p256"]));
    refused(
        &d.hsmctl(&["key", "create", "dup", "--type", "ed25519"]),
        "already-exists",
    );
    let err = refused(
        &d.hsmctl(&["key", "create", "x", "--type", "aes256-gcm", "--usage", "sign"]),
        "invalid-argument",
    );
    assert!(err.contains("cannot be used to sign"), "{err}");
    let out = d.hsmctl(&["key", "create", "x", "--type", "rsa"]);
    assert_eq!(out.status.code(), Some(2), "unknown types are usage errors");

    ok(&d.hsmctl(&["key", "create", "verify-only", "--type", "ed25519", "--usage", "verify"]));
    let err = refused(
        &d.hsmctl_with_stdin(&["sign", "--force", "verify-only", "-i", "-", "-o", "-"], b"x"),
        "failed-precondition",
    );
    assert!(err.contains("may not be used to sign"), "{err}");
    ok(&d.hsmctl(&["key", "create", "sym", "--type", "aes256-gcm"]));
    refused(&d.hsmctl(&["key", "public", "sym"]), "invalid-argument");

    let mut c = d.client();
    let err = c
        .call(Operation::Sign(protocol::SignArgs {
            name: "dup".into(),
            digest: vec![0; 64],
        }))
        .expect_err("wrong digest length");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
    assert!(err.to_string().contains("32-byte digest"), "{err}");

    let list: serde_json::Value = serde_json::from_str(&ok(&d.hsmctl(&["--json", "key", "list"]))).expect("JSON");
    let names: Vec<_> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|k| k["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["dup", "sym", "verify-only"]);
    assert_eq!(list[0]["usages"], serde_json::json!(["sign", "verify"]));
    assert_eq!(list[2]["usages"], serde_json::json!(["verify"]));

    // Deleting is soft (see tests/lifecycle.rs); purging is final.
    ok(&d.hsmctl(&["key", "delete", "dup"]));
    refused(&d.hsmctl(&["key", "delete", "dup"]), "key-state");
    ok(&d.hsmctl(&["key", "purge", "dup", "--yes"]));
    refused(&d.hsmctl(&["key", "info", "dup"]), "not-found");
    refused(&d.hsmctl(&["key", "delete", "dup"]), "not-found");
}

#[test]
fn locked_means_no_key_use_and_unlock_brings_every_key_back_after_a_restart() {
    let (mut d, keyfile) = initialized();
    let names = ["a", "b", "c"];
    for (n, t) in names.iter().zip(["ed25519", "ecdsa-p256", "ecdsa-p384"]) {
        ok(&d.hsmctl(&["key", "create", n, "--type", t]));
    }
    ok(&d.hsmctl_with_stdin(&["sign", "--force", "a", "-i", "-", "-o", "-"], b"x"));
    ok(&d.hsmctl(&["lock"]));
    refused(
        &d.hsmctl_with_stdin(&["sign", "--force", "a", "-i", "-", "-o", "-"], b"x"),
        "locked",
    );
    refused(&d.hsmctl(&["key", "create", "d", "--type", "ed25519"]), "locked");
    refused(&d.hsmctl(&["key", "delete", "a"]), "locked");
    // Metadata stays readable while locked.
    assert!(ok(&d.hsmctl(&["key", "list"])).contains("ecdsa-p384"));

    d.restart(false);
    assert_eq!(d.client().status().expect("status").state, ServiceState::Locked);
    ok(&d.hsmctl(&["unlock", "--keyfile", path(&keyfile)]));
    for n in names {
        ok(&d.hsmctl_with_stdin(&["sign", "--force", n, "-i", "-", "-o", "-"], b"after restart"));
    }
}

fn edit(d: &Daemon, sql: &str) {
    let conn = rusqlite::Connection::open(d.dir().join("state/keystore.sqlite")).expect("open keystore");
    conn.execute_batch(sql).expect("edit keystore");
}

fn sign_code(c: &mut Client, name: &str, len: usize) -> Result<(), ErrorCode> {
    match c.call(Operation::Sign(protocol::SignArgs {
        name: name.into(),
        digest: vec![1; len],
    })) {
        Ok(Reply::Signature { .. }) => Ok(()),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e.code().unwrap_or(ErrorCode::Internal)),
    }
}

#[test]
fn edited_or_swapped_key_records_fail_as_tampered_and_other_keys_work() {
    let (mut d, keyfile) = initialized();
    for n in ["edited", "swap-a", "swap-b", "widened", "intact"] {
        ok(&d.hsmctl(&["key", "create", n, "--type", "ed25519"]));
    }
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    edit(
        &d,
        "UPDATE key_versions
             SET wrapped = CAST(substr(wrapped, 1, 30)
                 || CASE WHEN substr(wrapped, 31, 1) = x'00' THEN x'01' ELSE x'00' END
                 || substr(wrapped, 32) AS BLOB)
             WHERE key_id = (SELECT id FROM keys WHERE name = 'edited');
         CREATE TEMP TABLE a AS SELECT wrapped, public FROM key_versions
             WHERE key_id = (SELECT id FROM keys WHERE name = 'swap-a');
         CREATE TEMP TABLE b AS SELECT wrapped, public FROM key_versions
             WHERE key_id = (SELECT id FROM keys WHERE name = 'swap-b');
         UPDATE key_versions SET wrapped = (SELECT wrapped FROM b), public = (SELECT public FROM b)
             WHERE key_id = (SELECT id FROM keys WHERE name = 'swap-a');
         UPDATE key_versions SET wrapped = (SELECT wrapped FROM a), public = (SELECT public FROM a)
             WHERE key_id = (SELECT id FROM keys WHERE name = 'swap-b');
         UPDATE keys SET usages = 'sign,verify,encrypt' WHERE name = 'widened';",
    );
    d.restart(true);
    ok(&d.hsmctl(&["unlock", "--keyfile", path(&keyfile)]));
    for n in ["edited", "swap-a", "swap-b", "widened"] {
        let err = refused(
            &d.hsmctl_with_stdin(&["sign", "--force", n, "-i", "-", "-o", "-"], b"x"),
            "tampered",
        );
        assert!(err.contains("keystore record tampered"), "{n}: {err}");
        assert!(err.contains(&format!("key \"{n}\" version 1")), "{n}: {err}");
    }
    ok(&d.hsmctl_with_stdin(&["sign", "--force", "intact", "-i", "-", "-o", "-"], b"x"));
    assert!(d.log().contains("keystore record tampered"), "tampering is logged");
}

/// A small deterministic generator, so a failing run can be repeated from its seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_key() {
    let (mut d, keyfile) = initialized();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |t| t.as_nanos() as u64)
        | 1;
    eprintln!("crash test seed: {seed}");
    let mut rng = XorShift(seed);
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let types = [
        KeyType::Ed25519,
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::Aes256Gcm,
        KeyType::HmacSha256,
    ];
    for round in 0..20 {
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let mut c = d.client();
                let (stop, acknowledged) = (Arc::clone(&stop), Arc::clone(&acknowledged));
                thread::spawn(move || {
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let name = format!("r{round}-w{w}-{i}");
                        let created = c.call(Operation::KeyCreate {
                            name: name.clone(),
                            key_type: types[i % types.len()],
                            usages: Vec::<Usage>::new(),
                            options: protocol::KeyOptions::default(),
                        });
                        match created {
                            Ok(Reply::KeyCreated(_)) => {
                                acknowledged.lock().expect("lock").insert(name);
                            }
                            // The daemon died under us: the key may or may not exist.
                            _ => return,
                        }
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(20 + rng.next() % 120));
        d.restart(true);
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().expect("writer");
        }
        ok(&d.hsmctl(&["unlock", "--keyfile", path(&keyfile)]));
    }
    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(
        acknowledged.len() >= 40,
        "the test created too few keys to mean much: {}",
        acknowledged.len()
    );
    let mut c = d.client();
    let present: BTreeSet<String> = match c.call(Operation::KeyList).expect("list") {
        Reply::Keys(keys) => keys.into_iter().map(|k| k.name).collect(),
        other => panic!("{other:?}"),
    };
    let lost: Vec<_> = acknowledged.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "acknowledged keys lost after SIGKILL (seed {seed}): {lost:?}"
    );
    // Every acknowledged signing key is usable, not merely listed.
    let started = Instant::now();
    for name in &acknowledged {
        let info = match c.call(Operation::KeyInfo { name: name.clone() }).expect("info") {
            Reply::Key(k) => k,
            other => panic!("{other:?}"),
        };
        if let Some(len) = info.key_type.digest_len() {
            sign_code(&mut c, name, len).unwrap_or_else(|e| panic!("{name} unusable after crashes: {e:?}"));
        }
    }
    eprintln!(
        "{} acknowledged keys checked in {:?}",
        acknowledged.len(),
        started.elapsed()
    );
}

#[test]
fn openssh_public_keys_read_back_by_ssh_keygen_as_the_same_key() {
    let (d, _) = initialized();
    for (t, algorithm) in [
        ("ed25519", "ssh-ed25519"),
        ("ecdsa-p256", "ecdsa-sha2-nistp256"),
        ("ecdsa-p384", "ecdsa-sha2-nistp384"),
    ] {
        let name = format!("ssh-{t}");
        ok(&d.hsmctl(&["key", "create", &name, "--type", t]));
        let line = ok(&d.hsmctl(&["key", "public", &name, "--format", "openssh"]));
        assert!(line.starts_with(&format!("{algorithm} ")), "{line}");
        assert!(line.trim_end().ends_with(&format!("hsmd:{name}")), "{line}");
        let pub_file = d.dir().join(format!("{t}.pub"));
        fs::write(&pub_file, &line).expect("write");
        if t == "ed25519" {
            // OpenSSH 9.2 cannot export Ed25519 as PKCS#8; it still must parse the
            // line and print the fingerprint of the key `key public --format raw` gives.
            use base64::Engine as _;
            use sha2::Digest as _;
            let out = Command::new("ssh-keygen")
                .args(["-l", "-E", "sha256", "-f", path(&pub_file)])
                .output()
                .expect("run ssh-keygen (Debian package openssh-client)");
            let listed = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success() && listed.contains("(ED25519)"), "{out:?}");
            let raw = d.hsmctl(&["key", "public", &name, "--format", "raw"]).stdout;
            assert_eq!(raw.len(), 32);
            let mut blob = Vec::new();
            for part in [&b"ssh-ed25519"[..], &raw] {
                blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
                blob.extend_from_slice(part);
            }
            let fingerprint = base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(&blob));
            assert!(
                listed.contains(&format!("SHA256:{fingerprint}")),
                "{listed} vs {fingerprint}"
            );
            continue;
        }
        // OpenSSH converts our line back to PKCS#8 PEM: it must be hsmd's own PEM.
        let out = Command::new("ssh-keygen")
            .args(["-e", "-m", "PKCS8", "-f", path(&pub_file)])
            .output()
            .expect("run ssh-keygen (Debian package openssh-client)");
        assert!(out.status.success(), "ssh-keygen rejects hsmd's {t} line: {out:?}");
        let pem = ok(&d.hsmctl(&["key", "public", &name, "--format", "pem"]));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pem.trim(), "{t}");
    }
}

#[test]
fn key_exists_exits_0_for_a_key_and_1_for_none_locked_or_not() {
    let (d, keyfile) = initialized();
    ok(&d.hsmctl(&["key", "create", "present", "--type", "ed25519"]));
    let yes = d.hsmctl(&["key", "exists", "present"]);
    assert_eq!(yes.status.code(), Some(0), "{yes:?}");
    assert_eq!(String::from_utf8_lossy(&yes.stdout), "key present exists\n");
    let no = d.hsmctl(&["key", "exists", "absent"]);
    assert_eq!(no.status.code(), Some(1), "{no:?}");
    assert!(no.stdout.is_empty(), "{no:?}");
    assert!(
        String::from_utf8_lossy(&no.stderr).contains("there is no key \"absent\""),
        "{no:?}"
    );
    // A deleted key still recoverable holds its name.
    ok(&d.hsmctl(&["key", "create", "deleted", "--type", "ed25519"]));
    ok(&d.hsmctl(&["key", "delete", "deleted"]));
    assert_eq!(d.hsmctl(&["key", "exists", "deleted"]).status.code(), Some(0));
    // The answer needs no unlocked keystore: names are not secret from those
    // who may see the key.
    ok(&d.hsmctl(&["lock"]));
    assert_eq!(d.hsmctl(&["key", "exists", "present"]).status.code(), Some(0));
    assert_eq!(d.hsmctl(&["key", "exists", "absent"]).status.code(), Some(1));
    ok(&d.hsmctl(&["unlock", "--keyfile", path(&keyfile)]));
}
