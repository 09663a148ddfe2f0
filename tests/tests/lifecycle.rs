//! Key lifecycle (issue 4): versions and rotation, minimum versions and rewrap,
//! scheduled rotation across restarts, the state table of the README row by row,
//! soft delete and purge, batched use counters, data keys and batches.

use std::{
    fs,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use hsmd_tests::check::{ok, p, refused};
use hsmd_tests::Daemon;
use protocol::{
    BatchItem, Client, ErrorCode, KeyInfo, KeyOptions, KeyType, Operation, Reply, Transition, MAX_BATCH_ITEMS,
};
use sha2::Digest as _;

fn info(c: &mut Client, name: &str) -> KeyInfo {
    match c.call(Operation::KeyInfo { name: name.into() }).expect("key info") {
        Reply::Key(k) => *k,
        other => panic!("{other:?}"),
    }
}

fn create(c: &mut Client, name: &str, key_type: KeyType, options: KeyOptions) -> KeyInfo {
    match c
        .call(Operation::KeyCreate {
            name: name.into(),
            key_type,
            usages: Vec::new(),
            options,
        })
        .expect("create")
    {
        Reply::KeyCreated(k) => *k,
        other => panic!("{other:?}"),
    }
}

/// The version an `hsmctl encrypt` file names in its header.
fn enc_version(file: &Path, name: &str) -> u32 {
    let bytes = fs::read(file).expect("read");
    let at = 8 + 2 + name.len();
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn sig_version(file: &Path) -> u32 {
    let text = fs::read_to_string(file).expect("read");
    text.lines()
        .find_map(|l| l.strip_prefix("version: "))
        .expect("version line")
        .parse()
        .expect("number")
}

fn initialized(builder: hsmd_tests::DaemonBuilder) -> (Daemon, std::path::PathBuf) {
    let d = builder.start();
    let keyfile = d.dir().join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", p(&keyfile)]));
    (d, keyfile)
}

#[test]
fn rotated_keys_keep_old_versions_working_until_the_minimum_rises_and_rewrap_moves_ciphertexts_forward() {
    let d = Daemon::builder().dev().start();
    let dir = d.dir();
    let data = dir.join("data.bin");
    fs::write(&data, b"payroll 2026, row after row".repeat(20_000)).expect("write");
    ok(&d.hsmctl(&["key", "create", "vault", "--type", "aes256-gcm"]));
    ok(&d.hsmctl(&["key", "create", "rel", "--type", "ed25519"]));
    for v in 1..=3u32 {
        if v > 1 {
            assert!(ok(&d.hsmctl(&["key", "rotate", "vault"])).contains(&format!("version {v}")));
            ok(&d.hsmctl(&["key", "rotate", "rel"]));
        }
        let ct = dir.join(format!("c{v}"));
        let sig = dir.join(format!("s{v}"));
        ok(&d.hsmctl(&[
            "encrypt",
            "--force",
            "vault",
            "-i",
            p(&data),
            "-o",
            p(&ct),
            "--aad",
            "ctx",
        ]));
        ok(&d.hsmctl(&["sign", "--force", "rel", "-i", p(&data), "-o", p(&sig)]));
        assert_eq!(enc_version(&ct, "vault"), v, "new ciphertexts name the newest version");
        assert_eq!(sig_version(&sig), v, "new signatures name the newest version");
    }
    for v in 1..=3 {
        let out = dir.join(format!("p{v}"));
        ok(&d.hsmctl(&[
            "decrypt",
            "--force",
            "vault",
            "-i",
            p(&dir.join(format!("c{v}"))),
            "-o",
            p(&out),
            "--aad",
            "ctx",
        ]));
        assert_eq!(fs::read(&out).expect("read"), fs::read(&data).expect("read"));
        assert!(
            ok(&d.hsmctl(&["verify", "rel", "-i", p(&data), "-s", p(&dir.join(format!("s{v}")))]))
                .contains(&format!("version {v}"))
        );
    }

    // Rewrap brings the version-1 ciphertext to version 3 inside hsmd.
    let c1_new = dir.join("c1-rewrapped");
    ok(&d.hsmctl(&[
        "rewrap",
        "--force",
        "vault",
        "-i",
        p(&dir.join("c1")),
        "-o",
        p(&c1_new),
        "--aad",
        "ctx",
    ]));
    assert_eq!(enc_version(&c1_new, "vault"), 3);
    // Over the library: the answer to a rewrap is a ciphertext and nothing else.
    let mut c = d.client();
    let secret = b"the plaintext must not come back";
    let (v1_sealed, _) = {
        ok(&d.hsmctl(&["key", "create", "env", "--type", "aes256-gcm"]));
        match c
            .call(Operation::Encrypt(protocol::EncryptArgs {
                name: "env".into(),
                version: None,
                plaintext: protocol::SecretBytes::new(secret.to_vec()),
                aad: b"a".to_vec(),
            }))
            .expect("encrypt")
        {
            Reply::Encrypted { sealed, version } => (sealed, version),
            other => panic!("{other:?}"),
        }
    };
    ok(&d.hsmctl(&["key", "rotate", "env"]));
    match c
        .call(Operation::Rewrap {
            name: "env".into(),
            version: 1,
            sealed: v1_sealed,
            aad: b"a".to_vec(),
            to_version: None,
        })
        .expect("rewrap")
    {
        Reply::Encrypted { version, sealed } => {
            assert_eq!(version, 2);
            assert!(!sealed.windows(secret.len()).any(|w| w == secret));
        }
        other => panic!("rewrap answered {other:?}"),
    }

    ok(&d.hsmctl(&["key", "set", "vault", "--min-decrypt-version", "3"]));
    let err = refused(
        &d.hsmctl(&[
            "decrypt",
            "--force",
            "vault",
            "-i",
            p(&dir.join("c1")),
            "-o",
            p(&dir.join("never")),
            "--aad",
            "ctx",
        ]),
        "key-state",
    );
    assert!(
        err.contains("version 1 is below its minimum decryption version 3"),
        "{err}"
    );
    assert!(!dir.join("never").exists(), "no output from a refused decrypt");
    refused(
        &d.hsmctl(&[
            "rewrap",
            "--force",
            "vault",
            "-i",
            p(&dir.join("c1")),
            "-o",
            p(&dir.join("x")),
            "--aad",
            "ctx",
        ]),
        "key-state",
    );
    let out = dir.join("p1-again");
    ok(&d.hsmctl(&[
        "decrypt",
        "--force",
        "vault",
        "-i",
        p(&c1_new),
        "-o",
        p(&out),
        "--aad",
        "ctx",
    ]));
    assert_eq!(fs::read(&out).expect("read"), fs::read(&data).expect("read"));
    let k = info(&mut c, "vault");
    assert_eq!((k.version, k.min_decrypt_version, k.min_encrypt_version), (3, 3, 3));
    assert_eq!(k.versions.len(), 3);
    assert!(k.last_rotated_unix.is_some());
    // The minimum cannot pass the newest version.
    refused(
        &d.hsmctl(&["key", "set", "vault", "--min-decrypt-version", "4"]),
        "invalid-argument",
    );
    // Naming an old version to encrypt with is refused below the minimum.
    let err = c
        .call(Operation::Encrypt(protocol::EncryptArgs {
            name: "vault".into(),
            version: Some(2),
            plaintext: protocol::SecretBytes::new(vec![1]),
            aad: vec![],
        }))
        .expect_err("below the minimum");
    assert_eq!(err.code(), Some(ErrorCode::KeyState), "{err}");
}

#[test]
fn the_daemon_rotates_on_schedule_and_catches_up_after_being_stopped() {
    let (mut d, keyfile) = initialized(
        Daemon::builder()
            .keys("maintenance_interval", "\"200ms\"")
            .keys("min_rotation_period", "\"1s\""),
    );
    let mut c = d.client();
    create(
        &mut c,
        "auto",
        KeyType::Ed25519,
        KeyOptions {
            rotate_every_secs: Some(1),
            ..KeyOptions::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while info(&mut c, "auto").version < 3 {
        assert!(Instant::now() < deadline, "no scheduled rotation: {}", d.log());
        thread::sleep(Duration::from_millis(100));
    }
    assert!(d.log().contains("by its rotation policy"), "{}", d.log());

    // A longer period; the next rotation falls due while the daemon is down.
    ok(&d.hsmctl(&["key", "set", "auto", "--rotate-every", "3s"]));
    let before = info(&mut c, "auto").version;
    d.restart(false);
    thread::sleep(Duration::from_secs(4));
    let mut c = d.client();
    let locked = info(&mut c, "auto");
    assert_eq!(locked.version, before, "nothing rotates while locked");
    let text = ok(&d.hsmctl(&["key", "info", "auto"]));
    assert!(text.contains("rotation OVERDUE"), "{text}");
    ok(&d.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
    let deadline = Instant::now() + Duration::from_secs(5);
    while info(&mut c, "auto").version == before {
        assert!(
            Instant::now() < deadline,
            "overdue rotation not done after unlock: {}",
            d.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Every version still verifies what it signed: sign now, check with the newest.
    let sig = d.dir().join("s");
    let file = d.dir().join("f");
    fs::write(&file, b"x").expect("write");
    ok(&d.hsmctl(&["sign", "--force", "auto", "-i", p(&file), "-o", p(&sig)]));
    ok(&d.hsmctl(&["verify", "auto", "-i", p(&file), "-s", p(&sig)]));
    ok(&d.hsmctl(&["key", "set", "auto", "--rotate-every", "never"]));
    assert_eq!(info(&mut c, "auto").next_rotation_unix, None);
}

/// The README's state table: (state, [sign, verify, encrypt, decrypt, mac,
/// mac-verify, rewrap, datakey, rotate, public]).
fn readme_table() -> Vec<(String, Vec<String>)> {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README");
    let start = readme.find("<!-- key-state-table").expect("table start");
    let end = readme.find("<!-- end key-state-table -->").expect("table end");
    let rows: Vec<(String, Vec<String>)> = readme[start..end]
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("| state") && !l.starts_with("| ---"))
        .map(|l| {
            let cells: Vec<String> = l.trim_matches('|').split('|').map(|c| c.trim().to_owned()).collect();
            (cells[0].clone(), cells[1..].to_vec())
        })
        .collect();
    assert_eq!(rows.len(), 7, "seven states in the README table");
    rows
}

/// What one use of a key did: allowed, refused for its state, or refused
/// unless the compromised flag is given.
fn attempt(c: &mut Client, op: Operation) -> &'static str {
    match c.call(op) {
        Ok(Reply::Verified { valid }) | Ok(Reply::MacVerified { valid }) => {
            assert!(valid, "an allowed check of a good signature or tag is valid");
            "yes"
        }
        Ok(_) => "yes",
        Err(e) if e.code() == Some(ErrorCode::KeyState) => "no",
        Err(e) => panic!("unexpected refusal {e}"),
    }
}

#[test]
fn each_state_allows_exactly_its_row_of_the_readme_table() {
    let d = Daemon::builder().dev().start();
    let mut c = d.client();
    let digest = sha2::Sha512::digest(b"document").to_vec();
    for (row, expected) in readme_table() {
        let tag = row.split_whitespace().next().expect("state").to_owned();
        let (s, e, m) = (format!("{tag}-sig"), format!("{tag}-enc"), format!("{tag}-mac"));
        let options = if tag == "pre-active" {
            KeyOptions {
                activate_at_unix: Some(4_000_000_000),
                ..KeyOptions::default()
            }
        } else {
            KeyOptions::default()
        };
        for (name, t) in [
            (&s, KeyType::Ed25519),
            (&e, KeyType::Aes256Gcm),
            (&m, KeyType::HmacSha256),
        ] {
            create(&mut c, name, t, options.clone());
        }
        // Material made while the keys could still make it (pre-active keys
        // never could: their checks are refused before the bytes are looked at).
        let (signature, sealed, mac) = if tag == "pre-active" {
            (vec![0; 64], vec![0; 28], vec![0; 32])
        } else {
            let signature = match c
                .call(Operation::Sign(protocol::SignArgs {
                    name: s.clone(),
                    digest: digest.clone(),
                }))
                .expect("sign")
            {
                Reply::Signature { signature, .. } => signature,
                other => panic!("{other:?}"),
            };
            let sealed = match c
                .call(Operation::Encrypt(protocol::EncryptArgs {
                    name: e.clone(),
                    version: None,
                    plaintext: protocol::SecretBytes::new(b"p".to_vec()),
                    aad: vec![],
                }))
                .expect("encrypt")
            {
                Reply::Encrypted { sealed, .. } => sealed,
                other => panic!("{other:?}"),
            };
            let mac = match c
                .call(Operation::Mac(protocol::MacArgs {
                    name: m.clone(),
                    data: b"d".to_vec(),
                }))
                .expect("mac")
            {
                Reply::MacTag { tag, .. } => tag,
                other => panic!("{other:?}"),
            };
            (signature, sealed, mac)
        };
        let to = match tag.as_str() {
            "suspended" => Some(Transition::Disable),
            "deactivated" => Some(Transition::Deactivate),
            "compromised" => Some(Transition::Compromise),
            "destroyed" => Some(Transition::Destroy),
            _ => None,
        };
        for name in [&s, &e, &m] {
            if let Some(to) = to {
                c.call(Operation::KeyTransition { name: name.clone(), to })
                    .expect("transition");
            }
            if tag == "deleted" {
                c.call(Operation::KeyDelete { name: name.clone() }).expect("delete");
            }
            if tag != "deleted" {
                assert_eq!(info(&mut c, name).state.as_str(), tag, "state in force");
            }
        }
        let mut got = Vec::new();
        for flag in [false, true] {
            let ops = vec![
                Operation::Sign(protocol::SignArgs {
                    name: s.clone(),
                    digest: digest.clone(),
                }),
                Operation::Verify(protocol::VerifyArgs {
                    name: s.clone(),
                    version: 1,
                    digest: digest.clone(),
                    signature: signature.clone(),
                    allow_compromised: flag,
                }),
                Operation::Encrypt(protocol::EncryptArgs {
                    name: e.clone(),
                    version: None,
                    plaintext: protocol::SecretBytes::new(b"p".to_vec()),
                    aad: vec![],
                }),
                Operation::Decrypt(protocol::DecryptArgs {
                    name: e.clone(),
                    version: 1,
                    sealed: sealed.clone(),
                    aad: vec![],
                    allow_compromised: flag,
                }),
                Operation::Mac(protocol::MacArgs {
                    name: m.clone(),
                    data: b"d".to_vec(),
                }),
                Operation::MacVerify(protocol::MacVerifyArgs {
                    name: m.clone(),
                    version: 1,
                    data: b"d".to_vec(),
                    tag: mac.clone(),
                    allow_compromised: flag,
                }),
                Operation::Rewrap {
                    name: e.clone(),
                    version: 1,
                    sealed: sealed.clone(),
                    aad: vec![],
                    to_version: None,
                },
                Operation::DataKey {
                    name: e.clone(),
                    aad: vec![],
                    plaintext: false,
                },
            ];
            got.push(ops.into_iter().map(|op| attempt(&mut c, op)).collect::<Vec<_>>());
        }
        // Rotation and public-key export, last: rotation changes the key.
        let mut tail = vec![attempt(&mut c, Operation::KeyPublic { name: s.clone() })];
        tail.insert(0, attempt(&mut c, Operation::KeyRotate { name: s.clone() }));
        let merged: Vec<String> = got[0]
            .iter()
            .zip(&got[1])
            .map(|(without, with)| match (*without, *with) {
                (a, b) if a == b => a.to_owned(),
                ("no", "yes") => "flag".to_owned(),
                (a, b) => panic!("the flag took a use from {a} to {b}"),
            })
            .chain(tail.iter().map(|t| (*t).to_owned()))
            .collect();
        assert_eq!(merged, expected, "row {row:?} (columns as in the README)");
    }
    // A refusal names the state and what it forbids.
    let err = c
        .call(Operation::Sign(protocol::SignArgs {
            name: "suspended-sig".into(),
            digest: digest.clone(),
        }))
        .expect_err("suspended");
    assert!(
        err.to_string().contains("\"suspended-sig\" is suspended") && err.to_string().contains("key enable"),
        "{err}"
    );
    // And the high-risk uses are logged as such.
    assert!(
        d.log().contains("risk=\"high\"") || d.log().contains("risk=high"),
        "{}",
        d.log()
    );
}

#[test]
fn lifecycle_transitions_refuse_what_the_lifecycle_forbids() {
    let d = Daemon::builder().dev().start();
    ok(&d.hsmctl(&["key", "create", "k", "--type", "ed25519"]));
    refused(&d.hsmctl(&["key", "enable", "k"]), "key-state");
    ok(&d.hsmctl(&["key", "disable", "k"]));
    ok(&d.hsmctl(&["key", "enable", "k"]));
    ok(&d.hsmctl(&["key", "compromise", "k"]));
    let err = refused(&d.hsmctl(&["key", "enable", "k"]), "key-state");
    assert!(err.contains("is compromised"), "{err}");
    let out = d.hsmctl(&["key", "destroy", "k"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--yes"),
        "{out:?}"
    );
    ok(&d.hsmctl(&["key", "destroy", "k", "--yes"]));
    refused(&d.hsmctl(&["key", "destroy", "k", "--yes"]), "key-state");
    // Expiry deactivates by itself; activation times activate.
    let mut c = d.client();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    create(
        &mut c,
        "soon",
        KeyType::Ed25519,
        KeyOptions {
            activate_at_unix: Some(now + 3600),
            expire_at_unix: Some(now + 7200),
            ..KeyOptions::default()
        },
    );
    assert_eq!(info(&mut c, "soon").state.as_str(), "pre-active");
    c.call(Operation::DebugClock { advance_secs: 3700 }).expect("clock");
    assert_eq!(info(&mut c, "soon").state.as_str(), "active");
    c.call(Operation::DebugClock { advance_secs: 3700 }).expect("clock");
    assert_eq!(info(&mut c, "soon").state.as_str(), "deactivated");
    // Times that cannot be dates are refused, not stored.
    let err = c
        .call(Operation::KeyCreate {
            name: "far".into(),
            key_type: KeyType::Ed25519,
            usages: vec![],
            options: KeyOptions {
                expire_at_unix: Some(u64::MAX),
                ..KeyOptions::default()
            },
        })
        .expect_err("year 584 billion");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
}

#[test]
fn deleted_keys_wait_in_their_recovery_window_and_are_purged_when_it_ends() {
    let d = Daemon::builder().dev().keys("recovery_window", "\"7d\"").start();
    let file = d.dir().join("f");
    let sig = d.dir().join("s");
    fs::write(&file, b"data").expect("write");
    for k in ["keep", "gone", "expires"] {
        ok(&d.hsmctl(&["key", "create", k, "--type", "ed25519"]));
    }
    ok(&d.hsmctl(&["sign", "--force", "keep", "-i", p(&file), "-o", p(&sig)]));
    let said = ok(&d.hsmctl(&["key", "delete", "keep"]));
    assert!(said.contains("key restore keep"), "{said}");
    let err = refused(
        &d.hsmctl(&["sign", "--force", "keep", "-i", p(&file), "-o", p(&sig)]),
        "key-state",
    );
    assert!(err.contains("is deleted and will be purged at"), "{err}");
    refused(
        &d.hsmctl(&["verify", "keep", "-i", p(&file), "-s", p(&sig)]),
        "key-state",
    );
    let list: Vec<serde_json::Value> = serde_json::from_str(&ok(&d.hsmctl(&["--json", "key", "list"]))).expect("json");
    let keep = list.iter().find(|k| k["name"] == "keep").expect("listed while deleted");
    let (deleted, purge) = (
        keep["deleted_unix"].as_u64().expect("deleted"),
        keep["purge_at_unix"].as_u64().expect("purge"),
    );
    assert_eq!(purge - deleted, 7 * 86_400);
    assert!(ok(&d.hsmctl(&["key", "list"])).contains("DELETED, purged at"));
    ok(&d.hsmctl(&["key", "restore", "keep"]));
    ok(&d.hsmctl(&["verify", "keep", "-i", p(&file), "-s", p(&sig)]));
    ok(&d.hsmctl(&["sign", "--force", "keep", "-i", p(&file), "-o", p(&sig)]));
    refused(&d.hsmctl(&["key", "restore", "keep"]), "key-state");

    // Purge is refused on a live key, final on a deleted one.
    refused(&d.hsmctl(&["key", "purge", "gone", "--yes"]), "key-state");
    ok(&d.hsmctl(&["key", "delete", "gone"]));
    ok(&d.hsmctl(&["key", "purge", "gone", "--yes"]));
    refused(&d.hsmctl(&["key", "info", "gone"]), "not-found");
    refused(&d.hsmctl(&["key", "restore", "gone"]), "not-found");

    // An ended window purges by itself.
    ok(&d.hsmctl(&["key", "delete", "expires"]));
    let mut c = d.client();
    c.call(Operation::DebugClock {
        advance_secs: 7 * 86_400 + 1,
    })
    .expect("clock");
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.hsmctl(&["key", "info", "expires"]).status.success() {
        assert!(Instant::now() < deadline, "not purged: {}", d.log());
        thread::sleep(Duration::from_millis(100));
    }
    assert!(d.log().contains("recovery window ended"), "{}", d.log());
    ok(&d.hsmctl(&["key", "info", "keep"]));
}

#[test]
fn ten_thousand_signatures_are_counted_with_few_keystore_writes_and_survive_a_restart() {
    let (mut d, keyfile) = initialized(Daemon::builder().keys("usage_flush_interval", "\"1h\""));
    let mut c = d.client();
    create(&mut c, "busy", KeyType::Ed25519, KeyOptions::default());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let writes_before = c.status().expect("status").keystore_writes;
    let digest = vec![9u8; 64];
    // 9,000 in batches of 500 and 1,000 one at a time.
    for _ in 0..18 {
        let items = vec![
            BatchItem::Sign(protocol::SignArgs {
                name: "busy".into(),
                digest: digest.clone()
            });
            500
        ];
        let results = c.batch(items).expect("batch");
        assert_eq!(results.len(), 500);
        assert!(results
            .iter()
            .all(|r| matches!(r, Ok(Reply::Signature { version: 1, .. }))));
    }
    for _ in 0..1000 {
        c.call(Operation::Sign(protocol::SignArgs {
            name: "busy".into(),
            digest: digest.clone(),
        }))
        .expect("sign");
    }
    let writes = c.status().expect("status").keystore_writes - writes_before;
    println!("keystore writes for 10,000 signatures: {writes}");
    // Use counts cost none; the audit log records its head in the keystore at
    // each of its flushes (every second, or per 4,096 events).
    assert!(writes <= 10, "{writes} keystore writes for 10,000 signatures");
    let live = info(&mut c, "busy");
    assert_eq!(live.versions[0].use_count, 10_000, "counted in memory");

    d.restart(false);
    assert!(d.log().contains("key use counts written"), "{}", d.log());
    let mut c = d.client();
    ok(&d.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
    let k = info(&mut c, "busy");
    assert_eq!(k.versions[0].use_count, 10_000);
    let last = k.last_used_unix.expect("last used");
    assert!(
        last >= started && last <= started + 120,
        "last used {last}, started {started}"
    );
    assert_eq!(k.versions[0].last_used_unix, Some(last));
}

#[test]
fn batches_answer_item_by_item_and_have_a_limit() {
    let d = Daemon::builder().dev().start();
    let mut c = d.client();
    create(&mut c, "b-ed", KeyType::Ed25519, KeyOptions::default());
    create(&mut c, "b-aes", KeyType::Aes256Gcm, KeyOptions::default());
    let items = vec![
        BatchItem::Sign(protocol::SignArgs {
            name: "b-ed".into(),
            digest: vec![1; 64],
        }),
        BatchItem::Sign(protocol::SignArgs {
            name: "missing".into(),
            digest: vec![1; 64],
        }),
        BatchItem::Encrypt(protocol::EncryptArgs {
            name: "b-aes".into(),
            version: None,
            plaintext: protocol::SecretBytes::new(b"x".to_vec()),
            aad: vec![],
        }),
        BatchItem::Sign(protocol::SignArgs {
            name: "b-ed".into(),
            digest: vec![1; 3],
        }),
    ];
    let Reply::Batch(results) = c.call(Operation::Batch { items }).expect("batch") else {
        panic!("not a batch answer");
    };
    assert!(matches!(results[0], Ok(Reply::Signature { .. })));
    assert_eq!(results[1].as_ref().expect_err("missing").code, ErrorCode::NotFound);
    assert!(matches!(results[2], Ok(Reply::Encrypted { version: 1, .. })));
    assert_eq!(
        results[3].as_ref().expect_err("bad digest").code,
        ErrorCode::InvalidArgument
    );
    let too_many = vec![
        BatchItem::Mac(protocol::MacArgs {
            name: "x".into(),
            data: vec![]
        });
        MAX_BATCH_ITEMS + 1
    ];
    let err = c.call(Operation::Batch { items: too_many }).expect_err("limit");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
    assert!(err.to_string().contains("at most 1024"), "{err}");
}

#[test]
fn data_keys_come_sealed_and_in_plain_only_when_the_key_allows_it() {
    let d = Daemon::builder().dev().start();
    let dir = d.dir();
    ok(&d.hsmctl(&["key", "create", "dek", "--type", "aes256-gcm"]));
    let sealed = dir.join("k.enc");
    ok(&d.hsmctl(&["datakey", "--force", "dek", "-o", p(&sealed)]));
    let opened = dir.join("k.bin");
    ok(&d.hsmctl(&["decrypt", "--force", "dek", "-i", p(&sealed), "-o", p(&opened)]));
    assert_eq!(fs::read(&opened).expect("read").len(), 32);

    let plain = dir.join("plain.bin");
    let err = refused(
        &d.hsmctl(&[
            "datakey",
            "--force",
            "dek",
            "-o",
            p(&dir.join("k2.enc")),
            "--plaintext-out",
            p(&plain),
        ]),
        "failed-precondition",
    );
    assert!(err.contains("--allow-plaintext-datakey"), "{err}");
    assert!(!plain.exists());
    ok(&d.hsmctl(&["key", "set", "dek", "--allow-plaintext-datakey", "true"]));
    ok(&d.hsmctl(&[
        "datakey",
        "--force",
        "dek",
        "-o",
        p(&dir.join("k3.enc")),
        "--plaintext-out",
        p(&plain),
    ]));
    let again = dir.join("k3.bin");
    ok(&d.hsmctl(&[
        "decrypt",
        "--force",
        "dek",
        "-i",
        p(&dir.join("k3.enc")),
        "-o",
        p(&again),
    ]));
    assert_eq!(fs::read(&plain).expect("read"), fs::read(&again).expect("read"));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(fs::metadata(&plain).expect("stat").permissions().mode() & 0o777, 0o600);
    refused(
        &d.hsmctl(&["key", "create", "sig", "--type", "ed25519", "--allow-plaintext-datakey"]),
        "invalid-argument",
    );
}

#[test]
fn an_edited_key_state_in_the_file_is_detected_as_tampering() {
    let (mut d, keyfile) = initialized(Daemon::builder());
    ok(&d.hsmctl(&["key", "create", "burned", "--type", "ed25519"]));
    ok(&d.hsmctl(&["key", "create", "fine", "--type", "ed25519"]));
    ok(&d.hsmctl(&["key", "compromise", "burned"]));
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    {
        let conn = rusqlite::Connection::open(d.dir().join("state/keystore.sqlite")).expect("open");
        let n = conn
            .execute("UPDATE keys SET state = 'active' WHERE name = 'burned'", [])
            .expect("edit");
        assert_eq!(n, 1);
    }
    d.restart(false);
    ok(&d.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
    let file = d.dir().join("f");
    fs::write(&file, b"x").expect("write");
    let err = refused(
        &d.hsmctl(&["sign", "--force", "burned", "-i", p(&file), "-o", p(&d.dir().join("s"))]),
        "tampered",
    );
    assert!(err.contains("edited outside hsmd"), "{err}");
    ok(&d.hsmctl(&["sign", "--force", "fine", "-i", p(&file), "-o", p(&d.dir().join("s"))]));
}

#[test]
fn recovery_window_outside_seven_to_ninety_days_is_refused_at_start() {
    let prepared = Daemon::builder().keys("recovery_window", "\"3d\"").prepare();
    let out = prepared.command().output().expect("run hsmd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keys.recovery_window") && err.contains("7 to 90 days"),
        "{err}"
    );
}
