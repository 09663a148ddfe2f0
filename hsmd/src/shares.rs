//! Fair shares of things hsmd holds for its callers (descriptor transfers,
//! frame-path file sessions, connections): a total, and a cap per uid so that
//! one user cannot take them all. A [`Share`] is held while the thing lives
//! and given back when dropped, on every path.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use protocol::{ErrorCode, WireError};

/// What is being shared, for refusals: the thing's name in the plural and
/// the config keys that set the limits.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    /// `"descriptor transfers"`, …
    pub what: &'static str,
    /// The config key of the total (`files.max_transfers`).
    pub total_key: &'static str,
    /// The config key of the per-uid cap (`files.max_transfers_per_uid`).
    pub per_uid_key: &'static str,
    /// The code a refusal carries (`busy`; `too-many-connections` for connections).
    pub code: ErrorCode,
}

/// A pool of places with a total and a per-uid cap.
#[derive(Debug, Clone)]
pub struct Shares {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    total: usize,
    per_uid: usize,
    names: Names,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    /// Only uids holding at least one place: bounded by the places.
    by_uid: HashMap<u32, usize>,
}

/// Why a place was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The uid holds its whole share.
    PerUid,
    /// Every place is taken.
    Total,
}

/// One place, given back when dropped.
#[derive(Debug)]
pub struct Share {
    inner: Arc<Inner>,
    uid: u32,
}

impl Shares {
    /// A pool of `total` places, at most `per_uid` to any one uid.
    #[must_use]
    pub fn new(total: usize, per_uid: usize, names: Names) -> Self {
        Self {
            inner: Arc::new(Inner {
                total,
                per_uid,
                names,
                held: Mutex::new(Held::default()),
            }),
        }
    }

    /// Takes a place for `uid` if it is under its cap and one is free.
    ///
    /// # Errors
    /// Which limit stood in the way.
    pub fn try_take(&self, uid: u32) -> Result<Share, Refusal> {
        let mut held = self.inner.held.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = held.by_uid.get(&uid).copied().unwrap_or(0);
        if mine >= self.inner.per_uid {
            return Err(Refusal::PerUid);
        }
        if held.total >= self.inner.total {
            return Err(Refusal::Total);
        }
        held.total += 1;
        held.by_uid.insert(uid, mine + 1);
        Ok(Share {
            inner: Arc::clone(&self.inner),
            uid,
        })
    }

    /// [`Shares::try_take`], refusing with a message that names the limit.
    ///
    /// # Errors
    /// [`Names::code`], naming the cap or the total and its config key.
    pub fn take(&self, uid: u32) -> Result<Share, WireError> {
        self.try_take(uid).map_err(|why| self.refusal(uid, why))
    }

    /// The refusal's wire error.
    #[must_use]
    pub fn refusal(&self, uid: u32, why: Refusal) -> WireError {
        let Names {
            what,
            total_key,
            per_uid_key,
            code,
        } = self.inner.names;
        match why {
            Refusal::PerUid => WireError::new(
                code,
                format!(
                    "uid {uid} already holds {} {what}, its share ({per_uid_key} = {}); \
                     retry when one of them has finished",
                    self.inner.per_uid, self.inner.per_uid
                ),
            ),
            Refusal::Total => WireError::new(
                code,
                format!(
                    "hsmd holds its maximum of {} {what} ({total_key}); retry shortly",
                    self.inner.total
                ),
            ),
        }
    }

    /// Places `uid` holds now.
    #[must_use]
    pub fn held_by(&self, uid: u32) -> usize {
        let held = self.inner.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.by_uid.get(&uid).copied().unwrap_or(0)
    }

    /// Places held now, by everyone.
    #[must_use]
    pub fn held(&self) -> usize {
        self.inner.held.lock().unwrap_or_else(PoisonError::into_inner).total
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.inner.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                held.by_uid.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: Names = Names {
        what: "things",
        total_key: "x.max",
        per_uid_key: "x.max_per_uid",
        code: ErrorCode::Busy,
    };

    #[test]
    fn a_uid_gets_its_share_and_no_more_and_dropping_gives_it_back() {
        let s = Shares::new(5, 2, NAMES);
        let a1 = s.try_take(1).expect("first");
        let _a2 = s.try_take(1).expect("second");
        assert_eq!(s.try_take(1).unwrap_err(), Refusal::PerUid);
        let msg = s.take(1).unwrap_err().message;
        assert!(msg.contains("x.max_per_uid = 2") && msg.contains("uid 1"), "{msg}");
        let _b: Vec<Share> = (0..2).map(|_| s.try_take(2).expect("b")).collect();
        let _c = s.try_take(3).expect("c");
        assert_eq!(s.try_take(4).unwrap_err(), Refusal::Total);
        assert!(s.take(4).unwrap_err().message.contains("maximum of 5 things (x.max)"));
        drop(a1);
        assert_eq!(s.held_by(1), 1);
        let _d = s.try_take(4).expect("a place came free");
        assert_eq!(s.held(), 5);
    }

    #[test]
    fn uids_holding_nothing_are_forgotten() {
        let s = Shares::new(100, 1, NAMES);
        for uid in 0..1000 {
            drop(s.try_take(uid).expect("take"));
        }
        assert!(s.inner.held.lock().expect("lock").by_uid.is_empty());
    }
}
