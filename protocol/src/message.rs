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
/// an unknown request.
pub const OPERATION_VARIANTS: u32 = 22;

/// One client frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client, echoed in the response; lets a client pipeline.
    pub id: u64,
    /// What to do.
    pub op: Operation,
}

/// An operation a client asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    WhoAmI,
    /// Holds a worker for `millis` milliseconds (at most 10 000) and then answers.
    /// Served only by `hsmd --dev`; used to test concurrency and shutdown.
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
    /// Destroys a key. Needs unlocked.
    KeyDelete {
        /// The key's name.
        name: String,
    },
    /// Signs a digest the client computed (SHA-512 for ed25519, SHA-256 for
    /// ecdsa-p256, SHA-384 for ecdsa-p384). Needs unlocked.
    Sign {
        /// The key's name.
        name: String,
        /// The digest of the data.
        #[serde(with = "serde_bytes")]
        digest: Vec<u8>,
    },
    /// Checks a signature over a digest.
    Verify {
        /// The key's name.
        name: String,
        /// The key version the signature names.
        version: u32,
        /// The digest of the data.
        #[serde(with = "serde_bytes")]
        digest: Vec<u8>,
        /// The signature: 64 bytes for ed25519, DER for ECDSA.
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// Seals `plaintext` with an aes256-gcm key's newest version. Needs unlocked.
    Encrypt {
        /// The key's name.
        name: String,
        /// The data.
        #[serde(with = "serde_bytes")]
        plaintext: Vec<u8>,
        /// Associated data, authenticated but not encrypted.
        #[serde(with = "serde_bytes")]
        aad: Vec<u8>,
    },
    /// Opens what `Encrypt` sealed. Needs unlocked.
    Decrypt {
        /// The key's name.
        name: String,
        /// The key version the ciphertext names.
        version: u32,
        /// 12-byte nonce, ciphertext, 16-byte tag.
        #[serde(with = "serde_bytes")]
        sealed: Vec<u8>,
        /// The associated data given to `Encrypt`.
        #[serde(with = "serde_bytes")]
        aad: Vec<u8>,
    },
    /// HMAC-SHA-256 of `data` with an hmac-sha256 key's newest version. Needs unlocked.
    Mac {
        /// The key's name.
        name: String,
        /// The data.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Checks an HMAC tag in constant time. Needs unlocked.
    MacVerify {
        /// The key's name.
        name: String,
        /// The key version the tag names.
        version: u32,
        /// The data.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// The 32-byte tag.
        #[serde(with = "serde_bytes")]
        tag: Vec<u8>,
    },
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
}

impl KeyType {
    /// Every type, in wire order.
    pub const ALL: [Self; 5] = [
        Self::Ed25519,
        Self::EcdsaP256,
        Self::EcdsaP384,
        Self::Aes256Gcm,
        Self::HmacSha256,
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
        }
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
            Self::Ed25519 | Self::EcdsaP256 | Self::EcdsaP384 => &[Usage::Sign, Usage::Verify],
            Self::Aes256Gcm => &[Usage::Encrypt, Usage::Decrypt],
            Self::HmacSha256 => &[Usage::Mac],
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
    /// Where it lives (`soft` for now).
    pub backend: String,
    /// What it may be used for.
    pub usages: Vec<Usage>,
    /// Newest version.
    pub version: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The uid that created it.
    pub owner_uid: u32,
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
}

/// A secret offered to unlock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnlockSecret {
    /// Tried against every passphrase slot.
    Passphrase(SecretBytes),
    /// Tried against every key-file slot.
    Keyfile(SecretBytes),
}

impl Operation {
    /// A short stable name for logs and audit lines.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::Ping { .. } => "ping",
            Self::Status => "status",
            Self::WhoAmI => "whoami",
            Self::DebugDelay { .. } => "debug-delay",
            Self::Init { .. } => "init",
            Self::Unlock { .. } => "unlock",
            Self::Lock => "lock",
            Self::SlotList => "slot-list",
            Self::SlotAdd { .. } => "slot-add",
            Self::SlotRemove { .. } => "slot-remove",
            Self::KeyCreate { .. } => "key-create",
            Self::KeyList => "key-list",
            Self::KeyInfo { .. } => "key-info",
            Self::KeyPublic { .. } => "key-public",
            Self::KeyDelete { .. } => "key-delete",
            Self::Sign { .. } => "sign",
            Self::Verify { .. } => "verify",
            Self::Encrypt { .. } => "encrypt",
            Self::Decrypt { .. } => "decrypt",
            Self::Mac { .. } => "mac",
            Self::MacVerify { .. } => "mac-verify",
        }
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Answer to [`Operation::Hello`].
    Hello(ServerHello),
    /// Answer to [`Operation::Ping`].
    Pong {
        /// The request's payload.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Answer to [`Operation::Status`].
    Status(StatusInfo),
    /// Answer to [`Operation::WhoAmI`].
    WhoAmI(PeerInfo),
    /// Answer to [`Operation::DebugDelay`].
    Delayed {
        /// How long the worker was held.
        millis: u32,
    },
    /// Answer to [`Operation::Init`].
    Initialized {
        /// The id of the first slot.
        slot: u32,
    },
    /// Answer to [`Operation::Unlock`].
    Unlocked {
        /// The slot that unlocked.
        slot: u32,
    },
    /// Answer to [`Operation::Lock`].
    Locked,
    /// Answer to [`Operation::SlotList`].
    Slots(Vec<SlotInfo>),
    /// Answer to [`Operation::SlotAdd`].
    SlotAdded {
        /// The new slot's id.
        slot: u32,
    },
    /// Answer to [`Operation::SlotRemove`].
    SlotRemoved {
        /// The removed slot's id.
        slot: u32,
    },
    /// Answer to [`Operation::KeyCreate`].
    KeyCreated(KeyInfo),
    /// Answer to [`Operation::KeyList`].
    Keys(Vec<KeyInfo>),
    /// Answer to [`Operation::KeyInfo`].
    Key(KeyInfo),
    /// Answer to [`Operation::KeyPublic`].
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
    KeyDeleted {
        /// The deleted key's name.
        name: String,
    },
    /// Answer to [`Operation::Sign`].
    Signature {
        /// The key version that signed.
        version: u32,
        /// 64 bytes for ed25519, DER for ECDSA.
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// Answer to [`Operation::Verify`].
    Verified {
        /// Whether the signature is valid.
        valid: bool,
    },
    /// Answer to [`Operation::Encrypt`].
    Encrypted {
        /// The key version that sealed.
        version: u32,
        /// 12-byte nonce, ciphertext, 16-byte tag.
        #[serde(with = "serde_bytes")]
        sealed: Vec<u8>,
    },
    /// Answer to [`Operation::Decrypt`].
    Decrypted {
        /// The data.
        plaintext: crate::SecretBytes,
    },
    /// Answer to [`Operation::Mac`].
    MacTag {
        /// The key version used.
        version: u32,
        /// The 32-byte tag.
        #[serde(with = "serde_bytes")]
        tag: Vec<u8>,
    },
    /// Answer to [`Operation::MacVerify`].
    MacVerified {
        /// Whether the tag is valid.
        valid: bool,
    },
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
}

impl Reply {
    /// A short stable name, matching [`Operation::name`].
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::Pong { .. } => "ping",
            Self::Status(_) => "status",
            Self::WhoAmI(_) => "whoami",
            Self::Delayed { .. } => "debug-delay",
            Self::Initialized { .. } => "init",
            Self::Unlocked { .. } => "unlock",
            Self::Locked => "lock",
            Self::Slots(_) => "slot-list",
            Self::SlotAdded { .. } => "slot-add",
            Self::SlotRemoved { .. } => "slot-remove",
            Self::KeyCreated(_) => "key-create",
            Self::Keys(_) => "key-list",
            Self::Key(_) => "key-info",
            Self::PublicKey { .. } => "key-public",
            Self::KeyDeleted { .. } => "key-delete",
            Self::Signature { .. } => "sign",
            Self::Verified { .. } => "verify",
            Self::Encrypted { .. } => "encrypt",
            Self::Decrypted { .. } => "decrypt",
            Self::MacTag { .. } => "mac",
            Self::MacVerified { .. } => "mac-verify",
        }
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
    /// Names of the key backends that are configured and available.
    pub backends: Vec<String>,
    /// Connections open now, this one included.
    pub connections: u32,
    /// The configured connection limit.
    pub max_connections: u32,
    /// Requests being worked on now, across all connections.
    pub requests_in_flight: u32,
    /// Whether this is a throw-away `hsmd --dev` instance.
    pub dev_mode: bool,
    /// The daemon's process id.
    pub pid: u32,
    /// Whether all of the daemon's memory is locked (mlockall), so keys never reach swap.
    pub memory_locked: bool,
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
    /// Roles the policy grants; empty until policies exist.
    pub roles: Vec<String>,
}
