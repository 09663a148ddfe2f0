//! One connection: identify the peer, admit or refuse, handshake, then read
//! frames and answer requests, many in flight at once, until the peer leaves, a
//! limit is broken, or the daemon shuts down.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Arc,
    time::Duration,
};

use bytes::{Buf, BytesMut};
use protocol::{
    codec,
    frame::{self, FrameStatus, HEADER_LEN, MAX_FRAME_CEILING},
    message::OPERATION_VARIANTS,
    ErrorCode, Operation, Reply, Request, Response, ServerHello, WireError, CONNECTION_ERROR_ID, PROTOCOL_VERSION,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{unix::OwnedWriteHalf, UnixStream},
    sync::{mpsc, Semaphore},
    time::{sleep_until, timeout, Instant},
};
use tracing::Instrument;

use super::{
    dispatch::{self, Caller, Work},
    InFlight, Shared, REFUSAL_WRITE_TIMEOUT, VERSION,
};
use crate::auth::{Admission, Credentials, PeerIdentity};

/// How long identity lookups (NSS) may take before the peer is refused.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of responses gathered into one write when several are ready.
const WRITE_BATCH: usize = 64 * 1024;

/// Writes one error frame to a peer we will not serve, then closes.
pub async fn refuse(mut stream: UnixStream, error: WireError) {
    let response = Response {
        id: CONNECTION_ERROR_ID,
        result: Err(error),
    };
    if let Ok(frame) = codec::encode_frame(&response, MAX_FRAME_CEILING) {
        let _ = timeout(REFUSAL_WRITE_TIMEOUT, async {
            stream.write_all(&frame).await?;
            stream.shutdown().await
        })
        .await;
    }
}

/// Serves one accepted connection to the end.
pub async fn serve(stream: UnixStream, id: u64, shared: &Arc<Shared>) {
    let creds = match stream.peer_cred() {
        Ok(c) => Credentials {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid().and_then(|p| u32::try_from(p).ok()),
        },
        Err(e) => {
            tracing::warn!(connection = id, error = %e, "cannot read peer credentials; closing");
            return;
        }
    };
    let peer = match timeout(
        IDENTITY_TIMEOUT,
        tokio::task::spawn_blocking(move || PeerIdentity::resolve(creds)),
    )
    .await
    {
        Ok(Ok(peer)) => peer,
        _ => {
            tracing::error!(
                connection = id,
                uid = creds.uid,
                "user database lookup failed or hung; refusing"
            );
            refuse(
                stream,
                WireError::new(ErrorCode::Internal, "hsmd could not look up your identity; see its log"),
            )
            .await;
            return;
        }
    };
    let span = tracing::info_span!("conn", id, uid = creds.uid, pid = creds.pid);
    async move {
        let exe = peer.executable.as_ref().map(|p| p.display().to_string());
        let admitted_because = match shared.gate.admit(&peer) {
            Admission::Admitted(why) => why,
            Admission::Refused(why) => {
                tracing::warn!(user = ?peer.user, exe = ?exe, reason = %why, "connection refused");
                refuse(stream, WireError::new(ErrorCode::PermissionDenied, why)).await;
                return;
            }
        };
        tracing::debug!(user = ?peer.user, exe = ?exe, "connection admitted: {admitted_because}");
        let caller = Arc::new(Caller {
            peer,
            admitted_because,
            connection_id: id,
        });
        Connection::new(stream, caller, Arc::clone(shared)).run().await;
    }
    .instrument(span)
    .await;
}

/// Why the read loop ended.
enum Ending {
    /// The peer closed its side.
    PeerClosed,
    /// We sent an error and close.
    Refused,
    /// A transport error.
    Broken,
}

struct Connection {
    reader: tokio::net::unix::OwnedReadHalf,
    writer: Option<OwnedWriteHalf>,
    caller: Arc<Caller>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Response>,
    rx: Option<mpsc::Receiver<Response>>,
    in_flight: Arc<Semaphore>,
    greeted: bool,
}

impl Connection {
    fn new(stream: UnixStream, caller: Arc<Caller>, shared: Arc<Shared>) -> Self {
        let (reader, writer) = stream.into_split();
        let depth = shared.limits.max_requests_in_flight as usize;
        let (tx, rx) = mpsc::channel(depth + 2);
        Self {
            reader,
            writer: Some(writer),
            caller,
            in_flight: Arc::new(Semaphore::new(depth)),
            shared,
            tx,
            rx: Some(rx),
            greeted: false,
        }
    }

    async fn run(mut self) {
        let (Some(writer), Some(rx)) = (self.writer.take(), self.rx.take()) else {
            return;
        };
        let write_timeout = self.shared.limits.frame_timeout;
        let writer = tokio::spawn(write_loop(writer, rx, write_timeout).in_current_span());
        let ending = self.read_loop().await;
        match ending {
            Ending::PeerClosed => tracing::debug!("peer closed the connection"),
            Ending::Refused | Ending::Broken => tracing::debug!("connection closed by hsmd"),
        }
        // Requests still in flight hold senders; the writer ends once they answer.
        drop(self.tx);
        let _ = writer.await;
    }

    async fn read_loop(&mut self) -> Ending {
        let limits = self.shared.limits.clone();
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let mut last_activity = Instant::now();
        // When the first byte of the frame now being received arrived.
        let mut frame_started: Option<Instant> = None;
        loop {
            // Answer every whole frame already buffered.
            loop {
                match frame::check(&buf, limits.max_frame_bytes) {
                    Err(e) => {
                        tracing::warn!(error = %e, "refusing oversize frame");
                        self.send_error(
                            CONNECTION_ERROR_ID,
                            ErrorCode::FrameTooLarge,
                            format!("{e}; the connection is closed"),
                        )
                        .await;
                        return Ending::Refused;
                    }
                    Ok(FrameStatus::Incomplete { buffered_at_least }) => {
                        // The header was checked against the limit above, so this
                        // reservation is bounded by max_frame_bytes.
                        buf.reserve(buffered_at_least.saturating_sub(buf.len()));
                        break;
                    }
                    Ok(FrameStatus::Complete { body_len }) => {
                        buf.advance(HEADER_LEN);
                        let body = buf.split_to(body_len).freeze();
                        last_activity = Instant::now();
                        frame_started = None;
                        if !self.handle_frame(&body).await {
                            return Ending::Refused;
                        }
                    }
                }
            }
            if !buf.is_empty() && frame_started.is_none() {
                frame_started = Some(Instant::now());
            }
            let (deadline, partial) = match frame_started {
                Some(t) => (t + limits.frame_timeout, true),
                None => (last_activity + limits.idle_timeout, false),
            };
            tokio::select! {
                biased;
                () = self.shared.shutdown.cancelled() => {
                    self.send_error(CONNECTION_ERROR_ID, ErrorCode::ShuttingDown,
                        "hsmd is shutting down; requests already sent are answered, no new ones are read").await;
                    return Ending::Refused;
                }
                () = sleep_until(deadline) => {
                    if partial {
                        tracing::warn!(buffered = buf.len(), "frame not completed in time; closing");
                        self.send_error(CONNECTION_ERROR_ID, ErrorCode::FrameTimeout, format!(
                            "a frame was started but not completed within {}; the connection is closed",
                            humantime::format_duration(limits.frame_timeout))).await;
                        return Ending::Refused;
                    }
                    if self.requests_in_flight() > 0 {
                        // Waiting on our own answers is not idleness.
                        last_activity = Instant::now();
                        continue;
                    }
                    tracing::debug!("idle timeout; closing");
                    self.send_error(CONNECTION_ERROR_ID, ErrorCode::IdleTimeout, format!(
                        "no request for {}; the connection is closed",
                        humantime::format_duration(limits.idle_timeout))).await;
                    return Ending::Refused;
                }
                read = self.reader.read_buf(&mut buf) => match read {
                    Ok(0) => {
                        if !buf.is_empty() {
                            tracing::warn!(buffered = buf.len(), "peer disconnected in the middle of a frame");
                        }
                        return Ending::PeerClosed;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "read failed");
                        return Ending::Broken;
                    }
                },
            }
        }
    }

    fn requests_in_flight(&self) -> usize {
        self.shared.limits.max_requests_in_flight as usize - self.in_flight.available_permits()
    }

    /// Answers one frame; `false` means the connection must close.
    async fn handle_frame(&mut self, body: &[u8]) -> bool {
        let request: Request = match codec::decode_body(body) {
            Ok(r) => r,
            Err(e) => {
                if let Some((id, variant)) = codec::peek_request_header(body).filter(|(_, v)| *v >= OPERATION_VARIANTS)
                {
                    tracing::warn!(request = id, variant, "unknown operation; closing");
                    self.send_error(
                        id,
                        ErrorCode::UnknownRequest,
                        format!(
                            "operation #{variant} is not known to hsmd {VERSION} (protocol {PROTOCOL_VERSION}); \
                         upgrade hsmd or use a client of the same version; the connection is closed"
                        ),
                    )
                    .await;
                } else {
                    tracing::warn!(error = %e, len = body.len(), "malformed frame; closing");
                    self.send_error(
                        CONNECTION_ERROR_ID,
                        ErrorCode::MalformedFrame,
                        format!("{e}; the connection is closed"),
                    )
                    .await;
                }
                return false;
            }
        };
        let Request { id, op } = request;
        if !self.greeted {
            return self.handshake(id, op).await;
        }
        if let Operation::Hello(_) = op {
            self.send_error(
                id,
                ErrorCode::ProtocolViolation,
                "hello was already exchanged on this connection; the connection is closed",
            )
            .await;
            return false;
        }
        // Backpressure: a client with too much in flight is not read further
        // until some of it is answered.
        let permit = tokio::select! {
            biased;
            () = self.shared.shutdown.cancelled() => return false,
            p = Arc::clone(&self.in_flight).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return false,
            },
        };
        tracing::trace!(request = id, op = op.name(), "request");
        match dispatch::route(op, &self.caller, &self.shared) {
            Work::Done(result) => {
                drop(permit);
                let _ = self.tx.send(Response { id, result }).await;
            }
            Work::Blocking(job) => {
                let tx = self.tx.clone();
                let counted = InFlight::new(Arc::clone(&self.shared));
                let span = tracing::Span::current();
                tokio::task::spawn_blocking(move || {
                    let _enter = span.enter();
                    let _counted = counted;
                    let result = catch_unwind(AssertUnwindSafe(job)).unwrap_or_else(|_| {
                        tracing::error!(request = id, "request handler panicked");
                        Err(WireError::new(
                            ErrorCode::Internal,
                            "hsmd failed to serve this request; see its log",
                        ))
                    });
                    let _ = tx.blocking_send(Response { id, result });
                    drop(permit);
                });
            }
        }
        true
    }

    async fn handshake(&mut self, id: u64, op: Operation) -> bool {
        let Operation::Hello(hello) = op else {
            self.send_error(
                id,
                ErrorCode::ProtocolViolation,
                format!(
                    "the first request must be hello, not {}; the connection is closed",
                    op.name()
                ),
            )
            .await;
            return false;
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            tracing::warn!(client = %hello.client, version = hello.protocol_version, "unsupported protocol version");
            self.send_error(
                id,
                ErrorCode::UnsupportedVersion,
                format!(
                    "client {:?} speaks protocol {}, hsmd {VERSION} speaks protocol {PROTOCOL_VERSION}; \
                 use a client built for this daemon; the connection is closed",
                    hello.client, hello.protocol_version
                ),
            )
            .await;
            return false;
        }
        tracing::debug!(client = %hello.client, "hello");
        self.greeted = true;
        let mut features = vec!["pipelining".to_owned()];
        if self.shared.dev {
            features.push("dev-mode".to_owned());
        }
        let reply = Reply::Hello(ServerHello {
            protocol_version: PROTOCOL_VERSION,
            daemon_version: VERSION.to_owned(),
            features,
            max_frame_bytes: self.shared.limits.max_frame_bytes,
            connection_id: self.caller.connection_id,
        });
        let _ = self.tx.send(Response { id, result: Ok(reply) }).await;
        true
    }

    async fn send_error(&self, id: u64, code: ErrorCode, message: impl Into<String>) {
        let _ = self
            .tx
            .send(Response {
                id,
                result: Err(WireError::new(code, message)),
            })
            .await;
    }
}

/// Writes responses as they come, batching those that are ready together into
/// one write. Ends when every sender is gone, or the peer stops reading.
async fn write_loop(mut writer: OwnedWriteHalf, mut rx: mpsc::Receiver<Response>, write_timeout: Duration) {
    let mut out = Vec::with_capacity(8 * 1024);
    while let Some(first) = rx.recv().await {
        out.clear();
        encode(&first, &mut out);
        while out.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(next) => encode(&next, &mut out),
                Err(_) => break,
            }
        }
        match timeout(write_timeout, writer.write_all(&out)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "write failed; dropping the connection");
                return;
            }
            Err(_) => {
                tracing::warn!("peer stopped reading its responses; dropping the connection");
                return;
            }
        }
    }
    let _ = writer.shutdown().await;
}

fn encode(response: &Response, out: &mut Vec<u8>) {
    if let Err(e) = codec::encode_frame_into(response, MAX_FRAME_CEILING, out) {
        tracing::error!(request = response.id, error = %e, "cannot encode response");
        let fallback = Response {
            id: response.id,
            result: Err(WireError::new(
                ErrorCode::Internal,
                "hsmd could not encode its answer; see its log",
            )),
        };
        // A short error always fits.
        let _ = codec::encode_frame_into(&fallback, MAX_FRAME_CEILING, out);
    }
}
