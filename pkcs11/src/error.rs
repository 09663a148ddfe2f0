//! What can go wrong in a PKCS#11 call, and the `CK_RV` each failure becomes.

use cryptoki_sys::*;
use protocol::{ClientError, ErrorCode};
use thiserror::Error;

/// A failed PKCS#11 call: why, for the module's log, and the return value the
/// caller sees ([`Error::rv`]).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// hsmd answered or could not be reached; the mapping is by its error code.
    #[error("hsmd: {0}")]
    Hsmd(#[from] ClientError),
    /// A PKCS#11 rule the caller broke (a bad handle, an argument out of
    /// range, an operation in the wrong state), with its return value.
    #[error("{why}")]
    Call {
        /// The return value the specification assigns to this failure.
        rv: CK_RV,
        /// What was wrong, for the log.
        why: String,
    },
}

impl Error {
    /// A failure the specification names by its return value.
    pub fn call(rv: CK_RV, why: impl Into<String>) -> Self {
        Self::Call { rv, why: why.into() }
    }

    /// The return value the caller sees.
    ///
    /// hsmd unreachable (socket gone, connection dropped) is `CKR_DEVICE_REMOVED`;
    /// locked is `CKR_USER_NOT_LOGGED_IN` (no PIN helps: `hsmctl unlock` does);
    /// a policy or key-state refusal is `CKR_KEY_FUNCTION_NOT_PERMITTED`.
    #[must_use]
    pub fn rv(&self) -> CK_RV {
        match self {
            Self::Call { rv, .. } => *rv,
            Self::Hsmd(e) => match e {
                ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Closed => CKR_DEVICE_REMOVED,
                ClientError::Daemon(w) => daemon_rv(w.code),
                // A request larger than hsmd's frame limit.
                ClientError::Codec(protocol::codec::CodecError::Frame(_)) => CKR_DATA_LEN_RANGE,
                _ => CKR_DEVICE_ERROR,
            },
        }
    }
}

fn daemon_rv(code: ErrorCode) -> CK_RV {
    match code {
        ErrorCode::Locked => CKR_USER_NOT_LOGGED_IN,
        ErrorCode::NotInitialized => CKR_TOKEN_NOT_RECOGNIZED,
        ErrorCode::PermissionDenied | ErrorCode::KeyState => CKR_KEY_FUNCTION_NOT_PERMITTED,
        ErrorCode::NotFound => CKR_KEY_HANDLE_INVALID,
        ErrorCode::DecryptFailed => CKR_ENCRYPTED_DATA_INVALID,
        ErrorCode::InvalidArgument => CKR_ARGUMENTS_BAD,
        ErrorCode::AlreadyExists => CKR_TEMPLATE_INCONSISTENT,
        ErrorCode::StorageUnavailable => CKR_DEVICE_MEMORY,
        ErrorCode::ShuttingDown | ErrorCode::IdleTimeout => CKR_DEVICE_REMOVED,
        ErrorCode::BackendUnavailable
        | ErrorCode::BackendFailed
        | ErrorCode::AuditUnavailable
        | ErrorCode::Tampered
        | ErrorCode::Internal => CKR_DEVICE_ERROR,
        _ => CKR_FUNCTION_FAILED,
    }
}

/// A PKCS#11 call's result.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::WireError;

    #[test]
    fn daemon_refusals_map_to_the_specifications_nearest_codes() {
        let daemon = |code| Error::Hsmd(ClientError::Daemon(WireError::new(code, "x")));
        assert_eq!(daemon(ErrorCode::Locked).rv(), CKR_USER_NOT_LOGGED_IN);
        assert_eq!(daemon(ErrorCode::PermissionDenied).rv(), CKR_KEY_FUNCTION_NOT_PERMITTED);
        assert_eq!(Error::Hsmd(ClientError::Closed).rv(), CKR_DEVICE_REMOVED);
    }
}
