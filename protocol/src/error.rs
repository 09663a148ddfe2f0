//! Errors: the stable code carried on the wire, and the client library's error.

use std::{fmt, io, path::PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{codec::CodecError, frame::FrameError};

/// A stable error code. Codes are only ever added; a code this build does not know
/// decodes as [`ErrorCode::Unknown`] so old clients still read new daemons' errors.
///
/// On the wire a code is its `u32` number (see [`ErrorCode::number`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u32", into = "u32")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The daemon failed in a way that is not the caller's fault; see its log.
    Internal,
    /// The frame body is not a valid message. The connection is closed.
    MalformedFrame,
    /// The frame's length prefix exceeds the daemon's maximum. The connection is closed.
    FrameTooLarge,
    /// The hello named a protocol version the daemon does not speak.
    UnsupportedVersion,
    /// The operation is not known to this daemon (a newer client). The connection is closed.
    UnknownRequest,
    /// The request is out of order, e.g. anything before the hello, or a second hello.
    ProtocolViolation,
    /// The caller's identity is not allowed to do this (or to connect at all).
    PermissionDenied,
    /// The daemon is at its connection limit; try again later.
    TooManyConnections,
    /// A frame was started but not finished within the frame timeout.
    FrameTimeout,
    /// The connection was idle longer than the idle timeout.
    IdleTimeout,
    /// The daemon is shutting down and takes no new requests.
    ShuttingDown,
    /// The operation exists but this daemon does not serve it (e.g. dev-only).
    NotAvailable,
    /// An argument is out of range or malformed; the message says which.
    InvalidArgument,
    /// No keystore exists yet; `hsmctl init` creates one.
    NotInitialized,
    /// `init` was asked of a daemon that already has a keystore.
    AlreadyInitialized,
    /// The daemon is locked; `hsmctl unlock` first.
    Locked,
    /// The secret offered matched no unlock slot.
    UnlockFailed,
    /// The named thing (slot, key) does not exist.
    NotFound,
    /// The current state forbids this (e.g. removing the last unlock slot).
    FailedPrecondition,
    /// Too many attempts; the message says when to try again.
    RateLimited,
    /// A keystore record failed authentication: it was edited or moved.
    Tampered,
    /// Something by that name exists already.
    AlreadyExists,
    /// Decryption failed: the ciphertext or associated data was altered, or it
    /// belongs to another key.
    DecryptFailed,
    /// The key's lifecycle state (or its being deleted, or a minimum version)
    /// forbids this use; the message names the state and what it allows.
    KeyState,
    /// The key's backend (a PKCS#11 token, the TPM) cannot be reached now: the
    /// device is gone, its helper is restarting, or the backend is not
    /// configured. Retrying later may succeed; `hsmctl status` shows its health.
    BackendUnavailable,
    /// The backend was reached but refused or failed the operation; the
    /// message carries what it said.
    BackendFailed,
    /// The audit log cannot be written now (the disk is full, the file system
    /// is read-only, the file or its directory is gone, or writes are far
    /// behind). Audited requests are refused until it can be; liveness calls
    /// still answer and `hsmctl status` says why. Service resumes by itself.
    AuditUnavailable,
    /// The keystore could not be written for a reason outside hsmd (no space
    /// left, a read-only file system, an I/O error); the message names the
    /// cause and the directory. Nothing was changed.
    StorageUnavailable,
    /// The caller is using its whole share of something hsmd divides among
    /// users (descriptor transfers, file sessions, connections); the message
    /// names the limit. Retry once some of the caller's own finish.
    Busy,
    /// A code this build does not know, with its number.
    Unknown(u32),
}

impl ErrorCode {
    /// The number that stands for this code on the wire.
    #[must_use]
    pub fn number(self) -> u32 {
        match self {
            Self::Internal => 1,
            Self::MalformedFrame => 2,
            Self::FrameTooLarge => 3,
            Self::UnsupportedVersion => 4,
            Self::UnknownRequest => 5,
            Self::ProtocolViolation => 6,
            Self::PermissionDenied => 7,
            Self::TooManyConnections => 8,
            Self::FrameTimeout => 9,
            Self::IdleTimeout => 10,
            Self::ShuttingDown => 11,
            Self::NotAvailable => 12,
            Self::InvalidArgument => 13,
            Self::NotInitialized => 14,
            Self::AlreadyInitialized => 15,
            Self::Locked => 16,
            Self::UnlockFailed => 17,
            Self::NotFound => 18,
            Self::FailedPrecondition => 19,
            Self::RateLimited => 20,
            Self::Tampered => 21,
            Self::AlreadyExists => 22,
            Self::DecryptFailed => 23,
            Self::KeyState => 24,
            Self::BackendUnavailable => 25,
            Self::BackendFailed => 26,
            Self::AuditUnavailable => 27,
            Self::StorageUnavailable => 28,
            Self::Busy => 29,
            Self::Unknown(n) => n,
        }
    }

    /// A stable kebab-case name, as shown by `hsmctl --json`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::MalformedFrame => "malformed-frame",
            Self::FrameTooLarge => "frame-too-large",
            Self::UnsupportedVersion => "unsupported-version",
            Self::UnknownRequest => "unknown-request",
            Self::ProtocolViolation => "protocol-violation",
            Self::PermissionDenied => "permission-denied",
            Self::TooManyConnections => "too-many-connections",
            Self::FrameTimeout => "frame-timeout",
            Self::IdleTimeout => "idle-timeout",
            Self::ShuttingDown => "shutting-down",
            Self::NotAvailable => "not-available",
            Self::InvalidArgument => "invalid-argument",
            Self::NotInitialized => "not-initialized",
            Self::AlreadyInitialized => "already-initialized",
            Self::Locked => "locked",
            Self::UnlockFailed => "unlock-failed",
            Self::NotFound => "not-found",
            Self::FailedPrecondition => "failed-precondition",
            Self::RateLimited => "rate-limited",
            Self::Tampered => "tampered",
            Self::AlreadyExists => "already-exists",
            Self::DecryptFailed => "decrypt-failed",
            Self::KeyState => "key-state",
            Self::BackendUnavailable => "backend-unavailable",
            Self::BackendFailed => "backend-failed",
            Self::AuditUnavailable => "audit-unavailable",
            Self::StorageUnavailable => "storage-unavailable",
            Self::Busy => "busy",
            Self::Unknown(_) => "unknown",
        }
    }
}

impl From<u32> for ErrorCode {
    fn from(n: u32) -> Self {
        match n {
            1 => Self::Internal,
            2 => Self::MalformedFrame,
            3 => Self::FrameTooLarge,
            4 => Self::UnsupportedVersion,
            5 => Self::UnknownRequest,
            6 => Self::ProtocolViolation,
            7 => Self::PermissionDenied,
            8 => Self::TooManyConnections,
            9 => Self::FrameTimeout,
            10 => Self::IdleTimeout,
            11 => Self::ShuttingDown,
            12 => Self::NotAvailable,
            13 => Self::InvalidArgument,
            14 => Self::NotInitialized,
            15 => Self::AlreadyInitialized,
            16 => Self::Locked,
            17 => Self::UnlockFailed,
            18 => Self::NotFound,
            19 => Self::FailedPrecondition,
            20 => Self::RateLimited,
            21 => Self::Tampered,
            22 => Self::AlreadyExists,
            23 => Self::DecryptFailed,
            24 => Self::KeyState,
            25 => Self::BackendUnavailable,
            26 => Self::BackendFailed,
            27 => Self::AuditUnavailable,
            28 => Self::StorageUnavailable,
            29 => Self::Busy,
            n => Self::Unknown(n),
        }
    }
}

impl From<ErrorCode> for u32 {
    fn from(code: ErrorCode) -> Self {
        code.number()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(n) => write!(f, "unknown error code {n}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// An error as the daemon sends it: a stable code and a message for humans that
/// says what failed and what to do. Never carries secret material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Error)]
#[error("{message} ({code})")]
pub struct WireError {
    /// What kind of failure this is; match on this, not on the message.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl WireError {
    /// Builds an error from a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What can go wrong for a client of the daemon.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket could not be reached. The message names the likely cause.
    #[error("cannot connect to {}: {}", path.display(), describe_connect_error(path, source))]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("connection to hsmd failed: {0}")]
    Io(#[source] io::Error),
    /// The connection ended before a response arrived.
    #[error("hsmd closed the connection without answering")]
    Closed,
    /// No response arrived within the client's timeout.
    #[error("hsmd did not answer within {0:?}")]
    TimedOut(std::time::Duration),
    /// A frame broke the size limit.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A frame could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The daemon answered with an error.
    #[error("hsmd refused: {0}")]
    Daemon(#[source] WireError),
    /// The daemon answered with a reply of the wrong kind.
    #[error("hsmd answered {got} to a {expected} request")]
    UnexpectedReply {
        /// The operation asked for.
        expected: &'static str,
        /// The reply received.
        got: &'static str,
    },
    /// The daemon answered a request id that is not outstanding.
    #[error("hsmd answered request {got}, which was not asked")]
    UnexpectedId {
        /// The id received.
        got: u64,
    },
}

impl ClientError {
    /// hsmd answered `got` to a request whose answer is `expected` (an
    /// operation's name).
    #[must_use]
    pub fn unexpected_reply(expected: &'static str, got: &crate::Reply) -> Self {
        Self::UnexpectedReply {
            expected,
            got: got.name(),
        }
    }

    /// The daemon's error code, if the daemon answered with an error.
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Daemon(e) => Some(e.code),
            _ => None,
        }
    }

    /// Whether the daemon could not be reached at all (as opposed to refusing).
    #[must_use]
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }
}

fn describe_connect_error(path: &std::path::Path, e: &io::Error) -> String {
    use std::os::unix::fs::FileTypeExt as _;
    // connect(2) on a directory or a regular file also says "refused"; that
    // is a wrong path, not a daemon that went away.
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.is_dir() {
            return "it is a directory, not a socket; point --socket / HSMD_SOCKET at hsmd's socket \
                    (e.g. /run/hsmd/hsmd.sock)"
                .into();
        }
        if !meta.file_type().is_socket() {
            return "it is not a socket (a regular file or another kind of file); point --socket / HSMD_SOCKET \
                    at hsmd's socket"
                .into();
        }
    }
    match e.kind() {
        io::ErrorKind::NotFound => {
            "no such file; is hsmd running? (start it, or point --socket / HSMD_SOCKET at its socket)".into()
        }
        io::ErrorKind::ConnectionRefused => {
            "connection refused; the socket file is left over from an hsmd that is no longer running".into()
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied; your user must be in the socket's group (usually `hsmd`)".into()
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_their_numbers() {
        for n in 0..64 {
            let code = ErrorCode::from(n);
            assert_eq!(code.number(), n);
        }
        assert_eq!(ErrorCode::from(7), ErrorCode::PermissionDenied);
        assert_eq!(ErrorCode::from(4242), ErrorCode::Unknown(4242));
    }

    #[test]
    fn unknown_code_from_a_newer_daemon_still_decodes() {
        let body = {
            let mut b = Vec::new();
            b.extend_from_slice(&999u32.to_le_bytes());
            b.extend_from_slice(&2u64.to_le_bytes());
            b.extend_from_slice(b"hi");
            b
        };
        let e: WireError = crate::codec::decode_body(&body).unwrap();
        assert_eq!(e.code, ErrorCode::Unknown(999));
        assert_eq!(e.message, "hi");
    }

    #[test]
    fn connect_error_names_the_fix() {
        let e = ClientError::Connect {
            path: "/run/hsmd/hsmd.sock".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(
            e.to_string(),
            "cannot connect to /run/hsmd/hsmd.sock: no such file; is hsmd running? \
             (start it, or point --socket / HSMD_SOCKET at its socket)"
        );
    }
}
