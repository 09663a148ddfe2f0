//! An answer that comes later: a device's reply, read on whichever thread
//! reads it, carried through the pipeline's steps (audit line, metrics) to
//! the connection that waits for it, with no thread blocked meanwhile.

use std::sync::{Arc, Mutex};

use protocol::{ErrorCode, WireError};

use super::Reached;

/// Where an answer goes when it comes.
type Sink<T> = Box<dyn FnOnce(T) + Send + 'static>;

/// An answer that comes later. [`Pending::then`] says where it goes; the
/// steps added with [`Pending::map`] run on the way, on the thread that
/// delivers it.
pub struct Pending<T>(Box<dyn FnOnce(Sink<T>) + Send + 'static>);

impl<T: Send + 'static> Pending<T> {
    /// Hands the answer to `sink` when it comes, or at once if it has.
    pub fn then(self, sink: impl FnOnce(T) + Send + 'static) {
        (self.0)(Box::new(sink));
    }

    /// The answer, passed through `step` on its way.
    #[must_use]
    pub fn map<U: Send + 'static>(self, step: impl FnOnce(T) -> U + Send + 'static) -> Pending<U> {
        Pending(Box::new(move |sink: Sink<U>| self.then(move |t| sink(step(t)))))
    }
}

impl<T> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending")
    }
}

/// Where the answer and its sink meet, whichever comes first.
enum Slot {
    Empty,
    Answered(Reached),
    Waiting(Sink<Reached>),
    Done,
}

/// Fills a [`Pending`] with the device's answer. Dropped unfilled (the
/// device's reader went away without answering), it fills it with an
/// error, so the connection waiting for it is never left waiting.
pub struct Fill(Option<Arc<Mutex<Slot>>>);

/// A pending answer and the handle that fills it.
pub fn device_answer() -> (Pending<Reached>, Fill) {
    let slot = Arc::new(Mutex::new(Slot::Empty));
    let waiting = Arc::clone(&slot);
    let pending = Pending(Box::new(move |sink: Sink<Reached>| {
        let mut s = waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match std::mem::replace(&mut *s, Slot::Done) {
            Slot::Answered(r) => {
                drop(s);
                sink(r);
            }
            Slot::Empty => *s = Slot::Waiting(sink),
            Slot::Waiting(_) | Slot::Done => {}
        }
    }));
    (pending, Fill(Some(slot)))
}

impl Fill {
    /// Delivers `reached` to the sink, now if it is set, else when it is.
    pub fn fill(mut self, reached: Reached) {
        if let Some(slot) = self.0.take() {
            deliver(&slot, reached);
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            let lost = WireError::new(
                ErrorCode::BackendUnavailable,
                "the backend's answer to this request was lost; retry",
            );
            deliver(&slot, Err(lost).into());
        }
    }
}

fn deliver(slot: &Mutex<Slot>, reached: Reached) {
    let mut s = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match std::mem::replace(&mut *s, Slot::Done) {
        Slot::Waiting(sink) => {
            drop(s);
            sink(reached);
        }
        Slot::Empty => *s = Slot::Answered(reached),
        Slot::Answered(_) | Slot::Done => {}
    }
}
