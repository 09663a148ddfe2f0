//! The audit writer: one thread that turns queued events into lines, writes
//! them in batches (a group commit: whatever queued while one batch was being
//! written goes into the next), syncs, records the anchors, rotates, and
//! suspends audited service while lines cannot be written.
//!
//! Requests wait for their line, not for each other: an answer goes out once
//! the [`Progress`] the writer publishes covers its [`Ticket`].

use crate::audit::EventType;
use std::{
    collections::{BTreeMap, VecDeque},
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use protocol::{ErrorCode, WireError};
use tokio::sync::watch;

use super::{
    line, recovery, run_id,
    verify::{self, Broken, Snapshot, Verified},
    AnchorStore, Class, Event, Head, Meta, Outcome, Settings, Start,
};

/// Disk space kept allocated past the end of the current file, so the lines
/// of requests already under way can still be written when the disk fills.
const RESERVE: u64 = 512 * 1024;
/// Below this much free space the disk counts as full: new audited requests
/// are refused while the reserve still takes the lines of those under way.
const LOW_SPACE: u64 = 64 * 1024;
/// How often a suspended writer tries again.
const RETRY: Duration = Duration::from_millis(250);
/// How often the file's identity and the free space are looked at (a
/// removed log and a full disk are noticed within this long; the space
/// reserved past the end covers what is written meanwhile).
const CHECK_EVERY: Duration = Duration::from_millis(50);
/// The most queued lines a request's own thread writes itself; more go to
/// the writer thread, which renders them on another core.
const INLINE_BATCH: usize = 16;
/// Rotated files are looked for up to this number (the most `audit.keep_files`
/// allows), so lowering it leaves no file unaccounted for.
const MAX_ROTATED: u32 = 1000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How far the writer has got, as it publishes it. Event numbers (`idx`)
/// count events as they were queued, from 1.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Every event up to this one is written to the file.
    pub written: u64,
    /// …and up to this one synced to disk.
    pub synced: u64,
    /// Every event up to this one that is not yet written failed to be.
    pub failed: u64,
    /// Why they failed.
    pub reason: Option<Arc<str>>,
}

/// What an answer waits for: its event's line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    idx: u64,
    synced: bool,
    required: bool,
}

impl Ticket {
    /// A ticket that is settled when both are: for an answer that covers
    /// several lines (a batch). Lines are written in the order they were queued.
    #[must_use]
    pub fn join(self, other: Self) -> Self {
        Self {
            idx: self.idx.max(other.idx),
            synced: self.synced || other.synced,
            required: self.required || other.required,
        }
    }
}

/// Where a [`Ticket`] stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The line is not written yet.
    Pending,
    /// The line is written (and synced, if that was asked), or it did not
    /// have to be for the answer to go out.
    Done,
    /// The line could not be written: the answer must be withheld.
    Failed(Arc<str>),
}

impl Progress {
    /// Where `t` stands.
    #[must_use]
    pub fn settle(&self, t: Ticket) -> Settled {
        let done = if t.synced { self.synced } else { self.written };
        if done >= t.idx {
            Settled::Done
        } else if self.failed >= t.idx {
            if t.required {
                Settled::Failed(
                    self.reason
                        .clone()
                        .unwrap_or_else(|| Arc::from("the audit log cannot be written")),
                )
            } else {
                Settled::Done
            }
        } else {
            Settled::Pending
        }
    }
}

/// The audit log's health, for `hsmctl status` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Whether audited requests are served.
    pub healthy: bool,
    /// Why not, and since when.
    pub detail: String,
    /// Events waiting to be written.
    pub pending: usize,
    /// The last sequence number written.
    pub last_seq: u64,
}

struct Queued {
    /// 0 for the writer's own events, which nobody waits for.
    idx: u64,
    event: Event,
    class: Class,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Queued>,
    next_idx: u64,
    closing: bool,
    /// Lines were written by a request's own thread that must be synced (a
    /// security event) or rotated: the writer thread does that.
    sync_wanted: bool,
}

/// Why audited requests are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// Lines cannot be written, synced or anchored.
    Fault,
    /// The queue is full: the disk is slower than the requests.
    Behind,
}

#[derive(Debug)]
struct Suspension {
    cause: Cause,
    since: SystemTime,
    reason: Arc<str>,
    refused: u64,
    held: u64,
    dropped: BTreeMap<&'static str, u64>,
}

impl Suspension {
    fn new(cause: Cause, reason: Arc<str>) -> Self {
        Self {
            cause,
            since: SystemTime::now(),
            reason,
            refused: 0,
            held: 0,
            dropped: BTreeMap::new(),
        }
    }
}

/// The current file and the chain, as the writer keeps them.
struct FileState {
    /// Shared so the writer can sync it without holding the lock.
    file: Option<Arc<File>>,
    /// (device, inode) of `file`, to notice it being removed or replaced.
    ident: Option<(u64, u64)>,
    /// Bytes of whole lines in `file`.
    size: u64,
    /// Where the disk space allocated for the file ends.
    reserved_to: u64,
    /// Whether the file system can reserve space (`fallocate`).
    can_reserve: bool,
    head: Head,
    start: Start,
    /// What the keystore records.
    stored: Option<(Head, Start)>,
    written_idx: u64,
    synced_idx: u64,
    /// Bytes written since the last sync.
    unsynced: bool,
    last_sync: Instant,
    /// The file was found removed or replaced; say so in the log once it is
    /// open again.
    lost: bool,
    /// When the file's identity and the free space were last looked at.
    checked: Option<Instant>,
    /// Bumped when the log is replaced under the writer (a restore): a sync
    /// planned before must not record its head in the keystore after.
    generation: u64,
    /// The buffer a cycle renders its lines into, kept for the next one: a
    /// busy log would otherwise allocate it, grow it and give it back to the
    /// system every cycle. Audit lines carry no secret.
    render: Vec<u8>,
}

/// The most render buffer kept between cycles; a larger one (a burst) is
/// given back.
const KEEP_RENDER: usize = 1 << 20;

struct Inner {
    settings: Settings,
    run: String,
    anchors: Arc<dyn AnchorStore>,
    queue: Mutex<Queue>,
    wake: Condvar,
    file: Mutex<FileState>,
    progress: Mutex<Progress>,
    settled: Condvar,
    /// Threads waiting on `settled` (a notification with none costs a syscall).
    waiting: AtomicUsize,
    progress_tx: watch::Sender<Progress>,
    suspended: AtomicBool,
    suspension: Mutex<Option<Suspension>>,
    queued: AtomicUsize,
    last_seq: AtomicU64,
    refused_total: AtomicU64,
    dropped_total: AtomicU64,
    /// Tests: every write stops after this many bytes with "no space left
    /// on device", as a full disk makes it, until set back to 0.
    #[cfg(test)]
    short_write: AtomicUsize,
}

/// What a backup copies of the audit log: see [`Auditor::backup_snapshot`].
#[derive(Debug)]
pub struct BackupSnapshot {
    /// Each file's name (no directory), open, and the length to copy.
    pub files: Vec<(String, File, u64)>,
    /// The chain's last line in the copy.
    pub head: super::Head,
    /// Where the retained log begins.
    pub start: super::Start,
}

/// The daemon's audit log (see the module's documentation).
pub struct Auditor {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("path", &self.inner.settings.path)
            .finish_non_exhaustive()
    }
}

/// Says what an I/O error means for the log at `path`, in words an operator
/// acts on.
fn describe(e: &io::Error, doing: &str, path: &Path) -> String {
    let dir = path.parent().unwrap_or(Path::new("/")).display();
    match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
            format!("no space left on device in {dir} ({doing} {})", path.display())
        }
        io::ErrorKind::ReadOnlyFilesystem => {
            format!("the file system of {dir} is read-only ({doing} {})", path.display())
        }
        io::ErrorKind::NotFound => format!("{dir} is gone ({doing} {})", path.display()),
        _ => format!("{doing} {}: {e}", path.display()),
    }
}

fn open_current(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// Reads the log back against the keystore's anchors (repairing what a
/// crash left) and opens its current file, synced: the lines read back are
/// the chain's from then on, durable before the keystore may point at them.
fn read_back(settings: &Settings, anchors: &dyn AnchorStore) -> io::Result<(recovery::Recovered, File, (u64, u64))> {
    let recorded = anchors.load().map_err(io::Error::other)?;
    let recovered = recovery::recover(settings, &recorded)?;
    let file = open_current(&settings.path)?;
    let meta = file.metadata()?;
    file.sync_data()?;
    Ok((recovered, file, ident(&meta)))
}

fn ident(meta: &fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

impl Auditor {
    /// Opens the log: reads it back against the keystore's anchors, repairs
    /// what a crash left (recording it), and starts the writer.
    ///
    /// # Errors
    /// The anchors or the files cannot be read, or the file cannot be opened.
    pub fn open(settings: Settings, anchors: Arc<dyn AnchorStore>) -> io::Result<Self> {
        let (recovered, file, file_ident) = read_back(&settings, anchors.as_ref())?;
        let mut state = FileState {
            ident: Some(file_ident),
            file: Some(Arc::new(file)),
            size: recovered.size,
            reserved_to: recovered.size,
            can_reserve: true,
            head: recovered.head.clone(),
            start: recovered.start.clone(),
            stored: None,
            written_idx: 0,
            synced_idx: 0,
            unsynced: false,
            last_sync: Instant::now(),
            lost: false,
            checked: None,
            generation: 0,
            render: Vec::new(),
        };
        if !recovered.store_anchors {
            state.stored = Some((recovered.head.clone(), recovered.start.clone()));
        }
        let (progress_tx, _) = watch::channel(Progress::default());
        let inner = Arc::new(Inner {
            run: run_id(),
            anchors,
            queue: Mutex::new(Queue {
                next_idx: 1,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            last_seq: AtomicU64::new(state.head.seq),
            file: Mutex::new(state),
            progress: Mutex::new(Progress::default()),
            settled: Condvar::new(),
            waiting: AtomicUsize::new(0),
            progress_tx,
            suspended: AtomicBool::new(false),
            suspension: Mutex::new(None),
            queued: AtomicUsize::new(0),
            refused_total: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
            #[cfg(test)]
            short_write: AtomicUsize::new(0),
            settings,
        });
        let worker = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("hsmd-audit".into())
            .stack_size(crate::secure_mem::THREAD_STACK)
            .spawn(move || worker.run())?;
        let auditor = Self {
            inner,
            thread: Mutex::new(Some(thread)),
        };
        // What start-up found is on disk before anything else happens.
        for event in recovered.events {
            if let Err(e) = auditor.record_sync(event) {
                tracing::error!("{}", e.message);
            }
        }
        Ok(auditor)
    }

    /// Where the log is.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.settings.path
    }

    /// The log's files, oldest first.
    #[must_use]
    pub fn files(&self) -> Vec<PathBuf> {
        self.inner.files()
    }

    /// Events waiting to be written.
    pub fn pending(&self) -> usize {
        self.inner.queued.load(Ordering::Relaxed)
    }

    /// Requests refused because the log could not be written, since start.
    pub fn refused_total(&self) -> u64 {
        self.inner.refused_total.load(Ordering::Relaxed)
    }

    /// Events that could not be kept and were counted instead, since start.
    pub fn dropped_total(&self) -> u64 {
        self.inner.dropped_total.load(Ordering::Relaxed)
    }

    /// Whether an audited request may run now; the refusal says why not.
    /// Cheap: called on the reactor for every audited request.
    ///
    /// # Errors
    /// `AuditUnavailable` while lines cannot be written.
    pub fn admit(&self) -> Result<(), WireError> {
        if !self.inner.suspended.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut s = lock(&self.inner.suspension);
        let Some(s) = s.as_mut() else { return Ok(()) };
        s.refused += 1;
        self.inner.refused_total.fetch_add(1, Ordering::Relaxed);
        Err(WireError::new(ErrorCode::AuditUnavailable, refusal(s)))
    }

    /// Queues `event`; the answer it belongs to waits for the returned
    /// ticket. `required`: the request was admitted and its answer must be
    /// withheld if the line cannot be written. An event that is not required
    /// (a refusal, a lock, a read of the log itself) is counted instead of
    /// queued when the queue is full, and its answer does not wait while the
    /// log is suspended.
    pub fn submit(&self, event: Event, class: Class, required: bool) -> Option<Ticket> {
        let ticket = self.submit_deferred(event, class, required);
        self.write_pending();
        ticket
    }

    /// As [`Auditor::submit`], but the line is not written yet: the caller
    /// calls [`Auditor::write_pending`] before it waits, so the lines of
    /// several requests (a pipelined connection's) are written together.
    pub fn submit_deferred(&self, event: Event, class: Class, required: bool) -> Option<Ticket> {
        let inner = &self.inner;
        let cap = inner.settings.buffer_events.max(1);
        let suspended = inner.suspended.load(Ordering::Acquire);
        let idx = {
            let mut q = lock(&inner.queue);
            let len = q.events.len();
            if len >= cap || suspended {
                let mut s = lock(&inner.suspension);
                if s.is_none() && len >= cap {
                    let reason: Arc<str> = Arc::from(format!(
                        "{len} audit events are waiting to be written: the disk is slower than the requests"
                    ));
                    tracing::warn!("{reason}; refusing audited requests until the writer catches up");
                    *s = Some(Suspension::new(Cause::Behind, reason));
                    inner.suspended.store(true, Ordering::Release);
                }
                if let Some(s) = s.as_mut() {
                    if len >= cap && !required {
                        *s.dropped.entry(event.event_type.as_str()).or_insert(0) += 1;
                        inner.dropped_total.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    s.held += 1;
                }
            }
            let idx = q.next_idx;
            q.next_idx += 1;
            q.events.push_back(Queued { idx, event, class });
            inner.queued.store(q.events.len(), Ordering::Relaxed);
            idx
        };
        if suspended && !required {
            return None;
        }
        Some(Ticket {
            idx,
            synced: class == Class::Security,
            required,
        })
    }

    /// Gets queued lines written: by this thread when they are few and the
    /// writer is idle (no hand-off, no wake-up), else by the writer thread.
    pub fn write_pending(&self) {
        let inner = &self.inner;
        let n = inner.queued.load(Ordering::Relaxed);
        if n == 0 {
            return;
        }
        let suspended = inner.suspended.load(Ordering::Acquire);
        if suspended || n > INLINE_BATCH || !inner.write_inline() {
            inner.wake.notify_one();
        }
    }

    /// Writes a security event and waits until it is synced. Blocking.
    ///
    /// # Errors
    /// `AuditUnavailable` if it could not be written.
    pub fn record_sync(&self, event: Event) -> Result<(), WireError> {
        let Some(ticket) = self.submit(event, Class::Security, true) else {
            return Ok(());
        };
        self.wait_blocking(ticket)
    }

    /// Waits (blocking) until `ticket` is settled.
    ///
    /// # Errors
    /// `AuditUnavailable` if its line could not be written.
    pub fn wait_blocking(&self, ticket: Ticket) -> Result<(), WireError> {
        let mut p = lock(&self.inner.progress);
        loop {
            match p.settle(ticket) {
                Settled::Done => return Ok(()),
                Settled::Failed(why) => return Err(withheld(&why)),
                Settled::Pending => {
                    self.inner.waiting.fetch_add(1, Ordering::SeqCst);
                    p = self
                        .inner
                        .settled
                        .wait_timeout(p, Duration::from_secs(1))
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                    self.inner.waiting.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }

    /// Waits (async) until `ticket` is settled.
    ///
    /// # Errors
    /// `AuditUnavailable` if its line could not be written.
    pub async fn wait(&self, ticket: Ticket) -> Result<(), WireError> {
        let mut rx = self.progress();
        loop {
            let settled = rx.borrow_and_update().settle(ticket);
            match settled {
                Settled::Done => return Ok(()),
                Settled::Failed(why) => return Err(withheld(&why)),
                Settled::Pending => {}
            }
            if rx.changed().await.is_err() {
                return Ok(());
            }
        }
    }

    /// The writer's progress, to wait on from async code.
    #[must_use]
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.inner.progress_tx.subscribe()
    }

    /// Where `ticket` stands now.
    #[must_use]
    pub fn settle(&self, ticket: Ticket) -> Settled {
        self.inner.progress_tx.borrow().settle(ticket)
    }

    /// The log's health.
    #[must_use]
    pub fn health(&self) -> Health {
        let pending = self.pending();
        let last_seq = self.inner.last_seq.load(Ordering::Relaxed);
        match lock(&self.inner.suspension).as_ref() {
            None => Health {
                healthy: true,
                detail: String::new(),
                pending,
                last_seq,
            },
            Some(s) => Health {
                healthy: false,
                detail: format!(
                    "{} (since {}); audited requests are refused until it can be written",
                    s.reason,
                    humantime::format_rfc3339_seconds(s.since)
                ),
                pending,
                last_seq,
            },
        }
    }

    /// Checks the chain through every file, from a snapshot (see
    /// `audit::verify`). Blocking.
    ///
    /// # Errors
    /// [`Broken`] naming each break.
    pub fn verify(&self) -> Result<Verified, Broken> {
        let snapshot = self.inner.snapshot();
        verify::check(snapshot)
    }

    /// The log's files as they are now (whole lines only, opened, oldest
    /// first), with the chain's head and where the retained log begins: what
    /// a backup copies. Writes go on meanwhile; they are not in the copy.
    pub fn backup_snapshot(&self) -> BackupSnapshot {
        let Snapshot { files, head, start } = self.inner.snapshot();
        BackupSnapshot {
            files: files
                .into_iter()
                .map(|(path, file, len)| {
                    let name = path
                        .file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                    (name, file, len)
                })
                .collect(),
            head,
            start,
        }
    }

    /// Replaces the log under the writer (a restore): writes what is queued
    /// to the log as it is, then, with the writer held, runs `change` with the
    /// chain's head and start (it puts other files, and a keystore with
    /// their anchors, in place), reads
    /// the log back against the anchors as at start-up, and goes on from its
    /// head. Blocking.
    ///
    /// # Errors
    /// The log left by `change` cannot be read or opened; the writer then
    /// refuses audited requests until it can (`change`'s own answer is lost,
    /// so it should not fail after it changed anything).
    pub fn replaced_while<T>(&self, change: impl FnOnce(&Head, &Start) -> T) -> io::Result<T> {
        let inner = &self.inner;
        // What was asked before the restore goes into the log it was asked of.
        let before = lock(&inner.queue).next_idx.saturating_sub(1);
        if before > 0 {
            self.write_pending();
            let _ = self.wait_blocking(Ticket {
                idx: before,
                synced: true,
                required: false,
            });
        }
        let (out, events) = {
            let mut f = lock(&inner.file);
            if let Some(file) = &f.file {
                let _ = file.sync_data();
            }
            let out = change(&f.head, &f.start);
            let (recovered, file, file_ident) = read_back(&inner.settings, inner.anchors.as_ref())?;
            f.ident = Some(file_ident);
            f.file = Some(Arc::new(file));
            f.size = recovered.size;
            f.reserved_to = recovered.size;
            f.head = recovered.head.clone();
            f.start = recovered.start.clone();
            f.stored = (!recovered.store_anchors).then(|| (recovered.head.clone(), recovered.start.clone()));
            f.unsynced = false;
            f.lost = false;
            f.checked = None;
            f.generation += 1;
            inner.last_seq.store(recovered.head.seq, Ordering::SeqCst);
            (out, recovered.events)
        };
        sync_dir(&inner.settings.path);
        for event in events {
            if let Err(e) = self.record_sync(event) {
                tracing::error!("{}", e.message);
            }
        }
        Ok(out)
    }

    /// Writes everything queued, syncs, records the anchors and stops the
    /// writer. Blocking. Events that still cannot be written are logged.
    pub fn close(&self) {
        lock(&self.inner.queue).closing = true;
        self.inner.wake.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

/// Keeps a cycle's render buffer for the next cycle (which clears it) unless a
/// burst made it large.
fn keep_render(f: &mut FileState, text: Vec<u8>) {
    if text.capacity() <= KEEP_RENDER {
        f.render = text;
    }
}

#[cfg(test)]
impl Auditor {
    /// Holds the writer back (it needs this lock to write), for tests.
    pub(super) fn inner_file_lock_for_tests(&self) -> impl Drop + '_ {
        lock(&self.inner.file)
    }

    /// Makes writes stop after `bytes` bytes, failing as a full disk does
    /// (0: writes work again).
    pub(super) fn short_write_for_tests(&self, bytes: usize) {
        self.inner.short_write.store(bytes, Ordering::SeqCst);
    }
}

impl Drop for Auditor {
    fn drop(&mut self) {
        self.close();
    }
}

fn refusal(s: &Suspension) -> String {
    match s.cause {
        Cause::Fault => format!(
            "hsmd cannot write its audit log: {} (since {}); it refuses audited requests until it can, and \
             resumes by itself; `hsmctl status` shows the audit log's state",
            s.reason,
            humantime::format_rfc3339_seconds(s.since)
        ),
        Cause::Behind => format!("hsmd's audit log is behind: {}; retry shortly", s.reason),
    }
}

/// The error an answer gets in place of its result when its audit line could
/// not be written.
#[must_use]
pub fn withheld(why: &str) -> WireError {
    WireError::new(
        ErrorCode::AuditUnavailable,
        format!(
            "hsmd could not write this request's audit line ({why}); its answer is withheld. If it changed \
             something (a key created, a state changed), the change was made and its line is written as soon \
             as the log can be; audited requests are refused until then"
        ),
    )
}

/// A sync and anchoring the writer thread does without the file's lock.
struct SyncPlan {
    file: Arc<File>,
    /// Whether there are written lines to sync (else only anchors to record).
    sync: bool,
    /// Every event up to this one is in what is synced…
    idx: u64,
    /// …which is the file up to here…
    size: u64,
    /// …ending with this line.
    head: Head,
    start: Start,
    /// The log it was planned on (see `FileState::generation`).
    generation: u64,
}

/// Who writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The writer thread: writes, syncs, anchors, rotates.
    Writer {
        /// The last round before hsmd stops: sync whatever was written.
        closing: bool,
        /// A request's thread wrote lines that must be synced now.
        sync: bool,
    },
    /// A request's own thread, while the writer is idle: writes only.
    Inline,
}

/// What one write cycle came to.
enum Cycle {
    /// All written (and synced, anchored, rotated as due).
    Ok,
    /// Something failed: the reason; the writer retries after [`RETRY`].
    Failed(Arc<str>),
}

impl Inner {
    fn files(&self) -> Vec<PathBuf> {
        let path = &self.settings.path;
        let mut files: Vec<PathBuf> = (1..=MAX_ROTATED.max(self.settings.keep_files))
            .rev()
            .map(|i| self.settings.rotated(i))
            .filter(|p| p.exists())
            .collect();
        files.push(path.clone());
        files
    }

    fn snapshot(&self) -> Snapshot {
        let f = lock(&self.file);
        let mut files = Vec::new();
        for path in self.files() {
            let Ok(file) = File::open(&path) else { continue };
            let Ok(meta) = file.metadata() else { continue };
            let len = if path == self.settings.path && f.ident == Some(ident(&meta)) {
                // The current file: whole lines only (a failed write may have
                // left bytes past them, which the next write replaces).
                f.size.min(meta.len())
            } else {
                meta.len()
            };
            files.push((path, file, len));
        }
        Snapshot {
            files,
            head: f.head.clone(),
            start: f.start.clone(),
        }
    }

    fn publish(&self, change: impl FnOnce(&mut Progress)) {
        let snapshot = {
            let mut p = lock(&self.progress);
            change(&mut p);
            p.clone()
        };
        // A waiter counts itself under the progress lock before it waits, so
        // one that saw the old progress is counted here.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.settled.notify_all();
        }
        self.progress_tx.send_replace(snapshot);
    }

    fn suspend(&self, reason: &Arc<str>) {
        let mut s = lock(&self.suspension);
        match s.as_mut() {
            Some(s) => {
                if s.reason != *reason {
                    tracing::error!(reason = %reason, "the audit log still cannot be written");
                }
                s.cause = Cause::Fault;
                s.reason = Arc::clone(reason);
            }
            None => {
                tracing::error!(reason = %reason, "the audit log cannot be written; refusing audited requests until it can");
                *s = Some(Suspension::new(Cause::Fault, Arc::clone(reason)));
                self.suspended.store(true, Ordering::Release);
            }
        }
    }

    /// Ends a suspension whose cause is gone, queueing `AUDIT_RESUMED`.
    fn resume_if_clear(&self, cycle_ok: bool) {
        let mut s = lock(&self.suspension);
        let Some(current) = s.as_ref() else { return };
        let clear = match current.cause {
            Cause::Fault => cycle_ok,
            Cause::Behind => cycle_ok && self.queued.load(Ordering::Relaxed) < self.settings.buffer_events.max(2) / 2,
        };
        if !clear {
            return;
        }
        let Some(done) = s.take() else { return };
        self.suspended.store(false, Ordering::Release);
        drop(s);
        tracing::warn!(
            reason = %done.reason,
            refused = done.refused,
            "the audit log is written again; audited requests are served again"
        );
        let dropped: u64 = done.dropped.values().sum();
        let mut meta = Meta::message(format!(
            "the audit log is written again after {}; from {} on, {} audited request{} were refused, {} event{} \
             waited in memory (the lines before this one), {} event{} of requests that changed nothing were \
             counted instead of written",
            done.reason,
            humantime::format_rfc3339_seconds(done.since),
            done.refused,
            if done.refused == 1 { "" } else { "s" },
            done.held,
            if done.held == 1 { "" } else { "s" },
            dropped,
            if dropped == 1 { "" } else { "s" },
        ));
        let x = meta.extra();
        x.since = Some(humantime::format_rfc3339_seconds(done.since).to_string());
        x.held_events = Some(done.held);
        x.refused_requests = Some(done.refused);
        if !done.dropped.is_empty() {
            x.dropped_events = Some(done.dropped);
        }
        let event = Event::by_daemon(EventType::AuditResumed, "audit", "resume", Outcome::Success, 6, meta);
        let mut q = lock(&self.queue);
        q.events.push_back(Queued {
            idx: 0,
            event,
            class: Class::Security,
        });
        self.queued.store(q.events.len(), Ordering::Relaxed);
    }

    /// The writer thread.
    fn run(self: Arc<Self>) {
        let mut retry_at: Option<Instant> = None;
        loop {
            let sync_at = {
                let f = lock(&self.file);
                (f.unsynced || f.stored.as_ref() != Some(&(f.head.clone(), f.start.clone())))
                    .then(|| f.last_sync + self.settings.flush_interval)
            };
            let (batch, closing, sync) = self.next_batch(retry_at, sync_at);
            let wrote = !batch.is_empty();
            let (outcome, plan) = {
                let mut f = lock(&self.file);
                self.cycle(&mut f, batch, Mode::Writer { closing, sync })
            };
            // Syncing and anchoring take milliseconds: requests' own threads
            // go on writing meanwhile.
            // What was written is synced even while the disk is short of
            // space (it went into the reserve).
            let outcome = match plan.map(|plan| self.sync(plan)) {
                Some(synced) if matches!(outcome, Cycle::Ok) => synced,
                _ => outcome,
            };
            match outcome {
                Cycle::Ok => {
                    retry_at = None;
                    // A cycle with nothing to write proves nothing while lines
                    // wait (a request's failed line may have been put back
                    // meanwhile): resuming then would be a false all-clear,
                    // and a second AUDIT_RESUMED once the write failed again.
                    if wrote || self.queued.load(Ordering::Relaxed) == 0 {
                        self.resume_if_clear(true);
                    }
                }
                Cycle::Failed(why) => {
                    self.suspend(&why);
                    retry_at = Some(Instant::now() + RETRY);
                }
            }
            if retry_at.is_none() && self.suspended.load(Ordering::Acquire) {
                // Suspended by a request's own write, or behind: look again soon.
                retry_at = Some(Instant::now() + RETRY);
            }
            if closing {
                let left = lock(&self.queue).events.len();
                if left == 0 || retry_at.is_some() {
                    if left > 0 {
                        tracing::error!(events = left, "audit events could not be written before hsmd stopped");
                    }
                    break;
                }
            }
        }
    }

    /// Waits for events (or a deadline) and takes every queued event; also
    /// says whether hsmd is closing and whether a sync was asked for.
    fn next_batch(&self, retry_at: Option<Instant>, sync_at: Option<Instant>) -> (Vec<Queued>, bool, bool) {
        let mut q = lock(&self.queue);
        // Never longer than the sync interval: requests' own threads write
        // lines the writer must sync.
        let longest = Instant::now() + self.settings.flush_interval;
        loop {
            if q.closing {
                break;
            }
            let now = Instant::now();
            // After a failure, wait out the retry time even with events queued.
            let deadline = match retry_at {
                Some(r) => r,
                None if !q.events.is_empty() || q.sync_wanted => break,
                None => sync_at.unwrap_or(longest),
            }
            .min(longest);
            if deadline <= now {
                break;
            }
            q = self
                .wake
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        let batch: Vec<Queued> = q.events.drain(..).collect();
        self.queued.store(0, Ordering::Relaxed);
        let sync = std::mem::take(&mut q.sync_wanted);
        (batch, q.closing, sync)
    }

    /// Writes what is queued on this thread, if the writer is idle and all is
    /// well; `false` if it did not (the writer thread must).
    fn write_inline(&self) -> bool {
        let mut f = match self.file.try_lock() {
            Ok(f) => f,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        let batch: Vec<Queued> = {
            let mut q = lock(&self.queue);
            if q.closing {
                return false;
            }
            self.queued.store(0, Ordering::Relaxed);
            q.events.drain(..).collect()
        };
        if batch.is_empty() {
            return true;
        }
        match self.cycle(&mut f, batch, Mode::Inline).0 {
            Cycle::Ok => true,
            Cycle::Failed(why) => {
                drop(f);
                // The writer thread looks again at once, and retries from here on.
                self.suspend(&why);
                lock(&self.queue).sync_wanted = true;
                false
            }
        }
    }

    /// A batch that could not be written: its answers fail (see
    /// [`Settled::Failed`]) and its events wait for the next try.
    fn fail(&self, batch: Vec<Queued>, why: Arc<str>) -> Cycle {
        let failed = batch.iter().map(|q| q.idx).max().unwrap_or(0);
        self.requeue(batch);
        self.publish(|p| {
            p.failed = p.failed.max(failed);
            p.reason = Some(Arc::clone(&why));
        });
        Cycle::Failed(why)
    }

    /// Puts events back at the front of the queue, in order, for the next try.
    fn requeue(&self, batch: Vec<Queued>) {
        let mut q = lock(&self.queue);
        for e in batch.into_iter().rev() {
            q.events.push_front(e);
        }
        self.queued.store(q.events.len(), Ordering::Relaxed);
    }

    /// Makes sure `f.file` is the file at the log's path, reopening it if it
    /// was removed or replaced.
    fn ensure_file(&self, f: &mut FileState) -> Result<(), Arc<str>> {
        let path = &self.settings.path;
        // A removed or renamed-over file has no links left: looked at on every
        // write (one fstat), so no line goes into a file that is gone. Its
        // path is looked at less often (a file kept alive by a second link).
        let recent = f.checked.is_some_and(|t| t.elapsed() < CHECK_EVERY);
        if recent
            && f.file
                .as_ref()
                .and_then(|file| file.metadata().ok())
                .is_some_and(|m| m.nlink() > 0)
        {
            return Ok(());
        }
        if let Some(file) = &f.file {
            let ours = file.metadata().ok();
            let at_path = fs::metadata(path).ok().map(|m| ident(&m));
            if ours
                .as_ref()
                .is_some_and(|m| m.nlink() > 0 && at_path == Some(ident(m)))
            {
                return Ok(());
            }
            tracing::error!(
                path = %path.display(),
                seq = f.head.seq,
                "the audit log file was removed or replaced while hsmd ran; opening it again"
            );
            f.file = None;
            f.ident = None;
            f.lost = true;
        }
        let file = open_current(path).map_err(|e| Arc::from(describe(&e, "opening", path)))?;
        let meta = file.metadata().map_err(|e| Arc::from(describe(&e, "opening", path)))?;
        f.size = meta.len();
        f.reserved_to = f.size;
        f.ident = Some(ident(&meta));
        f.file = Some(Arc::new(file));
        sync_dir(path);
        Ok(())
    }

    /// Checks free space and keeps [`RESERVE`] bytes allocated past the end.
    fn ensure_space(&self, f: &mut FileState, need: u64) -> Result<(), Arc<str>> {
        let path = &self.settings.path;
        let dir = path.parent().unwrap_or(Path::new("/"));
        let look = f.checked.is_none_or(|t| t.elapsed() >= CHECK_EVERY);
        if let Some(st) = look.then(|| nix::sys::statvfs::statvfs(dir).ok()).flatten() {
            if st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
                return Err(Arc::from(format!(
                    "the file system of {} is read-only (writing {})",
                    dir.display(),
                    path.display()
                )));
            }
            let blocks = if nix::unistd::geteuid().is_root() {
                st.blocks_free()
            } else {
                st.blocks_available()
            };
            let free = blocks.saturating_mul(st.fragment_size());
            if free < LOW_SPACE {
                return Err(Arc::from(format!(
                    "no space left on device in {} ({free} bytes free; writing {})",
                    dir.display(),
                    path.display()
                )));
            }
        }
        if !f.can_reserve || f.reserved_to >= f.size + need + RESERVE / 2 {
            return Ok(());
        }
        let Some(file) = &f.file else { return Ok(()) };
        let from = f.reserved_to.max(f.size);
        let to = f.size + need + RESERVE;
        let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
            return Ok(());
        };
        match nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE, offset, len) {
            Ok(()) => {
                f.reserved_to = to;
                Ok(())
            }
            Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS) => {
                tracing::info!(path = %path.display(), "the file system cannot reserve space for the audit log; a full disk is noticed when a write fails");
                f.can_reserve = false;
                Ok(())
            }
            Err(e) => Err(Arc::from(describe(&io::Error::from(e), "reserving space for", path))),
        }
    }

    /// One round: write `batch`, then (on the writer thread) sync and anchor
    /// as due, rotate as due.
    fn cycle(&self, f: &mut FileState, mut batch: Vec<Queued>, mode: Mode) -> (Cycle, Option<SyncPlan>) {
        let path = &self.settings.path;
        let closing = matches!(mode, Mode::Writer { closing: true, .. });
        let asked = matches!(mode, Mode::Writer { sync: true, .. });
        if let Err(why) = self.ensure_file(f) {
            f.checked = None;
            return (self.fail(batch, why), None);
        }
        if f.lost {
            f.lost = false;
            batch.insert(
                0,
                Queued {
                    idx: 0,
                    event: Event::audit_tampered(format!(
                        "the audit log {} was removed or replaced while hsmd ran: its lines up to seq {} are no \
                         longer in it; the chain goes on in a new file",
                        path.display(),
                        f.head.seq
                    )),
                    class: Class::Security,
                },
            );
        }
        // Render, then write in one go.
        let mut text = std::mem::take(&mut f.render);
        text.clear();
        text.reserve(batch.len() * 512);
        let mut head = f.head.clone();
        let mut security = closing || asked;
        let mut last_idx = f.written_idx;
        for q in &batch {
            let hash = line::render(&q.event, head.seq + 1, &head.hash, &self.run, &mut text);
            head = Head {
                seq: head.seq + 1,
                hash,
            };
            security |= q.class == Class::Security;
            last_idx = last_idx.max(q.idx);
        }
        let space = self.ensure_space(f, text.len() as u64);
        f.checked = match space {
            Ok(()) if f.checked.is_none_or(|t| t.elapsed() >= CHECK_EVERY) => Some(Instant::now()),
            Ok(()) => f.checked,
            Err(_) => None,
        };
        if !text.is_empty() {
            let written = match &f.file {
                Some(file) => self.write_at(file, &text, f.size).inspect_err(|_| {
                    // Nothing half-written stays: cut back to the last whole line.
                    let _ = file.set_len(f.size);
                }),
                None => Err(io::Error::other("the file is not open")),
            };
            if let Err(e) = written {
                f.reserved_to = f.size;
                keep_render(f, text);
                return (self.fail(batch, Arc::from(describe(&e, "writing", path))), None);
            }
            f.size += text.len() as u64;
            f.head = head;
            f.written_idx = last_idx;
            f.unsynced = true;
            self.last_seq.store(f.head.seq, Ordering::Relaxed);
            self.publish(|p| p.written = p.written.max(last_idx));
        }
        keep_render(f, text);
        // A file due for rotation is synced (and anchored) now, so it can go.
        let rotate = f.size > self.settings.max_file_bytes;
        let space = match space {
            Ok(()) => Cycle::Ok,
            Err(why) => Cycle::Failed(why),
        };
        if mode == Mode::Inline {
            if security || rotate {
                lock(&self.queue).sync_wanted = true;
                self.wake.notify_one();
            }
            return (space, None);
        }
        let due = f.last_sync.elapsed() >= self.settings.flush_interval || rotate;
        let sync = f.unsynced && (security || due);
        let store = f.stored.as_ref() != Some(&(f.head.clone(), f.start.clone()));
        let plan = match &f.file {
            Some(file) if sync || (store && !f.unsynced) || rotate => Some(SyncPlan {
                file: Arc::clone(file),
                sync: f.unsynced,
                idx: f.written_idx,
                size: f.size,
                head: f.head.clone(),
                start: f.start.clone(),
                generation: f.generation,
            }),
            _ => None,
        };
        (space, plan)
    }

    /// Syncs what `plan` captured (outside the file's lock), records the
    /// anchors, then rotates if the file is due. Returns how it went.
    fn sync(&self, plan: SyncPlan) -> Cycle {
        let path = &self.settings.path;
        if plan.sync {
            if let Err(e) = plan.file.sync_data() {
                let why: Arc<str> = Arc::from(describe(&e, "syncing", path));
                self.publish(|p| {
                    p.failed = p.failed.max(plan.idx);
                    p.reason = Some(Arc::clone(&why));
                });
                return Cycle::Failed(why);
            }
            self.publish(|p| p.synced = p.synced.max(plan.idx));
        }
        let mut f = lock(&self.file);
        if f.generation != plan.generation {
            // The log was replaced meanwhile: this head is not its chain's.
            return Cycle::Ok;
        }
        let same_file = f.file.as_ref().is_some_and(|file| Arc::ptr_eq(file, &plan.file));
        if plan.sync && same_file {
            f.last_sync = Instant::now();
            f.synced_idx = f.synced_idx.max(plan.idx);
            // Lines written by requests' threads meanwhile wait for the next sync.
            f.unsynced = f.size > plan.size;
        }
        let anchored = (plan.head.clone(), plan.start.clone());
        if f.stored.as_ref() != Some(&anchored) && (plan.sync || !f.unsynced) {
            if let Err(e) = self.anchors.store(&plan.head, &plan.start) {
                return Cycle::Failed(Arc::from(format!(
                    "the keystore cannot record the audit log's head: {e}"
                )));
            }
            f.stored = Some(anchored);
        }
        if f.size > self.settings.max_file_bytes {
            if let Err(why) = self.rotate(&mut f) {
                // Not a reason to refuse anything: the file grows until
                // rotation succeeds.
                tracing::error!(reason = %why, "cannot rotate the audit log; it keeps growing");
            }
        }
        Cycle::Ok
    }

    #[cfg(not(test))]
    #[allow(clippy::unused_self)]
    fn write_at(&self, file: &File, bytes: &[u8], at: u64) -> io::Result<()> {
        file.write_all_at(bytes, at)
    }

    /// As the real one, but a short write can be arranged.
    #[cfg(test)]
    fn write_at(&self, file: &File, bytes: &[u8], at: u64) -> io::Result<()> {
        let short = self.short_write.load(Ordering::SeqCst);
        if short == 0 {
            return file.write_all_at(bytes, at);
        }
        file.write_all_at(&bytes[..short.min(bytes.len())], at)?;
        Err(io::Error::from(io::ErrorKind::StorageFull))
    }

    /// Moves the current file to `.1` (and the others up), dropping files
    /// past `keep_files` after recording where the retained log now begins.
    fn rotate(&self, f: &mut FileState) -> Result<(), String> {
        let path = &self.settings.path;
        let keep = self.settings.keep_files.max(1);
        if let Some(file) = &f.file {
            // Every line of a file is synced before it stops being the
            // current one, and the reserve given back.
            let _ = file.set_len(f.size);
            file.sync_data().map_err(|e| describe(&e, "syncing", path))?;
            f.unsynced = false;
            f.last_sync = Instant::now();
            f.synced_idx = f.written_idx;
            let synced = f.synced_idx;
            self.publish(|p| p.synced = p.synced.max(synced));
            let current = (f.head.clone(), f.start.clone());
            if f.stored.as_ref() != Some(&current) {
                self.anchors
                    .store(&current.0, &current.1)
                    .map_err(|e| format!("the keystore cannot record the audit log's head: {e}"))?;
                f.stored = Some(current);
            }
        }
        let dropping: Vec<PathBuf> = (keep..=MAX_ROTATED.max(keep))
            .map(|i| self.settings.rotated(i))
            .filter(|p| p.exists())
            .collect();
        if !dropping.is_empty() {
            // The oldest file kept: `.keep-1` … `.1`, then the current one.
            let kept = (1..keep)
                .rev()
                .map(|i| self.settings.rotated(i))
                .chain(std::iter::once(path.clone()));
            let new_start = kept
                .filter_map(|p| line::first_line(&p))
                .next()
                .unwrap_or_else(|| Start {
                    seq: f.head.seq + 1,
                    prev_hash: f.head.hash.clone(),
                });
            if new_start != f.start {
                self.anchors
                    .store(&f.head, &new_start)
                    .map_err(|e| format!("cannot record where the retained audit log begins: {e}"))?;
                f.start = new_start.clone();
                f.stored = Some((f.head.clone(), new_start));
            }
            for p in dropping {
                fs::remove_file(&p).map_err(|e| format!("cannot remove {}: {e}", p.display()))?;
            }
        }
        for i in (1..keep).rev() {
            let from = self.settings.rotated(i);
            if from.exists() {
                fs::rename(&from, self.settings.rotated(i + 1))
                    .map_err(|e| format!("cannot rename {}: {e}", from.display()))?;
            }
        }
        fs::rename(path, self.settings.rotated(1)).map_err(|e| format!("cannot rename {}: {e}", path.display()))?;
        let file = open_current(path).map_err(|e| describe(&e, "creating", path))?;
        sync_dir(path);
        let meta = file.metadata().map_err(|e| e.to_string())?;
        f.ident = Some(ident(&meta));
        f.file = Some(Arc::new(file));
        f.size = 0;
        f.reserved_to = 0;
        tracing::info!(path = %path.display(), seq = f.head.seq, "audit log rotated");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_waits_for_its_line_and_fails_only_when_required() {
        let t = Ticket {
            idx: 5,
            synced: false,
            required: true,
        };
        let mut p = Progress::default();
        assert_eq!(p.settle(t), Settled::Pending);
        p.failed = 5;
        p.reason = Some(Arc::from("full"));
        assert_eq!(p.settle(t), Settled::Failed(Arc::from("full")));
        assert_eq!(p.settle(Ticket { required: false, ..t }), Settled::Done);
        p.written = 5;
        assert_eq!(p.settle(t), Settled::Done);
        assert_eq!(
            p.settle(Ticket { synced: true, ..t }),
            Settled::Failed(Arc::from("full"))
        );
        p.synced = 6;
        assert_eq!(p.settle(Ticket { synced: true, ..t }), Settled::Done);
    }
}
