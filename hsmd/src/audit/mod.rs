//! The audit log: JSON lines, one per operation or decision, each carrying the
//! hash of the line before it, so an edited, deleted, reordered or truncated
//! line is found by `hsmctl audit verify` and named by its sequence number.
//!
//! The log is kept the way a journaling file system keeps its journal:
//!
//! - **Written before the answer.** Every audited request's line is written
//!   (to the file, so a killed daemon cannot lose it) before its answer goes
//!   out; security events (denials, custody, key lifecycle) are also synced to
//!   disk first. Other lines are synced every `audit.flush_interval`, and the
//!   keystore records the chain's last line (its *head*) and where the
//!   retained log begins (its *start*) at every sync.
//! - **Crash-consistent.** At start the log is read back: an unfinished last
//!   line (a torn write) is cut off, lines past the keystore's head that
//!   continue its chain (written, then the process died) are adopted, and an
//!   `AUDIT_RECOVERED` line says what was done. A log that ends *before* the
//!   keystore's head, or does not continue it, was tampered with and is named.
//! - **Fail closed.** While lines cannot be written (a full disk, a read-only
//!   or vanished directory, writes far behind), audited requests are refused
//!   with `audit-unavailable` before they run, nothing is half-written, and
//!   service resumes by itself with an `AUDIT_RESUMED` line. hsmd keeps disk
//!   space reserved past the end of the file (`fallocate`), so it notices a
//!   full disk before a line would be lost to it.
//! - **Verified from a snapshot.** `verify` checks the files as they were at
//!   one moment (rotation included) while writers go on.
//!
//! Events never carry secrets, plaintext or key bytes: only names, versions,
//! error codes and messages (which hsmd never fills with secrets).

mod line;
mod recovery;
mod show;
#[cfg(test)]
mod tests;
mod verify;
mod writer;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Serialize;

pub use line::GENESIS;
pub use show::{show, Filter};
pub use verify::{Break, Broken, Verified};
pub use writer::{withheld, Auditor, BackupSnapshot, Health, Progress, Settled, Ticket};

/// Who made a request, as audit lines name them.
#[derive(Debug, Clone)]
pub struct Who {
    /// Kernel-reported uid.
    pub uid: u32,
    /// User name, if any.
    pub user: Option<String>,
    /// Process id.
    pub pid: Option<u32>,
    /// Executable path.
    pub executable: Option<String>,
    /// The daemon's connection number (0: the daemon itself).
    pub connection: u64,
    /// On the SSH agent socket: the fingerprint (`SHA256:…`) of the host key
    /// the client's SSH session was bound to (`session-bind@openssh.com`),
    /// so the line says which server a signature logged the user in to.
    pub ssh_host_key: Option<String>,
}

impl Who {
    /// The daemon itself, for what it does on its own (scheduled rotations,
    /// purges, start and stop, reloads, audit recovery): its uid, the user
    /// name `hsmd`, its pid, connection 0.
    #[must_use]
    pub fn daemon() -> Arc<Self> {
        Arc::new(Self {
            uid: nix::unistd::getuid().as_raw(),
            user: Some("hsmd".into()),
            pid: Some(std::process::id()),
            executable: std::env::current_exe().ok().map(|p| p.display().to_string()),
            connection: 0,
            ssh_host_key: None,
        })
    }
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Done.
    Success,
    /// Refused or failed.
    Failure,
}

/// How sure the answer must be that its line is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Written to the file before the answer (a killed daemon cannot lose
    /// it); synced within `audit.flush_interval`.
    Operation,
    /// Written and synced to disk before the answer.
    Security,
}

/// Declares [`EventType`]: each variant with the name the log writes.
macro_rules! event_types {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// What an audit line records, as its `event_type` field names it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventType {
            $(
                #[doc = concat!("`", $name, "`")]
                $variant,
            )*
        }

        impl EventType {
            /// Every event type, in the order declared.
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];

            /// The name in the log: `SIGN`, `KEY_CREATED`, …
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }
    };
}

event_types! {
    AccessDenied => "ACCESS_DENIED",
    AuditRead => "AUDIT_READ",
    AuditRecovered => "AUDIT_RECOVERED",
    AuditResumed => "AUDIT_RESUMED",
    AuditTampered => "AUDIT_TAMPERED",
    AuthFailure => "AUTH_FAILURE",
    BackendPinSet => "BACKEND_PIN_SET",
    BackupCreated => "BACKUP_CREATED",
    BackupRestored => "BACKUP_RESTORED",
    BackupVerified => "BACKUP_VERIFIED",
    ConfigChecked => "CONFIG_CHECKED",
    ConfigError => "CONFIG_ERROR",
    DaemonStarted => "DAEMON_STARTED",
    DaemonStopped => "DAEMON_STOPPED",
    Datakey => "DATAKEY",
    Decrypt => "DECRYPT",
    Encrypt => "ENCRYPT",
    FileDeleted => "FILE_DELETED",
    FileInfo => "FILE_INFO",
    FileList => "FILE_LIST",
    FileRetrieved => "FILE_RETRIEVED",
    FileStored => "FILE_STORED",
    FileStoreStarted => "FILE_STORE_STARTED",
    KeystoreInitialized => "KEYSTORE_INITIALIZED",
    KeyCreated => "KEY_CREATED",
    KeyDeleted => "KEY_DELETED",
    KeyInfo => "KEY_INFO",
    KeyList => "KEY_LIST",
    KeyPublic => "KEY_PUBLIC",
    KeyPurged => "KEY_PURGED",
    KeyRestored => "KEY_RESTORED",
    KeyRotated => "KEY_ROTATED",
    KeyStateChanged => "KEY_STATE_CHANGED",
    KeyUpdated => "KEY_UPDATED",
    Lock => "LOCK",
    Mac => "MAC",
    MacVerify => "MAC_VERIFY",
    PolicyRead => "POLICY_READ",
    PolicyReloaded => "POLICY_RELOADED",
    RateLimited => "RATE_LIMITED",
    Rewrap => "REWRAP",
    Sign => "SIGN",
    SlotAdded => "SLOT_ADDED",
    SlotList => "SLOT_LIST",
    SlotRemoved => "SLOT_REMOVED",
    Unlock => "UNLOCK",
    UnlockFailed => "UNLOCK_FAILED",
    Verify => "VERIFY",
}

impl EventType {
    /// The event type named `name` (any case).
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.as_str().eq_ignore_ascii_case(name))
    }
}

/// One event, before it has a place in the chain.
#[derive(Debug, Clone)]
pub struct Event {
    /// `SIGN`, `KEY_CREATED`, `ACCESS_DENIED`, …
    pub event_type: EventType,
    /// Who.
    pub who: Arc<Who>,
    /// Backend, for key events.
    pub backend: Option<&'static str>,
    /// What it was about: `key:NAME`, `keystore`, `policy`, `connection`.
    pub resource: String,
    /// The operation or decision.
    pub action: &'static str,
    /// How it ended.
    pub result: Outcome,
    /// Small facts: versions, error codes and messages. Never secrets.
    pub metadata: Meta,
    /// 0 (routine) to 10 (alarming).
    pub risk_score: u8,
    /// When.
    pub time: SystemTime,
}

impl Event {
    /// An event of the daemon's own (see [`Who::daemon`]), now.
    #[must_use]
    pub fn by_daemon(
        event_type: EventType,
        resource: impl Into<String>,
        action: &'static str,
        result: Outcome,
        risk_score: u8,
        metadata: Meta,
    ) -> Self {
        Self {
            event_type,
            who: Who::daemon(),
            backend: None,
            resource: resource.into(),
            action,
            result,
            metadata,
            risk_score,
            time: SystemTime::now(),
        }
    }
}

impl Event {
    /// `AUDIT_RECOVERED`: what start-up repaired.
    pub(crate) fn audit_recovered(meta: Meta) -> Self {
        Self::by_daemon(EventType::AuditRecovered, "audit", "recover", Outcome::Success, 5, meta)
    }

    /// `AUDIT_TAMPERED`: the log is not as hsmd left it.
    pub(crate) fn audit_tampered(message: String) -> Self {
        Self::by_daemon(
            EventType::AuditTampered,
            "audit",
            "check",
            Outcome::Failure,
            10,
            Meta::message(message),
        )
    }
}

/// An event's metadata: a fixed set of small facts (a struct, not a map, so
/// recording an event on the hot path allocates little). Facts that only a
/// few events carry live in [`Extra`], boxed, so a signature's event stays small.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Meta {
    /// The key version used or made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// A check's verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid: Option<bool>,
    /// A key's state after the operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    /// The error code of a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    /// A stored file's token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// For a message signature: the hash signed over (`pure` for Ed25519).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<&'static str>,
    /// For a message signature: the message's length in bytes (never the message).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_bytes: Option<u64>,
    /// The message of a failure or decision (hsmd's own text, never a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The rarer facts, written as members of `metadata` like the above.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Box<Extra>>,
}

impl Meta {
    /// Metadata with only a message.
    #[must_use]
    pub fn message(text: impl Into<String>) -> Self {
        Self {
            message: Some(text.into()),
            ..Self::default()
        }
    }

    /// The rarer facts, made on first use.
    pub fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }
}

/// Facts only some events carry: what a new key is, what the daemon started
/// with, what a recovery did. Never secrets.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Extra {
    /// The key a stored file's data key is wrapped with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A new key's type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_type: Option<&'static str>,
    /// A new key's usages, comma-separated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usages: Option<String>,
    /// A key's automatic rotation period, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotate_every_secs: Option<u64>,
    /// A key's activation time (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activate_at_unix: Option<u64>,
    /// A key's expiry time (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expire_at_unix: Option<u64>,
    /// The daemon's version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daemon_version: Option<&'static str>,
    /// The deployment profile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<&'static str>,
    /// The config file, or `built-in defaults`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// SHA-256 of the config file's bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// SHA-256 of the policy file's bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_sha256: Option<String>,
    /// Whether a reloaded file's content changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// Lines past the keystore's head that were adopted: the first…
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adopted_from_seq: Option<u64>,
    /// …and the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adopted_to_seq: Option<u64>,
    /// Bytes of an unfinished tail cut off the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut_bytes: Option<u64>,
    /// Their SHA-256.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut_sha256: Option<String>,
    /// The sequence number of the line the cut bytes followed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut_after_seq: Option<u64>,
    /// Since when something was the case (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Events held in memory while the log could not be written (they are
    /// the lines before this one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_events: Option<u64>,
    /// Requests refused because the log could not be written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_requests: Option<u64>,
    /// Events that could not be kept, by type: refusals of requests that did
    /// nothing (connection refusals, rate limits) and liveness-class events,
    /// counted instead of written one by one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_events: Option<BTreeMap<&'static str, u64>>,
}

/// Where the chain stands: the last line's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Sequence number of the last line (0 before any).
    pub seq: u64,
    /// Its hash (GENESIS before any).
    pub hash: String,
}

impl Default for Head {
    fn default() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

/// Where the retained log begins: the first line kept (after rotation dropped
/// older files) and the hash it follows. Anchoring it finds lines removed
/// from the front, a deleted rotated file, or a deleted log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The first retained line's sequence number.
    pub seq: u64,
    /// Its `prev_hash`.
    pub prev_hash: String,
}

impl Default for Start {
    fn default() -> Self {
        Self {
            seq: 1,
            prev_hash: GENESIS.to_owned(),
        }
    }
}

/// What the keystore records about the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Anchors {
    /// The last line synced.
    pub head: Option<Head>,
    /// Where the retained log begins.
    pub start: Option<Start>,
}

/// Where the chain's anchors are kept durably (the keystore). Both are
/// written in one transaction.
pub trait AnchorStore: Send + Sync {
    /// Reads the anchors.
    ///
    /// # Errors
    /// Why they cannot be read.
    fn load(&self) -> Result<Anchors, String>;
    /// Records both, durably.
    ///
    /// # Errors
    /// Why they cannot be written (e.g. the disk is full).
    fn store(&self, head: &Head, start: &Start) -> Result<(), String>;
}

/// Settings, from `[audit]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The current file.
    pub path: PathBuf,
    /// Rotate when the file passes this size.
    pub max_file_bytes: u64,
    /// Rotated files kept (`audit.log.1` … `.N`).
    pub keep_files: u32,
    /// The most events held in memory waiting to be written; at this many,
    /// audited requests are refused until the writer catches up.
    pub buffer_events: usize,
    /// How often written lines are synced to disk and the anchors recorded.
    pub flush_interval: Duration,
}

impl Settings {
    /// Rotated file `i` (`audit.log.1` is the newest).
    #[must_use]
    pub fn rotated(&self, i: u32) -> PathBuf {
        rotated(&self.path, i)
    }

    /// The log's files that exist, oldest first, the current one last (even
    /// if it does not exist).
    #[must_use]
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = (1..=self.keep_files.max(1))
            .rev()
            .map(|i| self.rotated(i))
            .filter(|p| p.exists())
            .collect();
        files.push(self.path.clone());
        files
    }
}

fn rotated(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

/// A random prefix for this run's event ids: `<prefix>-<seq>` is unique
/// without a random draw per line.
fn run_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// The hex SHA-256 of `bytes`.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}
