//! Memory that callers' work may hold at once, daemon-wide and per uid: the
//! bytes of request frames (`limits.frame_memory`) and the chunk buffers of
//! descriptor transfers (`files.transfer_memory`).
//!
//! A frame is charged its body length from the moment its header says how
//! long it is (before its buffer grows to hold it) until its answer has been
//! written: that span covers the frame's buffer, the decoded request and the
//! answer made from it. A connection that cannot be charged stops reading and
//! waits (its frame timer does not run meanwhile) until others' answers go out.
//! Waiting, rather than refusing, keeps a client that pipelines large requests
//! working, only slower; the cap per uid keeps one user from holding it all.
//!
//! A transfer is charged each chunk buffer it allocates, as it needs them, and
//! is refused as busy only if not even its first fits.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::watch;

/// Bytes held at once, in total and per uid.
#[derive(Debug)]
pub struct Budget {
    total: usize,
    per_uid: usize,
    held: Mutex<Held>,
    /// Bumped when bytes are given back while someone waits.
    freed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    /// Only uids holding bytes: bounded by the connections.
    by_uid: HashMap<u32, usize>,
    waiting: usize,
}

impl Budget {
    /// A budget of `total` bytes, at most `per_uid` to one uid.
    #[must_use]
    pub fn new(total: usize, per_uid: usize) -> Self {
        Self {
            total,
            per_uid,
            held: Mutex::new(Held::default()),
            freed: watch::channel(0).0,
        }
    }

    /// Charges `bytes` to `uid` if both its share and the total have room.
    /// Zero bytes always fit.
    #[must_use]
    pub fn try_charge(&self, uid: u32, bytes: usize) -> bool {
        self.charge(uid, bytes, 0)
    }

    /// [`Budget::try_charge`] for what is nice to have rather than needed:
    /// only while a quarter of the total stays free, so that growing what is
    /// already running never keeps something new from starting.
    #[must_use]
    pub fn try_charge_extra(&self, uid: u32, bytes: usize) -> bool {
        self.charge(uid, bytes, self.total / 4)
    }

    fn charge(&self, uid: u32, bytes: usize, leave: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = held.by_uid.get(&uid).copied().unwrap_or(0);
        if mine + bytes > self.per_uid || held.total + bytes + leave > self.total {
            return false;
        }
        held.total += bytes;
        held.by_uid.insert(uid, mine + bytes);
        true
    }

    /// Gives back `bytes` that `uid` was charged.
    pub fn release(&self, uid: u32, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.total = held.total.saturating_sub(bytes);
        if let Some(mine) = held.by_uid.get_mut(&uid) {
            *mine = mine.saturating_sub(bytes);
            if *mine == 0 {
                held.by_uid.remove(&uid);
            }
        }
        if held.waiting > 0 {
            self.freed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A handle to wait for bytes to be given back: see [`Waiter::freed`].
    #[must_use]
    pub fn waiter(self: &Arc<Self>) -> Waiter {
        let mut rx = self.freed.subscribe();
        rx.mark_unchanged();
        self.held.lock().unwrap_or_else(PoisonError::into_inner).waiting += 1;
        Waiter {
            budget: Arc::clone(self),
            rx,
        }
    }

    /// Bytes held now, by everyone.
    #[must_use]
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).total
    }
}

/// One connection waiting for room; counted as waiting until dropped, so that
/// releases wake it.
#[derive(Debug)]
pub struct Waiter {
    budget: Arc<Budget>,
    rx: watch::Receiver<u64>,
}

impl Waiter {
    /// Resolves when bytes have been given back since the last call (or since
    /// the waiter was made): the caller then tries to charge again.
    pub async fn freed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The budget lives as long as the daemon: never reached.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.waiting = held.waiting.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_is_held_to_its_share_and_everyone_to_the_total() {
        let b = Budget::new(10, 6);
        assert!(b.try_charge(1, 6));
        assert!(!b.try_charge(1, 1), "uid 1 is at its share");
        assert!(b.try_charge(2, 4));
        assert!(!b.try_charge(3, 1), "the total is reached");
        assert!(b.try_charge(3, 0), "nothing always fits");
        b.release(1, 6);
        assert!(b.try_charge(3, 5));
        assert_eq!(b.held(), 9);
    }

    #[test]
    fn extras_leave_a_quarter_free() {
        let b = Budget::new(100, 100);
        assert!(b.try_charge_extra(1, 75));
        assert!(!b.try_charge_extra(1, 1), "a quarter stays free for what is needed");
        assert!(b.try_charge(2, 25), "which needs can still take");
    }

    #[tokio::test]
    async fn a_release_wakes_a_waiter_made_before_it() {
        let b = Arc::new(Budget::new(4, 4));
        assert!(b.try_charge(1, 4));
        let mut w = b.waiter();
        assert!(!b.try_charge(2, 1));
        b.release(1, 4);
        tokio::time::timeout(std::time::Duration::from_secs(1), w.freed())
            .await
            .expect("woken");
        assert!(b.try_charge(2, 1));
    }
}
