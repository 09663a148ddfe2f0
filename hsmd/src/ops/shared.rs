//! The state every connection shares: the keystore, policy, audit log,
//! file store, limits and counters, built by the daemon at start.

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use tokio_util::sync::CancellationToken;

use crate::{auth::AccessGate, config::Limits, keystore::Vault};

/// Threads that look up identities at connect, and lookups that may wait.
const IDENTITY_THREADS: usize = 4;
const IDENTITY_QUEUE: usize = 256;

/// Live counters, shown by `hsmctl status`.
#[derive(Debug, Default)]
pub struct Counters {
    pub(crate) connections: AtomicU32,
    pub(crate) in_flight: AtomicU32,
    pub(crate) next_connection_id: AtomicU64,
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
    pub transfers: Arc<super::transfer::Transfers>,
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
            state: Some(self.vault.custody().state()),
            audit,
            connections: self.counters.connections(),
            frame_memory: self.frame_budget.held(),
            backends: self.vault.backends().statuses(),
            backend_unanswered: self.vault.backends().unanswered(),
            keys: self.vault.keys().list_keys().ok(),
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
