//! The key service, in process (no daemon, no socket): usages and lifecycle
//! checked before material is touched, versions and rotation, soft delete,
//! caches that never outlive a change, tampering found, use counts kept.
//! The end-to-end tests (tests/tests/keys.rs, lifecycle.rs) cover the same
//! through hsmctl; these show the key service alone, in milliseconds.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use hsmd::keystore::{slots::Argon2Cost, Vault, VaultError};
use protocol::{KeyChanges, KeyOptions, KeyState, KeyType, NewSlot, SecretBytes, Transition, UnlockSecret, Usage};
use sha2::{Digest as _, Sha256, Sha512};

fn keyfile() -> SecretBytes {
    SecretBytes::new(vec![3; 32])
}

/// A fresh, unlocked keystore in a temporary directory.
fn vault() -> (tempfile::TempDir, Vault) {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = Vault::open(dir.path(), Argon2Cost::FLOOR).expect("open");
    v.custody()
        .init(&NewSlot::Keyfile {
            label: "test".into(),
            key: keyfile(),
        })
        .expect("init");
    (dir, v)
}

fn create(v: &Vault, name: &str, key_type: KeyType, usages: &[Usage]) {
    v.keys()
        .create_key(name, key_type, usages, &KeyOptions::default(), 1000, None)
        .expect("create");
}

#[test]
fn a_key_does_only_what_its_usages_allow() {
    let (_dir, v) = vault();
    create(&v, "checker", KeyType::EcdsaP256, &[Usage::Verify]);
    let key = v.keys().find("checker", None).expect("find");
    let digest = Sha256::digest(b"x").to_vec();
    match v.keys().sign(&key, &digest) {
        Err(VaultError::UsageNotAllowed { name, usage, usages }) => {
            assert_eq!((name.as_str(), usage, usages.as_str()), ("checker", "sign", "verify"));
        }
        other => panic!("a verify-only key signed: {other:?}"),
    }
    // A digest of the wrong length is refused before anything is signed.
    create(&v, "signer", KeyType::EcdsaP256, &[]);
    let signer = v.keys().find("signer", None).expect("find");
    assert!(matches!(
        v.keys().sign(&signer, &Sha512::digest(b"x")),
        Err(VaultError::Invalid(why)) if why.contains("32-byte digest")
    ));
    // An AES key seals and opens, and nothing opens what another key, or
    // other associated data, sealed.
    create(&v, "box", KeyType::Aes256Gcm, &[]);
    create(&v, "other", KeyType::Aes256Gcm, &[]);
    let (k, o) = (
        v.keys().find("box", None).unwrap(),
        v.keys().find("other", None).unwrap(),
    );
    let (version, sealed) = v.keys().encrypt(&k, None, b"secret", b"ctx").expect("encrypt");
    assert_eq!(version, 1);
    assert_eq!(
        &*v.keys().decrypt(&k, &sealed, b"ctx", false).expect("decrypt"),
        b"secret"
    );
    assert!(matches!(
        v.keys().decrypt(&k, &sealed, b"other ctx", false),
        Err(VaultError::DecryptFailed(_))
    ));
    assert!(
        v.keys().decrypt(&o, &sealed, b"ctx", false).is_err(),
        "another key opened it"
    );
}

#[test]
fn rotation_adds_a_version_and_minimum_versions_retire_the_old_one() {
    let (_dir, v) = vault();
    create(&v, "data", KeyType::Aes256Gcm, &[]);
    let keys = v.keys();
    let key = keys.find("data", None).unwrap();
    let (v1, old) = keys.encrypt(&key, None, b"old", b"").unwrap();
    let info = keys.rotate_key("data").expect("rotate");
    assert_eq!((v1, info.version), (1, 2));
    // The newest version seals now; the old one still opens what it sealed.
    let key = keys.find("data", None).unwrap();
    let (v2, new) = keys.encrypt(&key, None, b"new", b"").unwrap();
    assert_eq!(v2, 2);
    let first = keys.find("data", Some(1)).unwrap();
    assert_eq!(&*keys.decrypt(&first, &old, b"", false).unwrap(), b"old");
    assert!(
        keys.decrypt(&key, &old, b"", false).is_err(),
        "version 2 opened what version 1 sealed"
    );
    // A caller that does not know the version gets it with the plaintext.
    let any = |sealed: &[u8]| keys.decrypt_any_version("data", sealed, b"", false);
    let (version, plaintext) = any(&old).unwrap();
    assert_eq!((version, plaintext.as_slice()), (1, &b"old"[..]));
    assert_eq!(any(&new).unwrap().0, 2);
    // Until the minimum decrypt version passes it.
    let changes = KeyChanges {
        min_decrypt_version: Some(2),
        ..KeyChanges::default()
    };
    keys.set_key("data", &changes).expect("set");
    let first = keys.find("data", Some(1)).unwrap();
    let key = keys.find("data", None).unwrap();
    assert!(matches!(
        keys.decrypt(&first, &old, b"", false),
        Err(VaultError::KeyState(_))
    ));
    assert_eq!(&*keys.decrypt(&key, &new, b"", false).unwrap(), b"new");
    assert!(
        matches!(any(&old), Err(VaultError::DecryptFailed(_))),
        "version 1 is no longer tried"
    );
    assert_eq!(any(&new).unwrap().0, 2);
}

#[test]
fn a_state_change_takes_effect_at_the_next_lookup_though_the_row_was_cached() {
    let (_dir, v) = vault();
    create(&v, "rel", KeyType::Ed25519, &[]);
    let keys = v.keys();
    let key = keys.find("rel", None).unwrap();
    let digest = Sha512::digest(b"release").to_vec();
    let (_, signature) = keys.sign(&key, &digest).expect("sign while active");
    let info = keys.transition_key("rel", Transition::Deactivate).expect("deactivate");
    assert_eq!(info.state, KeyState::Deactivated);
    // Its row was cached when it signed; the change dropped it, so the next
    // lookup sees the new state. A deactivated key still verifies.
    let key = keys.find("rel", None).unwrap();
    assert!(matches!(keys.sign(&key, &digest), Err(VaultError::KeyState(_))));
    assert!(keys.verify(&key, &digest, &signature, false).expect("verify"));
}

#[test]
fn a_deleted_key_is_gone_until_restored_and_a_purged_one_for_good() {
    let (_dir, v) = vault();
    create(&v, "tmp", KeyType::HmacSha256, &[]);
    let keys = v.keys();
    let key = keys.find("tmp", None).unwrap();
    let (_, tag) = keys.mac(&key, b"data").expect("mac");
    keys.delete_key("tmp", Duration::from_secs(3600)).expect("delete");
    let after = keys.find("tmp", None).and_then(|k| keys.mac(&k, b"data"));
    assert!(after.is_err(), "a deleted key made a MAC");
    // Listed as deleted, with the time it will be purged.
    let listed = keys.list_keys().unwrap().into_iter().find(|k| k.name == "tmp").unwrap();
    assert!(listed.deleted_unix.is_some() && listed.purge_at_unix.is_some());
    keys.restore_key("tmp").expect("restore");
    let key = keys.find("tmp", None).unwrap();
    assert!(keys.mac_verify(&key, b"data", &tag, false).expect("mac verify"));
    keys.delete_key("tmp", Duration::from_secs(3600)).unwrap();
    keys.purge_key("tmp").expect("purge");
    assert!(matches!(keys.find("tmp", None), Err(VaultError::NoSuchKey(_))));
    assert!(matches!(keys.restore_key("tmp"), Err(VaultError::NoSuchKey(_))));
    // The name is free again, for a new key with a new identity.
    create(&v, "tmp", KeyType::HmacSha256, &[]);
    let key = v.keys().find("tmp", None).unwrap();
    assert!(!v.keys().mac_verify(&key, b"data", &tag, false).unwrap());
}

#[test]
fn widening_a_keys_usages_in_the_file_makes_it_fail_as_tampered() {
    let (dir, v) = vault();
    create(&v, "narrow", KeyType::EcdsaP256, &[Usage::Verify]);
    drop(v);
    let db = rusqlite::Connection::open(dir.path().join("keystore.sqlite")).expect("sqlite");
    let n = db
        .execute("UPDATE keys SET usages = 'sign,verify' WHERE name = 'narrow'", [])
        .expect("edit");
    assert_eq!(n, 1);
    drop(db);
    let v = Vault::open(dir.path(), Argon2Cost::FLOOR).expect("reopen");
    v.unlock(0, &UnlockSecret::Keyfile(keyfile())).expect("unlock");
    let key = v.keys().find("narrow", None).expect("find");
    match v.keys().sign(&key, &Sha256::digest(b"x")) {
        Err(VaultError::Tampered(why)) => assert!(why.contains("narrow"), "{why}"),
        other => panic!("an edited key was used: {other:?}"),
    }
}

#[test]
fn use_counts_are_kept_across_a_reopen_once_flushed() {
    let (dir, v) = vault();
    create(&v, "counted", KeyType::Ed25519, &[]);
    let key = v.keys().find("counted", None).unwrap();
    let digest = Sha512::digest(b"x").to_vec();
    for _ in 0..5 {
        v.keys().sign(&key, &digest).unwrap();
    }
    // Counted in memory at once, written when flushed.
    let count = |v: &Vault| v.keys().key_info("counted").unwrap().versions[0].use_count;
    assert_eq!(count(&v), 5);
    v.keys().flush_usage().expect("flush");
    drop(v);
    let v = Vault::open(dir.path(), Argon2Cost::FLOOR).expect("reopen");
    v.unlock(0, &UnlockSecret::Keyfile(keyfile())).expect("unlock");
    assert_eq!(count(&v), 5);
}
