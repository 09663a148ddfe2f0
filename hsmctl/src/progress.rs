//! The progress bar of `hsmctl file store | retrieve`: bytes, rate and ETA on
//! a terminal (stderr), nothing when stderr is not one or with `--quiet`.

use std::{
    fs::File,
    io::{IsTerminal as _, Seek as _},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar, or nothing.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar for `total` bytes (a spinner when the total is unknown), shown
    /// only on a terminal and unless `quiet`.
    pub(crate) fn new(verb: &'static str, total: Option<u64>, quiet: bool) -> Self {
        if quiet || !std::io::stderr().is_terminal() {
            return Self { bar: None };
        }
        let bar = match total {
            Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            ),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template("{spinner} {msg} {binary_bytes} {binary_bytes_per_sec} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        bar.set_message(verb);
        bar.enable_steady_tick(Duration::from_millis(200));
        Self { bar: Some(bar) }
    }

    /// Whether anything is drawn.
    pub(crate) fn shown(&self) -> bool {
        self.bar.is_some()
    }

    /// Bytes done so far.
    pub(crate) fn set(&self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
    }

    /// More bytes done.
    pub(crate) fn add(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Leaves the final line (bytes, rate, time) on the terminal.
    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }

    /// Takes the bar off the terminal (on failure, before the error).
    pub(crate) fn clear(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// Runs `work` while following the offset of `file`, a descriptor hsmd
    /// shares with us and reads or writes in order: the offset is how far
    /// hsmd has got. A descriptor without an offset (a pipe) shows only the
    /// elapsed time.
    pub(crate) fn follow<R>(&self, file: &File, start: u64, work: impl FnOnce() -> R) -> R {
        if self.bar.is_none() {
            return work();
        }
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    if let Ok(pos) = (&*file).stream_position() {
                        self.set(pos.saturating_sub(start));
                    }
                    std::thread::park_timeout(Duration::from_millis(100));
                }
            });
            let r = work();
            done.store(true, Ordering::Relaxed);
            r
        })
    }
}
