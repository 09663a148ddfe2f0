//! Backups of hsmd's whole state in one archive (format 3, `docs/backup.md`):
//! the keystore, and as asked every stored file (its sealed chunks, header
//! and metadata as they are on disk: never a plaintext or an unwrapped data
//! key) and the audit log's files with the chain's anchors. The archive is
//! streamed to a descriptor through [`archive::Writer`] and read back through
//! [`archive::Reader`], in bounded memory whatever its size.

pub mod archive;
pub mod restore;

use std::{
    fs::File,
    io::{self, Read, Write},
    sync::Arc,
};

use protocol::{ArchiveSummary, BackupContents, BackupManifest, BackupProtection, ErrorCode, UnlockSecret, WireError};
use serde::{Deserialize, Serialize};

use self::archive::{ArchiveError, ArchiveKey, Kind, Reader, Writer};
use crate::{
    audit::Auditor,
    filestore::Files,
    keystore::{backup::Protection, Vault, VaultError},
};

/// The format these archives have.
pub const FORMAT: u32 = 3;
/// The keystore's part.
const KEYSTORE: &str = "keystore.sqlite";
/// Where stored files' parts are named from.
const FILES: &str = "files/";
/// Where audit log files' parts are named from.
const AUDIT: &str = "audit/";

/// The archive's header (JSON): the keystore's manifest, how the archive key
/// is protected, and what else it holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    manifest: BackupManifest,
    protection: Protection,
    contents: BackupContents,
    /// Stored files in it.
    files: u32,
    /// The chain's anchors as the copied log ends and begins.
    audit: Option<AuditAnchors>,
}

/// The audit chain's head and start in the copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditAnchors {
    head_seq: u64,
    head_hash: String,
    start_seq: u64,
    start_prev_hash: String,
}

/// What a backup copies from.
#[derive(Debug)]
pub struct Sources {
    /// The keystore.
    pub vault: Arc<Vault>,
    /// The file store, when it is open.
    pub files: Option<Arc<Files>>,
    /// The audit log, when it is on.
    pub audit: Option<Arc<Auditor>>,
}

fn refused(what: &str) -> VaultError {
    VaultError::Wire(WireError::new(
        ErrorCode::FailedPrecondition,
        format!("the backup cannot hold {what}: hsmd has none here (it is off in hsmd.toml)"),
    ))
}

fn not_usable(e: &ArchiveError) -> VaultError {
    VaultError::Invalid(format!("not a usable hsmd backup: {e}"))
}

fn written(e: ArchiveError) -> VaultError {
    match e {
        ArchiveError::Io { what, source } => VaultError::Wire(WireError::new(
            ErrorCode::InvalidArgument,
            format!("{what} (the descriptor passed for the archive): {source}"),
        )),
        ArchiveError::SourceChanged(part, why) => VaultError::Invalid(format!(
            "the backup was not finished: {part} changed while it was read ({why})"
        )),
        other => VaultError::Invalid(format!("the backup was not finished: {other}")),
    }
}

/// Writes an archive of `sources` to `out` (see the module's
/// documentation). Needs unlocked.
///
/// # Errors
/// [`VaultError::Locked`]; a [`VaultError::Wire`] for contents asked for
/// that hsmd does not have, or an output that cannot be written;
/// [`VaultError::Invalid`] for a passphrase out of range.
pub fn write(
    sources: &Sources,
    protection: &BackupProtection,
    contents: BackupContents,
    out: impl Write,
) -> Result<ArchiveSummary, VaultError> {
    let files = match (&sources.files, contents.files) {
        (Some(f), true) => Some(f),
        (None, true) => return Err(refused("stored files")),
        (_, false) => None,
    };
    let audit = match (&sources.audit, contents.audit) {
        (Some(a), true) => Some(a),
        (None, true) => return Err(refused("the audit log")),
        (_, false) => None,
    };
    let vault = &sources.vault;
    // The keystore first, then the log: the keystore's own anchors are then
    // never ahead of the log copied, and the header records the copy's.
    let (snapshot, mut manifest) = vault.keystore_snapshot()?;
    let (key, protection) = vault.archive_protection(protection, &manifest.store_id)?;
    manifest.format = FORMAT;
    manifest.protection = protection.kind().to_owned();
    let copy = files
        .map(|f| f.backup_copy())
        .transpose()
        .map_err(|e| VaultError::Invalid(format!("cannot copy the file store: {e}")))?;
    let log = audit.map(|a| a.backup_snapshot());
    let header = Header {
        manifest: manifest.clone(),
        protection,
        contents,
        files: copy.as_ref().map_or(0, |c| c.tokens),
        audit: log.as_ref().map(|l| AuditAnchors {
            head_seq: l.head.seq,
            head_hash: l.head.hash.clone(),
            start_seq: l.start.seq,
            start_prev_hash: l.start.prev_hash.clone(),
        }),
    };
    let header_bytes = serde_json::to_vec(&header).map_err(|source| VaultError::Encode {
        what: "a backup header",
        source,
    })?;
    let mut w = Writer::new(
        io::BufWriter::with_capacity(256 * 1024, out),
        &header_bytes,
        ArchiveKey::new(key),
    )
    .map_err(written)?;
    let keystore = File::open(snapshot.path())
        .map_err(|e| VaultError::Invalid(format!("cannot read the keystore's snapshot: {e}")))?;
    w.part(Kind::Keystore, KEYSTORE, manifest.payload_bytes, keystore)
        .map_err(written)?;
    drop(snapshot);
    let mut summary = ArchiveSummary {
        manifest,
        contents,
        files: header.files,
        file_bytes: 0,
        audit_files: 0,
        audit_bytes: 0,
        parts: 1,
        archive_bytes: 0,
    };
    if let Some(copy) = &copy {
        for (name, file, len) in &copy.files {
            w.part(Kind::File, &format!("{FILES}{name}"), *len, file)
                .map_err(written)?;
            summary.file_bytes += len;
            summary.parts += 1;
        }
    }
    drop(copy);
    if let Some(log) = &log {
        for (name, file, len) in &log.files {
            // The current file goes on growing: only its whole lines as of
            // the snapshot are copied.
            w.part(Kind::Audit, &format!("{AUDIT}{name}"), *len, file.take(*len))
                .map_err(written)?;
            summary.audit_files += 1;
            summary.audit_bytes += len;
            summary.parts += 1;
        }
    }
    let (mut out, bytes) = w.finish().map_err(written)?;
    out.flush().map_err(|e| {
        written(ArchiveError::Io {
            what: "cannot write the archive".into(),
            source: e,
        })
    })?;
    summary.archive_bytes = bytes;
    tracing::info!(
        keys = summary.manifest.keys,
        files = summary.files,
        audit_files = summary.audit_files,
        bytes,
        "backup archive written"
    );
    Ok(summary)
}

/// Reads an archive from `input` to its end and checks it, writing nothing
/// (see [`protocol::Operation::BackupCheck`]). Without a secret, the digests
/// and the checksum; with one, the seals, the end's MAC and the keystore
/// inside (`summary.manifest.authenticated` says which).
///
/// # Errors
/// [`VaultError::Invalid`] naming the part that is wrong;
/// [`VaultError::BackupSecret`] for a wrong secret (counted toward `uid`'s
/// back-off); [`VaultError::BackupTampered`] for a part that does not open
/// under the right key.
pub fn check(
    vault: &Vault,
    uid: u32,
    input: impl Read,
    secret: Option<&UnlockSecret>,
) -> Result<ArchiveSummary, VaultError> {
    let (mut reader, header) = open(input)?;
    let mut key_is_right = false;
    if let Some(secret) = secret {
        let (key, right) = vault.archive_key(uid, &header.protection, &header.manifest.store_id, secret)?;
        key_is_right = right;
        reader.set_key(ArchiveKey::new(key));
    }
    let mut summary = header.summary();
    // The keystore part is kept (in a scratch file beside the keystore) to
    // check it as SQLite, as a restore would.
    let scratch = vault.scratch_file("check")?;
    let mut keystore: Option<File> = None;
    loop {
        if secret.is_some() && summary.parts == 0 {
            keystore = Some(scratch.create()?);
        }
        let mut sink = |bytes: &[u8]| match keystore.as_mut() {
            Some(f) => f.write_all(bytes),
            None => Ok(()),
        };
        let part = match reader.next_part(&mut sink) {
            Ok(Some(part)) => part,
            Ok(None) => break,
            Err(e) => {
                return Err(read_failed(
                    vault,
                    uid,
                    e,
                    secret.is_some(),
                    summary.parts == 0 && !key_is_right,
                ))
            }
        };
        keystore = None;
        tally(&mut summary, &header, &part)?;
        if secret.is_some() && part.kind == Kind::Keystore {
            vault.check_payload(scratch.path(), &header.manifest)?;
        }
    }
    if summary.parts == 0 {
        return Err(VaultError::Invalid(
            "not a usable hsmd backup: it holds no keystore".into(),
        ));
    }
    summary.archive_bytes = reader.bytes_read();
    if secret.is_some() {
        vault.archive_opened(uid);
        summary.manifest.authenticated = true;
    }
    Ok(summary)
}

/// Opens an archive: its signature and header.
fn open<R: Read>(input: R) -> Result<(Reader<io::BufReader<R>>, Header), VaultError> {
    let reader = Reader::open(io::BufReader::with_capacity(256 * 1024, input)).map_err(|e| not_usable(&e))?;
    let header: Header = serde_json::from_slice(reader.header())
        .map_err(|e| VaultError::Invalid(format!("not a usable hsmd backup: its header: {e}")))?;
    if header.manifest.format != FORMAT {
        return Err(VaultError::Invalid(format!(
            "not a usable hsmd backup: its header says format {}, in a format-{FORMAT} archive",
            header.manifest.format
        )));
    }
    Ok((reader, header))
}

/// Refuses a part the header does not allow where it is: the keystore
/// first and only there, files and audit files only when the header says
/// the archive holds them, each under a name of their kind.
fn allowed(header: &Header, part: &archive::Part) -> Result<(), VaultError> {
    let expected = match part.index {
        0 => part.kind == Kind::Keystore && part.name == KEYSTORE,
        _ => match part.kind {
            Kind::Keystore => false,
            Kind::File => header.contents.files && valid_file_part(&part.name),
            Kind::Audit => header.contents.audit && valid_audit_part(&part.name),
        },
    };
    if !expected {
        return Err(VaultError::Invalid(format!(
            "not a usable hsmd backup: {part} is not a part this archive's header allows"
        )));
    }
    Ok(())
}

/// Counts a part read into `summary`, refusing one the header does not
/// allow where it is (see [`allowed`]) or a keystore of another size than
/// its manifest's.
fn tally(summary: &mut ArchiveSummary, header: &Header, part: &archive::Part) -> Result<(), VaultError> {
    allowed(header, part)?;
    match part.kind {
        Kind::Keystore if part.size != header.manifest.payload_bytes => {
            return Err(VaultError::Invalid(
                "not a usable hsmd backup: the keystore inside does not match its manifest".into(),
            ))
        }
        Kind::Keystore => {}
        Kind::File => summary.file_bytes += part.size,
        Kind::Audit => {
            summary.audit_files += 1;
            summary.audit_bytes += part.size;
        }
    }
    summary.parts += 1;
    Ok(())
}

impl Header {
    /// A summary of the archive before any part is read.
    fn summary(&self) -> ArchiveSummary {
        ArchiveSummary {
            manifest: BackupManifest {
                authenticated: false,
                ..self.manifest.clone()
            },
            contents: self.contents,
            files: self.files,
            file_bytes: 0,
            audit_files: 0,
            audit_bytes: 0,
            parts: 0,
            archive_bytes: 0,
        }
    }
}

/// What a failure to read a part means: with a secret, a seal that fails
/// on the first part under a key not known to be right is a wrong secret
/// (counted toward `uid`'s back-off), any other is tampering; the rest
/// name what is damaged.
fn read_failed(vault: &Vault, uid: u32, e: ArchiveError, keyed: bool, unsure_of_key: bool) -> VaultError {
    match e {
        e @ (ArchiveError::PartTampered(..) | ArchiveError::EndTampered) if keyed => {
            tracing::warn!(error = %e, "backup archive: a seal fails");
            if unsure_of_key {
                return vault.archive_refused(uid, false);
            }
            VaultError::BackupTampered(format!(
                "{e}; the secret given is right. Use another copy of the backup"
            ))
        }
        ArchiveError::Io { what, source } if what.starts_with("cannot keep") => {
            VaultError::Invalid(format!("{what}: {source} (nothing was changed)"))
        }
        e => not_usable(&e),
    }
}

/// `files/<token>/<name>`, a name a stored file's directory holds.
fn valid_file_part(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(FILES) else {
        return false;
    };
    let Some((token, file)) = rest.split_once('/') else {
        return false;
    };
    crate::filestore::store::valid_token(token)
        && (file == "header.json"
            || file == "meta.json"
            || file
                .strip_prefix("seg-")
                .is_some_and(|n| n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit())))
}

/// `audit/<name>`, a plain file name.
fn valid_audit_part(name: &str) -> bool {
    name.strip_prefix(AUDIT)
        .is_some_and(|n| !n.is_empty() && n != "." && n != ".." && !n.contains('/') && !n.contains('\0'))
}
