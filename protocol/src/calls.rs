//! One typed method per operation, on [`Client`] and (with the `tokio`
//! feature) on `AsyncClient`: `client.sign(name, digest)` instead of building
//! an [`Operation`] and matching the [`Reply`].
//!
//! Each entry below names the operation, the method, its arguments (the
//! operation's fields, or its payload struct's, in order) and the reply it expects. The list is
//! checked against [`OperationKind`] by the compiler: an operation missing
//! from it fails to build.

#[cfg(feature = "tokio")]
use crate::AsyncClient;
use crate::Client;
use crate::{
    message::{
        BackupManifest, BackupProtection, FileInfo, HashAlg, KeyChanges, KeyInfo, KeyOptions, KeyType, NewSlot,
        OperationKind, PeerInfo, SlotInfo, SshIdentity, StatusInfo, Transition, UnlockSecret, Usage,
    },
    ClientError, Operation, Reply, SecretBytes,
};

/// A signature and the key version that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The key version that signed.
    pub version: u32,
    /// The signature's bytes (see `docs/protocol.md` for each key type's encoding).
    pub signature: Vec<u8>,
}

/// Sealed bytes and the key version that sealed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The key version that sealed.
    pub version: u32,
    /// Nonce, ciphertext and tag.
    pub sealed: Vec<u8>,
}

/// A plaintext and the key version that opened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The key version that opened it.
    pub version: u32,
    /// The data; wiped when dropped.
    pub plaintext: SecretBytes,
}

/// A MAC tag and the key version that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tagged {
    /// The key version.
    pub version: u32,
    /// The tag.
    pub tag: Vec<u8>,
}

/// A key's public half.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The key's type.
    pub key_type: KeyType,
    /// The version whose public half this is (the newest).
    pub version: u32,
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
}

/// A data key: sealed under the named key, and in the clear when asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataKey {
    /// The key version that sealed it.
    pub version: u32,
    /// The data key sealed under that version.
    pub sealed: Vec<u8>,
    /// The data key itself, when the request asked for it.
    pub plaintext: Option<SecretBytes>,
}

/// The answer to an unlock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlocked {
    /// The slot that opened the keystore.
    pub slot: u32,
    /// What the daemon found at unlock and wants an operator to know.
    pub warnings: Vec<String>,
}

/// A backup archive waiting to be read with [`Client::transfer_read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReady {
    /// The transfer to read it from.
    pub transfer: u64,
    /// Its size in bytes.
    pub size: u64,
    /// What it holds.
    pub manifest: BackupManifest,
}

/// The policy in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyText {
    /// Where it came from.
    pub source: String,
    /// The file's text.
    pub text: String,
    /// The roles it defines.
    pub roles: Vec<String>,
}

/// Whether a user may do something, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    /// Whether the permission is granted.
    pub allowed: bool,
    /// The role that grants it, or why none does.
    pub reason: String,
}

/// What a verification of the audit log found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerified {
    /// Lines checked.
    pub lines: u64,
    /// The first sequence number checked.
    pub first_seq: u64,
    /// The last sequence number checked.
    pub last_seq: u64,
    /// The files read.
    pub files: Vec<String>,
    /// The recoveries recorded in the chain.
    pub recoveries: Vec<String>,
}

/// An open file-store session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSession {
    /// The session, for the chunk requests that follow.
    pub session: u64,
    /// The file as stored (or being stored).
    pub info: FileInfo,
}

/// One chunk of a file being retrieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChunk {
    /// Its index from 0.
    pub index: u64,
    /// Whether it is the last.
    pub last: bool,
    /// Its plaintext, wiped when dropped.
    pub bytes: SecretBytes,
}

/// Declares the typed methods. `by_hand` lists the operations whose methods
/// are written out elsewhere (they carry a descriptor, a handshake or a
/// batch); the compiler checks that the two lists together name every
/// operation.
macro_rules! calls {
    (
        typed {
            $(
                $(#[doc = $doc:literal])*
                $kind:ident $(($args:ident))? => fn $method:ident($($arg:ident: $ty:ty),* $(,)?) -> $out:ty {
                    $pat:pat => $value:expr
                }
            )*
        }
        by_hand { $($hand:ident),* $(,)? }
    ) => {
        impl Client {
            $(
                $(#[doc = $doc])*
                ///
                /// # Errors
                /// As [`Client::call`].
                pub fn $method(&mut self, $($arg: $ty),*) -> Result<$out, ClientError> {
                    match self.call(operation!($kind $(($args))? { $($arg),* }))? {
                        $pat => Ok($value),
                        other => Err(ClientError::unexpected_reply(OperationKind::$kind.name(), &other)),
                    }
                }
            )*
        }

        #[cfg(feature = "tokio")]
        impl AsyncClient {
            $(
                $(#[doc = $doc])*
                ///
                /// # Errors
                /// As [`Client::call`].
                pub async fn $method(&mut self, $($arg: $ty),*) -> Result<$out, ClientError> {
                    match self.call(operation!($kind $(($args))? { $($arg),* })).await? {
                        $pat => Ok($value),
                        other => Err(ClientError::unexpected_reply(OperationKind::$kind.name(), &other)),
                    }
                }
            )*
        }

        /// Fails to build when an operation has no method: every kind must be
        /// in one of the two lists.
        const fn _every_operation_has_a_method(kind: OperationKind) {
            match kind {
                $(OperationKind::$kind => {})*
                $(OperationKind::$hand => {})*
            }
        }

        /// The operations that have a generated method, by name.
        pub const TYPED: &[OperationKind] = &[$(OperationKind::$kind),*];
    };
}

/// The operation a method sends: its fields in the variant, or in the
/// payload struct the variant shares with [`BatchItem`](crate::BatchItem).
macro_rules! operation {
    ($kind:ident ($args:ident) { $($arg:ident),* }) => {
        Operation::$kind(crate::message::$args { $($arg),* })
    };
    ($kind:ident { $($arg:ident),* }) => {
        Operation::$kind { $($arg),* }
    };
}

calls! {
    typed {
        /// Round trip with an echoed payload.
        Ping => fn ping(payload: Vec<u8>) -> Vec<u8> { Reply::Pong { payload } => payload }
        /// The daemon's status.
        Status => fn status() -> StatusInfo { Reply::Status(s) => s }
        /// The caller's identity as the daemon sees it.
        WhoAmI => fn whoami() -> PeerInfo { Reply::WhoAmI(p) => p }
        /// Creates the keystore with its first unlock slot; answers the slot's id.
        Init => fn init(slot: NewSlot) -> u32 { Reply::Initialized { slot } => slot }
        /// Unlocks the keystore.
        Unlock => fn unlock(secret: UnlockSecret) -> Unlocked {
            Reply::Unlocked { slot, warnings } => Unlocked { slot, warnings }
        }
        /// Locks the keystore: the master key and every unwrapped key are wiped.
        Lock => fn lock() -> () { Reply::Locked => () }
        /// The unlock slots.
        SlotList => fn slot_list() -> Vec<SlotInfo> { Reply::Slots(slots) => slots }
        /// Adds an unlock slot; answers its id.
        SlotAdd => fn slot_add(slot: NewSlot) -> u32 { Reply::SlotAdded { slot } => slot }
        /// Removes an unlock slot (never the last).
        SlotRemove => fn slot_remove(id: u32) -> u32 { Reply::SlotRemoved { slot } => slot }
        /// Creates a key.
        KeyCreate => fn key_create(name: String, key_type: KeyType, usages: Vec<Usage>, options: KeyOptions) -> KeyInfo {
            Reply::KeyCreated(k) => *k
        }
        /// The keys the caller may list.
        KeyList => fn key_list() -> Vec<KeyInfo> { Reply::Keys(keys) => keys }
        /// The keys offered to SSH that the caller may sign with.
        SshIdentities => fn ssh_identities() -> Vec<SshIdentity> { Reply::SshIdentities(ids) => ids }
        /// Opens what some version of the key sealed, trying the versions it
        /// still decrypts with, newest first.
        DecryptAnyVersion(DecryptAnyVersionArgs) => fn decrypt_any_version(name: String, sealed: Vec<u8>, aad: Vec<u8>, allow_compromised: bool) -> Opened {
            Reply::DecryptedWith { version, plaintext } => Opened { version, plaintext }
        }
        /// One key's description.
        KeyInfo => fn key_info(name: String) -> KeyInfo { Reply::Key(k) => *k }
        /// A key's public half.
        KeyPublic => fn key_public(name: String) -> PublicKey {
            Reply::PublicKey { key_type, version, spki_der } => PublicKey { key_type, version, spki_der }
        }
        /// Deletes a key, recoverably until its recovery window ends.
        KeyDelete => fn key_delete(name: String) -> KeyInfo { Reply::KeyUpdated(k) => *k }
        /// Signs a digest with the key's newest version.
        Sign(SignArgs) => fn sign(name: String, digest: Vec<u8>) -> Signed {
            Reply::Signature { version, signature } => Signed { version, signature }
        }
        /// Checks a signature made by `version` of the key.
        Verify(VerifyArgs) => fn verify(name: String, version: u32, digest: Vec<u8>, signature: Vec<u8>, allow_compromised: bool) -> bool {
            Reply::Verified { valid } => valid
        }
        /// Seals with the key's newest version, or `version`.
        Encrypt(EncryptArgs) => fn encrypt(name: String, version: Option<u32>, plaintext: SecretBytes, aad: Vec<u8>) -> Sealed {
            Reply::Encrypted { version, sealed } => Sealed { version, sealed }
        }
        /// Opens what `version` of the key sealed.
        Decrypt(DecryptArgs) => fn decrypt(name: String, version: u32, sealed: Vec<u8>, aad: Vec<u8>, allow_compromised: bool) -> SecretBytes {
            Reply::Decrypted { plaintext } => plaintext
        }
        /// A MAC tag over `data` with the key's newest version.
        Mac(MacArgs) => fn mac(name: String, data: Vec<u8>) -> Tagged { Reply::MacTag { version, tag } => Tagged { version, tag } }
        /// Checks a MAC tag made by `version` of the key.
        MacVerify(MacVerifyArgs) => fn mac_verify(name: String, version: u32, data: Vec<u8>, tag: Vec<u8>, allow_compromised: bool) -> bool {
            Reply::MacVerified { valid } => valid
        }
        /// Signs a message (at most `MAX_SIGN_MESSAGE` bytes) with the key's
        /// newest version: pure Ed25519, or ECDSA/RSA over its hash.
        SignMessage(SignMessageArgs) => fn sign_message(name: String, message: Vec<u8>, hash: Option<HashAlg>) -> Signed {
            Reply::Signature { version, signature } => Signed { version, signature }
        }
        /// Checks a signature made by `sign_message`.
        VerifyMessage(VerifyMessageArgs) => fn verify_message(
            name: String,
            version: u32,
            message: Vec<u8>,
            hash: Option<HashAlg>,
            signature: Vec<u8>,
            allow_compromised: bool,
        ) -> bool {
            Reply::Verified { valid } => valid
        }
        /// Adds a new version of the key and makes it the one that signs and seals.
        KeyRotate => fn key_rotate(name: String) -> KeyInfo { Reply::KeyUpdated(k) => *k }
        /// Changes a key's settings.
        KeySet => fn key_set(name: String, changes: KeyChanges) -> KeyInfo { Reply::KeyUpdated(k) => *k }
        /// Moves a key to another lifecycle state.
        KeyTransition => fn key_transition(name: String, to: Transition) -> KeyInfo { Reply::KeyUpdated(k) => *k }
        /// Brings back a deleted key within its recovery window.
        KeyRestore => fn key_restore(name: String) -> KeyInfo { Reply::KeyUpdated(k) => *k }
        /// Removes a deleted key for good.
        KeyPurge => fn key_purge(name: String) -> String { Reply::KeyPurged { name } => name }
        /// Re-seals what `version` sealed under the newest version (or `to_version`),
        /// without the plaintext leaving the daemon.
        Rewrap => fn rewrap(name: String, version: u32, sealed: Vec<u8>, aad: Vec<u8>, to_version: Option<u32>) -> Sealed {
            Reply::Encrypted { version, sealed } => Sealed { version, sealed }
        }
        /// A new data key sealed under the named key, and in the clear if `plaintext`.
        DataKey => fn datakey(name: String, aad: Vec<u8>, plaintext: bool) -> DataKey {
            Reply::DataKey { version, sealed, plaintext } => DataKey { version, sealed, plaintext }
        }
        /// Starts a backup; the archive is then read with [`Client::transfer_read`].
        BackupCreate => fn backup_create(protection: BackupProtection) -> BackupReady {
            Reply::BackupReady { transfer, size, manifest } => BackupReady { transfer, size, manifest }
        }
        /// Reads part of a transfer the daemon offers.
        TransferRead => fn transfer_read(transfer: u64, offset: u64, len: u32) -> Vec<u8> {
            Reply::TransferData { bytes } => bytes
        }
        /// Starts an upload of `size` bytes.
        TransferBegin => fn transfer_begin(size: u64) -> u64 { Reply::TransferStarted { transfer } => transfer }
        /// Writes part of an upload; answers how much the daemon has.
        TransferWrite => fn transfer_write(transfer: u64, offset: u64, bytes: Vec<u8>) -> u64 {
            Reply::TransferAck { received } => received
        }
        /// Checks an uploaded backup archive without restoring it.
        BackupVerify => fn backup_verify(transfer: u64, secret: Option<UnlockSecret>) -> BackupManifest {
            Reply::BackupVerified(m) => m
        }
        /// Restores an uploaded backup archive.
        BackupRestore => fn backup_restore(transfer: u64, secret: UnlockSecret, force: bool) -> BackupManifest {
            Reply::Restored(m) => m
        }
        /// The policy in force.
        PolicyShow => fn policy_show() -> PolicyText {
            Reply::Policy { source, text, roles } => PolicyText { source, text, roles }
        }
        /// Whether `user` may do `resource:action` (on `key`), and why.
        PolicyCheck => fn policy_check(user: String, resource: String, action: String, key: Option<String>) -> PolicyDecision {
            Reply::PolicyDecision { allowed, reason } => PolicyDecision { allowed, reason }
        }
        /// Verifies the audit log's hash chain.
        AuditVerify => fn audit_verify() -> AuditVerified {
            Reply::AuditVerified { lines, first_seq, last_seq, files, recoveries } =>
                AuditVerified { lines, first_seq, last_seq, files, recoveries }
        }
        /// Audit lines that match the filter, newest last.
        AuditShow => fn audit_show(
            since_secs: Option<u64>,
            event_type: Option<String>,
            user: Option<String>,
            key: Option<String>,
            result: Option<String>,
            limit: u32,
        ) -> Vec<String> {
            Reply::AuditLines(lines) => lines
        }
        /// The daemon's metrics in OpenMetrics text.
        Metrics => fn metrics() -> String { Reply::Metrics { text } => text }
        /// Starts storing a file in chunks.
        FileStoreBegin => fn file_store_begin(name: String, key: String, chunk_size: u32) -> FileSession {
            Reply::FileSession { session, info } => FileSession { session, info }
        }
        /// Stores one chunk; answers its index.
        FileStoreChunk => fn file_store_chunk(session: u64, index: u64, last: bool, bytes: SecretBytes) -> u64 {
            Reply::FileChunkStored { index } => index
        }
        /// Finishes a chunked store.
        FileStoreFinish => fn file_store_finish(session: u64) -> FileInfo { Reply::File(f) => f }
        /// Starts retrieving a file in chunks.
        FileRetrieveBegin => fn file_retrieve_begin(token: String) -> FileSession {
            Reply::FileSession { session, info } => FileSession { session, info }
        }
        /// The next chunk of a retrieval.
        FileRetrieveNext => fn file_retrieve_next(session: u64) -> FileChunk {
            Reply::FileChunk { index, last, bytes } => FileChunk { index, last, bytes }
        }
        /// The files the caller may see.
        FileList => fn file_list() -> Vec<FileInfo> { Reply::Files(files) => files }
        /// One stored file's description.
        FileInfo => fn file_info(token: String) -> FileInfo { Reply::File(f) => f }
        /// Deletes a stored file; answers its token.
        FileDelete => fn file_delete(token: String) -> String { Reply::FileDeleted { token } => token }
        /// Whether a key by this name is in the keystore (deleted but
        /// recoverable ones count).
        KeyExists => fn key_exists(name: String) -> bool { Reply::KeyExists { exists } => exists }
        /// Seals and stores the PIN of a backend (pkcs11) so the daemon can log in at unlock.
        BackendSetPin => fn backend_set_pin(backend: String, pin: SecretBytes) -> String {
            Reply::BackendPinSet { backend } => backend
        }
    }
    by_hand {
        // The handshake: done by `connect`.
        Hello,
        // `batch`: a list of items, one result each.
        Batch,
        // Carry a descriptor: `Client::call_with_fd`.
        FileStoreFd,
        FileRetrieveFd,
        BackupWrite,
        BackupCheck,
        BackupRestoreArchive,
        // Served only by `hsmd --dev`, for tests: `call` with the operation.
        DebugDelay,
        DebugClock,
    }
}
