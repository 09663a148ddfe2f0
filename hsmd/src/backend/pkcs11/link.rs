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

use std::{
    collections::HashMap,
    io::{BufReader, BufWriter, Write as _},
    os::{fd::AsFd as _, unix::net::UnixStream},
    process::{Child, ExitStatus},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

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

/// What a waiting caller is told.
enum Event {
    /// Its answer, read by the leader.
    Answer(Answer),
    /// The leader got its own answer: this caller reads from now on.
    Lead,
}

/// The callers waiting for answers.
struct Waiting {
    callers: HashMap<u64, mpsc::SyncSender<Event>>,
    /// Some caller leads (or has been told to): at most one reads.
    led: bool,
}

impl Waiting {
    /// Hands the lead to a waiting caller, or leaves the socket unread when
    /// no one waits (the next caller then leads).
    fn pass_lead(&mut self) {
        let mut gone = Vec::new();
        let mut passed = false;
        for (id, tx) in &self.callers {
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
    unanswered: AtomicU32,
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
        let link = Arc::new(Self {
            pid: child.id(),
            child: Mutex::new(child),
            token,
            writer: Mutex::new(writer),
            reader: Mutex::new(BufReader::new(stream)),
            waiting: Mutex::new(Waiting {
                callers: HashMap::new(),
                led: false,
            }),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            unanswered: AtomicU32::new(0),
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
            w.callers.insert(id, tx);
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
            if response.id == id {
                w.callers.remove(&id);
                // Answers already read in are handed out before the lead
                // passes, sparing the next leader a wake-up for them.
                while buffered_frame(&reader) {
                    match wire::read_frame::<Response>(&mut *reader) {
                        Ok(Some(r)) => deliver(&mut w, r),
                        // The next leader meets the same error.
                        _ => break,
                    }
                }
                w.pass_lead();
                return Ok(response.result);
            }
            // An id no one waits for belonged to a caller that gave up.
            deliver(&mut w, response);
            drop(w);
            if Instant::now() >= deadline {
                drop(reader);
                self.leave(id, true);
                return Err(Lost::TimedOut);
            }
        }
    }

    /// The helper is gone: every waiting caller is told (its channel closes).
    fn ended(&self, why: &str) -> Lost {
        self.alive.store(false, Ordering::SeqCst);
        let mut w = lock(&self.waiting);
        w.callers.clear();
        w.led = false;
        Lost::Ended(why.to_owned())
    }
}

/// Takes a request off the count of unanswered ones however its call ends.
struct Unanswered<'a>(&'a AtomicU32);

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn deliver(w: &mut Waiting, response: Response) {
    if let Some(tx) = w.callers.remove(&response.id) {
        let _ = tx.try_send(Event::Answer(response.result));
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

    use super::{Link, Lost};
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
