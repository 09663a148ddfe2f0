//! The socket front end: accepts connections, enforces the connection limit, and
//! runs one task per connection. Nothing below this module knows about sockets.

mod admit;
pub mod agent;
mod connection;
pub mod listener;
mod wiped;

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use protocol::ErrorCode;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

pub use crate::{
    ops::{Counters, Shared},
    VERSION,
};

/// Decrements a counter when dropped, so every exit path is counted.
struct CountGuard<'a>(&'a AtomicU32);

impl<'a> CountGuard<'a> {
    fn new(counter: &'a AtomicU32) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one request in flight, from when it is handed to the blocking pool
/// until its answer is queued.
pub(crate) struct InFlight(Arc<Shared>);

impl InFlight {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        shared.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The caller's request rate, checked for every request on either socket.
/// It keeps the rate worked out under the policy last seen, so roles are not
/// worked out again for every request; holding the policy keeps the
/// comparison by address sound.
#[derive(Default)]
pub(crate) struct RateGate {
    seen: Option<(Arc<crate::auth::policy::Policy>, Option<crate::auth::policy::Rate>)>,
}

impl RateGate {
    /// Takes a request (`what`) from the caller's token bucket; when there is
    /// none, counts and audits the refusal and says how long to wait.
    pub(crate) fn take(
        &mut self,
        shared: &Shared,
        caller: &crate::ops::Caller,
        what: &'static str,
    ) -> Result<(), Duration> {
        let policy = shared.policy();
        let rate = match &self.seen {
            Some((seen, rate)) if Arc::ptr_eq(seen, &policy) => *rate,
            _ => {
                let rate = policy.rate_of(&caller.peer);
                self.seen = Some((policy, rate));
                rate
            }
        };
        let wait = match shared.limiters.check(caller.peer.creds.uid, rate) {
            Ok(()) => return Ok(()),
            Err(wait) => wait,
        };
        shared.metrics.rate_limited();
        if let Some(audit) = &shared.audit {
            let _ = audit.submit(
                crate::audit::Event {
                    event_type: crate::audit::EventType::RateLimited,
                    who: Arc::clone(&caller.who),
                    backend: None,
                    resource: "connection".into(),
                    action: what,
                    result: crate::audit::Outcome::Failure,
                    metadata: crate::audit::Meta::default(),
                    risk_score: 4,
                    time: std::time::SystemTime::now(),
                },
                crate::audit::Class::Operation,
                false,
            );
        }
        Err(wait)
    }
}

/// How long a refused client gets to take its error before we close.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The connection places a peer may take: the general ones, then (for root
/// and the admin role only, decided once the peer is known) the reserved ones.
pub(crate) struct Place {
    _uid_share: crate::shares::Share,
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// Taken from the reserve: only root and admins may keep it.
    pub(crate) reserved: bool,
}

/// Refuses a connection for a limit, with the refusal `places` words for it.
fn refuse_over(
    shared: &Shared,
    places: &crate::shares::Shares,
    stream: tokio::net::UnixStream,
    (id, uid): (u64, u32),
    why: crate::shares::Refusal,
) {
    let reason = match why {
        crate::shares::Refusal::PerUid => "per_uid",
        crate::shares::Refusal::Total => "total",
    };
    tracing::warn!(
        connection = id,
        uid,
        reason,
        "refusing connection: over a connection limit"
    );
    shared.metrics.connection_refused(reason);
    tokio::spawn(connection::refuse(stream, places.refusal(uid, why)));
}

/// Which protocol a socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Front {
    /// hsmd's own (length-prefixed bincode frames).
    Hsmd,
    /// The SSH agent protocol.
    SshAgent,
}

/// Accepts one connection from `listener`, or waits forever when there is none.
async fn accept(listener: Option<&tokio::net::UnixListener>) -> std::io::Result<tokio::net::UnixStream> {
    match listener {
        Some(l) => l.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// Accepts connections on the hsmd socket and, when there is one, the SSH
/// agent socket, until `shared.shutdown` is cancelled; returns the tracker of
/// connection tasks so the caller can wait for them. Both sockets share one
/// set of connection places: the limits are the daemon's, not a socket's.
pub async fn serve(
    listener: &tokio::net::UnixListener,
    agent: Option<&tokio::net::UnixListener>,
    shared: Arc<Shared>,
) -> TaskTracker {
    let tracker = TaskTracker::new();
    let limits = &shared.limits;
    let (max, reserve) = (
        limits.max_connections,
        limits.reserved_connections.min(limits.max_connections - 1),
    );
    let general = Arc::new(Semaphore::new((max - reserve) as usize));
    let reserved = Arc::new(Semaphore::new(reserve as usize));
    let per_uid = crate::shares::Shares::new(
        max as usize,
        limits.max_connections_per_uid as usize,
        crate::shares::Names {
            what: "connections",
            total_key: "limits.max_connections",
            per_uid_key: "limits.max_connections_per_uid",
            code: ErrorCode::TooManyConnections,
        },
    );
    loop {
        let (accepted, front) = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => (accepted.map(|(stream, _)| stream), Front::Hsmd),
            accepted = accept(agent) => (accepted, Front::SshAgent),
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = shared.counters.next_connection_id.fetch_add(1, Ordering::Relaxed) + 1;
        // The kernel's word on who it is costs one system call and no lookup:
        // enough to count the connection against its uid before anything else.
        let creds = match stream.peer_cred() {
            Ok(c) => crate::auth::Credentials {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid().and_then(|p| u32::try_from(p).ok()),
            },
            Err(e) => {
                tracing::warn!(connection = id, error = %e, "cannot read peer credentials; closing");
                continue;
            }
        };
        let uid_share = match per_uid.try_take(creds.uid) {
            Ok(s) => s,
            Err(why) => {
                refuse_over(&shared, &per_uid, stream, (id, creds.uid), why);
                continue;
            }
        };
        let slot = match Arc::clone(&general).try_acquire_owned() {
            Ok(p) => Some((p, false)),
            Err(_) => Arc::clone(&reserved).try_acquire_owned().ok().map(|p| (p, true)),
        };
        let Some((slot, from_reserve)) = slot else {
            refuse_over(
                &shared,
                &per_uid,
                stream,
                (id, creds.uid),
                crate::shares::Refusal::Total,
            );
            continue;
        };
        let place = Place {
            _uid_share: uid_share,
            _slot: slot,
            reserved: from_reserve,
        };
        let shared = Arc::clone(&shared);
        tracker.spawn(async move {
            let _counted = CountGuard::new(&shared.counters.connections);
            match front {
                Front::Hsmd => connection::serve(stream, id, &shared, creds, place).await,
                Front::SshAgent => agent::serve(stream, id, &shared, creds, place).await,
            }
        });
    }
    tracker.close();
    tracker
}
