//! The keystore's custody, in process (no daemon, no socket): states, unlock
//! and its back-off per uid, keys surviving a lock and a reopen, the last slot.
//! The end-to-end tests (tests/tests/custody.rs) cover the same through hsmctl;
//! these show the core alone, in milliseconds.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use hsmd::keystore::{slots::Argon2Cost, Vault, VaultError};
use protocol::{KeyOptions, KeyType, NewSlot, SecretBytes, ServiceState, UnlockSecret};
use sha2::{Digest as _, Sha512};

fn keyfile(byte: u8) -> SecretBytes {
    SecretBytes::new(vec![byte; 32])
}

fn unlock(v: &Vault, uid: u32, byte: u8) -> Result<u32, VaultError> {
    v.unlock(uid, &UnlockSecret::Keyfile(keyfile(byte)))
        .map(|(slot, _)| slot)
}

#[test]
fn custody_moves_through_its_states_and_keys_outlive_a_lock_and_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = Vault::open(dir.path(), Argon2Cost::FLOOR).expect("open");
    assert_eq!(v.custody().state(), ServiceState::Uninitialized);
    assert!(matches!(unlock(&v, 1000, 7), Err(VaultError::NotInitialized)));

    let slot = v
        .custody()
        .init(&NewSlot::Keyfile {
            label: "first".into(),
            key: keyfile(7),
        })
        .expect("init");
    assert_eq!(v.custody().state(), ServiceState::Unlocked);
    v.keys()
        .create_key(
            "rel",
            KeyType::Ed25519,
            &[],
            &KeyOptions::default(),
            1000,
            Some("alice"),
        )
        .expect("create");
    let digest = Sha512::digest(b"release").to_vec();
    let key = v.keys().find("rel", None).expect("find");
    let (version, signature) = v.keys().sign(&key, &digest).expect("sign");

    v.custody().lock().expect("lock");
    assert_eq!(v.custody().state(), ServiceState::Locked);
    assert!(matches!(
        v.keys().find("rel", None).and_then(|k| v.keys().sign(&k, &digest)),
        Err(VaultError::Locked)
    ));

    // A wrong key file: refused, then the same uid must wait; another uid not.
    assert!(matches!(unlock(&v, 1000, 9), Err(VaultError::UnlockFailed { .. })));
    assert!(matches!(
        unlock(&v, 1000, 7),
        Err(VaultError::Backoff { uid: 1000, .. })
    ));
    assert_eq!(unlock(&v, 1001, 7).expect("another uid unlocks"), slot);
    let old = v.keys().find("rel", Some(version)).expect("find the version");
    assert!(v.keys().verify(&old, &digest, &signature, false).expect("verify"));

    // Reopened from its files: locked, and the same key after unlocking.
    drop(v);
    let v = Vault::open(dir.path(), Argon2Cost::FLOOR).expect("reopen");
    assert_eq!(v.custody().state(), ServiceState::Locked);
    unlock(&v, 0, 7).expect("unlock after reopen");
    let keys = v.keys().list_keys().expect("list");
    assert_eq!(keys.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["rel"]);
    let old = v.keys().find("rel", Some(version)).expect("find the version");
    assert!(v.keys().verify(&old, &digest, &signature, false).expect("verify"));

    // The last slot cannot go; with a second one, the first can.
    assert!(matches!(v.custody().remove_slot(slot), Err(VaultError::LastSlot(_))));
    let second = v
        .custody()
        .add_slot(&NewSlot::Keyfile {
            label: "second".into(),
            key: keyfile(8),
        })
        .expect("add");
    v.custody().remove_slot(slot).expect("remove the first");
    v.custody().lock().expect("lock");
    assert!(matches!(unlock(&v, 0, 7), Err(VaultError::UnlockFailed { .. })));
    assert_eq!(unlock(&v, 2000, 8).expect("the second slot"), second);
}
