//! What an agent message asks, read from its bytes before anything is done:
//! the only part of the agent front end that interprets a client's bytes, so
//! it is kept free of I/O and state (and fuzzed on its own).

use ssh_agent_lib::{
    proto::{
        extension::{MessageExtension, SessionBind},
        Request, SignRequest,
    },
    ssh_encoding::{Decode as _, Reader as _},
};

/// Request numbers (draft-miller-ssh-agent §6.1) answered without decoding
/// the body: adding keys would put private keys in this process's memory for
/// nothing, since hsmd refuses them anyway.
mod number {
    pub const REQUEST_IDENTITIES: u8 = 11;
    pub const SIGN_REQUEST: u8 = 13;
    pub const ADD_IDENTITY: u8 = 17;
    pub const REMOVE_IDENTITY: u8 = 18;
    pub const REMOVE_ALL_IDENTITIES: u8 = 19;
    pub const ADD_SMARTCARD_KEY: u8 = 20;
    pub const REMOVE_SMARTCARD_KEY: u8 = 21;
    pub const LOCK: u8 = 22;
    pub const UNLOCK: u8 = 23;
    pub const ADD_ID_CONSTRAINED: u8 = 25;
    pub const ADD_SMARTCARD_KEY_CONSTRAINED: u8 = 26;
    pub const EXTENSION: u8 = 27;
}

/// What a well-formed message asks.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// REQUEST_IDENTITIES.
    Identities,
    /// SIGN_REQUEST.
    Sign(SignRequest),
    /// `session-bind@openssh.com` whose host signature over the session id
    /// verifies.
    SessionBind(SessionBind),
    /// `session-bind@openssh.com` whose host signature does not verify:
    /// answered FAILURE, the connection stays unbound.
    ForgedSessionBind(String),
    /// An extension hsmd does not know (answered FAILURE, as the draft asks).
    UnknownExtension(String),
    /// A request to add or remove a key: hsmd's keys are made and deleted
    /// with hsmctl. The request number.
    AddOrRemove(u8),
    /// LOCK or UNLOCK: the keystore's lock is everyone's, not one agent
    /// client's. The request number.
    LockOrUnlock(u8),
    /// A request number hsmd does not know.
    Unknown(u8),
}

/// Why a message was not read: the connection that sent it is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub struct Malformed {
    /// What the message was to be.
    pub what: &'static str,
    /// What was wrong with it.
    pub why: String,
}

/// Reads one message's body (its length prefix already taken off).
///
/// # Errors
/// [`Malformed`] for an empty message, a SIGN_REQUEST or EXTENSION that does
/// not decode or has bytes after its end, or a `session-bind@openssh.com`
/// whose details do not decode.
pub fn parse(bytes: &[u8]) -> Result<Message, Malformed> {
    use number::*;
    let Some(&kind) = bytes.first() else {
        return Err(Malformed {
            what: "message",
            why: "it is empty".into(),
        });
    };
    Ok(match kind {
        REQUEST_IDENTITIES => Message::Identities,
        SIGN_REQUEST => match decode(bytes, "sign request")? {
            Request::SignRequest(request) => Message::Sign(request),
            _ => return Err(mismatch("sign request")),
        },
        EXTENSION => match decode(bytes, "extension")? {
            Request::Extension(extension) => {
                if extension.name != <SessionBind as MessageExtension>::NAME {
                    return Ok(Message::UnknownExtension(extension.name));
                }
                let bind = whole(extension.details.as_ref(), "session-bind@openssh.com", |reader| {
                    SessionBind::decode(reader)
                })?;
                match bind.verify_signature() {
                    Ok(()) => Message::SessionBind(bind),
                    Err(e) => Message::ForgedSessionBind(e.to_string()),
                }
            }
            _ => return Err(mismatch("extension")),
        },
        ADD_IDENTITY
        | ADD_ID_CONSTRAINED
        | ADD_SMARTCARD_KEY
        | ADD_SMARTCARD_KEY_CONSTRAINED
        | REMOVE_IDENTITY
        | REMOVE_ALL_IDENTITIES
        | REMOVE_SMARTCARD_KEY => Message::AddOrRemove(kind),
        LOCK | UNLOCK => Message::LockOrUnlock(kind),
        other => Message::Unknown(other),
    })
}

/// Decodes a whole request; bytes left over make it malformed.
fn decode(bytes: &[u8], what: &'static str) -> Result<Request, Malformed> {
    whole(bytes, what, |reader| Request::decode(reader))
}

/// Decodes `bytes` with `decode`, all of them: bytes left over make it
/// malformed (ssh-agent-lib leaves an extension's details unchecked at
/// their end).
fn whole<T, E: std::fmt::Display>(
    bytes: &[u8],
    what: &'static str,
    decode: impl FnOnce(&mut &[u8]) -> Result<T, E>,
) -> Result<T, Malformed> {
    let mut reader = bytes;
    let value = decode(&mut reader).map_err(|e| Malformed {
        what,
        why: e.to_string(),
    })?;
    if !reader.is_finished() {
        return Err(Malformed {
            what,
            why: format!("{} bytes after its end", reader.remaining_len()),
        });
    }
    Ok(value)
}

fn mismatch(what: &'static str) -> Malformed {
    Malformed {
        what,
        why: "it decoded as another request".into(),
    }
}
