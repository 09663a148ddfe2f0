//! The keystore: custody of its master key ([`Custody`]) and the keys it
//! holds ([`Keys`]), over one SQLite file ([`store`]).
//!
//! States (DESIGN.md): `uninitialized → locked ⇄ unlocked`. A random 256-bit
//! master key exists in memory only while unlocked; on disk it exists only sealed
//! under each unlock slot's key (see [`slots`]). The key service asks custody
//! for the master key and for unwrapped key versions, never the other way.

mod audit_anchors;
pub(crate) mod backup;
/// Moved to the crate's root (the backends use it too); here for the old paths.
pub use crate::crypto;
pub use backup::MAX_ARCHIVE;
mod custody;
mod key_ops;
mod key_service;
mod key_set;
pub use custody::Custody;
pub use key_ops::{DataKey, Found, Maintained, Maintenance, SignedThen};
pub use key_service::Keys;
pub mod keys;
pub mod lifecycle;
pub mod slots;
pub mod store;

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use protocol::{ErrorCode, KeyType, UnlockSecret, WireError};
use thiserror::Error;

use crate::backend::{BackendError, Backends};

use self::{
    crypto::CryptoError,
    key_service::KeyService,
    slots::{Argon2Cost, SlotError},
    store::{KeyRow, Store, StoreError},
};

/// What went wrong with a custody operation.
#[derive(Debug, Error)]
pub enum VaultError {
    /// No keystore yet.
    #[error("hsmd has no keystore yet; create one with `hsmctl init`")]
    NotInitialized,
    /// Init on an existing keystore.
    #[error("hsmd already has a keystore; use `hsmctl unlock`")]
    AlreadyInitialized,
    /// The operation needs the master key.
    #[error("hsmd is locked; unlock it with `hsmctl unlock`")]
    Locked,
    /// No slot accepted the secret.
    #[error("no {kind} slot accepts this {kind}")]
    UnlockFailed {
        /// `passphrase` or `keyfile`.
        kind: &'static str,
    },
    /// A backup archive did not open with the secret given.
    #[error("{0}")]
    BackupSecret(String),
    /// A backup archive was edited in a way its checksum does not show (the
    /// checksum was recomputed): found once the right secret was given.
    #[error("backup archive tampered: {0}")]
    BackupTampered(String),
    /// Too many wrong secrets from this uid.
    #[error("too many failed unlock attempts from uid {uid}; try again in {} ms", retry_after.as_millis())]
    Backoff {
        /// The caller.
        uid: u32,
        /// How long to wait.
        retry_after: Duration,
    },
    /// No such slot.
    #[error("there is no unlock slot {0}; `hsmctl slot list` shows them")]
    NoSuchSlot(u32),
    /// The last slot cannot go.
    #[error("slot {0} is the last unlock slot; add another before removing it")]
    LastSlot(u32),
    /// A secret, label, name or argument is unacceptable.
    #[error("{0}")]
    Invalid(String),
    /// No key by that name (or not that version).
    #[error("there is no key {0}; `hsmctl key list` shows them")]
    NoSuchKey(String),
    /// The name is taken.
    #[error("a key named {0:?} already exists")]
    KeyExists(String),
    /// Decryption failed authentication.
    #[error("cannot decrypt with key {0:?}: the ciphertext or its associated data was altered, or it was made with another key")]
    DecryptFailed(String),
    /// The key's usages do not include this operation.
    #[error("key {name:?} may not be used to {usage}; its usages are {usages}")]
    UsageNotAllowed {
        /// The key.
        name: String,
        /// What was asked.
        usage: &'static str,
        /// What it allows.
        usages: String,
    },
    /// The key's state, deletion or minimum version forbids the operation.
    #[error("{0}")]
    KeyState(String),
    /// An error already in wire form (from a part of the daemon outside the keystore).
    #[error("{}", .0.message)]
    Wire(WireError),
    /// A stored record failed its checks.
    #[error("keystore record tampered: {0}")]
    Tampered(String),
    /// The file failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The OS random source failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The key's backend could not do it.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A slot key could not be derived: the secret has the wrong shape for
    /// its kind of slot, or the slot's parameters are unusable.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// hsmd could not encode a record of its own (a bug; nothing was written).
    #[error("hsmd could not encode {what}: {source}; nothing was written. Report this as a bug")]
    Encode {
        /// The record.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// No TPM2 slot could be unsealed, and why.
    #[error("no tpm2 slot unlocks: {0}")]
    Tpm2Refused(String),
}

impl VaultError {
    /// The wire form: a stable code and this message.
    #[must_use]
    pub fn to_wire(&self) -> WireError {
        let code = match self {
            Self::Wire(w) => return w.clone(),
            Self::NotInitialized => ErrorCode::NotInitialized,
            Self::AlreadyInitialized => ErrorCode::AlreadyInitialized,
            Self::Locked => ErrorCode::Locked,
            Self::UnlockFailed { .. } | Self::BackupSecret(_) | Self::Tpm2Refused(_) => ErrorCode::UnlockFailed,
            Self::Backoff { .. } => ErrorCode::RateLimited,
            Self::NoSuchSlot(_) => ErrorCode::NotFound,
            Self::LastSlot(_) => ErrorCode::FailedPrecondition,
            Self::Invalid(_) | Self::Slot(_) => ErrorCode::InvalidArgument,
            Self::Encode { .. } => ErrorCode::Internal,
            Self::Tampered(_) | Self::BackupTampered(_) => ErrorCode::Tampered,
            Self::NoSuchKey(_) => ErrorCode::NotFound,
            Self::KeyExists(_) => ErrorCode::AlreadyExists,
            Self::DecryptFailed(_) => ErrorCode::DecryptFailed,
            Self::UsageNotAllowed { .. } => ErrorCode::FailedPrecondition,
            Self::KeyState(_) => ErrorCode::KeyState,
            Self::Store(e) if e.storage_cause().is_some() => ErrorCode::StorageUnavailable,
            Self::Store(_) | Self::Crypto(_) => ErrorCode::Internal,
            Self::Backend(BackendError::Unavailable { .. }) => ErrorCode::BackendUnavailable,
            Self::Backend(BackendError::Failed { .. }) => ErrorCode::BackendFailed,
            Self::Backend(BackendError::Unsupported(_)) => ErrorCode::InvalidArgument,
            Self::Backend(BackendError::BadReference { .. }) => ErrorCode::Tampered,
        };
        let message = match self {
            Self::Store(e) if e.storage_cause().is_some() => format!(
                "hsmd could not use its keystore: {}; nothing was changed. Free space or repair the file system, \
                 then retry",
                e.storage_cause().unwrap_or_default()
            ),
            // Paths and SQLite detail stay in the daemon's log.
            Self::Store(_) | Self::Crypto(_) => "hsmd could not read or write its keystore; see its log".to_owned(),
            other => other.to_string(),
        };
        WireError::new(code, message)
    }
}

/// The keystore: its custody and its keys, over one store. Every method may
/// block (SQLite, Argon2): call them from the blocking pool.
pub struct Vault {
    store: Arc<Mutex<Store>>,
    custody: Custody,
    keys: KeyService,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("state", &self.custody.state())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a lock leaves state that is still consistent (every
    // write is one assignment), so poisoning is not a reason to stop serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Associated data binding a key version's sealed material to everything that
/// says what the key is and may do: swapping rows, renaming, widening usages or
/// substituting a public key all make it fail.
fn key_aad(store_id: &[u8], row: &KeyRow) -> Vec<u8> {
    let mut aad = b"hsmd key v1\0".to_vec();
    for part in [
        store_id,
        row.id.as_bytes(),
        row.name.as_bytes(),
        row.key_type.as_bytes(),
        row.backend.as_bytes(),
        row.usages.as_bytes(),
    ] {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad.extend_from_slice(&row.version.to_be_bytes());
    let public = row.public.as_deref().unwrap_or_default();
    aad.extend_from_slice(&(public.len() as u32).to_be_bytes());
    aad.extend_from_slice(public);
    aad
}

fn parse_type(row: &KeyRow) -> Result<KeyType, VaultError> {
    KeyType::parse(&row.key_type)
        .ok_or_else(|| VaultError::Tampered(format!("key {:?} has unknown type {:?}", row.name, row.key_type)))
}

impl Vault {
    /// Opens the keystore in `state_dir`; comes up `locked` if it holds a
    /// keystore, else `uninitialized`.
    ///
    /// # Errors
    /// [`VaultError::Store`] if the file cannot be opened or migrated.
    pub fn open(state_dir: &Path, cost: Argon2Cost) -> Result<Self, VaultError> {
        let store = Store::open(state_dir)?;
        // A backup, check or restore killed midway leaves its scratch copy.
        let removed = backup::remove_scratch(store.dir());
        if removed > 0 {
            tracing::info!(removed, "removed scratch files a backup interrupted by a crash left");
        }
        let store_id = store.store_id()?;
        let writes = store.write_counter();
        let store = Arc::new(Mutex::new(store));
        Ok(Self {
            custody: Custody::new(Arc::clone(&store), store_id, cost),
            keys: KeyService::new(Arc::clone(&store), writes),
            store,
        })
    }

    /// Uses `backends` for keys (the default is `soft` alone).
    #[must_use]
    pub fn with_backends(mut self, backends: Backends) -> Self {
        self.custody.backends = backends.clone();
        self.keys.backends = backends;
        self
    }

    /// Refuses rotation periods shorter than `period` (`keys.min_rotation_period`;
    /// the default is one hour).
    #[must_use]
    pub fn with_min_rotation(mut self, period: std::time::Duration) -> Self {
        self.keys.min_rotation_secs = period.as_secs().max(1);
        self
    }

    /// The configured backends.
    #[must_use]
    pub fn backends(&self) -> &Backends {
        &self.keys.backends
    }

    /// Custody of the master key: states, slots, back-off, backend PIN.
    #[must_use]
    pub fn custody(&self) -> &Custody {
        &self.custody
    }

    /// The keys: creation, lifecycle and use.
    #[must_use]
    pub fn keys(&self) -> Keys<'_> {
        Keys::new(&self.keys, &self.custody)
    }

    /// Unlocks custody with `secret` (see [`Custody::unlock`]), then has the
    /// key service seal what predates policy MACs and check the key set.
    /// Returns the slot that opened and what the check found wrong, one
    /// sentence each.
    ///
    /// # Errors
    /// As [`Custody::unlock`].
    pub fn unlock(&self, uid: u32, secret: &UnlockSecret) -> Result<(u32, Vec<String>), VaultError> {
        let slot = self.custody.unlock(uid, secret)?;
        Ok((slot, self.keys().after_unlock()))
    }
}
