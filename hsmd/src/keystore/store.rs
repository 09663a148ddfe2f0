//! The keystore file: SQLite in the state directory, WAL mode, every commit
//! durable (`synchronous=FULL`), schema versioned by `PRAGMA user_version`.

use std::{
    fs::{self, OpenOptions},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
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
        let mut store = Self { conn, path };
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
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(wrap)?;
        tx.execute(
            "INSERT INTO meta (name, value) VALUES ('store_id', ?1)",
            params![store_id],
        )
        .map_err(wrap)?;
        let id = insert_slot(&tx, slot).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(id)
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
        self.sql(r)
    }

    /// Removes slot `id` unless it is the last one. `Ok(None)`: no such slot;
    /// `Ok(Some(false))`: it is the last one and stays.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is removed then.
    pub fn remove_slot(&mut self, id: u32) -> Result<Option<bool>, StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(wrap)?;
        let exists: bool = tx
            .query_row("SELECT EXISTS(SELECT 1 FROM slots WHERE id = ?1)", [id], |r| r.get(0))
            .map_err(wrap)?;
        if !exists {
            return Ok(None);
        }
        let count: i64 = tx
            .query_row("SELECT COUNT(*) FROM slots", [], |r| r.get(0))
            .map_err(wrap)?;
        if count <= 1 {
            return Ok(Some(false));
        }
        tx.execute("DELETE FROM slots WHERE id = ?1", [id]).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(Some(true))
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
    /// Creation time.
    pub created_unix: u64,
    /// This row's version.
    pub version: u32,
    /// The key material sealed under the master key.
    pub wrapped: Vec<u8>,
    /// Public key (SPKI DER) for asymmetric keys.
    pub public: Option<Vec<u8>>,
}

const KEY_COLUMNS: &str =
    "k.id, k.name, k.type, k.backend, k.usages, k.owner_uid, k.created_unix, v.version, v.wrapped, v.public";

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
    })
}

impl Store {
    /// Adds a key with its first version, durably. `Ok(false)`: the name is taken.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn insert_key(&mut self, key: &KeyRow) -> Result<bool, StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(wrap)?;
        let taken: bool = tx
            .query_row("SELECT EXISTS(SELECT 1 FROM keys WHERE name = ?1)", [&key.name], |r| {
                r.get(0)
            })
            .map_err(wrap)?;
        if taken {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO keys (id, name, type, backend, usages, owner_uid, created_unix) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![key.id, key.name, key.key_type, key.backend, key.usages, key.owner_uid, key.created_unix],
        )
        .map_err(wrap)?;
        tx.execute(
            "INSERT INTO key_versions (key_id, version, wrapped, public, created_unix) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![key.id, key.version, key.wrapped, key.public, key.created_unix],
        )
        .map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(true)
    }

    /// Every key at its newest version, by name.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be read.
    pub fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys k JOIN key_versions v ON v.key_id = k.id
             WHERE v.version = (SELECT MAX(version) FROM key_versions WHERE key_id = k.id) ORDER BY k.name"
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
             WHERE k.name = ?1 AND v.version = COALESCE(?2, (SELECT MAX(version) FROM key_versions WHERE key_id = k.id))"
        );
        let r = self.conn.query_row(&sql, params![name, version], key_row).optional();
        self.sql(r)
    }

    /// Deletes a key and all its versions. `false`: no such key.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is removed then.
    pub fn delete_key(&mut self, name: &str) -> Result<bool, StoreError> {
        let r = self.conn.execute("DELETE FROM keys WHERE name = ?1", [name]);
        Ok(self.sql(r)? > 0)
    }
}

fn insert_slot(conn: &Connection, slot: &SlotRow) -> rusqlite::Result<u32> {
    conn.execute(
        "INSERT INTO slots (kind, label, params, wrapped, created_unix) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![slot.kind, slot.label, slot.params, slot.wrapped, slot.created_unix],
    )?;
    u32::try_from(conn.last_insert_rowid())
        .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, conn.last_insert_rowid()))
}
