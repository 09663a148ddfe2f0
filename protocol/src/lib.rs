//! The hsmd wire protocol and its client library.
//!
//! hsmd listens on a Unix socket. Each frame is a 4-byte big-endian length and a
//! bincode body ([`codec`], specified in `docs/protocol.md`). A connection starts
//! with a hello that carries the protocol version; then the client sends
//! [`Request`]s, each with an id, and the daemon answers each with a [`Response`]
//! carrying the same id, in whatever order the work completes.
//!
//! ```no_run
//! use protocol::Client;
//!
//! let mut client = Client::connect("/run/hsmd/hsmd.sock")?;
//! let status = client.status()?;
//! println!("hsmd {} is {}", status.daemon_version, status.state.as_str());
//! # Ok::<(), protocol::ClientError>(())
//! ```
//!
//! With the `tokio` feature, [`AsyncClient`] offers the same calls as `async fn`s.

#![warn(missing_docs)]

pub mod codec;
pub mod error;
pub mod formats;
pub mod frame;
pub mod message;
pub mod period;
pub mod recv;
pub mod secret;

/// The README's example is compiled (not run) with the doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;

#[cfg(feature = "tokio")]
mod async_client;
pub mod calls;
mod client;

#[cfg(feature = "tokio")]
pub use async_client::AsyncClient;
pub use client::{default_socket, is_code, Client, ClientOptions, DEFAULT_SOCKET};
pub use error::{ClientError, ErrorCode, WireError};
pub use message::{
    ArchiveSummary, AuditStatus, BackendStatus, BackupContents, BackupManifest, BackupProtection, BatchItem,
    ClientHello, DecryptAnyVersionArgs, DecryptArgs, EncryptArgs, Fido2Challenge, FileInfo, GroupInfo, HashAlg,
    KeyChanges, KeyInfo, KeyOptions, KeyState, KeyType, MacArgs, MacVerifyArgs, NewSlot, Operation, PeerInfo, Profile,
    Reply, Request, Response, RestoreSummary, RsaScheme, ServerHello, ServiceState, SignArgs, SignMessageArgs,
    SlotInfo, SshIdentity, StatusInfo, Transition, UnlockSecret, Usage, VerifyArgs, VerifyMessageArgs, VersionInfo,
    CONNECTION_ERROR_ID, MAX_BATCH_ITEMS, MAX_SIGN_MESSAGE, PROTOCOL_VERSION, SSH_LABEL,
};
pub use period::format_period;

/// The shortest passphrase an unlock slot or a backup accepts, in bytes.
pub const MIN_PASSPHRASE_LEN: usize = 8;
/// The longest passphrase an unlock slot or a backup accepts, in bytes.
pub const MAX_PASSPHRASE_LEN: usize = 1024;
pub use secret::SecretBytes;

/// The client's hello.
fn hello(client_name: &str) -> Operation {
    Operation::Hello(ClientHello {
        protocol_version: PROTOCOL_VERSION,
        client: client_name.to_owned(),
    })
}

/// What a client assumes of the daemon until its hello arrives.
fn before_hello() -> ServerHello {
    ServerHello {
        protocol_version: PROTOCOL_VERSION,
        daemon_version: String::new(),
        features: Vec::new(),
        max_frame_bytes: frame::DEFAULT_MAX_FRAME,
        connection_id: 0,
    }
}

/// Checks that `response` answers the hello (id 1) and returns the daemon's half.
fn expect_hello(response: Response) -> Result<ServerHello, ClientError> {
    match expect_id(response, 1)? {
        Reply::Hello(hello) => Ok(hello),
        other => Err(unexpected("hello", &other)),
    }
}

/// Unwraps the response to request `id`. A connection-level error (id 0) is the
/// daemon's word on why it is closing, so it is reported as the answer.
fn expect_id(response: Response, id: u64) -> Result<Reply, ClientError> {
    if response.id != id && response.id != CONNECTION_ERROR_ID {
        return Err(ClientError::UnexpectedId { got: response.id });
    }
    match response.result {
        Ok(reply) if response.id == id => Ok(reply),
        Ok(_) => Err(ClientError::UnexpectedId { got: response.id }),
        Err(e) => Err(ClientError::Daemon(e)),
    }
}

fn unexpected(expected: &'static str, got: &Reply) -> ClientError {
    ClientError::unexpected_reply(expected, got)
}
