//! The socket front end: accepts connections, enforces the connection limit, and
//! runs one task per connection. Nothing below this module knows about sockets.

mod connection;
pub mod dispatch;
pub mod listener;
pub mod transfer;
mod wiped;

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use protocol::ErrorCode;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{auth::AccessGate, config::Limits, keystore::Vault};

/// The daemon's package version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Live counters, shown by `hsmctl status`.
#[derive(Debug, Default)]
pub struct Counters {
    connections: AtomicU32,
    in_flight: AtomicU32,
    next_connection_id: AtomicU64,
}

impl Counters {
    /// Connections being served now.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }
    /// Requests being worked on now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// State every connection shares.
#[derive(Debug)]
pub struct Shared {
    /// Limits from the config.
    pub limits: Limits,
    /// The connect-time gate.
    pub gate: AccessGate,
    /// Whether this is `hsmd --dev`.
    pub dev: bool,
    /// The configuration profile in force.
    pub profile: protocol::Profile,
    /// The keystore and its custody state.
    pub vault: Arc<Vault>,
    /// Whether all of the daemon's memory is locked.
    pub memory_locked: bool,
    /// How long a deleted key stays recoverable.
    pub recovery_window: std::time::Duration,
    /// Backup archives on their way in or out.
    pub transfers: Arc<transfer::Transfers>,
    /// The policy in force; replaced whole on reload.
    pub policy: std::sync::RwLock<Arc<crate::auth::policy::Policy>>,
    /// Per-uid request rates.
    pub limiters: crate::auth::rate::Limiters,
    /// The audit log, unless turned off.
    pub audit: Option<Arc<crate::audit::Auditor>>,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The token file store.
    pub files: Option<Arc<crate::filestore::Files>>,
    /// When the daemon started.
    pub started: Instant,
    /// Live counters.
    pub counters: Counters,
    /// Cancelled when the daemon begins to shut down.
    pub shutdown: CancellationToken,
    /// Identity lookups at connect, on threads of their own.
    pub lookups: crate::auth::lookups::Lookups,
    /// Bytes of request frames held at once.
    pub(crate) frame_budget: Arc<crate::budget::Budget>,
}

impl Shared {
    /// The metrics as OpenMetrics text, with the gauges read now. Blocking
    /// (it lists the keys): call it off the reactor.
    #[must_use]
    pub fn render_metrics(&self) -> String {
        let audit = self.audit.as_ref().map(|a| crate::metrics::AuditFigures {
            pending: a.pending(),
            healthy: a.health().healthy,
            refused_total: a.refused_total(),
            dropped_total: a.dropped_total(),
        });
        self.metrics.render(&crate::metrics::Snapshot {
            state: Some(self.vault.state()),
            audit,
            connections: self.counters.connections(),
            frame_memory: self.frame_budget.held(),
            backends: self.vault.backends().statuses(),
            keys: self.vault.list_keys().ok(),
        })
    }

    /// The policy in force now.
    #[must_use]
    pub fn policy(&self) -> Arc<crate::auth::policy::Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Puts a new policy in force.
    pub fn set_policy(&self, policy: crate::auth::policy::Policy) {
        *self.policy.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
    }

    /// Builds the shared state.
    #[must_use]
    pub fn new(limits: Limits, gate: AccessGate, dev: bool, vault: Arc<Vault>) -> Self {
        let frame_budget = Arc::new(crate::budget::Budget::new(
            limits.frame_memory as usize,
            limits.frame_memory_per_uid as usize,
        ));
        Self {
            frame_budget,
            limits,
            gate,
            dev,
            profile: protocol::Profile::Development,
            vault,
            memory_locked: false,
            recovery_window: std::time::Duration::from_secs(30 * 86_400),
            transfers: Arc::default(),
            policy: std::sync::RwLock::new(Arc::new(crate::auth::policy::Policy::open())),
            limiters: crate::auth::rate::Limiters::new(None),
            audit: None,
            metrics: Arc::default(),
            files: None,
            started: Instant::now(),
            counters: Counters::default(),
            shutdown: CancellationToken::new(),
            lookups: crate::auth::lookups::Lookups::start(IDENTITY_THREADS, IDENTITY_QUEUE),
        }
    }
}

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

/// Threads that look up identities at connect, and lookups that may wait.
const IDENTITY_THREADS: usize = 4;
const IDENTITY_QUEUE: usize = 256;

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

/// Accepts connections until `shared.shutdown` is cancelled; returns the tracker
/// of connection tasks so the caller can wait for them.
pub async fn serve(listener: &tokio::net::UnixListener, shared: Arc<Shared>) -> TaskTracker {
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
        let accepted = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
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
            connection::serve(stream, id, &shared, creds, place).await;
        });
    }
    tracker.close();
    tracker
}
