//! What can go wrong in hsmctl, the stable code each failure has in `--json`
//! output, and the exit status it ends with.
//!
//! Codes of errors hsmd sends are hsmd's own (`protocol::ErrorCode`); errors
//! hsmctl finds itself (a file it cannot read, an output it will not replace,
//! a signature that does not verify) have the codes of [`Local`], so a script
//! can tell every failure apart without reading messages.

use protocol::ClientError;
use serde_json::json;

/// The kinds of failure hsmctl finds itself, each with a stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Local {
    /// The command line is wrong (exit 2).
    Usage,
    /// A local file or directory could not be read or written.
    File,
    /// An input file is not what the command reads (a malformed signature
    /// or tag file, one made by another key, a truncated ciphertext).
    Input,
    /// A passphrase, key file or PIN could not be read.
    Secret,
    /// A FIDO2 authenticator could not be used.
    Authenticator,
    /// The signature does not verify (exit 1).
    InvalidSignature,
    /// The MAC tag does not verify (exit 1).
    InvalidTag,
    /// `key exists`: there is no such key (exit 1).
    Absent,
    /// The output exists and `--force` was not given.
    OutputExists,
    /// The output is refused whatever the flags: a link, a FIFO, a directory,
    /// another user's file, the input file itself, binary data for a terminal.
    UnsafeOutput,
    /// Something that cannot be undone was not confirmed.
    NotConfirmed,
    /// A fault in hsmctl itself.
    Internal,
}

impl Local {
    /// The stable code shown by `--json`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Usage => "usage",
            Self::File => "local-file",
            Self::Input => "bad-input",
            Self::Secret => "secret-unreadable",
            Self::Authenticator => "authenticator",
            Self::InvalidSignature => "invalid-signature",
            Self::InvalidTag => "invalid-tag",
            Self::Absent => "absent",
            Self::OutputExists => "output-exists",
            Self::UnsafeOutput => "unsafe-output",
            Self::NotConfirmed => "not-confirmed",
            Self::Internal => "internal",
        }
    }

    /// A failure of this kind, with what happened and what to do.
    pub(crate) fn fail(self, message: impl Into<String>) -> Failure {
        Failure::Local(self, message.into())
    }
}

/// Why a command did not succeed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Talking to hsmd failed, or hsmd refused.
    Client(ClientError),
    /// hsmctl found the problem itself.
    Local(Local, String),
    /// Exit 1 with nothing more to say: the answer was printed (a policy
    /// check that says no, a signature that does not verify under `--json`).
    Quiet,
    /// Exit with this status, the answer printed (`status` when not unlocked).
    Exit(u8),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Self::Client(e)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client(e) => e.fmt(f),
            Self::Local(_, m) => f.write_str(m),
            Self::Quiet | Self::Exit(_) => Ok(()),
        }
    }
}

impl Failure {
    /// The stable code of this failure, and hsmd's number for it when hsmd
    /// sent it.
    pub(crate) fn code(&self) -> (&'static str, Option<u32>) {
        match self {
            Self::Client(ClientError::Daemon(e)) => (e.code.as_str(), Some(e.code.number())),
            Self::Client(ClientError::Connect { .. }) => ("unreachable", None),
            Self::Client(ClientError::Io(_) | ClientError::Closed) => ("connection-lost", None),
            Self::Client(ClientError::TimedOut(_)) => ("timed-out", None),
            Self::Client(_) => ("protocol", None),
            Self::Local(kind, _) => (kind.as_str(), None),
            Self::Quiet | Self::Exit(_) => ("", None),
        }
    }

    /// 2 for a usage error, 3 when hsmd could not be reached or went away,
    /// 1 for everything else.
    pub(crate) fn exit_status(&self) -> u8 {
        match self {
            Self::Local(Local::Usage, _) => 2,
            Self::Client(
                ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Closed | ClientError::TimedOut(_),
            ) => 3,
            Self::Exit(code) => *code,
            _ => 1,
        }
    }

    /// The one JSON document `--json` prints for this failure.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let (code, number) = self.code();
        let message = match self {
            // The code is a field of its own here, not a suffix.
            Self::Client(ClientError::Daemon(e)) => e.message.clone(),
            other => other.to_string(),
        };
        json!({ "error": {
            "code": code,
            "number": number,
            "from": if number.is_some() { "hsmd" } else { "hsmctl" },
            "message": message,
        }})
    }
}

/// hsmd answered `got` to a request whose answer is `expected`.
pub(crate) fn unexpected(expected: &'static str, got: &protocol::Reply) -> Failure {
    Failure::Client(ClientError::unexpected_reply(expected, got))
}
