//! Per-uid request rates (token buckets, with the `governor` crate): one
//! limiter per distinct rate, keyed by uid, so a role's override gives its
//! members their own bucket size and one uid's burst never slows another's.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use governor::{
    clock::{Clock as _, DefaultClock},
    state::keyed::DefaultKeyedStateStore,
    Quota, RateLimiter,
};

use super::policy::Rate;

type Keyed = RateLimiter<u32, DefaultKeyedStateStore<u32>, DefaultClock>;

/// The daemon's rate limiters.
#[derive(Debug)]
pub struct Limiters {
    default: Option<Rate>,
    by_rate: Mutex<HashMap<(u32, u32), Arc<Keyed>>>,
    clock: DefaultClock,
}

impl Limiters {
    /// `default`: the rate for uids whose roles set none; `None` turns limits off
    /// for them.
    #[must_use]
    pub fn new(default: Option<Rate>) -> Self {
        Self {
            default,
            by_rate: Mutex::new(HashMap::new()),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one request from `uid`'s bucket (`rate` overrides the default);
    /// `Err` says how long until the next request would pass.
    ///
    /// # Errors
    /// The wait, when the uid is over its rate.
    pub fn check(&self, uid: u32, rate: Option<Rate>) -> Result<(), Duration> {
        let Some(rate) = rate.or(self.default) else {
            return Ok(());
        };
        let (Some(per_second), Some(burst)) = (NonZeroU32::new(rate.per_second), NonZeroU32::new(rate.burst)) else {
            return Ok(());
        };
        let limiter = {
            let mut map = self.by_rate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(
                map.entry((per_second.get(), burst.get()))
                    .or_insert_with(|| Arc::new(RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)))),
            )
        };
        limiter
            .check_key(&uid)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_over_its_burst_waits_and_others_do_not() {
        let l = Limiters::new(Some(Rate {
            per_second: 1,
            burst: 3,
        }));
        for _ in 0..3 {
            assert!(l.check(1000, None).is_ok());
        }
        let wait = l.check(1000, None).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(l.check(1001, None).is_ok(), "another uid has its own bucket");
        // A role's override gives a bigger bucket.
        for _ in 0..10 {
            assert!(l
                .check(
                    1000,
                    Some(Rate {
                        per_second: 100,
                        burst: 10
                    })
                )
                .is_ok());
        }
    }

    #[test]
    fn no_rate_means_no_limit() {
        let l = Limiters::new(None);
        for _ in 0..10_000 {
            assert!(l.check(1, None).is_ok());
        }
    }
}
