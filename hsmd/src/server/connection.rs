//! One connection: identify the peer, admit or refuse, handshake, then read
//! frames and answer requests, many in flight at once, until the peer leaves, a
//! limit is broken, or the daemon shuts down.

use std::{
    collections::VecDeque,
    io::{self, IoSliceMut},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Arc,
};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use protocol::{
    codec,
    frame::{self, FrameStatus, HEADER_LEN, MAX_FRAME_CEILING},
    message::OPERATION_VARIANTS,
    ErrorCode, Operation, Reply, Request, Response, ServerHello, WireError, CONNECTION_ERROR_ID, PROTOCOL_VERSION,
};
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::UnixStream,
    sync::{mpsc, watch},
    time::{sleep_until, timeout, Instant},
};
use tracing::Instrument;

use super::{
    wiped::{self, InBuf},
    InFlight, Shared, REFUSAL_WRITE_TIMEOUT, VERSION,
};
use crate::{
    audit::{Progress, Settled, Ticket},
    auth::Credentials,
    budget::{Budget, Waiter},
    ops::{self, Answer, Caller, Work},
};

/// Bytes of responses gathered into one write when several are ready.
const WRITE_BATCH: usize = 64 * 1024;
/// How long a connection answers buffered requests on the reactor before it
/// lets the others have a turn. A pipelining client sends many requests at
/// once; answered in one go, they would keep every other connection waiting
/// the whole batch (64 signatures is milliseconds). With turns, a request
/// waits for at most about one turn of each busy connection. Measured with
/// `hsmd-bench --suite keys` (the fairness row): 20 µs costs throughput in
/// yields, 300 µs lets the tail grow again; 50 µs and 100 µs do best.
const TURN: std::time::Duration = std::time::Duration::from_micros(50);
/// Descriptors a peer may send ahead of the requests that use them.
const MAX_QUEUED_FDS: usize = 4;
/// Linux's limit of descriptors in one message (SCM_MAX_FD): room for that
/// many means the kernel never truncates what it passes, so none can be
/// installed in our table without our knowing.
const SCM_MAX_FD: usize = 253;

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
pub async fn serve(stream: UnixStream, id: u64, shared: &Arc<Shared>, creds: Credentials, place: super::Place) {
    let span = tracing::info_span!("conn", id, uid = creds.uid, pid = creds.pid);
    async move {
        let caller = match super::admit::identify(id, shared, creds, &place).await {
            Ok(caller) => caller,
            Err(refusal) => {
                refuse(stream, refusal).await;
                return;
            }
        };
        Connection::new(stream, caller, Arc::clone(shared)).run().await;
        drop(place);
        // Frame-path file sessions end with the connection that opened them
        // (after its last answers went out).
        if let Some(files) = &shared.files {
            files.end_connection(id);
        }
    }
    .instrument(span)
    .await;
}

/// Why the connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The peer closed its side.
    PeerClosed,
    /// We answered with an error and close.
    Refused,
    /// A transport error, or the peer stopped reading.
    Broken,
}

/// One task per connection does everything: reads frames, answers cheap requests
/// straight into the output buffer, hands blocking ones to the pool and writes
/// their answers as they come back. One task (not a reader and a writer joined by
/// a channel) keeps a ping to one wake-up, as cheap as a raw echo.
struct Connection {
    stream: UnixStream,
    caller: Arc<Caller>,
    shared: Arc<Shared>,
    /// Answers from the blocking pool, with the frame bytes each was charged.
    done_tx: mpsc::UnboundedSender<(u64, Answer, usize)>,
    done_rx: mpsc::UnboundedReceiver<(u64, Answer, usize)>,
    /// Requests handed to the pool and not yet answered.
    in_flight: usize,
    /// Answers waiting for their audit line.
    held: Vec<(Ticket, Response)>,
    /// The audit writer's progress, which releases them.
    progress: Option<watch::Receiver<Progress>>,
    /// Encoded responses waiting to be written.
    out: Vec<u8>,
    greeted: bool,
    /// The caller's rate under the policy last seen, so roles are not worked
    /// out again for every request. Holding the policy keeps the comparison
    /// by address sound.
    rate: super::RateGate,
    /// Descriptors received (SCM_RIGHTS) for requests not yet read.
    fds: VecDeque<OwnedFd>,
    /// Room for the ancillary data of one read.
    cmsg: Vec<u8>,
    /// The daemon's frame memory, and what this connection holds of it: the
    /// frame being received (once its header is in), requests in flight, and
    /// answers not yet written. All given back when the connection ends.
    budget: Arc<Budget>,
    charged: usize,
    /// The charge of the frame being received, once its header is in.
    frame_charge: Option<usize>,
    /// The charge of the frame being handled, until a job takes it.
    handling_charge: usize,
    /// Charges of answers made, given back once written.
    answered_charge: usize,
}

/// What one read from the peer brought.
enum Received {
    /// Bytes (0: the peer closed).
    Bytes(usize),
    /// Nothing after all (readiness was stale).
    Nothing,
    /// More descriptors than may wait for their requests.
    TooManyFds,
}

impl Connection {
    fn new(stream: UnixStream, caller: Arc<Caller>, shared: Arc<Shared>) -> Self {
        // Unbounded is bounded in practice: at most max_requests_in_flight jobs
        // exist per connection, and each sends one answer.
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let progress = shared.audit.as_ref().map(|a| a.progress());
        let budget = Arc::clone(&shared.frame_budget);
        Self {
            stream,
            caller,
            shared,
            done_tx,
            done_rx,
            in_flight: 0,
            held: Vec::new(),
            progress,
            out: Vec::with_capacity(8 * 1024),
            greeted: false,
            rate: super::RateGate::default(),
            fds: VecDeque::new(),
            cmsg: nix::cmsg_space!([RawFd; SCM_MAX_FD]),
            budget,
            charged: 0,
            frame_charge: None,
            handling_charge: 0,
            answered_charge: 0,
        }
    }

    /// Charges the frame being received `bytes`; `false` if there is no room
    /// now, for the caller's uid or for anyone.
    fn charge_frame(&mut self, bytes: usize) -> bool {
        if self.frame_charge.is_some() {
            return true;
        }
        if !self.budget.try_charge(self.caller.peer.creds.uid, bytes) {
            return false;
        }
        self.charged += bytes;
        self.frame_charge = Some(bytes);
        true
    }

    /// Gives back the charges of answers made so far (they have been written).
    fn release_answered(&mut self) {
        let bytes = std::mem::take(&mut self.answered_charge);
        self.charged -= bytes;
        self.budget.release(self.caller.peer.creds.uid, bytes);
    }

    /// Reads what the peer sent, with any descriptors it passed (recvmsg, not
    /// read: a plain read would make the kernel close passed descriptors).
    fn receive(&mut self, buf: &mut InBuf) -> io::Result<Received> {
        buf.make_room(4096);
        let start = buf.end();
        // recvmsg wants initialized memory: spare() is, and zero.
        let spare = buf.spare();
        let (stream, cmsg) = (&self.stream, &mut self.cmsg);
        let result = stream.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(&mut *spare)];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(cmsg.as_mut_slice()),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            let mut fds = Vec::new();
            if let Ok(messages) = msg.cmsgs() {
                for m in messages {
                    if let ControlMessageOwned::ScmRights(list) = m {
                        for fd in list {
                            // SAFETY: the kernel just installed this descriptor in
                            // our table for this message (SCM_RIGHTS, with
                            // MSG_CMSG_CLOEXEC); nothing else refers to it, so
                            // owning it here closes it exactly once.
                            #[allow(unsafe_code)]
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
            }
            Ok((msg.bytes, fds))
        });
        match result {
            Ok((n, fds)) => {
                buf.filled_by(start, n);
                if self.fds.len() + fds.len() > MAX_QUEUED_FDS {
                    return Ok(Received::TooManyFds);
                }
                self.fds.extend(fds);
                Ok(Received::Bytes(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf.filled_by(start, 0);
                Ok(Received::Nothing)
            }
            Err(e) => {
                buf.filled_by(start, 0);
                Err(e)
            }
        }
    }

    async fn run(mut self) {
        let ending = self.serve().await;
        match ending {
            Ending::PeerClosed => tracing::debug!("peer closed the connection"),
            Ending::Refused => tracing::debug!("connection closed by hsmd"),
            Ending::Broken => tracing::debug!("connection broken"),
        }
        if ending != Ending::Broken {
            // Requests already handed to the pool are still answered.
            if let Some(audit) = &self.shared.audit {
                audit.write_pending();
            }
            while self.in_flight > 0 || !self.held.is_empty() {
                tokio::select! {
                    got = self.done_rx.recv() => {
                        let Some((id, answer, charge)) = got else { break };
                        self.in_flight -= 1;
                        self.deliver(id, answer, charge);
                    }
                    () = progressed(&mut self.progress), if !self.held.is_empty() => self.release(),
                }
                if !self.flush().await {
                    return;
                }
            }
            let _ = self.flush().await;
            let _ = self.stream.shutdown().await;
        }
    }

    async fn serve(&mut self) -> Ending {
        let limits = self.shared.limits.clone();
        let max_in_flight = limits.max_requests_in_flight as usize;
        let mut buf = InBuf::with_capacity(8 * 1024);
        let mut last_activity = Instant::now();
        // When the first byte of the frame now being received arrived.
        let mut frame_started: Option<Instant> = None;
        // Set while there is no room in the frame memory for the next frame.
        let mut waiter: Option<Waiter> = None;
        // One timer for the connection's life, moved only to an earlier
        // deadline: a later one (each request pushes the idle deadline on) is
        // taken up when the timer fires early, so a busy connection does not
        // arm and drop a timer per request.
        let timer = sleep_until(last_activity + limits.idle_timeout);
        tokio::pin!(timer);
        // Registered once: a fresh wait per pass would take the token's lock
        // twice for every request.
        let shutdown = self.shared.shutdown.clone().cancelled_owned();
        tokio::pin!(shutdown);
        loop {
            let mut blocked = false;
            // Whole frames left buffered when this turn ended.
            let mut turn_over = false;
            // When this turn's first frame was taken up; the clock is read only
            // when there is a frame to answer.
            let mut turn: Option<Instant> = None;
            // Answer the whole frames already buffered, while there is room in
            // flight, for one turn.
            while self.in_flight < max_in_flight {
                match frame::check(buf.filled(), limits.max_frame_bytes) {
                    Err(e) => {
                        tracing::warn!(error = %e, "refusing oversize frame");
                        self.push_error(
                            CONNECTION_ERROR_ID,
                            ErrorCode::FrameTooLarge,
                            format!("{e}; the connection is closed"),
                        );
                        return Ending::Refused;
                    }
                    Ok(FrameStatus::Incomplete { buffered_at_least }) => {
                        // Past the header the frame's length is known: it is
                        // charged before its buffer grows.
                        if buffered_at_least > HEADER_LEN && !self.charge_frame(buffered_at_least - HEADER_LEN) {
                            blocked = true;
                            break;
                        }
                        // The header was checked against the limit above, so this
                        // reservation is bounded by max_frame_bytes.
                        buf.make_room(buffered_at_least.saturating_sub(buf.len()));
                        break;
                    }
                    Ok(FrameStatus::Complete { body_len }) => {
                        match turn {
                            None => turn = Some(Instant::now()),
                            Some(t) if t.elapsed() >= TURN => {
                                turn_over = true;
                                break;
                            }
                            Some(_) => {}
                        }
                        if !self.charge_frame(body_len) {
                            blocked = true;
                            break;
                        }
                        self.handling_charge = self.frame_charge.take().unwrap_or(0);
                        let keep = self.handle_frame(&buf.filled()[HEADER_LEN..HEADER_LEN + body_len]);
                        // Unless a job took it, the answer is already made.
                        self.answered_charge += std::mem::take(&mut self.handling_charge);
                        // Zeroed as it goes: the frame may have carried a secret.
                        buf.consume(HEADER_LEN + body_len);
                        frame_started = None;
                        if !keep {
                            return Ending::Refused;
                        }
                    }
                }
            }
            if let Some(t) = turn {
                // The turn's start stands for its frames' arrival: the idle
                // timeout is counted in seconds, a turn in microseconds.
                last_activity = t;
            }
            if turn_over {
                // Answers gather while requests are left; the others' turn now.
                if self.out.len() >= WRITE_BATCH && !self.flush().await {
                    return Ending::Broken;
                }
                tokio::task::yield_now().await;
                continue;
            }
            if !self.held.is_empty() {
                // The lines of what was just answered, written together.
                if let Some(audit) = &self.shared.audit {
                    audit.write_pending();
                }
                self.release();
            }
            if !self.flush().await {
                return Ending::Broken;
            }
            if !blocked {
                waiter = None;
            } else if waiter.is_none() {
                // Registered before trying again, so that no release between
                // the failed try and the wait goes unseen.
                tracing::debug!(uid = self.caller.peer.creds.uid, "waiting for frame memory");
                self.shared.metrics.frame_memory_wait();
                waiter = Some(self.budget.waiter());
                continue;
            }
            // At the in-flight limit, or waiting for frame memory, the peer is
            // not read until answers go out. That wait is ours, so a partly
            // received frame is not timed meanwhile: its clock restarts when
            // reading resumes.
            let may_read = self.in_flight < max_in_flight && !blocked;
            if !may_read {
                frame_started = None;
            } else if !buf.is_empty() && frame_started.is_none() {
                frame_started = Some(Instant::now());
            }
            let (deadline, partial) = match frame_started {
                Some(t) => (t + limits.frame_timeout, true),
                None => (last_activity + limits.idle_timeout, false),
            };
            if timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    self.push_error(CONNECTION_ERROR_ID, ErrorCode::ShuttingDown,
                        "hsmd is shutting down; requests already sent are answered, no new ones are read");
                    return Ending::Refused;
                }
                Some((id, answer, charge)) = self.done_rx.recv() => {
                    self.in_flight -= 1;
                    self.deliver(id, answer, charge);
                    // Gather any others that are ready into the same write.
                    while self.out.len() < WRITE_BATCH {
                        let Ok((id, answer, charge)) = self.done_rx.try_recv() else { break };
                        self.in_flight -= 1;
                        self.deliver(id, answer, charge);
                    }
                    last_activity = Instant::now();
                }
                () = async { if let Some(w) = waiter.as_mut() { w.freed().await } }, if blocked => {}
                () = progressed(&mut self.progress), if !self.held.is_empty() => {
                    self.release();
                    last_activity = Instant::now();
                }
                () = &mut timer, if may_read => {
                    if Instant::now() < deadline {
                        timer.as_mut().reset(deadline);
                        continue;
                    }
                    if partial {
                        tracing::warn!(buffered = buf.len(), "frame not completed in time; closing");
                        self.push_error(CONNECTION_ERROR_ID, ErrorCode::FrameTimeout, format!(
                            "a frame was started but not completed within {}; the connection is closed",
                            humantime::format_duration(limits.frame_timeout)));
                        return Ending::Refused;
                    }
                    if self.in_flight > 0 || !self.held.is_empty() {
                        // Waiting on our own answers is not idleness.
                        last_activity = Instant::now();
                        continue;
                    }
                    tracing::debug!("idle timeout; closing");
                    self.push_error(CONNECTION_ERROR_ID, ErrorCode::IdleTimeout, format!(
                        "no request for {}; the connection is closed",
                        humantime::format_duration(limits.idle_timeout)));
                    return Ending::Refused;
                }
                ready = self.stream.readable(), if may_read => match ready.and_then(|()| self.receive(&mut buf)) {
                    Ok(Received::Bytes(0)) => {
                        if !buf.is_empty() {
                            tracing::warn!(buffered = buf.len(), "peer disconnected in the middle of a frame");
                        }
                        return Ending::PeerClosed;
                    }
                    Ok(Received::Bytes(_) | Received::Nothing) => {}
                    Ok(Received::TooManyFds) => {
                        tracing::warn!("peer sent more descriptors than requests to use them; closing");
                        self.push_error(CONNECTION_ERROR_ID, ErrorCode::ProtocolViolation, format!(
                            "more than {MAX_QUEUED_FDS} file descriptors were sent ahead of the requests that use them; \
                             the connection is closed"));
                        return Ending::Refused;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "read failed");
                        return Ending::Broken;
                    }
                },
            }
        }
    }

    /// Writes whatever responses are buffered; `false` if the peer is gone or
    /// has stopped reading for longer than the frame timeout.
    async fn flush(&mut self) -> bool {
        if self.out.is_empty() {
            self.release_answered();
            return true;
        }
        // Most answers fit the socket's buffer at once: only a write that
        // would wait needs a timer.
        let result = match self.stream.try_write(&self.out) {
            Ok(n) if n == self.out.len() => Ok(Ok(())),
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Ok(Err(e)),
            sent => {
                let rest = &self.out[sent.unwrap_or(0)..];
                timeout(self.shared.limits.frame_timeout, self.stream.write_all(rest)).await
            }
        };
        // Answers may carry plaintext: zeroed once written.
        wiped::clear(&mut self.out, 4 * WRITE_BATCH, WRITE_BATCH);
        match result {
            Ok(Ok(())) => {
                self.release_answered();
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                false
            }
            Err(_) => {
                tracing::warn!("peer stopped reading its responses; dropping the connection");
                false
            }
        }
    }

    /// Answers one frame; `false` means the connection must close.
    fn handle_frame(&mut self, body: &[u8]) -> bool {
        let request: Request = match codec::decode_body(body) {
            Ok(r) => r,
            Err(e) => {
                if let Some((id, variant)) = codec::peek_request_header(body).filter(|(_, v)| *v >= OPERATION_VARIANTS)
                {
                    tracing::warn!(request = id, variant, "unknown operation; closing");
                    self.push_error(
                        id,
                        ErrorCode::UnknownRequest,
                        format!(
                            "operation #{variant} is not known to hsmd {VERSION} (protocol {PROTOCOL_VERSION}); \
                         upgrade hsmd or use a client of the same version; the connection is closed"
                        ),
                    );
                } else {
                    tracing::warn!(error = %e, len = body.len(), "malformed frame; closing");
                    self.push_error(
                        CONNECTION_ERROR_ID,
                        ErrorCode::MalformedFrame,
                        format!("{e}; the connection is closed"),
                    );
                }
                return false;
            }
        };
        let Request { id, op } = request;
        if !self.greeted {
            return self.handshake(id, op);
        }
        if let Operation::Hello(_) = op {
            self.push_error(
                id,
                ErrorCode::ProtocolViolation,
                "hello was already exchanged on this connection; the connection is closed",
            );
            return false;
        }
        tracing::trace!(request = id, op = op.name(), "request");
        // The descriptor a request carries is taken before anything can refuse
        // it, so the next request's descriptor stays the next in line.
        let attached = if op.carries_fd() {
            let Some(fd) = self.fds.pop_front() else {
                self.push_error(
                    id,
                    ErrorCode::InvalidArgument,
                    format!(
                        "{} must carry a file descriptor sent with it (SCM_RIGHTS), and none came; \
                         use hsmctl or Client::call_with_fd",
                        op.name()
                    ),
                );
                return true;
            };
            Some(fd)
        } else {
            None
        };
        if let Err(wait) = self.rate.take(&self.shared, &self.caller, op.name()) {
            tracing::debug!(request = id, op = op.name(), "rate limited");
            self.push_error(
                id,
                ErrorCode::RateLimited,
                format!(
                    "{} is over its request rate; retry after {} ms",
                    self.caller.peer.describe(),
                    wait.as_millis().max(1)
                ),
            );
            return true;
        }
        let (job, own_thread) = match ops::route(op, &self.caller, &self.shared, attached) {
            Work::Done(answer) => {
                self.deliver(id, answer, 0);
                return true;
            }
            Work::Blocking(job) => (job, false),
            Work::Transfer(job) => (job, true),
            Work::Later(pending) => {
                self.in_flight += 1;
                let tx = self.done_tx.clone();
                let charge = std::mem::take(&mut self.handling_charge);
                let counted = InFlight::new(Arc::clone(&self.shared));
                pending.then(move |answer| {
                    drop(counted);
                    let _ = tx.send((id, answer, charge));
                });
                return true;
            }
        };
        self.in_flight += 1;
        let tx = self.done_tx.clone();
        // The job carries its frame's charge; it comes back with the answer.
        let charge = std::mem::take(&mut self.handling_charge);
        let counted = InFlight::new(Arc::clone(&self.shared));
        let span = tracing::Span::current();
        let run = move || {
            let _enter = span.enter();
            let answer = catch_unwind(AssertUnwindSafe(job)).unwrap_or_else(|_| {
                tracing::error!(request = id, "request handler panicked");
                Answer::from(Err(WireError::new(
                    ErrorCode::Internal,
                    "hsmd failed to serve this request; see its log",
                )))
            });
            drop(counted);
            let _ = tx.send((id, answer, charge));
        };
        if !own_thread {
            tokio::task::spawn_blocking(run);
        } else if let Err(e) = std::thread::Builder::new()
            .name("hsmd-transfer".into())
            .stack_size(crate::secure_mem::THREAD_STACK)
            .spawn(run)
        {
            // The closure (and the transfer's place in it) is gone with the error.
            tracing::error!(request = id, error = %e, "cannot start a transfer thread");
            self.in_flight -= 1;
            self.answered_charge += charge;
            self.push_error(
                id,
                ErrorCode::Busy,
                format!("hsmd cannot start a thread for this transfer now ({e}); retry shortly"),
            );
        }
        true
    }

    fn handshake(&mut self, id: u64, op: Operation) -> bool {
        let Operation::Hello(hello) = op else {
            self.push_error(
                id,
                ErrorCode::ProtocolViolation,
                format!(
                    "the first request must be hello, not {}; the connection is closed",
                    op.name()
                ),
            );
            return false;
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            tracing::warn!(client = ?hello.client, version = hello.protocol_version, "unsupported protocol version");
            self.push_error(
                id,
                ErrorCode::UnsupportedVersion,
                format!(
                    "client {:?} speaks protocol {}, hsmd {VERSION} speaks protocol {PROTOCOL_VERSION}; \
                 use a client built for this daemon; the connection is closed",
                    hello.client, hello.protocol_version
                ),
            );
            return false;
        }
        tracing::debug!(client = ?hello.client, "hello");
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
        encode(&Response { id, result: Ok(reply) }, &mut self.out);
        true
    }

    /// Queues an answer to be sent, or holds it until its audit line is
    /// written. Held answers are not counted in flight: the audit log's queue
    /// (`audit.buffer_events`) bounds them, and counting them would halve a
    /// pipelining client's depth.
    fn deliver(&mut self, id: u64, answer: Answer, charge: usize) {
        // Given back at the next write: a held answer's bytes are bounded by
        // the audit queue instead.
        self.answered_charge += charge;
        let Answer { result, audit } = answer;
        if let (Some(ticket), Some(a)) = (audit, &self.shared.audit) {
            match a.settle(ticket) {
                Settled::Pending => {
                    self.held.push((ticket, Response { id, result }));
                    return;
                }
                Settled::Failed(why) => {
                    tracing::error!(request = id, reason = %why, "answer withheld: its audit line could not be written");
                    let withheld = crate::audit::withheld(&why);
                    encode(
                        &Response {
                            id,
                            result: Err(withheld),
                        },
                        &mut self.out,
                    );
                    return;
                }
                Settled::Done => {}
            }
        }
        encode(&Response { id, result }, &mut self.out);
    }

    /// Sends the held answers whose audit lines are now written.
    fn release(&mut self) {
        let Some(rx) = self.progress.as_mut() else { return };
        let progress = rx.borrow_and_update().clone();
        let mut i = 0;
        while i < self.held.len() {
            let settled = progress.settle(self.held[i].0);
            if settled == Settled::Pending {
                i += 1;
                continue;
            }
            let (_, mut response) = self.held.swap_remove(i);
            if let Settled::Failed(why) = settled {
                tracing::error!(request = response.id, reason = %why, "answer withheld: its audit line could not be written");
                response.result = Err(crate::audit::withheld(&why));
            }
            encode(&response, &mut self.out);
        }
    }

    fn push_error(&mut self, id: u64, code: ErrorCode, message: impl Into<String>) {
        encode(
            &Response {
                id,
                result: Err(WireError::new(code, message)),
            },
            &mut self.out,
        );
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Answers never written (the peer left) may carry plaintext.
        wiped::clear(&mut self.out, 0, 0);
        // Jobs still running keep their bytes until they end, unaccounted:
        // at most max_requests_in_flight of them.
        self.budget.release(self.caller.peer.creds.uid, self.charged);
    }
}

/// Resolves when the audit writer publishes progress (never without an audit log).
async fn progressed(progress: &mut Option<watch::Receiver<Progress>>) {
    match progress {
        Some(rx) => {
            if rx.changed().await.is_err() {
                // The writer is gone: nothing more will be written.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
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
