//! Log output: tracing to stderr (journald keeps it), as text or JSON lines.
//!
//! Nothing that serves requests ever writes to stderr itself. A formatted line
//! goes into a bounded queue, and one thread (`hsmd-log`) writes the queue to
//! stderr. So a stderr that is full (a reader that stopped reading, a stalled
//! journal) or broken (a reader that went away) costs log lines, never a
//! request, a signal or a panic: when the queue is full a line is dropped, when
//! a write fails the line is dropped, and both are counted
//! (`hsmd_log_lines_dropped`).

use std::{
    io::{self, IsTerminal, Write},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
        OnceLock,
    },
    time::Duration,
};

use tracing_subscriber::{fmt, fmt::MakeWriter, EnvFilter};

use crate::config::{log_filter, LogFormat};

/// Lines that may wait for the writer thread. With lines cut at
/// [`MAX_LINE_BYTES`], the queue holds at most 2 MiB.
const QUEUE_LINES: usize = 512;
/// A longer line is cut (and ends in "…[cut]").
const MAX_LINE_BYTES: usize = 4096;

/// Lines dropped because the queue was full.
static DROPPED_FULL: AtomicU64 = AtomicU64::new(0);
/// Lines dropped because writing them to stderr failed.
static DROPPED_FAILED: AtomicU64 = AtomicU64::new(0);
static SINK: OnceLock<SyncSender<Message>> = OnceLock::new();

enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it has been written (or dropped).
    Flush(SyncSender<()>),
}

/// Lines not written to stderr since start: `(queue full, write failed)`.
#[must_use]
pub fn dropped_lines() -> (u64, u64) {
    (
        DROPPED_FULL.load(Ordering::Relaxed),
        DROPPED_FAILED.load(Ordering::Relaxed),
    )
}

/// Installs the global subscriber. `HSMD_LOG`, when set, overrides `level`.
pub fn init(level: &str, format: LogFormat) {
    let filter = std::env::var("HSMD_LOG")
        .ok()
        .and_then(|f| log_filter(&f))
        .or_else(|| log_filter(level))
        .unwrap_or_else(|| EnvFilter::new("info"));
    let Some(writer) = QueueWriter::start() else {
        // Already installed (tests calling in twice); keep the first.
        return;
    };
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(io::stderr().is_terminal())
        // Its own report of a failed write goes to stderr with eprintln!,
        // which panics when stderr is broken; our writer never fails anyway.
        .log_internal_errors(false);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
    if result.is_err() {
        // Already installed (tests calling in twice); keep the first.
    }
}

/// Waits up to `limit` for the lines queued so far to reach stderr; used at
/// exit so that the last lines are not lost when stderr is healthy.
pub fn flush(limit: Duration) {
    let Some(sink) = SINK.get() else { return };
    let (tx, rx) = mpsc::sync_channel(1);
    if sink.try_send(Message::Flush(tx)).is_ok() {
        let _ = rx.recv_timeout(limit);
    }
}

/// Writes one line to stderr the same way (queued, dropped rather than
/// blocking), for the few messages hsmd prints outside tracing.
pub fn print(line: &str) {
    if SINK.get().is_none() {
        // Before logging starts (a refused configuration): nothing else runs yet.
        let _ = writeln!(io::stderr(), "{line}");
        return;
    }
    let mut w = QueueWriter::get();
    let _ = w.write_all(line.as_bytes());
    let _ = w.write_all(b"\n");
}

/// Formats one event, then queues it when dropped.
#[derive(Debug)]
pub struct QueueWriter {
    line: Vec<u8>,
}

impl QueueWriter {
    /// Starts the writer thread; `None` if it already runs.
    fn start() -> Option<Self> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        if SINK.set(tx).is_err() {
            return None;
        }
        let spawned = std::thread::Builder::new()
            .name("hsmd-log".into())
            .stack_size(crate::secure_mem::THREAD_STACK)
            .spawn(move || write_lines(&rx));
        if spawned.is_err() {
            // No thread: every line will be counted as dropped (queue full).
            DROPPED_FAILED.fetch_add(1, Ordering::Relaxed);
        }
        Some(Self::get())
    }

    fn get() -> Self {
        Self {
            line: Vec::with_capacity(256),
        }
    }
}

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = MAX_LINE_BYTES.saturating_sub(self.line.len());
        self.line.extend_from_slice(&buf[..buf.len().min(room)]);
        // Claim all of it: the rest of an over-long line is cut, not an error.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for QueueWriter {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let mut line = std::mem::take(&mut self.line);
        if line.len() >= MAX_LINE_BYTES {
            line.truncate(MAX_LINE_BYTES - 8);
            line.extend_from_slice("…[cut]\n".as_bytes());
        }
        let Some(sink) = SINK.get() else { return };
        match sink.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED_FULL.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        Self::get()
    }
}

/// The `hsmd-log` thread: may block on stderr for as long as the reader
/// wants; only this thread waits.
fn write_lines(rx: &Receiver<Message>) {
    let mut stderr = io::stderr();
    while let Ok(message) = rx.recv() {
        match message {
            Message::Line(line) => {
                if stderr.write_all(&line).is_err() {
                    DROPPED_FAILED.fetch_add(1, Ordering::Relaxed);
                }
            }
            Message::Flush(done) => {
                let _ = done.try_send(());
            }
        }
    }
}
