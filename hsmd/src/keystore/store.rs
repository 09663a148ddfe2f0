//! The keystore file: SQLite in the state directory, WAL mode, every commit
//! durable (`synchronous=FULL`), schema versioned by `PRAGMA user_version`.

use std::{
    fs::{self, OpenOptions},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use thiserror::Error;

/// The file name inside the state directory.
pub const FILE_NAME: &str = "keystore.sqlite";

/// Each migration moves the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the keystore's identity and the unlock slots.
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT;
     CREATE TABLE slots (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         kind TEXT NOT NULL,
         label TEXT NOT NULL,
         params TEXT NOT NULL,
         wrapped BLOB NOT NULL,
         created_unix INTEGER NOT NULL
     ) STRICT;",
    // 2: keys, each with its versions (rotation adds versions).
    "CREATE TABLE keys (
         id TEXT PRIMARY KEY,
         name TEXT NOT NULL UNIQUE,
         type TEXT NOT NULL,
         backend TEXT NOT NULL,
         usages TEXT NOT NULL,
         owner_uid INTEGER NOT NULL,
         created_unix INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE key_versions (
         key_id TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
         version INTEGER NOT NULL,
         wrapped BLOB NOT NULL,
         public BLOB,
         created_unix INTEGER NOT NULL,
         PRIMARY KEY (key_id, version)
     ) STRICT;",
    // 3: lifecycle (NIST states, activation and expiry, soft delete), rotation
    // policy, minimum versions, descriptive metadata, per-version use counters,
    // and a MAC over the fields that decide what a key may do.
    "ALTER TABLE keys ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
     ALTER TABLE keys ADD COLUMN state_changed_unix INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE keys ADD COLUMN activate_at_unix INTEGER;
     ALTER TABLE keys ADD COLUMN activated_unix INTEGER;
     ALTER TABLE keys ADD COLUMN expire_at_unix INTEGER;
     ALTER TABLE keys ADD COLUMN rotate_every_secs INTEGER;
     ALTER TABLE keys ADD COLUMN min_decrypt_version INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE keys ADD COLUMN min_encrypt_version INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE keys ADD COLUMN latest_version INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE keys ADD COLUMN deleted_unix INTEGER;
     ALTER TABLE keys ADD COLUMN purge_at_unix INTEGER;
     ALTER TABLE keys ADD COLUMN description TEXT NOT NULL DEFAULT '';
     ALTER TABLE keys ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE keys ADD COLUMN allow_plaintext_datakey INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE keys ADD COLUMN policy_mac BLOB;
     ALTER TABLE key_versions ADD COLUMN use_count INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE key_versions ADD COLUMN last_used_unix INTEGER;
     UPDATE keys SET
         latest_version = (SELECT MAX(version) FROM key_versions WHERE key_id = keys.id),
         state_changed_unix = created_unix,
         activated_unix = created_unix;
     INSERT INTO meta (name, value) SELECT 'policy_seal_pending', x'01' WHERE EXISTS (SELECT 1 FROM keys);",
    // 4: the creator's user name, so a recycled uid does not inherit keys.
    "ALTER TABLE keys ADD COLUMN owner_name TEXT;",
];

/// The keystore file could not be used.
#[derive(Debug, Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("keystore {}: {source}", path.display())]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file or its directory could not be prepared.
    #[error("keystore {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The record of the keystore's keys failed its check, so it cannot be
    /// updated; the message says how.
    #[error("{0}")]
    KeySet(String),
    /// The file was written by a newer hsmd.
    #[error("keystore {} has schema version {found}, newer than this hsmd knows ({known}); upgrade hsmd", path.display())]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// Ours.
        known: usize,
    },
}

impl StoreError {
    /// What is wrong, when the failure is the file system's rather than
    /// hsmd's (no space left, a read-only file system, an I/O error, the file
    /// gone), in words that name the directory; `None` otherwise.
    #[must_use]
    pub fn storage_cause(&self) -> Option<String> {
        use rusqlite::ErrorCode as C;
        let (path, code) = match self {
            Self::Sqlite {
                path,
                source: rusqlite::Error::SqliteFailure(e, _),
            } => (path, e.code),
            Self::Io { path, source } => {
                let dir = path.parent().unwrap_or(Path::new("/")).display();
                return match source.kind() {
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                        Some(format!("no space left on device in {dir}"))
                    }
                    std::io::ErrorKind::ReadOnlyFilesystem => Some(format!("the file system of {dir} is read-only")),
                    _ => None,
                };
            }
            _ => return None,
        };
        let dir = path.parent().unwrap_or(Path::new("/")).display();
        match code {
            C::DiskFull => Some(format!("no space left on device in {dir}")),
            C::ReadOnly => Some(format!(
                "the keystore in {dir} cannot be written: its file system is read-only or it lost write permission"
            )),
            C::SystemIoFailure => Some(format!("the disk or file system of {dir} failed an I/O request")),
            C::CannotOpen => Some(format!(
                "the keystore in {dir} cannot be opened: its directory may be gone"
            )),
            _ => None,
        }
    }
}

/// A sequence number and a hash, as the audit log's anchors are recorded.
pub type SeqHash = (u64, String);

/// A key's activation and expiry times, for the maintenance that reports
/// them coming due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleTimes {
    /// The key.
    pub name: String,
    /// Its backend.
    pub backend: String,
    /// Its stored state.
    pub state: String,
    /// When it becomes active.
    pub activate_at_unix: Option<u64>,
    /// When it is deactivated.
    pub expire_at_unix: Option<u64>,
}

/// Why a write transaction's body failed.
enum TxError {
    Sql(rusqlite::Error),
    /// The key set record could not be updated (see [`KeySetUpdate`]).
    KeySet(String),
}

impl From<rusqlite::Error> for TxError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sql(e)
    }
}

/// One unlock slot as stored.
#[derive(Debug, Clone)]
pub struct SlotRow {
    /// Row id.
    pub id: u32,
    /// `passphrase` or `keyfile`.
    pub kind: String,
    /// Free-form label.
    pub label: String,
    /// KDF parameters, JSON.
    pub params: String,
    /// The master key sealed under the slot's key.
    pub wrapped: Vec<u8>,
    /// Creation time.
    pub created_unix: u64,
}

/// The open keystore file.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Write transactions committed since open; shared so it can be read
    /// without waiting for the store's lock.
    writes: Arc<AtomicU64>,
}

impl Store {
    /// Opens (creating if need be, mode 0600) and migrates the keystore in `state_dir`.
    ///
    /// # Errors
    /// [`StoreError`] naming the file.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join(FILE_NAME);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        // Create the file ourselves so it is 0600 from its first byte; SQLite's
        // -wal and -shm files inherit the daemon's umask (0077).
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io)?;
        let conn = Connection::open(&path).map_err(|source| StoreError::Sqlite {
            path: path.clone(),
            source,
        })?;
        let mut store = Self {
            conn,
            path,
            writes: Arc::new(AtomicU64::new(0)),
        };
        store.configure()?;
        store.migrate()?;
        Ok(store)
    }

    fn sql<T>(&self, r: rusqlite::Result<T>) -> Result<T, StoreError> {
        r.map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    fn configure(&self) -> Result<(), StoreError> {
        let mode: String = self.sql(self.conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(mode, "keystore is not in WAL mode");
        }
        self.sql(self.conn.execute_batch(
            "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000; PRAGMA secure_delete=ON;",
        ))
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self.sql(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0)))?;
        let known = MIGRATIONS.len();
        let current = usize::try_from(version).unwrap_or(usize::MAX);
        if current > known {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: version,
                known,
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(current) {
            let path = self.path.clone();
            let wrap = |source| StoreError::Sqlite {
                path: path.clone(),
                source,
            };
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Exclusive)
                .map_err(wrap)?;
            tx.execute_batch(step).map_err(wrap)?;
            tx.pragma_update(None, "user_version", i + 1).map_err(wrap)?;
            tx.commit().map_err(wrap)?;
            tracing::info!(path = %self.path.display(), version = i + 1, "keystore schema migrated");
        }
        Ok(())
    }

    /// The directory the keystore file is in.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// The schema version this build writes.
    #[must_use]
    pub fn schema_version() -> usize {
        MIGRATIONS.len()
    }

    /// Writes a consistent copy of the keystore to `path` (a new file).
    ///
    /// # Errors
    /// [`StoreError`] if SQLite cannot.
    pub fn vacuum_into(&self, path: &Path) -> Result<(), StoreError> {
        let r = self
            .conn
            .execute("VACUUM INTO ?1", [path.to_string_lossy().as_ref()])
            .map(|_| ());
        self.sql(r)
    }

    /// Replaces the keystore file with `incoming` (a checked keystore in the
    /// same directory): closes the current connection (so its WAL is folded in
    /// and removed), keeps an initialized old file aside and returns its new
    /// name, renames `incoming` into place, syncs the directory, and opens and
    /// migrates the new file.
    ///
    /// # Errors
    /// [`StoreError`]; if the rename fails the old keystore is reopened.
    pub fn replace_with(&mut self, incoming: &Path) -> Result<Option<PathBuf>, StoreError> {
        let path = self.path.clone();
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let had_keystore = self.store_id()?.is_some();
        let (kept, renamed) = self.closed_while(|| {
            let kept = if had_keystore {
                let aside = path.with_file_name(format!("{FILE_NAME}.before-restore-{}", now_secs()));
                fs::rename(&path, &aside).map_err(io)?;
                Some(aside)
            } else {
                None
            };
            for suffix in ["-wal", "-shm"] {
                let _ = fs::remove_file(path.with_file_name(format!("{FILE_NAME}{suffix}")));
            }
            let renamed = fs::rename(incoming, &path).map_err(io);
            if let Some(dir) = path.parent() {
                if let Ok(d) = fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            if let (Err(_), Some(aside)) = (&renamed, &kept) {
                let _ = fs::rename(aside, &path);
            }
            Ok::<_, StoreError>((kept, renamed))
        })??;
        renamed?;
        Ok(kept)
    }

    /// Closes the file (its WAL checkpointed into it, so the file alone is
    /// the keystore), runs `change` (which may replace the file), and opens
    /// the file again, migrating it if it is older.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be closed or opened again; then the
    /// store answers nothing until hsmd restarts.
    pub fn closed_while<T>(&mut self, change: impl FnOnce() -> T) -> Result<T, StoreError> {
        let path = self.path.clone();
        let placeholder = self.sql(Connection::open_in_memory())?;
        let old = std::mem::replace(&mut self.conn, placeholder);
        let _ = old.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
        old.close().map_err(|(_, source)| StoreError::Sqlite {
            path: path.clone(),
            source,
        })?;
        let out = change();
        self.conn = self.sql(Connection::open(&path))?;
        self.configure()?;
        self.migrate()?;
        self.wrote();
        Ok(out)
    }

    /// The count of write transactions committed since the file was opened.
    #[must_use]
    pub fn write_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.writes)
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether keys from before policy MACs existed still need theirs.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn policy_seal_pending(&self) -> Result<bool, StoreError> {
        self.sql(self.conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM meta WHERE name = 'policy_seal_pending')",
            [],
            |r| r.get(0),
        ))
    }

    /// A value of the meta table.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.sql(
            self.conn
                .query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| r.get(0))
                .optional(),
        )
    }

    /// Sets a value of the meta table, durably.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn set_meta(&mut self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write_tx(|tx| {
            tx.execute(
                "INSERT INTO meta (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                params![name, value],
            )?;
            Ok(((), true))
        })
    }

    /// A (sequence number, hash) pair of the meta table.
    fn seq_and_hash(&self, seq: &str, hash: &str) -> Result<Option<SeqHash>, StoreError> {
        let (Some(s), Some(h)) = (self.meta(seq)?, self.meta(hash)?) else {
            return Ok(None);
        };
        let s = String::from_utf8_lossy(&s).parse().unwrap_or(0);
        Ok(Some((s, String::from_utf8_lossy(&h).into_owned())))
    }

    /// The audit log's anchors as last recorded: its head (the last line's
    /// sequence number and hash) and its start (the first retained line's
    /// sequence number and the hash it follows).
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn audit_anchors(&self) -> Result<(Option<SeqHash>, Option<SeqHash>), StoreError> {
        Ok((
            self.seq_and_hash("audit_seq", "audit_hash")?,
            self.seq_and_hash("audit_start_seq", "audit_start_prev")?,
        ))
    }

    /// Records the audit log's head and start, in one transaction.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn set_audit_anchors(&mut self, head: (u64, &str), start: (u64, &str)) -> Result<(), StoreError> {
        self.write_tx(|tx| {
            for (name, value) in [
                ("audit_seq", head.0.to_string()),
                ("audit_hash", head.1.to_owned()),
                ("audit_start_seq", start.0.to_string()),
                ("audit_start_prev", start.1.to_owned()),
            ] {
                tx.execute(
                    "INSERT INTO meta (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    params![name, value.as_bytes()],
                )?;
            }
            Ok(((), true))
        })
    }

    /// Runs `f` in one IMMEDIATE transaction: committed durably (and counted)
    /// when `f` says it wrote, rolled back when it made no change or failed.
    fn write_tx<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<(T, bool), TxError>,
    ) -> Result<T, StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(wrap)?;
        let (value, wrote) = f(&tx).map_err(|e| match e {
            TxError::Sql(source) => wrap(source),
            TxError::KeySet(why) => StoreError::KeySet(why),
        })?;
        if wrote {
            tx.commit().map_err(wrap)?;
            self.wrote();
        }
        Ok(value)
    }

    /// The keystore's random identity, once initialized.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn store_id(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.sql(
            self.conn
                .query_row("SELECT value FROM meta WHERE name = 'store_id'", [], |r| r.get(0))
                .optional(),
        )
    }

    /// Writes the identity and the first slot in one durable transaction.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn initialize(&mut self, store_id: &[u8], slot: &SlotRow) -> Result<u32, StoreError> {
        self.write_tx(|tx| {
            tx.execute(
                "INSERT INTO meta (name, value) VALUES ('store_id', ?1)",
                params![store_id],
            )?;
            let id = insert_slot(tx, slot)?;
            Ok((id, true))
        })
    }

    /// Every slot, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn slots(&self) -> Result<Vec<SlotRow>, StoreError> {
        let mut stmt = self.sql(
            self.conn
                .prepare("SELECT id, kind, label, params, wrapped, created_unix FROM slots ORDER BY id"),
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(SlotRow {
                id: r.get(0)?,
                kind: r.get(1)?,
                label: r.get(2)?,
                params: r.get(3)?,
                wrapped: r.get(4)?,
                created_unix: r.get(5)?,
            })
        });
        let rows = self.sql(rows)?;
        self.sql(rows.collect())
    }

    /// Adds a slot durably; returns its id.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn add_slot(&mut self, slot: &SlotRow) -> Result<u32, StoreError> {
        let r = insert_slot(&self.conn, slot);
        self.wrote();
        self.sql(r)
    }

    /// Removes slot `id` unless it is the last one. `Ok(None)`: no such slot;
    /// `Ok(Some(false))`: it is the last one and stays.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is removed then.
    pub fn remove_slot(&mut self, id: u32) -> Result<Option<bool>, StoreError> {
        self.write_tx(|tx| {
            let exists: bool = tx.query_row("SELECT EXISTS(SELECT 1 FROM slots WHERE id = ?1)", [id], |r| r.get(0))?;
            if !exists {
                return Ok((None, false));
            }
            let count: i64 = tx.query_row("SELECT COUNT(*) FROM slots", [], |r| r.get(0))?;
            if count <= 1 {
                return Ok((Some(false), false));
            }
            tx.execute("DELETE FROM slots WHERE id = ?1", [id])?;
            Ok((Some(true), true))
        })
    }
}

/// A key with one of its versions, as stored.
#[derive(Debug, Clone)]
pub struct KeyRow {
    /// Random id (hex).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Type name (`ed25519`, …).
    pub key_type: String,
    /// Backend name.
    pub backend: String,
    /// Usages, comma-separated.
    pub usages: String,
    /// Creator.
    pub owner_uid: u32,
    /// The creator's user name then (`None` for a uid without one, and for
    /// keys made before hsmd recorded it).
    pub owner_name: Option<String>,
    /// Creation time.
    pub created_unix: u64,
    /// This row's version.
    pub version: u32,
    /// The key material sealed under the master key.
    pub wrapped: Vec<u8>,
    /// Public key (SPKI DER) for asymmetric keys.
    pub public: Option<Vec<u8>>,
    /// When this version was made.
    pub version_created_unix: u64,
    /// The key's lifecycle settings (one per key, the same in every version's row).
    pub policy: KeyPolicy,
    /// Descriptive metadata.
    pub description: String,
    /// Labels, a JSON object of strings.
    pub labels: String,
}

/// The fields of a key that decide what it may do. All of them are covered by
/// `mac`, which only the master key can make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPolicy {
    /// Stored lifecycle state name.
    pub state: String,
    /// When an operator last changed it.
    pub state_changed_unix: u64,
    /// Pre-active until then.
    pub activate_at_unix: Option<u64>,
    /// When it became active.
    pub activated_unix: Option<u64>,
    /// Deactivated from then on.
    pub expire_at_unix: Option<u64>,
    /// Automatic rotation period.
    pub rotate_every_secs: Option<u64>,
    /// Oldest version that may verify or decrypt.
    pub min_decrypt_version: u32,
    /// Oldest version that may be named to sign or encrypt.
    pub min_encrypt_version: u32,
    /// Newest version.
    pub latest_version: u32,
    /// Soft-deleted at.
    pub deleted_unix: Option<u64>,
    /// To be purged at.
    pub purge_at_unix: Option<u64>,
    /// Data keys may be returned in plain.
    pub allow_plaintext_datakey: bool,
    /// HMAC over the above (see `key_ops::policy_mac`); `None` before it was sealed.
    pub mac: Option<Vec<u8>>,
}

/// One version's public facts and counters.
#[derive(Debug, Clone)]
pub struct VersionRow {
    /// Its number.
    pub version: u32,
    /// When made.
    pub created_unix: u64,
    /// Uses flushed so far.
    pub use_count: u64,
    /// Last use flushed so far.
    pub last_used_unix: Option<u64>,
}

const KEY_COLUMNS: &str =
    "k.id, k.name, k.type, k.backend, k.usages, k.owner_uid, k.created_unix, v.version, v.wrapped, \
     v.public, v.created_unix, k.state, k.state_changed_unix, k.activate_at_unix, k.activated_unix, k.expire_at_unix, \
     k.rotate_every_secs, k.min_decrypt_version, k.min_encrypt_version, k.latest_version, k.deleted_unix, \
     k.purge_at_unix, k.allow_plaintext_datakey, k.policy_mac, k.description, k.labels, k.owner_name";

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow {
        id: r.get(0)?,
        name: r.get(1)?,
        key_type: r.get(2)?,
        backend: r.get(3)?,
        usages: r.get(4)?,
        owner_uid: r.get(5)?,
        created_unix: r.get(6)?,
        version: r.get(7)?,
        wrapped: r.get(8)?,
        public: r.get(9)?,
        version_created_unix: r.get(10)?,
        policy: KeyPolicy {
            state: r.get(11)?,
            state_changed_unix: r.get(12)?,
            activate_at_unix: r.get(13)?,
            activated_unix: r.get(14)?,
            expire_at_unix: r.get(15)?,
            rotate_every_secs: r.get(16)?,
            min_decrypt_version: r.get(17)?,
            min_encrypt_version: r.get(18)?,
            latest_version: r.get(19)?,
            deleted_unix: r.get(20)?,
            purge_at_unix: r.get(21)?,
            allow_plaintext_datakey: r.get(22)?,
            mac: r.get(23)?,
        },
        description: r.get(24)?,
        labels: r.get(25)?,
        owner_name: r.get(26)?,
    })
}

/// Writes a key's policy columns (and its description and labels).
fn update_policy(conn: &Connection, key: &KeyRow) -> rusqlite::Result<usize> {
    let p = &key.policy;
    conn.execute(
        "UPDATE keys SET state = ?2, state_changed_unix = ?3, activate_at_unix = ?4, activated_unix = ?5,
             expire_at_unix = ?6, rotate_every_secs = ?7, min_decrypt_version = ?8, min_encrypt_version = ?9,
             latest_version = ?10, deleted_unix = ?11, purge_at_unix = ?12, allow_plaintext_datakey = ?13,
             policy_mac = ?14, description = ?15, labels = ?16
         WHERE id = ?1",
        params![
            key.id,
            p.state,
            p.state_changed_unix,
            p.activate_at_unix,
            p.activated_unix,
            p.expire_at_unix,
            p.rotate_every_secs,
            p.min_decrypt_version,
            p.min_encrypt_version,
            p.latest_version,
            p.deleted_unix,
            p.purge_at_unix,
            p.allow_plaintext_datakey,
            p.mac,
            key.description,
            key.labels,
        ],
    )
}

/// The keystore's record of which keys it holds (see `Vault`'s key set):
/// sealed bytes and their MAC, or, before one was ever written, the keys there
/// are (id, name) to start it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySetRecord {
    /// As recorded.
    Sealed {
        /// The record.
        json: Vec<u8>,
        /// Its MAC under a key derived from the master key.
        mac: Vec<u8>,
    },
    /// None recorded yet.
    Absent {
        /// The keys in the file now, as (id, name).
        keys: Vec<(String, String)>,
    },
}

/// Turns the recorded key set into the new one (json, mac), or says why the
/// recorded one cannot be trusted.
pub type KeySetUpdate<'a> = &'a dyn Fn(KeySetRecord) -> Result<(Vec<u8>, Vec<u8>), String>;

/// A key as the keystore holds it, for the check at unlock: its id, name,
/// newest version, and the versions that have rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInventory {
    /// Random id.
    pub id: String,
    /// Name.
    pub name: String,
    /// The newest version the key's row names.
    pub latest_version: u32,
    /// The versions present, ascending.
    pub versions: Vec<u32>,
}

fn key_set_record(conn: &Connection) -> rusqlite::Result<KeySetRecord> {
    let get = |name: &str| -> rusqlite::Result<Option<Vec<u8>>> {
        conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| r.get(0))
            .optional()
    };
    if let (Some(json), Some(mac)) = (get("key_set")?, get("key_set_mac")?) {
        return Ok(KeySetRecord::Sealed { json, mac });
    }
    let mut stmt = conn.prepare("SELECT id, name FROM keys ORDER BY id")?;
    let keys = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<(String, String)>>>()?;
    Ok(KeySetRecord::Absent { keys })
}

fn write_key_set(conn: &Connection, json: &[u8], mac: &[u8]) -> rusqlite::Result<()> {
    for (name, value) in [("key_set", json), ("key_set_mac", mac)] {
        conn.execute(
            "INSERT INTO meta (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            params![name, value],
        )?;
    }
    Ok(())
}

impl Store {
    /// Runs `change` and updates the key set record in one IMMEDIATE
    /// transaction; `change` returning `false` means nothing was done (and
    /// nothing is written).
    fn with_key_set(
        &mut self,
        change: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<bool>,
        update: KeySetUpdate<'_>,
    ) -> Result<bool, StoreError> {
        self.write_tx(|tx| {
            if !change(tx)? {
                return Ok((false, false));
            }
            let (json, mac) = update(key_set_record(tx)?).map_err(TxError::KeySet)?;
            write_key_set(tx, &json, &mac)?;
            Ok((true, true))
        })
    }

    /// The key set record.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn key_set(&self) -> Result<KeySetRecord, StoreError> {
        let r = key_set_record(&self.conn);
        self.sql(r)
    }

    /// Replaces the key set record, durably.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn set_key_set(&mut self, json: &[u8], mac: &[u8]) -> Result<(), StoreError> {
        self.write_tx(|tx| {
            write_key_set(tx, json, mac)?;
            Ok(((), true))
        })
    }

    /// Every key row's id, name and newest version, with the versions that
    /// have rows, by name.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn key_inventory(&self) -> Result<Vec<KeyInventory>, StoreError> {
        let mut stmt = self.sql(self.conn.prepare(
            "SELECT k.id, k.name, k.latest_version, v.version FROM keys k
             LEFT JOIN key_versions v ON v.key_id = k.id ORDER BY k.name, v.version",
        ))?;
        let rows = self.sql(stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, Option<u32>>(3)?,
            ))
        }))?;
        let mut out: Vec<KeyInventory> = Vec::new();
        for row in rows {
            let (id, name, latest_version, version) = self.sql(row)?;
            if out.last().is_none_or(|k| k.id != id) {
                out.push(KeyInventory {
                    id,
                    name,
                    latest_version,
                    versions: Vec::new(),
                });
            }
            if let (Some(v), Some(k)) = (version, out.last_mut()) {
                k.versions.push(v);
            }
        }
        Ok(out)
    }

    /// Adds a key with its first version and records it in the key set,
    /// durably. `Ok(false)`: the name is taken.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn insert_key(&mut self, key: &KeyRow, update: KeySetUpdate<'_>) -> Result<bool, StoreError> {
        self.with_key_set(
            |tx| {
                let taken: bool =
                    tx.query_row("SELECT EXISTS(SELECT 1 FROM keys WHERE name = ?1)", [&key.name], |r| {
                        r.get(0)
                    })?;
                if taken {
                    return Ok(false);
                }
                tx.execute(
                    "INSERT INTO keys (id, name, type, backend, usages, owner_uid, created_unix, owner_name)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        key.id,
                        key.name,
                        key.key_type,
                        key.backend,
                        key.usages,
                        key.owner_uid,
                        key.created_unix,
                        key.owner_name
                    ],
                )?;
                update_policy(tx, key)?;
                tx.execute(
                "INSERT INTO key_versions (key_id, version, wrapped, public, created_unix) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![key.id, key.version, key.wrapped, key.public, key.version_created_unix],
            )?;
                Ok(true)
            },
            update,
        )
    }

    /// Adds `key.version` as the key's newest version and writes its policy
    /// (whose `latest_version` must name it), in one durable transaction.
    /// `Ok(false)`: the version exists already (a concurrent rotation won).
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn add_version(&mut self, key: &KeyRow) -> Result<bool, StoreError> {
        self.write_tx(|tx| {
            let inserted = tx.execute(
                "INSERT OR IGNORE INTO key_versions (key_id, version, wrapped, public, created_unix)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                params![key.id, key.version, key.wrapped, key.public, key.version_created_unix],
            )?;
            if inserted == 0 {
                return Ok((false, false));
            }
            update_policy(tx, key)?;
            Ok((true, true))
        })
    }

    /// Writes a key's policy, description and labels. `false`: no such key.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn update_policy(&mut self, key: &KeyRow) -> Result<bool, StoreError> {
        let r = update_policy(&self.conn, key);
        let n = self.sql(r)?;
        self.wrote();
        Ok(n > 0)
    }

    /// Writes several keys' policies in one transaction.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn update_policies(&mut self, keys: &[KeyRow]) -> Result<(), StoreError> {
        self.write_tx(|tx| {
            for key in keys {
                update_policy(tx, key)?;
            }
            tx.execute("DELETE FROM meta WHERE name = 'policy_seal_pending'", [])?;
            Ok(((), true))
        })
    }

    /// Erases every version's sealed material (the key becomes `destroyed`) and
    /// writes its policy, in one transaction.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn destroy_material(&mut self, key: &KeyRow) -> Result<(), StoreError> {
        self.write_tx(|tx| {
            tx.execute("UPDATE key_versions SET wrapped = x'' WHERE key_id = ?1", [&key.id])?;
            update_policy(tx, key)?;
            Ok(((), true))
        })
    }

    /// A key's versions, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn versions(&self, key_id: &str) -> Result<Vec<VersionRow>, StoreError> {
        let mut stmt = self.sql(self.conn.prepare_cached(
            "SELECT version, created_unix, use_count, last_used_unix FROM key_versions
             WHERE key_id = ?1 ORDER BY version",
        ))?;
        let rows = stmt.query_map([key_id], |r| {
            Ok(VersionRow {
                version: r.get(0)?,
                created_unix: r.get(1)?,
                use_count: r.get(2)?,
                last_used_unix: r.get(3)?,
            })
        });
        let rows = self.sql(rows)?;
        self.sql(rows.collect())
    }

    /// Adds use counts and last-use times to versions, in one transaction.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn add_usage(&mut self, usage: &[(String, u32, u64, u64)]) -> Result<(), StoreError> {
        if usage.is_empty() {
            return Ok(());
        }
        self.write_tx(|tx| {
            for (key_id, version, count, last_used) in usage {
                tx.execute(
                    "UPDATE key_versions SET use_count = use_count + ?3,
                         last_used_unix = MAX(COALESCE(last_used_unix, 0), ?4)
                     WHERE key_id = ?1 AND version = ?2",
                    params![key_id, version, count, last_used],
                )?;
            }
            Ok(((), true))
        })
    }

    /// Names of keys whose automatic rotation is due at `now`: active (by their
    /// stored state), not deleted, newest version older than their period.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn due_rotations(&self, now: u64) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.sql(self.conn.prepare_cached(
            "SELECT k.name FROM keys k JOIN key_versions v ON v.key_id = k.id AND v.version = k.latest_version
             WHERE k.rotate_every_secs IS NOT NULL AND k.deleted_unix IS NULL AND k.state = 'active'
               AND v.created_unix + k.rotate_every_secs <= ?1
             ORDER BY k.name",
        ))?;
        let rows = self.sql(stmt.query_map([now], |r| r.get(0)))?;
        self.sql(rows.collect())
    }

    /// Names of deleted keys whose recovery window has ended at `now`.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn due_purges(&self, now: u64) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.sql(self.conn.prepare_cached(
            "SELECT name FROM keys WHERE deleted_unix IS NOT NULL AND purge_at_unix <= ?1 ORDER BY name",
        ))?;
        let rows = self.sql(stmt.query_map([now], |r| r.get(0)))?;
        self.sql(rows.collect())
    }

    /// Keys with an activation or expiry time in `(after, until]`.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn lifecycle_times(&self, after: u64, until: u64) -> Result<Vec<LifecycleTimes>, StoreError> {
        let mut stmt = self.sql(self.conn.prepare_cached(
            "SELECT name, backend, state, activate_at_unix, expire_at_unix FROM keys
             WHERE deleted_unix IS NULL
               AND ((activate_at_unix > ?1 AND activate_at_unix <= ?2) OR (expire_at_unix > ?1 AND expire_at_unix <= ?2))
             ORDER BY name",
        ))?;
        let rows = self.sql(stmt.query_map([after, until], |r| {
            Ok(LifecycleTimes {
                name: r.get(0)?,
                backend: r.get(1)?,
                state: r.get(2)?,
                activate_at_unix: r.get(3)?,
                expire_at_unix: r.get(4)?,
            })
        }))?;
        self.sql(rows.collect())
    }

    /// Every key at its newest version, by name.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys k JOIN key_versions v ON v.key_id = k.id
             WHERE v.version = k.latest_version ORDER BY k.name"
        );
        let mut stmt = self.sql(self.conn.prepare(&sql))?;
        let rows = self.sql(stmt.query_map([], key_row))?;
        self.sql(rows.collect())
    }

    /// One key at `version`, or its newest version when `None`.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn key(&self, name: &str, version: Option<u32>) -> Result<Option<KeyRow>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys k JOIN key_versions v ON v.key_id = k.id
             WHERE k.name = ?1 AND v.version = COALESCE(?2, k.latest_version)"
        );
        let r = self.conn.query_row(&sql, params![name, version], key_row).optional();
        self.sql(r)
    }

    /// Removes a key and all its versions for good (`secure_delete` overwrites
    /// the freed pages), and takes it out of the key set, in one transaction.
    /// `false`: no such key.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is removed then.
    pub fn purge_key(&mut self, name: &str, update: KeySetUpdate<'_>) -> Result<bool, StoreError> {
        self.with_key_set(
            |tx| Ok(tx.execute("DELETE FROM keys WHERE name = ?1", [name])? > 0),
            update,
        )
    }

    /// Takes a key whose rows are gone out of the key set (`update` does it).
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn forget_key(&mut self, update: KeySetUpdate<'_>) -> Result<(), StoreError> {
        self.with_key_set(|_| Ok(true), update).map(|_| ())
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn insert_slot(conn: &Connection, slot: &SlotRow) -> rusqlite::Result<u32> {
    conn.execute(
        "INSERT INTO slots (kind, label, params, wrapped, created_unix) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![slot.kind, slot.label, slot.params, slot.wrapped, slot.created_unix],
    )?;
    u32::try_from(conn.last_insert_rowid())
        .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, conn.last_insert_rowid()))
}
