//! The messages of protocol version 1.
//!
//! Every client frame is a [`Request`]; every daemon frame is a [`Response`]. The
//! first request on a connection must be [`Operation::Hello`]. New operations and
//! replies are only ever appended, so variant indices never change meaning.

use serde::{Deserialize, Serialize};

use crate::{error::WireError, secret::SecretBytes};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The request id the daemon uses for errors that belong to no request (refused
/// connections, malformed frames, timeouts). Clients number requests from 1.
pub const CONNECTION_ERROR_ID: u64 = 0;

/// Number of [`Operation`] variants this version knows; an index at or above it is
/// an unknown request. Counted by the compiler from the enum.
#[allow(clippy::cast_possible_truncation)]
pub const OPERATION_VARIANTS: u32 = <Operation as strum::EnumCount>::COUNT as u32;

/// One client frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client, echoed in the response; lets a client pipeline.
    pub id: u64,
    /// What to do.
    pub op: Operation,
}

/// An operation a client asks for.
///
/// Its name (for logs, metrics and audit lines) is the variant's name in
/// kebab-case unless an attribute says otherwise; [`OperationKind`] is the
/// same list without the payloads.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::EnumCount,
    strum::EnumDiscriminants,
)]
#[strum(serialize_all = "kebab-case")]
#[strum_discriminants(
    name(OperationKind),
    derive(Hash, PartialOrd, Ord, strum::EnumIter, strum::IntoStaticStr),
    strum(serialize_all = "kebab-case"),
    doc = "Which operation a request is, without its payload."
)]
pub enum Operation {
    /// Must be the first request on a connection, and only the first. Its layout
    /// is frozen across protocol versions so any daemon can read it.
    Hello(ClientHello),
    /// Echoes `payload`; the cheapest round trip, for liveness and benchmarks.
    Ping {
        /// Bytes the daemon sends back unchanged.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// The daemon's state, version, uptime, backends and load.
    Status,
    /// The caller's identity as the daemon sees it, and what it may do.
    #[strum(serialize = "whoami")]
    WhoAmI,
    /// Holds a worker for `millis` milliseconds (at most 10 000) and then answers.
    /// Served only by `hsmd --dev`; used to test concurrency and shutdown.
    #[doc(hidden)]
    DebugDelay {
        /// How long to hold the worker.
        millis: u32,
    },
    /// Creates the keystore: a fresh master key wrapped by its first unlock slot.
    /// Leaves the daemon unlocked.
    Init {
        /// The first unlock slot.
        slot: NewSlot,
    },
    /// Unwraps the master key with any one slot's secret.
    Unlock {
        /// The secret to try.
        secret: UnlockSecret,
    },
    /// Zeroizes the master key and every unlocked key at once.
    Lock,
    /// Lists the unlock slots (no secrets).
    SlotList,
    /// Adds an unlock slot; the daemon must be unlocked.
    SlotAdd {
        /// The slot to add.
        slot: NewSlot,
    },
    /// Removes an unlock slot; the last one is never removed.
    SlotRemove {
        /// The slot's id, as `SlotList` shows it.
        id: u32,
    },
    /// Generates a key inside the daemon. Needs unlocked.
    KeyCreate {
        /// Unique name; see `docs/protocol.md` for the allowed characters.
        name: String,
        /// What kind of key.
        key_type: KeyType,
        /// What it may be used for; empty means the type's defaults.
        usages: Vec<Usage>,
        /// Lifecycle settings and descriptive metadata.
        options: KeyOptions,
    },
    /// Every key's metadata.
    KeyList,
    /// One key's metadata.
    KeyInfo {
        /// The key's name.
        name: String,
    },
    /// The public half of an asymmetric key (SubjectPublicKeyInfo, DER).
    KeyPublic {
        /// The key's name.
        name: String,
    },
    /// Moves a key into its recovery window (soft delete): nothing can use it
    /// until `KeyRestore`, and the daemon purges it when the window ends.
    KeyDelete {
        /// The key's name.
        name: String,
    },
    /// Signs a digest the client computed (SHA-512 for ed25519, SHA-256 for
    /// ecdsa-p256 and every RSA type, SHA-384 for ecdsa-p384). Needs unlocked.
    Sign(SignArgs),
    /// Checks a signature over a digest.
    Verify(VerifyArgs),
    /// Seals `plaintext` with an aes256-gcm key's newest version, or with
    /// `version` (no lower than the key's minimum encryption version). Needs unlocked.
    Encrypt(EncryptArgs),
    /// Opens what `Encrypt` sealed. Needs unlocked.
    Decrypt(DecryptArgs),
    /// HMAC-SHA-256 of `data` with an hmac-sha256 key's newest version. Needs unlocked.
    Mac(MacArgs),
    /// Checks an HMAC tag in constant time. Needs unlocked.
    MacVerify(MacVerifyArgs),
    /// Adds a version to a key; new signatures and ciphertexts use it. Needs unlocked.
    KeyRotate {
        /// The key's name.
        name: String,
    },
    /// Changes a key's settings and metadata. Needs unlocked.
    KeySet {
        /// The key's name.
        name: String,
        /// What to change; `None` fields stay as they are.
        changes: KeyChanges,
    },
    /// Moves a key to another lifecycle state. Needs unlocked.
    KeyTransition {
        /// The key's name.
        name: String,
        /// Where to.
        to: Transition,
    },
    /// Brings a deleted key back from its recovery window. Needs unlocked.
    KeyRestore {
        /// The key's name.
        name: String,
    },
    /// Destroys a deleted key at once and for good, with every version. Needs unlocked.
    KeyPurge {
        /// The key's name.
        name: String,
    },
    /// Re-seals a ciphertext under the key's newest version (or `to_version`)
    /// without the plaintext leaving the daemon. Answered with `Reply::Encrypted`.
    Rewrap {
        /// The key's name.
        name: String,
        /// The version the ciphertext names.
        version: u32,
        /// 12-byte nonce, ciphertext, 16-byte tag.
        #[serde(with = "serde_bytes")]
        sealed: Vec<u8>,
        /// The associated data it was sealed with (kept for the new one).
        #[serde(with = "serde_bytes")]
        aad: Vec<u8>,
        /// The version to re-seal under; `None` for the newest.
        to_version: Option<u32>,
    },
    /// A fresh random 32-byte data key, sealed by an aes256-gcm key as
    /// `Encrypt` would seal it, and in plain as well only when asked and the
    /// key allows it (`KeyOptions::allow_plaintext_datakey`).
    #[strum(serialize = "datakey")]
    DataKey {
        /// The key's name.
        name: String,
        /// Associated data for the sealed data key.
        #[serde(with = "serde_bytes")]
        aad: Vec<u8>,
        /// Also return the data key in plain.
        plaintext: bool,
    },
    /// Several key operations in one frame, answered by `Reply::Batch` with one
    /// result per item, in order. At most [`MAX_BATCH_ITEMS`] items.
    Batch {
        /// The operations.
        items: Vec<BatchItem>,
    },
    /// Dev mode only: moves the daemon's clock for key lifecycles (activation,
    /// expiry, rotation, purge) forward, so tests need not wait for days.
    #[doc(hidden)]
    DebugClock {
        /// Seconds to add.
        advance_secs: u64,
    },
    /// Makes a backup archive of the whole keystore (see `docs/backup.md`) and
    /// holds it for the caller to read with `TransferRead`. Needs unlocked.
    BackupCreate {
        /// What encrypts the archive.
        protection: BackupProtection,
    },
    /// Reads part of a transfer the daemon holds (a backup archive).
    TransferRead {
        /// The transfer, from `BackupReady`.
        transfer: u64,
        /// Where to start.
        offset: u64,
        /// How many bytes at most (bounded by the frame limit).
        len: u32,
    },
    /// Starts an upload of `size` bytes (a backup archive to verify or restore).
    TransferBegin {
        /// The total size.
        size: u64,
    },
    /// Appends bytes to an upload; `offset` must be what was received so far.
    TransferWrite {
        /// The transfer, from `TransferStarted`.
        transfer: u64,
        /// Where these bytes go.
        offset: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Checks an uploaded archive: its checksum and structure, and with a
    /// secret also its encryption and the keystore inside.
    BackupVerify {
        /// The completed upload.
        transfer: u64,
        /// The backup passphrase, or a slot secret for a master-key backup.
        secret: Option<UnlockSecret>,
    },
    /// Replaces the keystore with an uploaded archive's; the daemon is then
    /// locked, and unlocks with the archive's slots.
    BackupRestore {
        /// The completed upload.
        transfer: u64,
        /// The backup passphrase, or a slot secret for a master-key backup.
        secret: UnlockSecret,
        /// Replace a keystore that already exists (it is kept aside, not deleted).
        force: bool,
    },
    /// The policy in force: its source and text.
    PolicyShow,
    /// Would `user` be allowed `resource:action` on `key`, and by what?
    PolicyCheck {
        /// A user name or uid.
        user: String,
        /// `keys`, `keystore`, `audit`, `policy` or `metrics`.
        resource: String,
        /// The action, e.g. `sign`.
        action: String,
        /// The key, for key actions.
        key: Option<String>,
    },
    /// Checks the audit log's hash chain against the head the keystore records.
    AuditVerify,
    /// Audit lines that pass the filter, oldest first (at most `limit`, the newest).
    AuditShow {
        /// Only events of the last this many seconds.
        since_secs: Option<u64>,
        /// Only this event type (e.g. `SIGN`).
        event_type: Option<String>,
        /// Only this user (name or uid).
        user: Option<String>,
        /// Only events about this key.
        key: Option<String>,
        /// Only `success` or `failure`.
        result: Option<String>,
        /// At most this many lines (at most 100,000).
        limit: u32,
    },
    /// The daemon's Prometheus metrics, as OpenMetrics text.
    Metrics,
    /// Starts storing a file (`docs/filestore.md`): answered with a session to
    /// send its chunks to, in order, and the token it will have.
    FileStoreBegin {
        /// The original file name (no directories).
        name: String,
        /// The aes256-gcm key that wraps the file's data key.
        key: String,
        /// Plaintext bytes per chunk (4 KiB to 8 MiB).
        chunk_size: u32,
    },
    /// The next chunk of a file being stored (exactly `chunk_size` bytes except
    /// the last).
    FileStoreChunk {
        /// From `FileSession`.
        session: u64,
        /// Its index, from 0, in order.
        index: u64,
        /// Whether it is the last.
        last: bool,
        /// The plaintext.
        bytes: crate::SecretBytes,
    },
    /// Completes a store after its last chunk: from now on the token exists.
    FileStoreFinish {
        /// From `FileSession`.
        session: u64,
    },
    /// Starts reading a stored file, answered with a session and its info.
    FileRetrieveBegin {
        /// The file's token.
        token: String,
    },
    /// The next chunk of a file being read.
    FileRetrieveNext {
        /// From `FileSession`.
        session: u64,
    },
    /// Stored files (the caller's own, or all for `files:admin`).
    FileList,
    /// One stored file's metadata.
    FileInfo {
        /// The file's token.
        token: String,
    },
    /// Wipes and removes a stored file.
    FileDelete {
        /// The file's token.
        token: String,
    },
    /// Stores a whole file that hsmd reads from the descriptor sent with this
    /// request (`SCM_RIGHTS`, see [`crate::Client::call_with_fd`]) to its end:
    /// hsmd reads with the caller's own access and seals chunks in parallel.
    /// hsmd reads the descriptor in order with read(2), so its shared file
    /// offset shows the progress. Answered with `File` once stored.
    #[strum(serialize = "file-store")]
    FileStoreFd {
        /// The original file name (no directories).
        name: String,
        /// The aes256-gcm key that wraps the file's data key.
        key: String,
        /// Plaintext bytes per chunk (a power of two, 4 KiB to 8 MiB).
        chunk_size: u32,
    },
    /// Writes a stored file's plaintext to the descriptor sent with this
    /// request, in order with write(2) (so the offset of a regular file shows
    /// the progress); the last chunk is written only once every chunk and the
    /// checksum have checked out. Answered with `File`.
    #[strum(serialize = "file-retrieve")]
    FileRetrieveFd {
        /// The file's token.
        token: String,
    },
    /// Seals a backend's PIN (today: the PKCS#11 token's user PIN) under the
    /// master key in the keystore and hands it to the backend, now and at
    /// every unlock. Needs unlocked. Answered with `BackendPinSet`.
    BackendSetPin {
        /// The backend: `pkcs11`.
        backend: String,
        /// The PIN.
        pin: SecretBytes,
    },
    /// Whether a key by this name is in the keystore (a deleted key still
    /// recoverable counts: its name is taken). Needs any permission on the
    /// key, as `KeyInfo`; works while locked. Answered with `KeyExists`.
    KeyExists {
        /// The key's name.
        name: String,
    },
    /// Signs a message the client sends (at most [`MAX_SIGN_MESSAGE`]
    /// bytes): pure Ed25519 (RFC 8032) over the message itself; ECDSA and
    /// RSA over its hash, with the hash named or the key type's own. Needs
    /// unlocked. Answered with `Signature`.
    SignMessage(SignMessageArgs),
    /// Checks a signature made by `SignMessage`. Answered with `Verified`.
    VerifyMessage(VerifyMessageArgs),
    /// The keys the caller may sign with that are offered to SSH: labelled
    /// [`SSH_LABEL`], allowed to sign, active, and of a type OpenSSH takes.
    /// Needs no permission of its own: each key is listed only if the
    /// caller's `keys.sign` covers it. Needs unlocked (the public halves
    /// are read from the keys). Answered with `SshIdentities`.
    SshIdentities,
    /// Opens what `Encrypt` sealed when the caller does not know which key
    /// version sealed it (a PKCS#11 `C_Decrypt` has only the ciphertext):
    /// hsmd tries the versions the key still decrypts with, newest first,
    /// down to its minimum decryption version. Needs `keys.decrypt` and
    /// unlocked. Answered with `DecryptedWith`, which names the version.
    DecryptAnyVersion(DecryptAnyVersionArgs),
    /// Writes a backup archive of hsmd's state (format 3, `docs/backup.md`:
    /// the keystore, and as asked the stored files, still sealed, and the
    /// audit log) to the descriptor sent with this request, streamed in
    /// order with write(2), in bounded memory whatever its size. Needs
    /// unlocked. Answered with `BackupWritten`.
    #[strum(serialize = "backup-write")]
    BackupWrite {
        /// What encrypts the archive.
        protection: BackupProtection,
        /// What it holds besides the keystore.
        contents: BackupContents,
    },
    /// Reads a format-3 archive from the descriptor sent with this request to
    /// its end and checks it, writing nothing: every part's digest and the
    /// final checksum, and with a secret every part's seal, the end record's
    /// MAC and the keystore inside. Answered with `BackupChecked`.
    #[strum(serialize = "backup-check")]
    BackupCheck {
        /// The backup passphrase, or a slot secret for a master-key backup.
        secret: Option<UnlockSecret>,
    },
    /// Restores a format-3 archive read from the descriptor sent with this
    /// request: the keystore, and what the archive holds of the stored files
    /// (under their tokens) and the audit log (which goes on from its head).
    /// Every part is read and checked into a staging directory first; if
    /// anything is wrong, or keys or slots of the archive cannot work here
    /// and `accept_unusable` is not set, nothing changes. Refused when hsmd
    /// has a keystore or stored files unless `force` (the current ones are
    /// kept aside). hsmd is locked afterwards. Needs `keystore.restore`.
    /// Answered with `BackupRestoredArchive`.
    #[strum(serialize = "backup-restore-archive")]
    BackupRestoreArchive {
        /// The backup passphrase, or a slot secret for a master-key backup.
        secret: UnlockSecret,
        /// Replace an initialized keystore and a file store that holds files.
        force: bool,
        /// Restore even though some unlock slots or keys cannot work here.
        accept_unusable: bool,
    },
}

/// What a format-3 backup holds besides the keystore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BackupContents {
    /// Every stored file (its sealed chunks and header, never its plaintext).
    pub files: bool,
    /// The audit log's files, with the chain's anchors.
    pub audit: bool,
}

/// What a format-3 archive holds, as written or as read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveSummary {
    /// The keystore inside, as format 2 describes it (`format` is 3).
    pub manifest: BackupManifest,
    /// What it holds besides the keystore.
    pub contents: BackupContents,
    /// Stored files in it.
    pub files: u32,
    /// Bytes of the file store's files in it (sealed, as on disk).
    pub file_bytes: u64,
    /// Audit log files in it.
    pub audit_files: u32,
    /// Bytes of audit log in it.
    pub audit_bytes: u64,
    /// The archive's parts.
    pub parts: u32,
    /// The archive's bytes.
    pub archive_bytes: u64,
}

/// What a restore of a format-3 archive did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSummary {
    /// What the archive held.
    pub archive: ArchiveSummary,
    /// Unlock slots and keys of the archive that cannot work on this hsmd
    /// (no TPM, a backend not configured or not reachable), one sentence each.
    pub unusable: Vec<String>,
    /// Where what the restore replaced was kept (keystore, file store, audit
    /// log files).
    pub kept: Vec<String>,
}

/// The label that offers a key to SSH clients through hsmd's agent socket
/// (its value is not read): `hsmctl key create … --label ssh=yes`.
pub const SSH_LABEL: &str = "ssh";

/// A key offered to SSH, as [`Operation::SshIdentities`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshIdentity {
    /// The key's name.
    pub name: String,
    /// Its type.
    pub key_type: KeyType,
    /// Its newest version, the one that signs.
    pub version: u32,
    /// That version's public key, as a DER SubjectPublicKeyInfo.
    #[serde(with = "serde_bytes")]
    pub spki_der: Vec<u8>,
}

impl Operation {
    /// Whether this request carries a file descriptor (sent with it as
    /// `SCM_RIGHTS` ancillary data).
    #[must_use]
    pub fn carries_fd(&self) -> bool {
        matches!(
            self,
            Self::FileStoreFd { .. }
                | Self::FileRetrieveFd { .. }
                | Self::BackupWrite { .. }
                | Self::BackupCheck { .. }
                | Self::BackupRestoreArchive { .. }
        )
    }
}

/// A stored file's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Its token.
    pub token: String,
    /// The original name.
    pub name: String,
    /// Plaintext bytes.
    pub size: u64,
    /// Plaintext bytes per chunk.
    pub chunk_size: u32,
    /// Chunks.
    pub chunks: u64,
    /// The key that wraps its data key.
    pub key: String,
    /// That key's version.
    pub key_version: u32,
    /// Who stored it.
    pub owner_uid: u32,
    /// When.
    pub stored_unix: u64,
    /// SHA-256 over the chunks' SHA-256s, hex (`docs/filestore.md`).
    pub checksum: String,
}

/// What encrypts a backup archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupProtection {
    /// A key derived from the master key: restoring needs a secret of one of
    /// the archive's own unlock slots.
    MasterKey,
    /// A key derived from this passphrase with Argon2id.
    Passphrase(SecretBytes),
}

/// What a backup archive says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// Archive format version.
    pub format: u32,
    /// When it was made.
    pub created_unix: u64,
    /// The hsmd that made it.
    pub hsmd_version: String,
    /// The keystore's id (hex).
    pub store_id: String,
    /// The keystore's schema version.
    pub schema_version: u32,
    /// Keys in it (deleted ones included).
    pub keys: u32,
    /// Key versions in it.
    pub key_versions: u32,
    /// Unlock slots in it.
    pub slots: u32,
    /// `master-key` or `passphrase`.
    pub protection: String,
    /// Size of the keystore inside.
    pub payload_bytes: u64,
    /// SHA-256 of the keystore inside (hex).
    pub payload_sha256: String,
    /// Whether the contents were decrypted and checked (a secret was given),
    /// or only the checksum and structure.
    pub authenticated: bool,
}

/// One item of a [`Operation::Batch`]: the key operations that may be batched,
/// with the fields of the operations of the same name. A type of its own (not
/// `Operation`) so that a batch cannot hold a batch: a frame of nested batches
/// would otherwise make the decoder recurse as deep as the frame is long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchItem {
    /// As [`Operation::Sign`].
    Sign(SignArgs),
    /// As [`Operation::Verify`].
    Verify(VerifyArgs),
    /// As [`Operation::Encrypt`].
    Encrypt(EncryptArgs),
    /// As [`Operation::Decrypt`].
    Decrypt(DecryptArgs),
    /// As [`Operation::Mac`].
    Mac(MacArgs),
    /// As [`Operation::MacVerify`].
    MacVerify(MacVerifyArgs),
    /// As [`Operation::SignMessage`].
    SignMessage(SignMessageArgs),
    /// As [`Operation::VerifyMessage`].
    VerifyMessage(VerifyMessageArgs),
}

impl From<BatchItem> for Operation {
    fn from(item: BatchItem) -> Self {
        match item {
            BatchItem::Sign(a) => Self::Sign(a),
            BatchItem::Verify(a) => Self::Verify(a),
            BatchItem::Encrypt(a) => Self::Encrypt(a),
            BatchItem::Decrypt(a) => Self::Decrypt(a),
            BatchItem::Mac(a) => Self::Mac(a),
            BatchItem::MacVerify(a) => Self::MacVerify(a),
            BatchItem::SignMessage(a) => Self::SignMessage(a),
            BatchItem::VerifyMessage(a) => Self::VerifyMessage(a),
        }
    }
}

/// The fields of [`Operation::Sign`] and [`BatchItem::Sign`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignArgs {
    /// The key's name.
    pub name: String,
    /// The digest of the data.
    #[serde(with = "serde_bytes")]
    pub digest: Vec<u8>,
}

/// The fields of [`Operation::Verify`] and [`BatchItem::Verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyArgs {
    /// The key's name.
    pub name: String,
    /// The key version the signature names.
    pub version: u32,
    /// The digest of the data.
    #[serde(with = "serde_bytes")]
    pub digest: Vec<u8>,
    /// The signature: 64 bytes for ed25519, DER for ECDSA, the modulus
    /// length (big-endian) for RSA.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// Allow this use of a key in state `compromised` (logged at high risk).
    pub allow_compromised: bool,
}

/// The fields of [`Operation::Encrypt`] and [`BatchItem::Encrypt`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptArgs {
    /// The key's name.
    pub name: String,
    /// The version to seal with; `None` for the newest. Lets a client that
    /// seals a file chunk by chunk keep one version across a rotation.
    pub version: Option<u32>,
    /// The data; wiped when the request is dropped.
    pub plaintext: SecretBytes,
    /// Associated data, authenticated but not encrypted.
    #[serde(with = "serde_bytes")]
    pub aad: Vec<u8>,
}

/// The fields of [`Operation::Decrypt`] and [`BatchItem::Decrypt`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecryptArgs {
    /// The key's name.
    pub name: String,
    /// The key version the ciphertext names.
    pub version: u32,
    /// 12-byte nonce, ciphertext, 16-byte tag.
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
    /// The associated data given to `Encrypt`.
    #[serde(with = "serde_bytes")]
    pub aad: Vec<u8>,
    /// Allow this use of a key in state `compromised` (logged at high risk).
    pub allow_compromised: bool,
}

/// The fields of [`Operation::DecryptAnyVersion`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecryptAnyVersionArgs {
    /// The key's name.
    pub name: String,
    /// 12-byte nonce, ciphertext, 16-byte tag.
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
    /// The associated data given to `Encrypt`.
    #[serde(with = "serde_bytes")]
    pub aad: Vec<u8>,
    /// Allow this use of a key in state `compromised` (logged at high risk).
    pub allow_compromised: bool,
}

/// The fields of [`Operation::Mac`] and [`BatchItem::Mac`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacArgs {
    /// The key's name.
    pub name: String,
    /// The data.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// The fields of [`Operation::MacVerify`] and [`BatchItem::MacVerify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacVerifyArgs {
    /// The key's name.
    pub name: String,
    /// The key version the tag names.
    pub version: u32,
    /// The data.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// The 32-byte tag.
    #[serde(with = "serde_bytes")]
    pub tag: Vec<u8>,
    /// Allow this use of a key in state `compromised` (logged at high risk).
    pub allow_compromised: bool,
}

/// The longest message [`Operation::SignMessage`] signs, in bytes. Longer
/// data is hashed by the client and signed with [`Operation::Sign`].
pub const MAX_SIGN_MESSAGE: usize = 64 * 1024;

/// A hash a message is signed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HashAlg {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// The name used on the command line and in audit lines.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }

    /// Parses [`HashAlg::as_str`]'s names.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Sha256, Self::Sha384, Self::Sha512]
            .into_iter()
            .find(|h| h.as_str() == s)
    }
}

/// The fields of [`Operation::SignMessage`] and [`BatchItem::SignMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignMessageArgs {
    /// The key's name.
    pub name: String,
    /// The message, at most [`MAX_SIGN_MESSAGE`] bytes.
    #[serde(with = "serde_bytes")]
    pub message: Vec<u8>,
    /// The hash signed over: `None` for the key type's own (none for
    /// Ed25519, which signs the message itself; SHA-256 for ecdsa-p256 and
    /// RSA; SHA-384 for ecdsa-p384). An Ed25519 key takes none.
    pub hash: Option<HashAlg>,
}

/// The fields of [`Operation::VerifyMessage`] and [`BatchItem::VerifyMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyMessageArgs {
    /// The key's name.
    pub name: String,
    /// The key version the signature names.
    pub version: u32,
    /// The message, at most [`MAX_SIGN_MESSAGE`] bytes.
    #[serde(with = "serde_bytes")]
    pub message: Vec<u8>,
    /// The hash it was signed over, as given to `SignMessage`.
    pub hash: Option<HashAlg>,
    /// The signature, encoded as `Sign`'s.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// Allow this use of a key in state `compromised` (logged at high risk).
    pub allow_compromised: bool,
}

/// The most items one `Operation::Batch` may carry.
pub const MAX_BATCH_ITEMS: usize = 1024;

/// Settings given when a key is created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyOptions {
    /// Free text for people.
    pub description: String,
    /// Free-form labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Rotate automatically this often (seconds); `None` for never.
    pub rotate_every_secs: Option<u64>,
    /// Stay `pre-active` until this time (seconds since the Unix epoch).
    pub activate_at_unix: Option<u64>,
    /// Become `deactivated` at this time.
    pub expire_at_unix: Option<u64>,
    /// Whether `DataKey` may return data keys in plain.
    pub allow_plaintext_datakey: bool,
    /// Where the key lives: `soft`, `mock`, `pkcs11` or `tpm`; `None` for the
    /// daemon's configured default. Fixed for the key's life, every version.
    pub backend: Option<String>,
}

/// Changes to a key's settings; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChanges {
    /// New description.
    pub description: Option<String>,
    /// Labels to add or replace.
    pub set_labels: std::collections::BTreeMap<String, String>,
    /// Labels to remove.
    pub remove_labels: Vec<String>,
    /// New rotation period: `Some(None)` stops automatic rotation.
    pub rotate_every_secs: Option<Option<u64>>,
    /// New expiry: `Some(None)` removes it.
    pub expire_at_unix: Option<Option<u64>>,
    /// Oldest version that may still verify or decrypt.
    pub min_decrypt_version: Option<u32>,
    /// Oldest version a request may name to sign or encrypt with (requests
    /// that name none use the newest).
    pub min_encrypt_version: Option<u32>,
    /// Whether `DataKey` may return data keys in plain.
    pub allow_plaintext_datakey: Option<bool>,
}

/// A key's lifecycle state, after NIST SP 800-57 part 1, section 5.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    /// Not yet usable: waiting for its activation time.
    PreActive,
    /// Usable for everything its usages allow.
    Active,
    /// Disabled by an operator; usable for nothing until enabled.
    Suspended,
    /// Past use: may verify and decrypt, never sign or encrypt.
    Deactivated,
    /// Known or suspected to be exposed: verify and decrypt only when the
    /// request says so explicitly, each such use logged at high risk.
    Compromised,
    /// Its material is gone; only its metadata remains.
    Destroyed,
}

impl KeyState {
    /// Every state, in lifecycle order.
    pub const ALL: [Self; 6] = [
        Self::PreActive,
        Self::Active,
        Self::Suspended,
        Self::Deactivated,
        Self::Compromised,
        Self::Destroyed,
    ];

    /// The state's name on the command line and in documents.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreActive => "pre-active",
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Deactivated => "deactivated",
            Self::Compromised => "compromised",
            Self::Destroyed => "destroyed",
        }
    }

    /// Parses [`KeyState::as_str`]'s names.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// A requested change of lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transition {
    /// `active` → `suspended`.
    Disable,
    /// `suspended` or `pre-active` → `active`.
    Enable,
    /// `pre-active`, `active` or `suspended` → `deactivated`.
    Deactivate,
    /// Any state but `destroyed` → `compromised`.
    Compromise,
    /// Any state → `destroyed`: every version's material is erased.
    Destroy,
}

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Its number, from 1.
    pub version: u32,
    /// When it was made.
    pub created_unix: u64,
    /// Operations it performed.
    pub use_count: u64,
    /// When it was last used.
    pub last_used_unix: Option<u64>,
}

/// The kinds of key hsmd holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// Ed25519 signatures.
    Ed25519,
    /// ECDSA on NIST P-256 with SHA-256.
    EcdsaP256,
    /// ECDSA on NIST P-384 with SHA-384.
    EcdsaP384,
    /// AES-256-GCM encryption.
    Aes256Gcm,
    /// HMAC-SHA-256.
    HmacSha256,
    /// RSASSA-PSS (RFC 8017 §8.1) with a 2048-bit modulus: SHA-256, MGF1 with
    /// SHA-256, a 32-byte salt. Only where a backend keeps RSA keys (pkcs11, tpm).
    RsaPss2048,
    /// RSASSA-PSS as [`KeyType::RsaPss2048`], 3072-bit modulus.
    RsaPss3072,
    /// RSASSA-PSS as [`KeyType::RsaPss2048`], 4096-bit modulus.
    RsaPss4096,
    /// RSASSA-PKCS1-v1_5 (RFC 8017 §8.2) with SHA-256 and a 2048-bit modulus.
    RsaPkcs1_2048,
    /// RSASSA-PKCS1-v1_5 as [`KeyType::RsaPkcs1_2048`], 3072-bit modulus.
    RsaPkcs1_3072,
    /// RSASSA-PKCS1-v1_5 as [`KeyType::RsaPkcs1_2048`], 4096-bit modulus.
    RsaPkcs1_4096,
}

/// The RSA signature scheme a key type is bound to. A key signs with one
/// scheme only, so a PSS key can never be used to forge or check PKCS#1 v1.5
/// signatures (or the reverse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RsaScheme {
    /// RSASSA-PSS, SHA-256, MGF1-SHA-256, salt length 32.
    Pss,
    /// RSASSA-PKCS1-v1_5 with a SHA-256 DigestInfo.
    Pkcs1v15,
}

impl KeyType {
    /// Every type, in wire order.
    pub const ALL: [Self; 11] = [
        Self::Ed25519,
        Self::EcdsaP256,
        Self::EcdsaP384,
        Self::Aes256Gcm,
        Self::HmacSha256,
        Self::RsaPss2048,
        Self::RsaPss3072,
        Self::RsaPss4096,
        Self::RsaPkcs1_2048,
        Self::RsaPkcs1_3072,
        Self::RsaPkcs1_4096,
    ];

    /// The name used on the command line and in listings.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Aes256Gcm => "aes256-gcm",
            Self::HmacSha256 => "hmac-sha256",
            Self::RsaPss2048 => "rsa-pss-2048",
            Self::RsaPss3072 => "rsa-pss-3072",
            Self::RsaPss4096 => "rsa-pss-4096",
            Self::RsaPkcs1_2048 => "rsa-pkcs1-2048",
            Self::RsaPkcs1_3072 => "rsa-pkcs1-3072",
            Self::RsaPkcs1_4096 => "rsa-pkcs1-4096",
        }
    }

    /// For RSA types, the modulus size in bits and the signature scheme.
    #[must_use]
    pub fn rsa(self) -> Option<(u32, RsaScheme)> {
        Some(match self {
            Self::RsaPss2048 => (2048, RsaScheme::Pss),
            Self::RsaPss3072 => (3072, RsaScheme::Pss),
            Self::RsaPss4096 => (4096, RsaScheme::Pss),
            Self::RsaPkcs1_2048 => (2048, RsaScheme::Pkcs1v15),
            Self::RsaPkcs1_3072 => (3072, RsaScheme::Pkcs1v15),
            Self::RsaPkcs1_4096 => (4096, RsaScheme::Pkcs1v15),
            _ => return None,
        })
    }

    /// Whether keys of this type have a public half (SubjectPublicKeyInfo).
    #[must_use]
    pub fn is_asymmetric(self) -> bool {
        !matches!(self, Self::Aes256Gcm | Self::HmacSha256)
    }

    /// Parses [`KeyType::as_str`]'s names.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The usages a key of this type may have, the defaults.
    #[must_use]
    pub fn allowed_usages(self) -> &'static [Usage] {
        match self {
            Self::Aes256Gcm => &[Usage::Encrypt, Usage::Decrypt],
            Self::HmacSha256 => &[Usage::Mac],
            _ => &[Usage::Sign, Usage::Verify],
        }
    }

    /// Length of the digest a signature covers, for signing types.
    #[must_use]
    pub fn digest_len(self) -> Option<usize> {
        match self {
            Self::Ed25519 => Some(64),
            Self::EcdsaP256 => Some(32),
            Self::EcdsaP384 => Some(48),
            Self::Aes256Gcm | Self::HmacSha256 => None,
            // Every RSA type signs a SHA-256 digest.
            _ => Some(32),
        }
    }
}

/// What a key may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Usage {
    /// Make signatures.
    Sign,
    /// Check signatures.
    Verify,
    /// Encrypt.
    Encrypt,
    /// Decrypt.
    Decrypt,
    /// Compute and check MACs.
    Mac,
}

impl Usage {
    /// The name used on the command line.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sign => "sign",
            Self::Verify => "verify",
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::Mac => "mac",
        }
    }

    /// Parses [`Usage::as_str`]'s names.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Sign, Self::Verify, Self::Encrypt, Self::Decrypt, Self::Mac]
            .into_iter()
            .find(|u| u.as_str() == s)
    }
}

/// A key's metadata (never its material).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Unique name.
    pub name: String,
    /// Stable random id.
    pub id: String,
    /// What kind of key.
    pub key_type: KeyType,
    /// Where it lives: `soft`, `pkcs11`, `tpm` or `mock`.
    pub backend: String,
    /// What it may be used for.
    pub usages: Vec<Usage>,
    /// Newest version.
    pub version: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The uid that created it.
    pub owner_uid: u32,
    /// The creator's user name when the key was made.
    pub owner_name: Option<String>,
    /// Whether that uid is still that user (a deleted or recycled uid owns
    /// nothing; such keys are an admin's to delete).
    pub owner_exists: bool,
    /// Its lifecycle state now (an expiry or activation time already applied).
    pub state: KeyState,
    /// When the state last changed by an operator's hand.
    pub state_changed_unix: u64,
    /// When it became active, if it has.
    pub activated_unix: Option<u64>,
    /// When a pre-active key becomes active.
    pub activate_at_unix: Option<u64>,
    /// When it becomes deactivated.
    pub expire_at_unix: Option<u64>,
    /// When any version was last used.
    pub last_used_unix: Option<u64>,
    /// When the newest version was made by a rotation.
    pub last_rotated_unix: Option<u64>,
    /// Automatic rotation period, seconds.
    pub rotate_every_secs: Option<u64>,
    /// When the next automatic rotation is due.
    pub next_rotation_unix: Option<u64>,
    /// Oldest version that may verify or decrypt.
    pub min_decrypt_version: u32,
    /// Oldest version a request may name to sign or encrypt with.
    pub min_encrypt_version: u32,
    /// Every version, oldest first.
    pub versions: Vec<VersionInfo>,
    /// Free text.
    pub description: String,
    /// Free-form labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Whether `DataKey` may return data keys in plain.
    pub allow_plaintext_datakey: bool,
    /// When it was deleted, if it is in its recovery window.
    pub deleted_unix: Option<u64>,
    /// When a deleted key is purged.
    pub purge_at_unix: Option<u64>,
}

/// A new unlock slot and its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NewSlot {
    /// Unlocked by a passphrase, stretched with Argon2id.
    Passphrase {
        /// Free-form label shown by `SlotList`.
        label: String,
        /// The passphrase.
        passphrase: SecretBytes,
    },
    /// Unlocked by the 32 random bytes of a key file (automation, systemd credentials).
    Keyfile {
        /// Free-form label shown by `SlotList`.
        label: String,
        /// Exactly 32 bytes; the client generates them and keeps the file.
        key: SecretBytes,
    },
    /// Unlocked by the machine's TPM 2.0: the daemon seals a random secret in
    /// its TPM, optionally bound to the current values of some PCRs (SHA-256
    /// bank), so that a changed boot chain cannot unseal it.
    Tpm2 {
        /// Free-form label shown by `SlotList`.
        label: String,
        /// PCR indexes (0 to 23) to bind to; empty for none.
        pcrs: Vec<u8>,
    },
    /// Unlocked by a FIDO2 authenticator's hmac-secret: the client made a
    /// credential, asked for the hmac-secret output over a random salt (a
    /// touch, and the PIN where set), and sends the output as the secret.
    Fido2 {
        /// Free-form label shown by `SlotList`.
        label: String,
        /// What to ask the authenticator for at unlock.
        challenge: Fido2Challenge,
        /// The hmac-secret output, 32 bytes.
        secret: SecretBytes,
    },
}

/// A secret offered to unlock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnlockSecret {
    /// Tried against every passphrase slot.
    Passphrase(SecretBytes),
    /// Tried against every key-file slot.
    Keyfile(SecretBytes),
    /// Every TPM2 slot, unsealed by the daemon's TPM.
    Tpm2,
    /// The FIDO2 slot of this credential, with the authenticator's hmac-secret output.
    Fido2 {
        /// The credential that answered.
        #[serde(with = "serde_bytes")]
        credential_id: Vec<u8>,
        /// The hmac-secret output, 32 bytes.
        secret: SecretBytes,
    },
}

impl Operation {
    /// A short stable name for logs and audit lines.
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// Which operation this is.
    #[must_use]
    pub fn kind(&self) -> OperationKind {
        self.into()
    }
}

impl OperationKind {
    /// The operation's name, as [`Operation::name`] gives it.
    #[must_use]
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// The client's half of the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// The protocol version the client speaks; the daemon refuses others.
    pub protocol_version: u32,
    /// Free-form client name and version, for the daemon's logs (e.g. `hsmctl/0.1.0`).
    pub client: String,
}

/// One daemon frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The id of the request this answers, or [`CONNECTION_ERROR_ID`].
    pub id: u64,
    /// The reply, or why there is none.
    pub result: Result<Reply, WireError>,
}

/// A successful answer; the variant matches the operation asked for.
///
/// Its name is that of the operation that answers with it, given by the
/// attribute on each variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
pub enum Reply {
    /// Answer to [`Operation::Hello`].
    #[strum(serialize = "hello")]
    Hello(ServerHello),
    /// Answer to [`Operation::Ping`].
    #[strum(serialize = "ping")]
    Pong {
        /// The request's payload.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Answer to [`Operation::Status`].
    #[strum(serialize = "status")]
    Status(StatusInfo),
    /// Answer to [`Operation::WhoAmI`].
    #[strum(serialize = "whoami")]
    WhoAmI(PeerInfo),
    /// Answer to [`Operation::DebugDelay`].
    #[strum(serialize = "debug-delay")]
    #[doc(hidden)]
    Delayed {
        /// How long the worker was held.
        millis: u32,
    },
    /// Answer to [`Operation::Init`].
    #[strum(serialize = "init")]
    Initialized {
        /// The id of the first slot.
        slot: u32,
    },
    /// Answer to [`Operation::Unlock`].
    #[strum(serialize = "unlock")]
    Unlocked {
        /// The slot that unlocked.
        slot: u32,
        /// What the unlock found wrong in the keystore (a key or a version
        /// removed outside hsmd, a key that is not in its record of keys), one
        /// sentence each; empty when all is well. Other keys work as usual.
        warnings: Vec<String>,
    },
    /// Answer to [`Operation::Lock`].
    #[strum(serialize = "lock")]
    Locked,
    /// Answer to [`Operation::SlotList`].
    #[strum(serialize = "slot-list")]
    Slots(Vec<SlotInfo>),
    /// Answer to [`Operation::SlotAdd`].
    #[strum(serialize = "slot-add")]
    SlotAdded {
        /// The new slot's id.
        slot: u32,
    },
    /// Answer to [`Operation::SlotRemove`].
    #[strum(serialize = "slot-remove")]
    SlotRemoved {
        /// The removed slot's id.
        slot: u32,
    },
    /// Answer to [`Operation::KeyCreate`].
    #[strum(serialize = "key-create")]
    KeyCreated(Box<KeyInfo>),
    /// Answer to [`Operation::KeyList`].
    #[strum(serialize = "key-list")]
    Keys(Vec<KeyInfo>),
    /// Answer to [`Operation::KeyInfo`].
    #[strum(serialize = "key-info")]
    Key(Box<KeyInfo>),
    /// Answer to [`Operation::KeyPublic`].
    #[strum(serialize = "key-public")]
    PublicKey {
        /// The key's type.
        key_type: KeyType,
        /// The version this public key belongs to.
        version: u32,
        /// SubjectPublicKeyInfo, DER.
        #[serde(with = "serde_bytes")]
        spki_der: Vec<u8>,
    },
    /// Answer to [`Operation::KeyDelete`].
    #[strum(serialize = "key-delete")]
    KeyDeleted {
        /// The deleted key's name.
        name: String,
    },
    /// Answer to [`Operation::Sign`].
    #[strum(serialize = "sign")]
    Signature {
        /// The key version that signed.
        version: u32,
        /// 64 bytes for ed25519, DER for ECDSA.
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// Answer to [`Operation::Verify`].
    #[strum(serialize = "verify")]
    Verified {
        /// Whether the signature is valid.
        valid: bool,
    },
    /// Answer to [`Operation::Encrypt`].
    #[strum(serialize = "encrypt")]
    Encrypted {
        /// The key version that sealed.
        version: u32,
        /// 12-byte nonce, ciphertext, 16-byte tag.
        #[serde(with = "serde_bytes")]
        sealed: Vec<u8>,
    },
    /// Answer to [`Operation::Decrypt`].
    #[strum(serialize = "decrypt")]
    Decrypted {
        /// The data.
        plaintext: crate::SecretBytes,
    },
    /// Answer to [`Operation::Mac`].
    #[strum(serialize = "mac")]
    MacTag {
        /// The key version used.
        version: u32,
        /// The 32-byte tag.
        #[serde(with = "serde_bytes")]
        tag: Vec<u8>,
    },
    /// Answer to [`Operation::MacVerify`].
    #[strum(serialize = "mac-verify")]
    MacVerified {
        /// Whether the tag is valid.
        valid: bool,
    },
    /// Answer to `KeyRotate`, `KeySet`, `KeyTransition` and `KeyRestore`: the
    /// key as it is now.
    #[strum(serialize = "key-updated")]
    KeyUpdated(Box<KeyInfo>),
    /// Answer to `KeyPurge`.
    #[strum(serialize = "key-purge")]
    KeyPurged {
        /// The key that is gone.
        name: String,
    },
    /// Answer to `DataKey`.
    #[strum(serialize = "datakey")]
    DataKey {
        /// The version that sealed it.
        version: u32,
        /// The data key sealed like an `Encrypt` result.
        #[serde(with = "serde_bytes")]
        sealed: Vec<u8>,
        /// The data key itself, when asked and allowed.
        plaintext: Option<crate::SecretBytes>,
    },
    /// Answer to `Batch`: one result per item, in order.
    #[strum(serialize = "batch")]
    Batch(Vec<Result<Reply, WireError>>),
    /// Answer to `DebugClock`.
    #[strum(serialize = "debug-clock")]
    #[doc(hidden)]
    Clock {
        /// The daemon's lifecycle clock now, seconds since the Unix epoch.
        now_unix: u64,
    },
    /// Answer to `BackupCreate`: the archive waits to be read.
    #[strum(serialize = "backup-create")]
    BackupReady {
        /// Read it with `TransferRead`.
        transfer: u64,
        /// Its size.
        size: u64,
        /// What it holds.
        manifest: BackupManifest,
    },
    /// Answer to `TransferRead`.
    #[strum(serialize = "transfer-read")]
    TransferData {
        /// The bytes (fewer than asked only at the end).
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Answer to `TransferBegin`.
    #[strum(serialize = "transfer-begin")]
    TransferStarted {
        /// Write to it with `TransferWrite`.
        transfer: u64,
    },
    /// Answer to `TransferWrite`.
    #[strum(serialize = "transfer-write")]
    TransferAck {
        /// Bytes received so far.
        received: u64,
    },
    /// Answer to `BackupVerify`.
    #[strum(serialize = "backup-verify")]
    BackupVerified(BackupManifest),
    /// Answer to `BackupRestore`.
    #[strum(serialize = "backup-restore")]
    Restored(BackupManifest),
    /// Answer to `PolicyShow`.
    #[strum(serialize = "policy-show")]
    Policy {
        /// The file, or a sentence saying there is none.
        source: String,
        /// The file's text (empty without one).
        text: String,
        /// Every role's name, built-in ones included.
        roles: Vec<String>,
    },
    /// Answer to `PolicyCheck`.
    #[strum(serialize = "policy-check")]
    PolicyDecision {
        /// Whether it would be allowed.
        allowed: bool,
        /// The role, permission and binding that allow it, or why not.
        reason: String,
    },
    /// Answer to `AuditVerify` when the chain is whole (a broken chain is the
    /// error `Tampered`, naming the first bad sequence number).
    #[strum(serialize = "audit-verify")]
    AuditVerified {
        /// Lines checked.
        lines: u64,
        /// First sequence number present (above 1 once old files rotated away).
        first_seq: u64,
        /// Last sequence number, as the keystore records it.
        last_seq: u64,
        /// The files read, oldest first.
        files: Vec<String>,
        /// What start-up repaired, one per `AUDIT_RECOVERED` line (a torn
        /// tail cut, lines adopted that were written before a crash): a
        /// recovery, not tampering.
        recoveries: Vec<String>,
    },
    /// Answer to `AuditShow`: JSON lines as written.
    #[strum(serialize = "audit-show")]
    AuditLines(Vec<String>),
    /// Answer to `Metrics`.
    #[strum(serialize = "metrics")]
    Metrics {
        /// OpenMetrics text.
        text: String,
    },
    /// Answer to `FileStoreBegin` and `FileRetrieveBegin`.
    #[strum(serialize = "file-session")]
    FileSession {
        /// Send chunks to, or read chunks from, this session.
        session: u64,
        /// The file (while storing: the token it will have, size so far 0).
        info: FileInfo,
    },
    /// Answer to `FileStoreChunk`.
    #[strum(serialize = "file-store-chunk")]
    FileChunkStored {
        /// The chunk's index.
        index: u64,
    },
    /// Answer to `FileRetrieveNext`.
    #[strum(serialize = "file-retrieve-next")]
    FileChunk {
        /// Its index.
        index: u64,
        /// Whether it is the last (its arrival means the checksum matched).
        last: bool,
        /// The plaintext.
        bytes: crate::SecretBytes,
    },
    /// Answer to `FileStoreFinish`, `FileStoreFd`, `FileRetrieveFd` and `FileInfo`.
    #[strum(serialize = "file-info")]
    File(FileInfo),
    /// Answer to `FileList`.
    #[strum(serialize = "file-list")]
    Files(Vec<FileInfo>),
    /// Answer to `FileDelete`.
    #[strum(serialize = "file-delete")]
    FileDeleted {
        /// The token that is gone.
        token: String,
    },
    /// Answer to `BackendSetPin`.
    #[strum(serialize = "backend-set-pin")]
    BackendPinSet {
        /// The backend.
        backend: String,
    },
    /// Answer to `KeyExists`.
    #[strum(serialize = "key-exists")]
    KeyExists {
        /// Whether the key is there.
        exists: bool,
    },
    /// Answer to `SshIdentities`.
    #[strum(serialize = "ssh-identities")]
    SshIdentities(Vec<SshIdentity>),
    /// Answer to [`Operation::DecryptAnyVersion`].
    #[strum(serialize = "decrypt-any-version")]
    DecryptedWith {
        /// The key version that opened it.
        version: u32,
        /// The data.
        plaintext: SecretBytes,
    },
    /// Answer to `BackupWrite`: the archive is written.
    #[strum(serialize = "backup-write")]
    BackupWritten(ArchiveSummary),
    /// Answer to `BackupCheck`.
    #[strum(serialize = "backup-check")]
    BackupChecked(ArchiveSummary),
    /// Answer to `BackupRestoreArchive`.
    #[strum(serialize = "backup-restore-archive")]
    BackupRestoredArchive(Box<RestoreSummary>),
}

/// An unlock slot, as `SlotList` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// The slot's id.
    pub id: u32,
    /// `passphrase` or `keyfile`.
    pub kind: String,
    /// The label given when it was added.
    pub label: String,
    /// When it was added, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The key-derivation parameters, for passphrase slots (e.g. `argon2id m=65536 t=3 p=1`).
    pub kdf: Option<String>,
    /// For FIDO2 slots, what the client asks the authenticator for (none of it secret).
    pub fido2: Option<Fido2Challenge>,
}

/// What a client asks a FIDO2 authenticator for to unlock a FIDO2 slot: an
/// assertion by this credential with the hmac-secret extension over this salt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fido2Challenge {
    /// The relying party id the credential was made for.
    pub rp_id: String,
    /// The credential's id.
    #[serde(with = "serde_bytes")]
    pub credential_id: Vec<u8>,
    /// The 32-byte hmac-secret salt.
    #[serde(with = "serde_bytes")]
    pub salt: Vec<u8>,
}

impl Reply {
    /// A short stable name, matching [`Operation::name`].
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.into()
    }
}

/// The daemon's half of the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// The protocol version the daemon speaks.
    pub protocol_version: u32,
    /// The daemon's package version.
    pub daemon_version: String,
    /// Optional capabilities this daemon offers (e.g. `pipelining`, `dev-mode`).
    pub features: Vec<String>,
    /// The largest frame body the daemon accepts; larger requests are refused.
    pub max_frame_bytes: u32,
    /// The daemon's number for this connection, as it appears in its logs.
    pub connection_id: u64,
}

/// The custody state of the daemon (see DESIGN.md, States).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// No keystore exists yet; `hsmctl init` creates one.
    Uninitialized,
    /// The keystore exists but the master key is not in memory.
    Locked,
    /// The master key is in memory; key operations run.
    Unlocked,
}

impl ServiceState {
    /// The lower-case name used by `hsmctl status`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uninitialized => "uninitialized",
            Self::Locked => "locked",
            Self::Unlocked => "unlocked",
        }
    }
}

/// A daemon's configuration profile (`profile` in hsmd.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Weak settings are warnings.
    Development,
    /// Weak settings are refused at start.
    Production,
}

impl Profile {
    /// The name as the config file spells it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Development => "development",
            Self::Production => "production",
        }
    }
}

/// Answer to [`Operation::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Custody state.
    pub state: ServiceState,
    /// The daemon's package version.
    pub daemon_version: String,
    /// The protocol version the daemon speaks.
    pub protocol_version: u32,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Each configured key backend and its health.
    pub backends: Vec<BackendStatus>,
    /// Connections open now, this one included.
    pub connections: u32,
    /// The configured connection limit.
    pub max_connections: u32,
    /// Requests being worked on now, across all connections.
    pub requests_in_flight: u32,
    /// Whether this is a throw-away `hsmd --dev` instance.
    pub dev_mode: bool,
    /// The configuration profile in force.
    pub profile: Profile,
    /// The daemon's process id.
    pub pid: u32,
    /// Whether all of the daemon's memory is locked (mlockall), so keys never reach swap.
    pub memory_locked: bool,
    /// Write transactions committed to the keystore since the daemon started.
    pub keystore_writes: u64,
    /// The audit log's health.
    pub audit: AuditStatus,
}

/// The audit log as `Status` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditStatus {
    /// Whether the audit log is on (`audit.enabled`).
    pub enabled: bool,
    /// Whether events are being written. While not, audited requests are
    /// refused with `AuditUnavailable`; liveness calls still answer.
    pub healthy: bool,
    /// Why it is not healthy, and since when; empty when it is.
    pub detail: String,
    /// Events waiting to be written.
    pub pending_events: u64,
    /// The sequence number of the last line written.
    pub last_seq: u64,
}

/// One key backend as `Status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// `soft`, `mock`, `pkcs11` or `tpm`.
    pub name: String,
    /// Whether the backend answered its last health check.
    pub healthy: bool,
    /// What the backend is (module and token, TCTI), or why it is unhealthy.
    pub detail: String,
}

/// A group as the daemon resolved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Numeric group id.
    pub gid: u32,
    /// Name from the group database, if it has one.
    pub name: Option<String>,
}

/// Answer to [`Operation::WhoAmI`]: the caller as the kernel and the daemon see it.
/// Nothing here is self-declared; it all comes from `SO_PEERCRED` and the system
/// databases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Effective user id of the connecting process.
    pub uid: u32,
    /// User name from the passwd database.
    pub user: Option<String>,
    /// Primary group.
    pub group: GroupInfo,
    /// Supplementary groups from the group database (primary group included).
    pub groups: Vec<GroupInfo>,
    /// Process id of the connecting process, as of connect time.
    pub pid: u32,
    /// The connecting process's executable, if the daemon could read it.
    pub executable: Option<String>,
    /// The daemon's number for this connection.
    pub connection_id: u64,
    /// Why the daemon let this peer connect (e.g. `member of group hsmd`).
    pub admitted_because: String,
    /// Roles the policy grants, each with the binding that grants it.
    pub roles: Vec<String>,
    /// Every permission those roles give, as text.
    pub permissions: Vec<String>,
}
