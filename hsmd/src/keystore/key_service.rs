//! The key service: what it keeps between requests (cached rows, use counts
//! not yet written, the gate for changes), and [`Keys`], the handle through
//! which keys are made, changed and used. Its operations live in `key_ops`
//! and `key_set`; the master key and unwrapped versions come from
//! [`Custody`].

use std::{
    collections::HashMap,
    sync::{atomic::AtomicU64, Arc, Mutex},
};

use crate::backend::Backends;

use super::{
    key_ops::{Cached, UseCounter},
    key_set, lock,
    store::Store,
    Custody,
};

/// Cached key rows by (name, version; `None` = newest).
type RowCache = HashMap<(String, Option<u32>), Arc<Cached>>;

/// The key service's state (reached only through [`Keys`]).
pub struct KeyService {
    pub(super) store: Arc<Mutex<Store>>,
    /// Key rows by (name, version; `None` = newest), so key use does not query
    /// SQLite. Cleared by every operation that changes a key.
    pub(super) rows: Mutex<RowCache>,
    /// Uses per (key id, version) not yet written; see `Keys::flush_usage`.
    pub(super) usage: Mutex<HashMap<(String, u32), Arc<UseCounter>>>,
    /// Serializes changes to keys (read, change, seal, write).
    pub(super) manage_gate: Mutex<()>,
    /// Seconds added to the clock by dev mode's `DebugClock`.
    pub(super) clock_offset: AtomicU64,
    /// The store's count of write transactions.
    pub(super) writes: Arc<AtomicU64>,
    /// Where keys live; set once at start.
    pub(super) backends: Backends,
    /// What the last unlock's check of the key set found.
    pub(super) findings: Mutex<key_set::Findings>,
    /// The shortest rotation period a key may be given, in seconds.
    pub(super) min_rotation_secs: u64,
}

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService").finish_non_exhaustive()
    }
}

impl KeyService {
    pub(super) fn new(store: Arc<Mutex<Store>>, writes: Arc<AtomicU64>) -> Self {
        Self {
            store,
            rows: Mutex::new(HashMap::new()),
            usage: Mutex::new(HashMap::new()),
            manage_gate: Mutex::new(()),
            clock_offset: AtomicU64::new(0),
            writes,
            backends: Backends::default(),
            findings: Mutex::new(key_set::Findings::default()),
            min_rotation_secs: 3600,
        }
    }

    /// Forgets every cached row and unwritten count: after the store was
    /// replaced by a backup's.
    pub(super) fn forget_all(&self) {
        lock(&self.rows).clear();
        lock(&self.usage).clear();
    }
}

/// The keys of the keystore, from [`super::Vault::keys`]: every method may
/// block (SQLite, a backend), so call them from the blocking pool.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    service: &'a KeyService,
    /// Where the master key and unwrapped versions come from.
    pub(super) custody: &'a Custody,
}

impl<'a> Keys<'a> {
    pub(super) fn new(service: &'a KeyService, custody: &'a Custody) -> Self {
        Self { service, custody }
    }
}

impl std::ops::Deref for Keys<'_> {
    type Target = KeyService;

    fn deref(&self) -> &KeyService {
        self.service
    }
}
