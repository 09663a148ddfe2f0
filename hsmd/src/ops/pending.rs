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
    let pending = Pending(Box::new(move |sink: Sink<Reached>| meet(&waiting, Slot::Waiting(sink))));
    (pending, Fill(Some(slot)))
}

impl Fill {
    /// Delivers `reached` to the sink, now if it is set, else when it is.
    pub fn fill(mut self, reached: Reached) {
        if let Some(slot) = self.0.take() {
            meet(&slot, Slot::Answered(reached));
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
            meet(&slot, Slot::Answered(Err(lost).into()));
        }
    }
}

/// Puts one half (the answer or the sink) in the slot; the second half to
/// come hands the answer to the sink.
fn meet(slot: &Mutex<Slot>, half: Slot) {
    let mut s = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match (std::mem::replace(&mut *s, Slot::Done), half) {
        (Slot::Empty, half) => *s = half,
        (Slot::Answered(reached), Slot::Waiting(sink)) | (Slot::Waiting(sink), Slot::Answered(reached)) => {
            drop(s);
            sink(reached);
        }
        // Each half comes once; anything else has nowhere to go.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use protocol::{ErrorCode, Reply};

    use super::device_answer;

    fn answered() -> super::Reached {
        Ok(Reply::Pong { payload: vec![7] }).into()
    }

    #[test]
    fn the_answer_reaches_the_sink_whichever_comes_first_and_a_dropped_fill_answers_with_an_error() {
        // The sink first, then the answer (through a step).
        let (pending, fill) = device_answer();
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        pending.map(|r| r.result).then(move |r| t.send(r).unwrap());
        assert!(rx.try_recv().is_err(), "nothing before the answer");
        fill.fill(answered());
        assert!(matches!(rx.try_recv(), Ok(Ok(Reply::Pong { .. }))));

        // The answer first, then the sink.
        let (pending, fill) = device_answer();
        fill.fill(answered());
        let t = tx.clone();
        pending.then(move |r| t.send(r.result).unwrap());
        assert!(matches!(rx.try_recv(), Ok(Ok(Reply::Pong { .. }))));

        // Never filled: the sink is still answered.
        let (pending, fill) = device_answer();
        pending.then(move |r| tx.send(r.result).unwrap());
        drop(fill);
        let lost = rx.try_recv().expect("answered");
        assert_eq!(lost.err().map(|e| e.code), Some(ErrorCode::BackendUnavailable));
        assert!(rx.try_recv().is_err(), "each sink once");
    }
}
