//! The SSH agent protocol (draft-miller-ssh-agent and OpenSSH's
//! `PROTOCOL.agent`) on a socket of its own, so ssh, ssh-add, `ssh-keygen -Y`,
//! git and sshd's `HostKeyAgent` use hsmd's keys as they use ssh-agent's.
//!
//! This is a front end like the hsmd socket: the peer is identified and
//! admitted the same way, and each request becomes an hsmd operation
//! (`SshIdentities`, `SignMessage`) carried through the same pipeline, so the
//! policy, rate limits and audit lines are the ones of the hsmd socket.
//!
//! What it answers: identities (the keys labelled `ssh` the caller may sign
//! with), signatures (`rsa-sha2-256` and `rsa-sha2-512` for RSA keys; never
//! SHA-1 `ssh-rsa`), and `session-bind@openssh.com`, whose verified host key
//! is named in the audit lines that follow. Adding and removing keys, and the
//! agent's LOCK and UNLOCK, are answered FAILURE: keys are made with hsmctl,
//! and the keystore's lock is everyone's, not one agent client's. Messages
//! are read one at a time, up to [`MAX_MESSAGE`]; a longer, truncated or
//! malformed one closes this connection only.

pub mod message;

use std::{sync::Arc, time::Duration};

use protocol::{formats::openssh, HashAlg, Operation, Reply, SignMessageArgs, SshIdentity, WireError};
use ssh_agent_lib::{
    proto::{extension::SessionBind, Identity, PublicCredential, Response, SignRequest},
    ssh_encoding::Encode as _,
    ssh_key::{public::KeyData, HashAlg as SshHash},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
    time::timeout,
};
use tracing::Instrument as _;
use zeroize::Zeroizing;

use self::message::{Malformed, Message as Parsed};
use super::{InFlight, Place, RateGate, Shared};
use crate::{
    auth::Credentials,
    ops::{self, Caller, Work},
};

/// The longest message read, as OpenSSH's ssh-agent (`AGENT_MAX_LEN`).
pub const MAX_MESSAGE: usize = 256 * 1024;

/// SIGN_REQUEST flags (draft-miller-ssh-agent §5.3): which RSA signature.
const RSA_SHA2_256: u32 = 2;
const RSA_SHA2_512: u32 = 4;

/// Serves one accepted agent connection to the end.
pub(super) async fn serve(stream: UnixStream, id: u64, shared: &Arc<Shared>, creds: Credentials, place: Place) {
    let span = tracing::info_span!("agent", id, uid = creds.uid, pid = creds.pid);
    async move {
        // The agent protocol has no way to say why; the reason is in the log.
        let Ok(caller) = super::admit::identify(id, shared, creds, &place).await else {
            return;
        };
        let agent = Agent {
            stream,
            caller,
            shared: Arc::clone(shared),
            rate: RateGate::default(),
            listed: Vec::new(),
        };
        match agent.run().await {
            Ok(()) => tracing::debug!("agent connection ended"),
            Err(why) => tracing::warn!("agent connection closed: {why}"),
        }
        drop(place);
    }
    .instrument(span)
    .await;
}

/// Why a connection was closed by hsmd.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("a message of {0} bytes is over the agent's limit of {MAX_MESSAGE}")]
    TooLong(usize),
    #[error("an empty message")]
    Empty,
    #[error("a message begun and not finished within limits.frame_timeout")]
    TimedOut,
    #[error("no room in the daemon's frame memory for a {0}-byte message")]
    NoRoom(usize),
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
}

struct Agent {
    stream: UnixStream,
    caller: Arc<Caller>,
    shared: Arc<Shared>,
    rate: RateGate,
    /// The keys last listed, with their SSH public keys: a sign request names
    /// its key by public key.
    listed: Vec<(KeyData, SshIdentity)>,
}

impl Agent {
    async fn run(mut self) -> Result<(), Closed> {
        loop {
            let Some(message) = self.read().await? else {
                return Ok(());
            };
            let answer = self.handle(&message).await?;
            drop(message);
            let mut out = Vec::with_capacity(4 + answer.encoded_len().unwrap_or(0));
            let encoded = answer.encode(&mut out).and_then(|()| {
                let len = u32::try_from(out.len()).map_err(|_| ssh_agent_lib::ssh_encoding::Error::Overflow)?;
                out.splice(0..0, len.to_be_bytes());
                Ok(())
            });
            if let Err(e) = encoded {
                tracing::error!(error = %e, "cannot encode an agent answer; answering FAILURE");
                out = vec![0, 0, 0, 1, Response::Failure.message_id()];
            }
            self.stream.write_all(&out).await?;
        }
    }

    /// Reads one message, charged to the daemon's frame memory while held
    /// and wiped when dropped (a LOCK message carries a passphrase, an
    /// ADD_IDENTITY a private key). `None` when the client has closed.
    async fn read(&mut self) -> Result<Option<Message>, Closed> {
        let limits = &self.shared.limits;
        let mut header = [0u8; 4];
        match timeout(limits.idle_timeout, self.stream.read_exact(&mut header)).await {
            Err(_) => {
                // Idle as long as limits.idle_timeout: its place goes to others.
                tracing::debug!("agent connection idle for limits.idle_timeout; closing");
                return Ok(None);
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
        let len = u32::from_be_bytes(header) as usize;
        if len > MAX_MESSAGE {
            return Err(Closed::TooLong(len));
        }
        if len == 0 {
            return Err(Closed::Empty);
        }
        let message = Message::charge(&self.shared, self.caller.peer.creds.uid, len, limits.frame_timeout).await?;
        let mut message = message;
        match timeout(limits.frame_timeout, self.stream.read_exact(&mut message.bytes)).await {
            Err(_) => Err(Closed::TimedOut),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(_)) => Ok(Some(message)),
        }
    }

    async fn handle(&mut self, message: &Message) -> Result<Response, Closed> {
        Ok(match message::parse(&message.bytes)? {
            Parsed::Identities => self.identities().await,
            Parsed::Sign(request) => self.sign(request).await,
            Parsed::SessionBind(bind) => self.bind(&bind),
            Parsed::ForgedSessionBind(why) => {
                tracing::warn!(error = %why, "session-bind with a host signature that does not verify; refused");
                Response::Failure
            }
            Parsed::UnknownExtension(name) => {
                tracing::debug!(extension = %name, "unknown agent extension; answering FAILURE");
                Response::Failure
            }
            Parsed::AddOrRemove(request) => {
                tracing::info!(
                    request,
                    "agent request to add or remove a key refused: hsmd's keys are made and deleted with hsmctl"
                );
                Response::Failure
            }
            Parsed::LockOrUnlock(request) => {
                tracing::info!(
                    request,
                    "agent LOCK/UNLOCK refused: the keystore is locked and unlocked with hsmctl lock/unlock"
                );
                Response::Failure
            }
            Parsed::Unknown(request) => {
                tracing::debug!(request, "unknown agent request; answering FAILURE");
                Response::Failure
            }
        })
    }

    /// Runs `op` through the pipeline as the hsmd socket would, waiting for
    /// its audit line before the answer may go out.
    async fn call(&mut self, op: Operation) -> Result<Reply, WireError> {
        if let Err(wait) = self.rate.take(&self.shared, &self.caller, op.name()) {
            return Err(WireError::new(
                protocol::ErrorCode::RateLimited,
                format!("over the request rate; retry after {} ms", wait.as_millis().max(1)),
            ));
        }
        let answer = match ops::route(op, &self.caller, &self.shared, None) {
            Work::Done(answer) => answer,
            Work::Blocking(job) | Work::Transfer(job) => {
                let counted = InFlight::new(Arc::clone(&self.shared));
                let span = tracing::Span::current();
                let ran = tokio::task::spawn_blocking(move || {
                    let _enter = span.enter();
                    job()
                })
                .await;
                drop(counted);
                ran.map_err(|_| {
                    tracing::error!("agent request handler panicked");
                    WireError::new(protocol::ErrorCode::Internal, "hsmd failed to serve this request")
                })?
            }
            Work::Later(pending) => {
                let counted = InFlight::new(Arc::clone(&self.shared));
                let (tx, rx) = tokio::sync::oneshot::channel();
                pending.then(move |answer| {
                    let _ = tx.send(answer);
                });
                let answered = rx.await;
                drop(counted);
                answered.map_err(|_| {
                    WireError::new(protocol::ErrorCode::Internal, "hsmd lost the answer to this request")
                })?
            }
        };
        if let (Some(ticket), Some(audit)) = (answer.audit, &self.shared.audit) {
            audit.write_pending();
            audit.wait(ticket).await?;
        }
        answer.result
    }

    /// Lists the caller's SSH keys, and remembers them for sign requests. A
    /// locked or uninitialized keystore lists none (ssh then tries its other
    /// keys).
    async fn list(&mut self) -> Result<(), WireError> {
        self.listed.clear();
        let identities = match self.call(Operation::SshIdentities).await? {
            Reply::SshIdentities(identities) => identities,
            _ => return Err(WireError::new(protocol::ErrorCode::Internal, "unexpected answer")),
        };
        for identity in identities {
            match openssh::key_data(identity.key_type, &identity.spki_der) {
                Ok(key) => self.listed.push((key, identity)),
                Err(e) => tracing::warn!(key = %identity.name, error = %e, "not offered to SSH"),
            }
        }
        Ok(())
    }

    async fn identities(&mut self) -> Response {
        match self.list().await {
            Ok(()) => Response::IdentitiesAnswer(
                self.listed
                    .iter()
                    .map(|(key, identity)| Identity {
                        credential: PublicCredential::Key(key.clone()),
                        comment: openssh::comment(&identity.name),
                    })
                    .collect(),
            ),
            Err(e)
                if matches!(
                    e.code,
                    protocol::ErrorCode::Locked | protocol::ErrorCode::NotInitialized
                ) =>
            {
                tracing::info!(reason = %e.message, "listing no SSH keys");
                Response::IdentitiesAnswer(Vec::new())
            }
            Err(e) => {
                tracing::info!(error = %e.message, "cannot list SSH keys");
                Response::Failure
            }
        }
    }

    fn find(&self, key: &KeyData) -> Option<SshIdentity> {
        self.listed.iter().find(|(k, _)| k == key).map(|(_, id)| id.clone())
    }

    async fn sign(&mut self, request: SignRequest) -> Response {
        let SignRequest {
            credential,
            data,
            flags,
        } = request;
        let PublicCredential::Key(key) = credential else {
            tracing::info!("sign request for a certificate refused: hsmd offers plain keys");
            return Response::Failure;
        };
        // A client may sign without listing first (ssh-keygen -Y sign -f key.pub).
        let identity = match self.find(&key) {
            Some(identity) => identity,
            None => {
                if let Err(e) = self.list().await {
                    tracing::info!(error = %e.message, "cannot list SSH keys");
                }
                let Some(identity) = self.find(&key) else {
                    tracing::info!(
                        key = %key.fingerprint(SshHash::Sha256),
                        "sign request for a key not offered to this caller"
                    );
                    return Response::Failure;
                };
                identity
            }
        };
        let hash = if identity.key_type.rsa().is_some() {
            if flags & RSA_SHA2_512 != 0 {
                Some(HashAlg::Sha512)
            } else if flags & RSA_SHA2_256 != 0 {
                Some(HashAlg::Sha256)
            } else {
                tracing::info!(key = %identity.name, "refusing an ssh-rsa (SHA-1) signature; hsmd makes rsa-sha2-256/512 only");
                return Response::Failure;
            }
        } else {
            None
        };
        let op = Operation::SignMessage(SignMessageArgs {
            name: identity.name.clone(),
            message: data,
            hash,
        });
        match self.call(op).await {
            Ok(Reply::Signature { version, signature }) if version == identity.version => {
                match openssh::signature(identity.key_type, &signature, hash) {
                    Ok(signature) => Response::SignResponse(signature),
                    Err(e) => {
                        tracing::error!(key = %identity.name, error = %e, "cannot encode the signature for SSH");
                        Response::Failure
                    }
                }
            }
            Ok(Reply::Signature { version, .. }) => {
                // Its signature would not match the public key the client holds.
                tracing::info!(
                    key = %identity.name,
                    listed = identity.version,
                    signed = version,
                    "key rotated since it was listed; the client must list keys again"
                );
                self.listed.clear();
                Response::Failure
            }
            Ok(_) => Response::Failure,
            Err(e) => {
                tracing::info!(key = %identity.name, error = %e.message, "agent signature refused");
                Response::Failure
            }
        }
    }

    /// `session-bind@openssh.com`: the client says which server this
    /// connection authenticates to (the host's signature over the session id
    /// already checked); the host key is named in the audit lines that follow.
    fn bind(&mut self, bind: &SessionBind) -> Response {
        let host = bind.host_key.fingerprint(SshHash::Sha256).to_string();
        tracing::info!(host_key = %host, forwarding = bind.is_forwarding, "SSH session bound");
        let mut who = (*self.caller.who).clone();
        who.ssh_host_key = Some(host);
        self.caller = Arc::new(Caller {
            peer: self.caller.peer.clone(),
            admitted_because: self.caller.admitted_because.clone(),
            connection_id: self.caller.connection_id,
            who: Arc::new(who),
        });
        Response::Success
    }
}

/// One message's bytes, charged to the daemon's frame memory until dropped,
/// then wiped.
struct Message {
    bytes: Zeroizing<Vec<u8>>,
    shared: Arc<Shared>,
    uid: u32,
}

impl Message {
    /// Charges `len` bytes for `uid`, waiting up to `wait` for room.
    async fn charge(shared: &Arc<Shared>, uid: u32, len: usize, wait: Duration) -> Result<Self, Closed> {
        let budget = &shared.frame_budget;
        if !budget.try_charge(uid, len) {
            let mut waiter = budget.waiter();
            let charged = timeout(wait, async {
                loop {
                    if budget.try_charge(uid, len) {
                        return;
                    }
                    waiter.freed().await;
                }
            })
            .await;
            if charged.is_err() {
                return Err(Closed::NoRoom(len));
            }
        }
        Ok(Self {
            bytes: Zeroizing::new(vec![0; len]),
            shared: Arc::clone(shared),
            uid,
        })
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        self.shared.frame_budget.release(self.uid, self.bytes.len());
    }
}
