//! One running helper as hsmd sees it: requests go out on its socket tagged
//! with an id, answers come back by id in any order.
//!
//! No thread of hsmd's own reads the answers. One of the callers waiting on
//! the helper reads for all of them (it *leads*) and hands each answer to the
//! caller it belongs to; when its own answer comes, it passes the lead to
//! another waiting caller. A lone request thus costs no hand-off between
//! threads in hsmd (the answer is read by the thread that asked), and under
//! load one read brings in several answers. A small watcher notices the end
//! of the helper while no one is waiting, so the next request already finds
//! its replacement on the way.
//!
//! A request sent from the reactor ([`Link::call_then`]) does not wait: its
//! answer goes to a callback. The first such request starts a reader task on
//! the reactor, which takes the lead once the thread leading hands it on and
//! keeps it for the helper's life: from then on the reactor reads every
//! answer as it arrives (one wake-up, no thread between the helper and the
//! connection), and callers on threads wait for theirs as followers do.

use std::{
    collections::{HashMap, VecDeque},
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::net::UnixStream,
    },
    process::{Child, ExitStatus},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        mpsc, Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::{io::unix::AsyncFd, sync::Notify};
use zeroize::Zeroize as _;

use super::{
    lock,
    wire::{self, Envelope, Failure, Reply, Request, Response, TokenSummary},
};

/// What the helper answered.
pub type Answer = Result<Reply, Failure>;

/// Why a request got no answer.
#[derive(Debug)]
pub enum Lost {
    /// It could not be written: the helper stopped reading.
    Unsent(std::io::Error),
    /// No answer came within the time given.
    TimedOut,
    /// The helper ended, or wrote something that is not an answer, before
    /// answering.
    Ended(String),
}

/// Where an answer sent with [`Link::call_then`] goes: called once, with
/// the answer or why none came, on the thread that read it (the reactor,
/// mostly), so it must not block.
pub type Then = Box<dyn FnOnce(Result<Answer, Lost>) + Send>;

/// At most this many requests may wait for answers when another is sent from
/// the reactor: the helper reads requests only while a worker is free, so
/// what waits sits in the socket, and the reactor must never find it full.
pub const MAX_UNANSWERED_FROM_REACTOR: u32 = 64;

/// Frames up to this size are written by the reactor itself when the socket
/// has room; larger ones by a thread.
const SEND_NOW_MAX: usize = 4096;

/// What a waiting caller is told.
enum Event {
    /// Its answer, read by the leader.
    Answer(Answer),
    /// The leader got its own answer: this caller reads from now on.
    Lead,
}

/// A caller waiting for its answer.
enum Waiter {
    /// A thread, blocked until its channel brings the answer or the lead.
    Thread(mpsc::SyncSender<Event>),
    /// A callback, for a request sent from the reactor.
    Then(Then),
}

/// The callers waiting for answers.
struct Waiting {
    callers: HashMap<u64, Waiter>,
    /// Some caller leads (or has been told to): at most one reads.
    led: bool,
    /// The reactor's reader, once started: the lead goes to it and stays.
    task: Option<Arc<Notify>>,
    /// When each callback stops waiting, earliest first (all wait as long).
    deadlines: VecDeque<(Instant, u64)>,
}

impl Waiting {
    /// Hands the lead to the reactor's reader if it runs, else to a waiting
    /// thread, or leaves the socket unread when no one waits (the next
    /// caller then leads).
    fn pass_lead(&mut self) {
        if let Some(task) = &self.task {
            task.notify_one();
            self.led = true;
            return;
        }
        let mut gone = Vec::new();
        let mut passed = false;
        for (id, waiter) in &self.callers {
            let Waiter::Thread(tx) = waiter else { continue };
            // A caller's channel holds one event, and a caller still in the
            // map has had none: a failure means it has returned.
            if tx.try_send(Event::Lead).is_ok() {
                passed = true;
                break;
            }
            gone.push(*id);
        }
        for id in gone {
            self.callers.remove(&id);
        }
        self.led = passed;
    }
}

/// A running helper process and the requests waiting on it.
pub struct Link {
    child: Mutex<Child>,
    /// The helper's process id.
    pub pid: u32,
    /// The token the helper opened.
    pub token: TokenSummary,
    writer: Mutex<BufWriter<UnixStream>>,
    /// Held by the leader alone.
    reader: Mutex<BufReader<UnixStream>>,
    waiting: Mutex<Waiting>,
    next_id: AtomicU64,
    alive: AtomicBool,
    /// Requests written to the helper whose callers still wait.
    unanswered: Arc<AtomicU32>,
    /// Whether the reactor's reader has been started.
    reading_on_reactor: AtomicBool,
    /// Wakes the reader when the first callback starts waiting.
    deadline_added: Arc<Notify>,
    /// The socket, for the reactor's reader to take when it starts.
    for_reactor: Mutex<Option<UnixStream>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("pid", &self.pid)
            .field("alive", &self.alive())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link over `stream` to the helper `child`, which has opened `token`.
    /// `on_end` runs once when the helper's end of the socket closes.
    ///
    /// # Errors
    /// The socket cannot be duplicated or the watcher cannot start.
    pub fn start(
        child: Child,
        stream: UnixStream,
        token: TokenSummary,
        on_end: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Arc<Self>> {
        let writer = BufWriter::new(stream.try_clone()?);
        let watched = stream.try_clone()?;
        let for_reactor = stream.try_clone()?;
        let link = Arc::new(Self {
            pid: child.id(),
            child: Mutex::new(child),
            token,
            writer: Mutex::new(writer),
            reader: Mutex::new(BufReader::new(stream)),
            waiting: Mutex::new(Waiting {
                callers: HashMap::new(),
                led: false,
                task: None,
                deadlines: VecDeque::new(),
            }),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            unanswered: Arc::new(AtomicU32::new(0)),
            reading_on_reactor: AtomicBool::new(false),
            deadline_added: Arc::new(Notify::new()),
            for_reactor: Mutex::new(Some(for_reactor)),
        });
        let weak = Arc::downgrade(&link);
        std::thread::Builder::new()
            .name("hsmd-pkcs11-watch".into())
            .spawn(move || {
                wait_for_hangup(&watched);
                if let Some(link) = weak.upgrade() {
                    link.alive.store(false, Ordering::SeqCst);
                }
                on_end();
            })?;
        Ok(link)
    }

    /// Whether the helper is still there (as far as hsmd knows).
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Requests written to the helper whose callers still wait for the
    /// answer: a token's backlog, shown by the metrics.
    pub fn unanswered(&self) -> u32 {
        self.unanswered.load(Ordering::Relaxed)
    }

    /// Ends the helper (hung, or the token went away): whatever waits on it
    /// fails, and the watcher calls for another.
    pub fn kill(&self) {
        self.alive.store(false, Ordering::SeqCst);
        let _ = lock(&self.child).kill();
    }

    /// Ends the helper and collects its exit status.
    ///
    /// # Errors
    /// `wait` failed.
    pub fn stop(&self) -> std::io::Result<ExitStatus> {
        self.kill();
        lock(&self.child).wait()
    }

    /// Sends `request` and waits up to `timeout` for its answer.
    ///
    /// # Errors
    /// Why no answer came; the caller decides whether the helper must go.
    pub fn call(&self, request: Request, timeout: Duration) -> Result<Answer, Lost> {
        let deadline = Instant::now() + timeout;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        let mut leads = {
            let mut w = lock(&self.waiting);
            w.callers.insert(id, Waiter::Thread(tx));
            !std::mem::replace(&mut w.led, true)
        };
        let sent = {
            let mut w = lock(&self.writer);
            wire::write_frame(&mut *w, &Envelope { id, request }).and_then(|()| w.flush())
        };
        if let Err(e) = sent {
            self.leave(id, leads);
            return Err(Lost::Unsent(e));
        }
        self.unanswered.fetch_add(1, Ordering::Relaxed);
        let _counted = Unanswered(&self.unanswered);
        loop {
            if leads {
                return self.lead(id, deadline);
            }
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Event::Answer(a)) => return Ok(a),
                Ok(Event::Lead) => leads = true,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // An event may have been sent since the wait ended: the
                    // map's lock settles it.
                    let mut w = lock(&self.waiting);
                    match rx.try_recv() {
                        Ok(Event::Answer(a)) => return Ok(a),
                        Ok(Event::Lead) => {
                            w.callers.remove(&id);
                            w.pass_lead();
                        }
                        Err(_) => {
                            w.callers.remove(&id);
                        }
                    }
                    return Err(Lost::TimedOut);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Lost::Ended(format!(
                        "the PKCS#11 helper (pid {}) exited during the operation",
                        self.pid
                    )))
                }
            }
        }
    }

    /// Takes `id` off the waiting list, passing the lead on if it had it.
    fn leave(&self, id: u64, leads: bool) {
        let mut w = lock(&self.waiting);
        w.callers.remove(&id);
        if leads {
            w.pass_lead();
        }
    }

    /// Reads answers, handing each to its caller, until `id`'s comes.
    fn lead(&self, id: u64, deadline: Instant) -> Result<Answer, Lost> {
        let mut reader = lock(&self.reader);
        loop {
            if reader.buffer().is_empty() {
                match readable(reader.get_ref(), deadline) {
                    Ok(true) => {}
                    Ok(false) => {
                        drop(reader);
                        self.leave(id, true);
                        return Err(Lost::TimedOut);
                    }
                    Err(e) => return Err(self.ended(&format!("cannot wait for the PKCS#11 helper: {e}"))),
                }
            }
            let response = match wire::read_frame::<Response>(&mut *reader) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return Err(self.ended(&format!(
                        "the PKCS#11 helper (pid {}) exited during the operation",
                        self.pid
                    )))
                }
                Err(e) => {
                    return Err(self.ended(&format!(
                        "the PKCS#11 helper (pid {}) answered with a bad frame ({e}); it is restarted",
                        self.pid
                    )))
                }
            };
            let mut w = lock(&self.waiting);
            let mut called = Vec::new();
            if response.id == id {
                w.callers.remove(&id);
                // Answers already read in are handed out before the lead
                // passes, sparing the next leader a wake-up for them.
                while buffered_frame(&reader) {
                    match wire::read_frame::<Response>(&mut *reader) {
                        Ok(Some(r)) => called.extend(deliver(&mut w, r)),
                        // The next leader meets the same error.
                        _ => break,
                    }
                }
                w.pass_lead();
                drop(w);
                drop(reader);
                call_back(called);
                return Ok(response.result);
            }
            // An id no one waits for belonged to a caller that gave up.
            called.extend(deliver(&mut w, response));
            drop(w);
            call_back(called);
            if Instant::now() >= deadline {
                drop(reader);
                self.leave(id, true);
                return Err(Lost::TimedOut);
            }
        }
    }

    /// The helper is gone: every waiting caller is told (a thread's channel
    /// closes, a callback is called).
    fn ended(&self, why: &str) -> Lost {
        self.alive.store(false, Ordering::SeqCst);
        let mut w = lock(&self.waiting);
        let callers = std::mem::take(&mut w.callers);
        w.led = false;
        w.deadlines.clear();
        if let Some(task) = &w.task {
            // A reader that never got the lead would otherwise wait on.
            task.notify_one();
        }
        drop(w);
        for waiter in callers.into_values() {
            if let Waiter::Then(then) = waiter {
                then(Err(Lost::Ended(why.to_owned())));
            }
        }
        Lost::Ended(why.to_owned())
    }

    /// Whether the reactor may send a request now ([`Link::call_then`]):
    /// inside a tokio runtime, with answers read there (started here on
    /// first use), and fewer than [`MAX_UNANSWERED_FROM_REACTOR`] requests
    /// waiting. Otherwise the request goes from a thread that may wait.
    pub fn takes_calls_from_reactor(self: &Arc<Self>) -> bool {
        if self.unanswered() >= MAX_UNANSWERED_FROM_REACTOR || !self.alive() {
            return false;
        }
        if self.reading_on_reactor.load(Ordering::Acquire) {
            return true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        match self.start_reader(&runtime) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the PKCS#11 helper's answers on the reactor; threads wait for them instead");
                false
            }
        }
    }

    /// Sends `request` without waiting: `then` gets the answer, or why none
    /// came within `timeout`. For the reactor, after
    /// [`Link::takes_calls_from_reactor`] said yes: the request is written
    /// only if that cannot block (the writer is free and the socket has
    /// room), else a thread of the blocking pool writes it, so a hung helper
    /// whose socket has filled up never stalls the reactor.
    pub fn call_then(self: &Arc<Self>, request: Request, timeout: Duration, then: Then) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let counted = Arc::clone(&self.unanswered);
        counted.fetch_add(1, Ordering::Relaxed);
        let then: Then = Box::new(move |answer| {
            counted.fetch_sub(1, Ordering::Relaxed);
            then(answer);
        });
        {
            let mut w = lock(&self.waiting);
            w.callers.insert(id, Waiter::Then(then));
            if w.deadlines.is_empty() {
                self.deadline_added.notify_one();
            }
            w.deadlines.push_back((Instant::now() + timeout, id));
        }
        // Requests carry plaintext: the frame is wiped once written.
        let mut frame = zeroize::Zeroizing::new(Vec::new());
        let envelope = Envelope { id, request };
        if let Err(e) = protocol::codec::encode_frame_into(&envelope, wire::MAX_FRAME, &mut frame) {
            return self.fail(id, Lost::Unsent(std::io::Error::other(e)));
        }
        drop(envelope);
        match self.send_now(&frame) {
            Ok(true) => {}
            Ok(false) => {
                let link = Arc::clone(self);
                let write = move || {
                    let sent = {
                        let mut w = lock(&link.writer);
                        w.write_all(&frame).and_then(|()| w.flush())
                    };
                    if let Err(e) = sent {
                        link.fail(id, Lost::Unsent(e));
                    }
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => drop(rt.spawn_blocking(write)),
                    Err(_) => write(),
                }
            }
            Err(e) => self.fail(id, Lost::Unsent(e)),
        }
    }

    /// Writes `frame` if that cannot block: `Ok(false)` when another writer
    /// holds the socket or it has no room now (nothing was written).
    fn send_now(&self, frame: &[u8]) -> std::io::Result<bool> {
        let mut w = match self.writer.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
        };
        if !w.buffer().is_empty() || frame.len() > SEND_NOW_MAX {
            // A writer's flush failed (the next blocking write meets it), or
            // the frame is large enough to go in parts.
            return Ok(false);
        }
        let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
        match nix::sys::socket::send(w.get_ref().as_raw_fd(), frame, flags) {
            Ok(n) if n == frame.len() => Ok(true),
            // A frame this small goes whole or not at all (Linux splits a
            // write into parts of about 32 KiB); should a part go, the rest
            // must follow before any other frame, so it is written here.
            Ok(n) => w.write_all(&frame[n..]).and_then(|()| w.flush()).map(|()| true),
            Err(nix::errno::Errno::EAGAIN) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Fails the callback waiting for `id`, if it still waits.
    fn fail(&self, id: u64, why: Lost) {
        let waiter = lock(&self.waiting).callers.remove(&id);
        if let Some(Waiter::Then(then)) = waiter {
            then(Err(why));
        }
    }

    /// Starts the task that reads answers on the reactor (once).
    fn start_reader(self: &Arc<Self>, runtime: &tokio::runtime::Handle) -> std::io::Result<()> {
        let _entered = runtime.enter();
        let Some(stream) = lock(&self.for_reactor).take() else {
            // Another request is starting it.
            return Ok(());
        };
        // Registered with the reactor as it is: the socket stays blocking for
        // the threads, and the reader never waits in a read (MSG_DONTWAIT).
        // SAFETY: the AsyncFd owns the stream, so its descriptor stays open
        // and names the same socket for the AsyncFd's whole life.
        #[allow(unsafe_code)]
        let fd = unsafe { AsyncFd::register_with_interest(stream, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        self.reading_on_reactor.store(true, Ordering::Release);
        let lead = Arc::new(Notify::new());
        {
            let mut w = lock(&self.waiting);
            w.task = Some(Arc::clone(&lead));
            if !std::mem::replace(&mut w.led, true) {
                lead.notify_one();
            }
        }
        runtime.spawn(read_on_reactor(
            Arc::downgrade(self),
            fd,
            lead,
            Arc::clone(&self.deadline_added),
        ));
        Ok(())
    }

    /// Fails the callbacks whose time is up; returns when the next one's is.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut expired = Vec::new();
        let next = {
            let mut w = lock(&self.waiting);
            while let Some(&(at, id)) = w.deadlines.front() {
                if at > now {
                    break;
                }
                w.deadlines.pop_front();
                if let Some(Waiter::Then(then)) = w.callers.remove(&id) {
                    expired.push(then);
                }
            }
            w.deadlines.front().map(|(at, _)| *at)
        };
        for then in expired {
            then(Err(Lost::TimedOut));
        }
        next
    }

    /// Hands out the whole frames at the start of `buf` and removes them;
    /// `Err` when the helper wrote something that is not an answer.
    fn deliver_buffered(&self, buf: &mut Vec<u8>) -> Result<(), String> {
        let mut at = 0;
        let mut called = Vec::new();
        let mut bad = None;
        {
            let mut w = lock(&self.waiting);
            while buf.len() - at >= 4 {
                let len = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
                if len > wire::MAX_FRAME {
                    bad = Some(format!(
                        "a frame of {len} bytes is over the limit of {}",
                        wire::MAX_FRAME
                    ));
                    break;
                }
                let end = at + 4 + len as usize;
                if buf.len() < end {
                    break;
                }
                match protocol::codec::decode_body::<Response>(&buf[at + 4..end]) {
                    Ok(r) => called.extend(deliver(&mut w, r)),
                    Err(e) => {
                        bad = Some(e.to_string());
                        break;
                    }
                }
                at = end;
            }
        }
        call_back(called);
        // Answers may carry plaintext: what was read is wiped as it goes.
        let left = buf.len() - at;
        buf.copy_within(at.., 0);
        buf[left..].zeroize();
        buf.truncate(left);
        bad.map_or(Ok(()), Err)
    }
}

/// Reads the helper's answers on the reactor once it is handed the lead,
/// and fails callbacks whose time is up, until the helper ends.
async fn read_on_reactor(link: Weak<Link>, fd: AsyncFd<UnixStream>, lead: Arc<Notify>, added: Arc<Notify>) {
    let mut leading = false;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut next: Option<Instant> = None;
    loop {
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = lead.notified(), if !leading => {
                let Some(me) = link.upgrade() else { return };
                leading = true;
                // What the last thread to lead read ahead is ours now.
                let mut reader = lock(&me.reader);
                let ahead = reader.buffer().len();
                append_wiped(&mut buf, reader.buffer());
                reader.consume(ahead);
                drop(reader);
                if let Err(why) = me.deliver_buffered(&mut buf) {
                    me.ended(&format!("the PKCS#11 helper (pid {}) answered with a bad frame ({why}); it is restarted", me.pid));
                    return;
                }
            }
            ready = fd.readable(), if leading => {
                let Some(me) = link.upgrade() else { return };
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => {
                        me.ended(&format!("cannot wait for the PKCS#11 helper: {e}"));
                        return;
                    }
                };
                let read = guard.try_io(|s| {
                    nix::sys::socket::recv(s.as_raw_fd(), &mut chunk, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
                        .map_err(std::io::Error::from)
                });
                let Ok(read) = read else {
                    // Nothing after all: readiness is cleared, wait again.
                    continue;
                };
                match read {
                    Ok(0) => {
                        me.ended(&format!("the PKCS#11 helper (pid {}) exited during the operation", me.pid));
                        return;
                    }
                    Ok(n) => {
                        append_wiped(&mut buf, &chunk[..n]);
                        chunk[..n].zeroize();
                        if let Err(why) = me.deliver_buffered(&mut buf) {
                            me.ended(&format!("the PKCS#11 helper (pid {}) answered with a bad frame ({why}); it is restarted", me.pid));
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        me.ended(&format!("cannot read from the PKCS#11 helper: {e}"));
                        return;
                    }
                }
            }
            () = sleep => {}
            () = added.notified() => {}
        }
        let Some(me) = link.upgrade() else { return };
        if !me.alive() && lock(&me.waiting).callers.is_empty() {
            return;
        }
        next = me.expire(Instant::now());
    }
}

/// Appends `more` to `buf`; when `buf` must grow, the old allocation is
/// wiped before it is freed (answers may carry plaintext). A buffer grown for
/// a large answer is given back once it is empty.
fn append_wiped(buf: &mut Vec<u8>, more: &[u8]) {
    const KEPT: usize = 64 * 1024;
    if buf.is_empty() && buf.capacity() > KEPT && more.len() <= KEPT {
        *buf = Vec::with_capacity(KEPT);
    }
    if buf.capacity() - buf.len() < more.len() {
        let mut grown = Vec::with_capacity((buf.len() + more.len()).max(2 * buf.capacity()));
        grown.extend_from_slice(buf);
        buf.zeroize();
        *buf = grown;
    }
    buf.extend_from_slice(more);
}

/// Runs the callbacks of answers delivered under the waiting list's lock,
/// after it is released.
fn call_back(called: Vec<(Then, Answer)>) {
    for (then, answer) in called {
        then(Ok(answer));
    }
}

/// Takes a request off the count of unanswered ones however its call ends.
struct Unanswered<'a>(&'a AtomicU32);

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Gives `response` to the thread that waits for it, or returns it with
/// the callback to call once the waiting list is unlocked.
fn deliver(w: &mut Waiting, response: Response) -> Option<(Then, Answer)> {
    match w.callers.remove(&response.id)? {
        Waiter::Thread(tx) => {
            let _ = tx.try_send(Event::Answer(response.result));
            None
        }
        Waiter::Then(then) => Some((then, response.result)),
    }
}

/// Whether the reader's buffer holds a whole frame (length and body).
fn buffered_frame(reader: &BufReader<UnixStream>) -> bool {
    let b = reader.buffer();
    b.len() >= 4 && b.len() - 4 >= u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

/// Waits until `stream` can be read (or its peer closed it) or `deadline`
/// passes; `Ok(false)` on the deadline.
fn readable(stream: &UnixStream, deadline: Instant) -> std::io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) if left.is_zero() => return Ok(false),
            Ok(0) => {}
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Returns when the helper's end of the socket is closed. Asks for no event:
/// a hangup (or error) is reported anyway, and answers arriving do not wake
/// it.
fn wait_for_hangup(stream: &UnixStream) {
    loop {
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::empty())];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => {}
            Ok(0) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufReader, Write as _},
        os::unix::net::UnixStream,
        process::Command,
        sync::{mpsc, Arc},
        time::{Duration, Instant},
    };

    use super::{Answer, Link, Lost};
    use crate::backend::pkcs11::wire::{self, Envelope, Reply, Request, Response, TokenSummary};

    fn token() -> TokenSummary {
        TokenSummary {
            label: "t".into(),
            serial: "1".into(),
            manufacturer: "m".into(),
            model: "x".into(),
            key_types: Vec::new(),
            sessions: 1,
        }
    }

    /// A request whose answer says which caller sent it.
    fn ask(n: u32) -> Request {
        Request::Destroy {
            id: n.to_be_bytes().to_vec(),
        }
    }

    /// Plays the helper: answers what has come in, newest first, whenever
    /// nothing more arrives for a moment; never answers a request for id
    /// `u32::MAX`; closes the socket when told to.
    fn fake_helper(theirs: UnixStream, close: mpsc::Receiver<()>) {
        std::thread::spawn(move || {
            theirs.set_read_timeout(Some(Duration::from_micros(300))).unwrap();
            let mut out = theirs.try_clone().unwrap();
            let mut reader = BufReader::new(theirs);
            let mut held: Vec<Envelope> = Vec::new();
            loop {
                if close.try_recv().is_ok() {
                    return;
                }
                match wire::read_frame::<Envelope>(&mut reader) {
                    Ok(Some(e)) => held.push(e),
                    Ok(None) => return,
                    Err(_) => {
                        for e in held.drain(..).rev() {
                            let Request::Destroy { id } = e.request else { continue };
                            let n = u32::from_be_bytes(id.try_into().unwrap());
                            if n == u32::MAX {
                                continue;
                            }
                            let r = Response {
                                id: e.id,
                                result: Ok(Reply::Destroyed(n)),
                            };
                            wire::write_frame(&mut out, &r).unwrap();
                        }
                        out.flush().unwrap();
                    }
                }
            }
        });
    }

    fn link() -> (Arc<Link>, mpsc::Sender<()>, mpsc::Receiver<()>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (close_tx, close_rx) = mpsc::channel();
        fake_helper(theirs, close_rx);
        let child = Command::new("sleep").arg("120").spawn().unwrap();
        let (ended_tx, ended_rx) = mpsc::channel();
        let link = Link::start(child, ours, token(), move || {
            let _ = ended_tx.send(());
        })
        .unwrap();
        (link, close_tx, ended_rx)
    }

    #[test]
    fn answers_out_of_order_reach_the_callers_that_asked_whoever_reads_them() {
        let (link, _close, _) = link();
        let threads: Vec<_> = (0..8u32)
            .map(|t| {
                let link = Arc::clone(&link);
                std::thread::spawn(move || {
                    for i in 0..300 {
                        let n = t * 1000 + i;
                        match link.call(ask(n), Duration::from_secs(10)) {
                            Ok(Ok(Reply::Destroyed(got))) => assert_eq!(got, n),
                            other => panic!("caller {n}: {other:?}"),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        link.stop().unwrap();
    }

    #[test]
    fn a_caller_never_answered_times_out_alone_and_the_others_go_on() {
        let (link, _close, _) = link();
        let stuck = {
            let link = Arc::clone(&link);
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = link.call(ask(u32::MAX), Duration::from_millis(300));
                (r, t.elapsed())
            })
        };
        // The others run before, during and after its wait (it may lead).
        let others: Vec<_> = (0..4u32)
            .map(|t| {
                let link = Arc::clone(&link);
                std::thread::spawn(move || {
                    let end = Instant::now() + Duration::from_millis(700);
                    let mut n = 0;
                    while Instant::now() < end {
                        let r = link.call(ask(t), Duration::from_secs(10));
                        assert!(matches!(r, Ok(Ok(Reply::Destroyed(got))) if got == t), "{r:?}");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let (r, waited) = stuck.join().unwrap();
        assert!(matches!(r, Err(Lost::TimedOut)), "{r:?}");
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        for t in others {
            assert!(t.join().unwrap() > 10);
        }
        assert!(link.alive());
        link.stop().unwrap();
    }

    /// Sends `ask(n)` from the reactor; its answer (or why none came) goes
    /// to `tx` with `n`.
    fn send_then(link: &Arc<Link>, n: u32, timeout: Duration, tx: &mpsc::Sender<(u32, Result<Answer, Lost>)>) {
        assert!(link.takes_calls_from_reactor(), "a runtime is running");
        let tx = tx.clone();
        link.call_then(
            ask(n),
            timeout,
            Box::new(move |answer| {
                let _ = tx.send((n, answer));
            }),
        );
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn answers_read_on_the_reactor_reach_callbacks_and_waiting_threads_alike() {
        let (link, _close, _) = link();
        let rt = runtime();
        // Outside a runtime the reactor's path is refused: a thread must wait.
        assert!(!link.takes_calls_from_reactor());
        // A thread leads when the reactor starts: it reads for everyone
        // until its own wait ends (no answer ever comes for it), then the
        // lead passes to the reactor.
        let stuck = {
            let link = Arc::clone(&link);
            std::thread::spawn(move || link.call(ask(u32::MAX), Duration::from_millis(400)))
        };
        while link.unanswered() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let link = Arc::clone(&link);
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let n = 100_000 + t * 1000 + i;
                        match link.call(ask(n), Duration::from_secs(10)) {
                            Ok(Ok(Reply::Destroyed(got))) => assert_eq!(got, n),
                            other => panic!("thread caller {n}: {other:?}"),
                        }
                    }
                })
            })
            .collect();
        let (tx, rx) = mpsc::channel();
        let start = Instant::now();
        let sent = rt.block_on(async {
            let mut n = 0;
            // Before, while and after the thread leads.
            while start.elapsed() < Duration::from_millis(1200) {
                // Within the limit of requests in flight from the reactor.
                while link.unanswered() >= super::MAX_UNANSWERED_FROM_REACTOR - 8 {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                send_then(&link, n, Duration::from_secs(10), &tx);
                n += 1;
                if n % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            n
        });
        assert!(matches!(stuck.join().unwrap(), Err(Lost::TimedOut)));
        let mut got = Vec::new();
        for _ in 0..sent {
            let (n, answer) = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("every callback is called");
            match answer {
                Ok(Ok(Reply::Destroyed(m))) => assert_eq!(m, n, "the answer went to the callback that asked"),
                other => panic!("callback {n}: {other:?}"),
            }
            got.push(n);
        }
        got.sort_unstable();
        assert_eq!(got, (0..sent).collect::<Vec<_>>(), "each callback exactly once");
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(link.unanswered(), 0);
        link.stop().unwrap();
    }

    #[test]
    fn a_callback_never_answered_times_out_and_the_helper_ending_fails_the_rest() {
        let (link, close, ended) = link();
        let rt = runtime();
        let (tx, rx) = mpsc::channel();
        let t = Instant::now();
        rt.block_on(async {
            send_then(&link, u32::MAX, Duration::from_millis(300), &tx);
            send_then(&link, 7, Duration::from_secs(10), &tx);
        });
        let (n, answer) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(n, 7);
        assert!(matches!(answer, Ok(Ok(Reply::Destroyed(7)))), "{answer:?}");
        let (n, answer) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(n, u32::MAX);
        assert!(matches!(answer, Err(Lost::TimedOut)), "{answer:?}");
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        assert!(link.alive());

        // Waiting callbacks are told when the helper ends.
        rt.block_on(async {
            for _ in 0..3 {
                send_then(&link, u32::MAX, Duration::from_secs(20), &tx);
            }
        });
        close.send(()).unwrap();
        for _ in 0..3 {
            let (_, answer) = rx.recv_timeout(Duration::from_secs(5)).expect("told");
            assert!(matches!(answer, Err(Lost::Ended(_))), "{answer:?}");
        }
        ended
            .recv_timeout(Duration::from_secs(5))
            .expect("the watcher saw the end");
        assert!(!link.alive());
        assert!(rt.block_on(async { !link.takes_calls_from_reactor() }));
    }

    #[test]
    fn a_helper_that_stops_reading_never_blocks_the_reactor_when_its_socket_fills() {
        // A peer that never reads: the socket fills and stays full.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let child = Command::new("sleep").arg("120").spawn().unwrap();
        let link = Link::start(child, ours, token(), || {}).unwrap();
        let rt = runtime();
        let (tx, rx) = mpsc::channel();
        // 400 KiB of requests, more than the socket holds.
        let (done_tx, done_rx) = mpsc::channel();
        {
            let link = Arc::clone(&link);
            let handle = rt.handle().clone();
            std::thread::spawn(move || {
                handle.block_on(async {
                    assert!(link.takes_calls_from_reactor());
                    for n in 0..400u32 {
                        let tx = tx.clone();
                        let request = Request::Destroy {
                            id: vec![n as u8; 1000],
                        };
                        link.call_then(
                            request,
                            Duration::from_secs(30),
                            Box::new(move |answer| {
                                let _ = tx.send((n, answer));
                            }),
                        );
                    }
                });
                done_tx.send(()).unwrap();
            });
        }
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the reactor sent every request without waiting for room");
        assert_eq!(link.unanswered(), 400);
        // The peer goes: the writes waiting for room fail, and the rest end.
        drop(theirs);
        for _ in 0..400 {
            let (_, answer) = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("every callback is told");
            assert!(matches!(answer, Err(Lost::Unsent(_) | Lost::Ended(_))), "{answer:?}");
        }
        link.stop().unwrap();
    }

    #[test]
    fn the_helper_ending_fails_every_waiting_caller_and_is_noticed_with_no_one_waiting() {
        let (link, close, ended) = link();
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let link = Arc::clone(&link);
                std::thread::spawn(move || link.call(ask(u32::MAX), Duration::from_secs(20)))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        close.send(()).unwrap();
        for w in waiting {
            let r = w.join().unwrap();
            assert!(matches!(r, Err(Lost::Ended(_))), "{r:?}");
        }
        ended
            .recv_timeout(Duration::from_secs(5))
            .expect("the watcher saw the end");
        assert!(!link.alive());
        assert!(matches!(
            link.call(ask(1), Duration::from_secs(1)),
            Err(Lost::Unsent(_) | Lost::Ended(_))
        ));

        // With no call in flight, the end is noticed all the same.
        let (link, close, ended) = self::link();
        assert!(matches!(
            link.call(ask(5), Duration::from_secs(5)),
            Ok(Ok(Reply::Destroyed(5)))
        ));
        close.send(()).unwrap();
        // The fake notices the order at its next read timeout.
        ended
            .recv_timeout(Duration::from_secs(5))
            .expect("the watcher saw the end");
        assert!(!link.alive());
    }
}
