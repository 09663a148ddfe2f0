//! Backup archives: one consistent copy of the keystore (`VACUUM INTO`, so it
//! is a snapshot even while keys are used), encrypted under a key derived from
//! the master key or from a backup passphrase, with a manifest and a checksum.
//! The format is specified in `docs/backup.md`:
//!
//! ```text
//! "HSMDBAK1" | u32 header length | header (JSON) | sealed keystore | SHA-256 of all before
//! ```
//!
//! The header (manifest, protection, KDF parameters, and for master-key backups
//! the unlock slots, which hold the master key only sealed) is the associated
//! data of the AES-256-GCM seal, so neither part can be changed alone; the
//! trailing checksum finds a damaged archive without any secret.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use hkdf::Hkdf;
use protocol::{BackupManifest, BackupProtection, ServiceState, UnlockSecret};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::{
    crypto::{self, Key256},
    custody::{fido2_rows, open_master, MAX_PASSPHRASE, MIN_PASSPHRASE},
    lock, now_unix,
    slots::SlotParams,
    store::{SlotRow, Store},
    Vault, VaultError,
};

const MAGIC: &[u8; 8] = b"HSMDBAK1";
/// The format written. Format 1 (read still) had no check value.
const FORMAT: u32 = 2;
/// The largest header accepted (it holds a few slots, not data).
const MAX_HEADER: usize = 1024 * 1024;
/// The largest archive accepted.
pub const MAX_ARCHIVE: u64 = 256 * 1024 * 1024;

/// A slot as the archive carries it: the master key only sealed, as on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ArchivedSlot {
    id: u32,
    kind: String,
    label: String,
    params: String,
    wrapped: String,
    created_unix: u64,
}

/// The archive's header, authenticated as the seal's associated data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    manifest: BackupManifest,
    /// For passphrase backups: the Argon2id parameters and salt.
    kdf: Option<SlotParams>,
    /// For master-key backups: the keystore's unlock slots.
    slots: Vec<ArchivedSlot>,
    /// Salt of the HKDF that derives a master-key backup's key.
    salt: String,
    /// Check value of the archive key (format 2 on), hex: with it a seal that
    /// fails under the right key is named as tampering, not a wrong secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    check: Option<String>,
}

/// How an archive is protected, as its header says: the fields a format-2
/// header has besides its manifest, which a format-3 header carries too.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Protection {
    /// For passphrase backups: the Argon2id parameters and salt.
    kdf: Option<SlotParams>,
    /// For master-key backups: the keystore's unlock slots.
    slots: Vec<ArchivedSlot>,
    /// Salt of the HKDF that derives a master-key backup's key.
    salt: String,
    /// Check value of the archive key, hex.
    check: Option<String>,
}

/// A parsed archive whose checksum matched.
struct Parsed<'a> {
    header: Header,
    header_bytes: &'a [u8],
    sealed: &'a [u8],
}

fn damaged(why: impl std::fmt::Display) -> VaultError {
    VaultError::Invalid(format!("not a usable hsmd backup: {why}"))
}

fn aad(header_bytes: &[u8]) -> Vec<u8> {
    let mut aad = b"hsmd backup v1\0".to_vec();
    aad.extend_from_slice(header_bytes);
    aad
}

fn parse(archive: &[u8]) -> Result<Parsed<'_>, VaultError> {
    if archive.len() < MAGIC.len() + 4 + 32 || &archive[..8] != MAGIC {
        return Err(damaged("it does not start with the HSMDBAK1 signature"));
    }
    let (body, sum) = archive.split_at(archive.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err(damaged(
            "its checksum does not match: the file is damaged, truncated or was edited",
        ));
    }
    let header_len = u32::from_be_bytes([body[8], body[9], body[10], body[11]]) as usize;
    if header_len > MAX_HEADER || 12 + header_len > body.len() {
        return Err(damaged("its header length is out of range"));
    }
    let header_bytes = &body[12..12 + header_len];
    let header: Header = serde_json::from_slice(header_bytes).map_err(|e| damaged(format!("its header: {e}")))?;
    if !(1..=FORMAT).contains(&header.manifest.format) {
        return Err(damaged(format!(
            "it has format {}, and this hsmd reads formats 1 to {FORMAT}",
            header.manifest.format
        )));
    }
    Ok(Parsed {
        header,
        header_bytes,
        sealed: &body[12 + header_len..],
    })
}

fn master_backup_key(master: &Key256, salt: &[u8]) -> Key256 {
    let mut key = Zeroizing::new([0u8; 32]);
    // Infallible: 32 bytes is far below HKDF-SHA-256's output limit.
    let _ = Hkdf::<Sha256>::new(Some(salt), master.as_ref()).expand(b"hsmd backup key v1", key.as_mut());
    key
}

/// The archive key's check value; bound to the keystore it holds.
fn archive_check(key: &Key256, store_id_hex: &str) -> String {
    let mut context = b"hsmd backup archive key\0".to_vec();
    context.extend_from_slice(store_id_hex.as_bytes());
    hex::encode(crypto::check_value(key, &context))
}

fn hex_decode(what: &str, s: &str) -> Result<Vec<u8>, VaultError> {
    hex::decode(s).map_err(|_| damaged(format!("its {what} is not hex")))
}

/// Facts about a keystore file, read from a snapshot of it.
fn inspect(path: &Path) -> Result<(Vec<u8>, u32, u32, u32, u32), VaultError> {
    let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| damaged(format!("the keystore inside does not open: {e}")))?;
    let q = |sql: &str| -> Result<u32, VaultError> {
        conn.query_row(sql, [], |r| r.get(0))
            .map_err(|e| damaged(format!("the keystore inside does not read: {e}")))
    };
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| damaged(format!("the keystore inside does not read: {e}")))?;
    if check != "ok" {
        return Err(damaged(format!(
            "the keystore inside fails SQLite's integrity check: {check}"
        )));
    }
    let schema = q("PRAGMA user_version")?;
    let store_id: Vec<u8> = conn
        .query_row("SELECT value FROM meta WHERE name = 'store_id'", [], |r| r.get(0))
        .map_err(|_| damaged("the keystore inside is not initialized"))?;
    Ok((
        store_id,
        schema,
        q("SELECT COUNT(*) FROM keys")?,
        q("SELECT COUNT(*) FROM key_versions")?,
        q("SELECT COUNT(*) FROM slots")?,
    ))
}

/// A temp file in `dir` that is removed when dropped.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    /// Its path.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// Creates it, empty and private (0600), for writing.
    pub(crate) fn create(&self) -> Result<fs::File, VaultError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.0)
            .map_err(|e| damaged(format!("cannot write {}: {e}", self.0.display())))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// What scratch files are made for (their names' first part).
const SCRATCH_KINDS: [&str; 4] = ["backup", "verify", "restore", "check"];

/// Removes scratch files that a backup, check or restore killed midway left
/// in `dir` (no process has them open once hsmd starts: hsmd runs once per
/// state directory); answers how many.
pub(crate) fn remove_scratch(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_scratch = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.rsplit_once('-'))
            .is_some_and(|(kind, id)| {
                SCRATCH_KINDS.contains(&kind) && id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
            });
        if is_scratch && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A scratch file's name in `dir`, not yet created.
pub(crate) fn scratch(dir: &Path, what: &'static str) -> Result<Scratch, VaultError> {
    debug_assert!(
        SCRATCH_KINDS.contains(&what),
        "{what} is not a scratch kind start-up removes"
    );
    let name = format!(".{what}-{}.tmp", hex::encode(crypto::random::<8>()?));
    Ok(Scratch(dir.join(name)))
}

/// A file's length and SHA-256 (hex), read in pieces.
fn file_digest(path: &Path) -> Result<(u64, String), VaultError> {
    let mut f = fs::File::open(path).map_err(|e| damaged(format!("cannot read the snapshot: {e}")))?;
    let mut hash = Sha256::new();
    let n = std::io::copy(&mut f, &mut hash).map_err(|e| damaged(format!("cannot read the snapshot: {e}")))?;
    Ok((n, hex::encode(hash.finalize())))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), VaultError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |e: std::io::Error| damaged(format!("cannot write {}: {e}", path.display()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)
}

impl Protection {
    /// `master-key` or `passphrase`.
    pub(crate) fn kind(&self) -> &'static str {
        if self.kdf.is_some() {
            "passphrase"
        } else {
            "master-key"
        }
    }
}

impl Vault {
    /// Makes a backup archive of the keystore as it is now (use counts are
    /// flushed first). Needs unlocked.
    ///
    /// # Errors
    /// [`VaultError::Locked`]; [`VaultError::Invalid`] for a passphrase out of
    /// range; [`VaultError::Store`] if the snapshot fails.
    pub fn create_backup(&self, protection: &BackupProtection) -> Result<(Vec<u8>, BackupManifest), VaultError> {
        let (snapshot, mut manifest) = self.keystore_snapshot()?;
        let payload =
            Zeroizing::new(fs::read(snapshot.path()).map_err(|e| damaged(format!("cannot read the snapshot: {e}")))?);
        drop(snapshot);
        let (key, p) = self.archive_protection(protection, &manifest.store_id)?;
        manifest.format = FORMAT;
        manifest.protection = p.kind().to_owned();
        let header = Header {
            manifest: manifest.clone(),
            kdf: p.kdf,
            slots: p.slots,
            salt: p.salt,
            check: p.check,
        };
        let header_bytes = serde_json::to_vec(&header).map_err(|source| VaultError::Encode {
            what: "a backup header",
            source,
        })?;
        let sealed = crypto::seal(&key, &payload, &aad(&header_bytes))?;
        let mut archive = Vec::with_capacity(12 + header_bytes.len() + sealed.len() + 32);
        archive.extend_from_slice(MAGIC);
        archive.extend_from_slice(&(header_bytes.len() as u32).to_be_bytes());
        archive.extend_from_slice(&header_bytes);
        archive.extend_from_slice(&sealed);
        let sum = Sha256::digest(&archive);
        archive.extend_from_slice(&sum);
        tracing::info!(
            keys = manifest.keys,
            bytes = archive.len(),
            protection = manifest.protection,
            "backup archive made"
        );
        Ok((archive, manifest))
    }

    /// A consistent copy of the keystore (`VACUUM INTO`, use counts flushed
    /// first) in a scratch file beside it, and its manifest (format and
    /// protection left for the caller). Needs unlocked.
    pub(crate) fn keystore_snapshot(&self) -> Result<(Scratch, BackupManifest), VaultError> {
        self.custody.master()?;
        if let Err(e) = self.keys().flush_usage() {
            tracing::warn!(error = %e, "use counts not flushed before the backup");
        }
        let dir = lock(&self.store).dir().to_owned();
        let snapshot = scratch(&dir, "backup")?;
        lock(&self.store).vacuum_into(&snapshot.0)?;
        let (store_id, schema, keys, versions, slot_count) = inspect(&snapshot.0)?;
        let (bytes, sha256) = file_digest(&snapshot.0)?;
        let manifest = BackupManifest {
            format: 0,
            created_unix: now_unix(),
            hsmd_version: env!("CARGO_PKG_VERSION").to_owned(),
            store_id: hex::encode(&store_id),
            schema_version: schema,
            keys,
            key_versions: versions,
            slots: slot_count,
            protection: String::new(),
            payload_bytes: bytes,
            payload_sha256: sha256,
            authenticated: true,
        };
        Ok((snapshot, manifest))
    }

    /// The archive key for `protection`, and how the header records it.
    pub(crate) fn archive_protection(
        &self,
        protection: &BackupProtection,
        store_id_hex: &str,
    ) -> Result<(Key256, Protection), VaultError> {
        let master = self.custody.master()?;
        let salt = crypto::random::<16>()?;
        let (key, kdf, slots) = match protection {
            BackupProtection::MasterKey => {
                let slots = lock(&self.store)
                    .slots()?
                    .into_iter()
                    .map(|r| ArchivedSlot {
                        id: r.id,
                        kind: r.kind,
                        label: r.label,
                        params: r.params,
                        wrapped: hex::encode(&r.wrapped),
                        created_unix: r.created_unix,
                    })
                    .collect();
                (master_backup_key(&master, &salt), None, slots)
            }
            BackupProtection::Passphrase(p) => {
                let n = p.len();
                if !(MIN_PASSPHRASE..=MAX_PASSPHRASE).contains(&n) {
                    return Err(VaultError::Invalid(format!(
                        "a backup passphrase must be {} to {} bytes; this one is {n}",
                        MIN_PASSPHRASE, MAX_PASSPHRASE
                    )));
                }
                let params = SlotParams::Argon2id {
                    cost: self.custody.cost,
                    salt: hex::encode(crypto::random::<16>()?),
                };
                let key = {
                    let _gate = lock(&self.custody.kdf_gate);
                    params.derive(p.expose())?
                };
                (key, Some(params), Vec::new())
            }
        };
        let check = Some(archive_check(&key, store_id_hex));
        Ok((
            key,
            Protection {
                kdf,
                slots,
                salt: hex::encode(salt),
                check,
            },
        ))
    }

    /// Opens an archive with `secret`: checksum, header, key derivation, seal,
    /// payload digest. Wrong secrets count toward the uid's unlock back-off.
    fn open_backup(
        &self,
        uid: u32,
        parsed: &Parsed<'_>,
        secret: &UnlockSecret,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let _gate = lock(&self.custody.kdf_gate);
        let h = &parsed.header;
        let protection = Protection {
            kdf: h.kdf.clone(),
            slots: h.slots.clone(),
            salt: h.salt.clone(),
            check: h.check.clone(),
        };
        let (key, key_is_right) = self.archive_key_locked(uid, &protection, &h.manifest.store_id, secret)?;
        let payload = crypto::open(&key, parsed.sealed, &aad(parsed.header_bytes)).map_err(|_| {
            if key_is_right {
                // Not a wrong secret, so not counted toward the back-off.
                tracing::error!("backup archive tampered: its seal fails under the right key");
                return VaultError::BackupTampered(
                    "its sealed keystore or its header was changed after it was made, and its checksum \
                     recomputed to match; the secret given is right. Use another copy of the backup"
                        .into(),
                );
            }
            self.custody.record_failure(uid);
            VaultError::BackupSecret("the backup does not open with this passphrase".into())
        })?;
        if hex::encode(Sha256::digest(&payload[..])) != h.manifest.payload_sha256
            || payload.len() as u64 != h.manifest.payload_bytes
        {
            return Err(damaged("the keystore inside does not match its manifest"));
        }
        self.custody.clear_failures(uid);
        Ok(payload)
    }

    /// The archive key `secret` gives for an archive protected as
    /// `protection`, and whether it is known to be right (a slot of the
    /// archive opened, or the check value matched) before any seal is tried.
    /// Wrong secrets count toward the uid's unlock back-off.
    pub(crate) fn archive_key(
        &self,
        uid: u32,
        protection: &Protection,
        store_id_hex: &str,
        secret: &UnlockSecret,
    ) -> Result<(Key256, bool), VaultError> {
        let _gate = lock(&self.custody.kdf_gate);
        self.archive_key_locked(uid, protection, store_id_hex, secret)
    }

    /// A scratch file's name beside the keystore, removed when dropped.
    pub(crate) fn scratch_file(&self, what: &'static str) -> Result<Scratch, VaultError> {
        let dir = lock(&self.store).dir().to_owned();
        scratch(&dir, what)
    }

    /// An archive opened under `uid`'s secret: its failures are forgotten.
    pub(crate) fn archive_opened(&self, uid: u32) {
        self.custody.clear_failures(uid);
    }

    /// A wrong secret for an archive whose key was not known to be right
    /// (counted toward the back-off), or its tampering (not counted).
    pub(crate) fn archive_refused(&self, uid: u32, key_is_right: bool) -> VaultError {
        if key_is_right {
            tracing::error!("backup archive tampered: a seal fails under the right key");
            return VaultError::BackupTampered(
                "it was changed after it was made; the secret given is right. Use another copy of the backup".into(),
            );
        }
        self.custody.record_failure(uid);
        VaultError::BackupSecret("the backup does not open with this passphrase".into())
    }

    /// As [`Vault::archive_key`], the KDF gate held.
    fn archive_key_locked(
        &self,
        uid: u32,
        h: &Protection,
        store_id_hex: &str,
        secret: &UnlockSecret,
    ) -> Result<(Key256, bool), VaultError> {
        self.custody.check_backoff(uid)?;
        Ok(match (&h.kdf, secret) {
            (Some(params), UnlockSecret::Passphrase(p)) => {
                let key = params
                    .derive(p.expose())
                    .map_err(|e| damaged(format!("its key derivation: {e}")))?;
                let right = h.check.as_deref() == Some(archive_check(&key, store_id_hex).as_str());
                (key, right)
            }
            (Some(_), UnlockSecret::Keyfile(_) | UnlockSecret::Tpm2 | UnlockSecret::Fido2 { .. }) => {
                return Err(VaultError::Invalid(
                    "this backup is protected by a backup passphrase; give it with --passphrase-file".into(),
                ))
            }
            (None, secret) => {
                let rows: Vec<SlotRow> = h
                    .slots
                    .iter()
                    .map(|s| {
                        Ok(SlotRow {
                            id: s.id,
                            kind: s.kind.clone(),
                            label: s.label.clone(),
                            params: s.params.clone(),
                            wrapped: hex_decode("slot", &s.wrapped)?,
                            created_unix: s.created_unix,
                        })
                    })
                    .collect::<Result<_, VaultError>>()?;
                let store_id = hex_decode("store id", store_id_hex)?;
                let tampered = |e: VaultError| match e {
                    VaultError::Tampered(why) => VaultError::BackupTampered(why),
                    other => other,
                };
                let (kind, opened) = match secret {
                    UnlockSecret::Passphrase(p) => (
                        "passphrase",
                        open_master(&store_id, &rows, "passphrase", p.expose()).map_err(tampered)?,
                    ),
                    UnlockSecret::Keyfile(k) => (
                        "keyfile",
                        open_master(&store_id, &rows, "keyfile", k.expose()).map_err(tampered)?,
                    ),
                    // The backup's TPM2 slots open on the machine whose TPM sealed them.
                    UnlockSecret::Tpm2 => ("tpm2", self.custody.open_tpm2(&store_id, &rows).map_err(tampered)?),
                    UnlockSecret::Fido2 { credential_id, secret } => (
                        "fido2",
                        open_master(&store_id, &fido2_rows(&rows, credential_id), "fido2", secret.expose())
                            .map_err(tampered)?,
                    ),
                };
                match opened {
                    Some((_, master)) => (master_backup_key(&master, &hex_decode("salt", &h.salt)?), true),
                    None => {
                        self.custody.record_failure(uid);
                        return Err(VaultError::BackupSecret(format!(
                            "no {kind} slot of the backup accepts this {kind}"
                        )));
                    }
                }
            }
        })
    }

    /// Closes the keystore, runs `change` (which may put another keystore
    /// file in its place) and opens it again, locked: every unwrapped key
    /// is forgotten.
    ///
    /// # Errors
    /// [`VaultError::Store`] if the file cannot be opened again.
    pub(crate) fn replaced_while<T>(&self, change: impl FnOnce() -> T) -> Result<T, VaultError> {
        let out = self.custody.replaced_while(change)?;
        self.keys.forget_all();
        Ok(out)
    }

    /// The directory the keystore is in (the state directory).
    pub(crate) fn state_dir(&self) -> PathBuf {
        lock(&self.store).dir().to_owned()
    }

    /// What of the keystore file in `dir` (a restore's staged copy) cannot
    /// work on this hsmd, one sentence each (TPM2 slots the TPM here does not
    /// unseal, keys whose backend is not configured or not reachable), and
    /// whether at least one unlock slot can.
    ///
    /// # Errors
    /// The file cannot be read.
    pub(crate) fn unusable_here(&self, dir: &Path) -> Result<(Vec<String>, bool), VaultError> {
        let store = Store::open(dir)?;
        let mut unusable = Vec::new();
        let mut usable_slots = 0;
        for row in store.slots()? {
            if row.kind != "tpm2" {
                usable_slots += 1;
                continue;
            }
            let why = match (self.backends().sealer(), serde_json::from_str::<SlotParams>(&row.params)) {
                (None, _) => Some("no TPM is configured here ([backends.tpm])".to_owned()),
                (Some(sealer), Ok(SlotParams::Tpm2 {
                    pcrs, public, private, ..
                })) => match (hex::decode(&public), hex::decode(&private)) {
                    (Ok(public), Ok(private)) => sealer.unseal(&public, &private, &pcrs).err().map(|e| {
                        format!("the TPM here does not unseal it ({e}); it was sealed by another TPM or to other PCR values")
                    }),
                    _ => Some("its sealed blobs are not hex".to_owned()),
                },
                (Some(_), _) => Some("its parameters are not a TPM2 slot's".to_owned()),
            };
            match why {
                Some(why) => unusable.push(format!("unlock slot {} (tpm2, {:?}): {why}", row.id, row.label)),
                None => usable_slots += 1,
            }
        }
        let mut by_backend: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
        for key in store.keys()? {
            by_backend.entry(key.backend).or_default().push(key.name);
        }
        for (backend, names) in by_backend {
            let why = match self.backends().get(&backend) {
                Err(_) => format!("no {backend} backend is configured here ([backends.{backend}])"),
                Ok(b) => {
                    let h = b.health();
                    // A token waiting for the PIN the restored keystore
                    // brings is opened at unlock: whether it is there is
                    // known only then.
                    let awaits_pin = backend == crate::backend::pkcs11::NAME
                        && self.backends().pkcs11().is_some_and(|p| p.awaits_pin());
                    if h.healthy || awaits_pin {
                        continue;
                    }
                    format!("the {backend} backend here is not reachable: {}", h.detail)
                }
            };
            let shown: Vec<&str> = names.iter().take(10).map(String::as_str).collect();
            let more = names.len().saturating_sub(shown.len());
            unusable.push(format!(
                "{} key{} on the {backend} backend ({}{}): {why}",
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ));
        }
        Ok((unusable, usable_slots > 0))
    }

    /// Records the audit chain's anchors in the keystore file in `dir` (a
    /// restore's staged copy), so the log restored beside it is read back
    /// as its own.
    ///
    /// # Errors
    /// The file cannot be written.
    pub(crate) fn set_staged_anchors(dir: &Path, head: (u64, &str), start: (u64, &str)) -> Result<(), VaultError> {
        let mut store = Store::open(dir)?;
        store.set_audit_anchors(head, start)?;
        Ok(())
    }

    /// Checks an archive. Without a secret: its signature, checksum and
    /// header; with one: also that it decrypts and holds a sound keystore
    /// matching its manifest. Changes nothing.
    ///
    /// # Errors
    /// [`VaultError::Invalid`] naming what is wrong; [`VaultError::UnlockFailed`]
    /// for a wrong secret.
    pub fn verify_backup(
        &self,
        uid: u32,
        archive: &[u8],
        secret: Option<&UnlockSecret>,
    ) -> Result<BackupManifest, VaultError> {
        let parsed = parse(archive)?;
        let mut manifest = parsed.header.manifest.clone();
        manifest.authenticated = false;
        let Some(secret) = secret else {
            return Ok(manifest);
        };
        let payload = self.open_backup(uid, &parsed, secret)?;
        let dir = lock(&self.store).dir().to_owned();
        let check = scratch(&dir, "verify")?;
        write_private(&check.0, &payload)?;
        self.check_payload(&check.0, &manifest)?;
        manifest.authenticated = true;
        Ok(manifest)
    }

    /// Checks a keystore file from an archive against its manifest: SQLite's
    /// integrity check, store id, counts, schema not newer than this hsmd's.
    pub(crate) fn check_payload(&self, path: &Path, manifest: &BackupManifest) -> Result<(), VaultError> {
        let (store_id, schema, keys, versions, slots) = inspect(path)?;
        if hex::encode(store_id) != manifest.store_id
            || (keys, versions, slots) != (manifest.keys, manifest.key_versions, manifest.slots)
        {
            return Err(damaged("the keystore inside does not match its manifest"));
        }
        if schema as usize > Store::schema_version() {
            return Err(damaged(format!(
                "its keystore has schema version {schema}, newer than this hsmd knows; upgrade hsmd"
            )));
        }
        Ok(())
    }

    /// Replaces the keystore with an archive's. Refuses to replace an
    /// initialized keystore unless `force` (which keeps the old file aside).
    /// Afterwards the daemon is locked and unlocks with the archive's slots.
    ///
    /// # Errors
    /// As [`Vault::verify_backup`]; [`VaultError::AlreadyInitialized`] without `force`.
    pub fn restore_backup(
        &self,
        uid: u32,
        archive: &[u8],
        secret: &UnlockSecret,
        force: bool,
    ) -> Result<BackupManifest, VaultError> {
        let parsed = parse(archive)?;
        if self.custody.state() != ServiceState::Uninitialized && !force {
            return Err(VaultError::Wire(protocol::WireError::new(
                protocol::ErrorCode::AlreadyInitialized,
                "hsmd already has a keystore; restoring would replace it. Add --force to replace it \
                 (the current file is kept beside it as keystore.sqlite.before-restore-<time>)",
            )));
        }
        let payload = self.open_backup(uid, &parsed, secret)?;
        let manifest = parsed.header.manifest.clone();
        let dir = lock(&self.store).dir().to_owned();
        let incoming = scratch(&dir, "restore")?;
        write_private(&incoming.0, &payload)?;
        self.check_payload(&incoming.0, &manifest)?;
        let store_id = hex_decode("store id", &manifest.store_id)?;
        let kept = self.custody.replace_store(&incoming.0, store_id)?;
        self.keys.forget_all();
        if let Some(k) = &kept {
            tracing::warn!(kept = %k.display(), "keystore replaced by a backup; the previous one is kept");
        }
        tracing::info!(keys = manifest.keys, store_id = %manifest.store_id, "keystore restored from a backup; locked");
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive_with(header: &Header, sealed: &[u8]) -> Vec<u8> {
        let header_bytes = serde_json::to_vec(header).unwrap();
        let mut a = MAGIC.to_vec();
        a.extend_from_slice(&(header_bytes.len() as u32).to_be_bytes());
        a.extend_from_slice(&header_bytes);
        a.extend_from_slice(sealed);
        let sum = Sha256::digest(&a);
        a.extend_from_slice(&sum);
        a
    }

    fn header() -> Header {
        Header {
            manifest: BackupManifest {
                format: FORMAT,
                created_unix: 1,
                hsmd_version: "0".into(),
                store_id: "00".into(),
                schema_version: 3,
                keys: 0,
                key_versions: 0,
                slots: 0,
                protection: "master-key".into(),
                payload_bytes: 0,
                payload_sha256: String::new(),
                authenticated: true,
            },
            kdf: None,
            slots: Vec::new(),
            salt: "00".into(),
            check: None,
        }
    }

    /// An archive as hsmd wrote it before check values: format 1, no `check`
    /// in the header, and slots that are the seal alone.
    #[test]
    fn a_format_1_archive_with_slots_made_before_check_values_still_restores() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path(), super::super::Argon2Cost::FLOOR).unwrap();
        let keyfile = vec![5u8; 32];
        vault
            .custody()
            .init(&protocol::NewSlot::Keyfile {
                label: String::new(),
                key: protocol::SecretBytes::new(keyfile.clone()),
            })
            .unwrap();
        let (archive, _) = vault.create_backup(&BackupProtection::MasterKey).unwrap();
        let parsed = parse(&archive).unwrap();
        let key = master_backup_key(
            &vault.custody().master().unwrap(),
            &hex::decode(&parsed.header.salt).unwrap(),
        );
        let payload = crypto::open(&key, parsed.sealed, &aad(parsed.header_bytes)).unwrap();
        let mut old = parsed.header.clone();
        assert!(old.check.is_some(), "format 2 writes a check value");
        old.check = None;
        old.manifest.format = 1;
        for slot in &mut old.slots {
            assert_eq!(
                slot.wrapped.len(),
                2 * (crypto::CHECK_LEN + super::super::custody::SEALED_MASTER_LEN)
            );
            slot.wrapped = slot.wrapped[2 * crypto::CHECK_LEN..].to_owned();
        }
        let old_bytes = serde_json::to_vec(&old).unwrap();
        let sealed = crypto::seal(&key, &payload, &aad(&old_bytes)).unwrap();
        let old_archive = archive_with(&old, &sealed);
        assert!(!String::from_utf8_lossy(&old_archive).contains("\"check\""));

        let secret = UnlockSecret::Keyfile(protocol::SecretBytes::new(keyfile));
        let manifest = vault.verify_backup(0, &old_archive, Some(&secret)).unwrap();
        assert!(manifest.authenticated);
        vault.restore_backup(0, &old_archive, &secret, true).unwrap();
        // The restored keystore's own slot (made with a check value) unlocks.
        vault.unlock(0, &secret).unwrap();
        assert_eq!(vault.custody().state(), ServiceState::Unlocked);
    }

    #[test]
    fn scratch_copies_a_crash_left_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let made = scratch(dir.path(), "backup").unwrap();
        fs::write(made.path(), b"a keystore snapshot").unwrap();
        let left = made.path().to_owned();
        // As a SIGKILL leaves it: never dropped.
        std::mem::forget(made);
        let others = [
            ".backup-notes.tmp",
            "backup-0123456789abcdef.tmp",
            ".restore-0123456789abcdef",
            "keystore.sqlite",
        ];
        for name in others {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_scratch(dir.path()), 1);
        assert!(!left.exists());
        for name in others {
            assert!(dir.path().join(name).exists(), "{name} was removed");
        }
    }

    #[test]
    fn every_flipped_byte_is_caught_by_the_checksum() {
        let a = archive_with(&header(), &[7u8; 60]);
        assert!(parse(&a).is_ok());
        for i in 0..a.len() {
            let mut b = a.clone();
            b[i] ^= 0x01;
            assert!(parse(&b).is_err(), "flip at {i} went unnoticed");
        }
        assert!(parse(&a[..a.len() - 1]).is_err(), "truncation");
        assert!(parse(b"HSMDBAK1").is_err(), "too short");
    }

    #[test]
    fn a_header_length_past_the_end_is_refused_without_reading_it() {
        let mut a = MAGIC.to_vec();
        a.extend_from_slice(&u32::MAX.to_be_bytes());
        let sum = Sha256::digest(&a);
        a.extend_from_slice(&sum);
        let Err(e) = parse(&a) else { panic!("accepted") };
        assert!(e.to_string().contains("header length"), "{e}");
    }

    #[test]
    fn other_formats_are_named_in_the_refusal() {
        let mut h = header();
        h.manifest.format = 9;
        let Err(e) = parse(&archive_with(&h, &[])) else {
            panic!("accepted")
        };
        assert!(e.to_string().contains("format 9"), "{e}");
    }
}
