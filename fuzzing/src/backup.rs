//! Backup archives as `hsmctl backup verify` has hsmd read them: a valid
//! archive made by hsmd, damaged as the input says, verified without and
//! with the secret that opens it. The untouched archive must verify; a
//! damaged one must be refused or verify, never panic.
//!
//! Input: the first byte's bit 0 asks for the secret (the payload is then
//! opened and its keystore inspected); bit 1 reads the rest as a whole
//! archive of its own instead of edits to the valid one.

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use hsmd::keystore::{slots::Argon2Cost, Vault};
use protocol::{BackupProtection, KeyOptions, KeyType, NewSlot, SecretBytes, UnlockSecret};

struct Base {
    _dir: tempfile::TempDir,
    vault: Vault,
    archive: Vec<u8>,
}

fn keyfile() -> SecretBytes {
    SecretBytes::new(vec![7; 32])
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = Vault::open(dir.path(), Argon2Cost::FLOOR).expect("open the keystore");
        vault
            .custody()
            .init(&NewSlot::Keyfile {
                label: "fuzz".into(),
                key: keyfile(),
            })
            .expect("init");
        for (name, key_type) in [("ed", KeyType::Ed25519), ("aes", KeyType::Aes256Gcm)] {
            vault
                .keys()
                .create_key(name, key_type, &[], &KeyOptions::default(), 0, None)
                .expect("create a key");
        }
        let (archive, _) = vault.create_backup(&BackupProtection::MasterKey).expect("backup");
        Base {
            _dir: dir,
            vault,
            archive,
        }
    })
}

/// One change to the archive.
#[derive(Debug, Arbitrary)]
enum Edit {
    Flip { at: u32, bits: u8 },
    Truncate { at: u32 },
    Insert { at: u32, bytes: Vec<u8> },
}

/// Verifies the edited (or given) archive.
pub fn run(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let base = base();
    let archive = if flags & 2 == 2 {
        rest.to_vec()
    } else {
        let Ok(edits) = Vec::<Edit>::arbitrary_take_rest(Unstructured::new(rest)) else {
            return;
        };
        let mut archive = base.archive.clone();
        for edit in edits {
            let at = |at: u32, len: usize| usize::try_from(at).unwrap_or(usize::MAX) % (len + 1);
            match edit {
                Edit::Flip { at: i, bits } if !archive.is_empty() => {
                    let i = at(i, archive.len() - 1);
                    archive[i] ^= bits;
                }
                Edit::Truncate { at: i } => archive.truncate(at(i, archive.len())),
                Edit::Insert { at: i, bytes } => {
                    let i = at(i, archive.len());
                    archive.splice(i..i, bytes);
                }
                Edit::Flip { .. } => {}
            }
        }
        archive
    };
    let secret = UnlockSecret::Keyfile(keyfile());
    let result = base
        .vault
        .verify_backup(0, &archive, (flags & 1 == 1).then_some(&secret));
    if archive == base.archive {
        let manifest = result.unwrap_or_else(|e| panic!("hsmd's own archive did not verify: {e}"));
        assert_eq!(manifest.authenticated, flags & 1 == 1);
    }
}
