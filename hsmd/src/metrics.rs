//! Prometheus metrics (`prometheus-client`, OpenMetrics text): requests by
//! operation and result, latency histograms, keys by type, backend and state,
//! backend health, authentication failures by reason, rate-limited requests,
//! custody state and the audit buffer. Served by `hsmctl metrics` and, when
//! configured, on a loopback HTTP listener.
//!
//! The listener answers `GET /metrics` and nothing else, on loopback only; it
//! is a few lines over tokio rather than an HTTP framework because that is all
//! it does (bounded request head, 5 s timeout, one response, close).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use tokio_util::sync::CancellationToken;

/// The state the gauges are read from at each render, gathered by the server
/// (so this module knows nothing of the server's internals).
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The custody state.
    pub state: Option<protocol::ServiceState>,
    /// The audit log's figures, when it is on.
    pub audit: Option<AuditFigures>,
    /// Connections open now.
    pub connections: u32,
    /// Bytes of request frames held now.
    pub frame_memory: usize,
    /// Each backend's health.
    pub backends: Vec<protocol::BackendStatus>,
    /// Requests waiting for a device's answer, per queueing backend.
    pub backend_unanswered: Vec<(&'static str, u32)>,
    /// The keys, if they could be listed.
    pub keys: Option<Vec<protocol::KeyInfo>>,
}

/// The audit log's figures for the gauges.
#[derive(Debug, Default)]
pub struct AuditFigures {
    /// Events waiting to be written.
    pub pending: usize,
    /// Whether lines are being written.
    pub healthy: bool,
    /// Requests refused because the log could not take their line, in all.
    pub refused_total: u64,
    /// Events dropped, in all.
    pub dropped_total: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    operation: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Operation {
    operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key_type: String,
    backend: String,
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Backend {
    backend: &'static str,
}

fn latency_histogram() -> Histogram {
    // 10 µs to about 40 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1e-5, 2.0, 22,
    ))
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<Request, Counter>,
    latency: Family<Operation, Histogram, fn() -> Histogram>,
    keys: Family<KeyLabels, Gauge>,
    backend_up: Family<Backend, Gauge>,
    backend_unanswered: Family<Backend, Gauge>,
    auth_failures: Family<Reason, Counter>,
    rate_limited: Counter,
    unlocked: Gauge,
    initialized: Gauge,
    audit_buffer: Gauge,
    audit_up: Gauge,
    audit_refused: Counter,
    audit_dropped: Counter,
    log_dropped: Family<Reason, Counter>,
    connections: Gauge,
    connections_refused: Family<Reason, Counter>,
    frame_memory: Gauge,
    frame_memory_waits: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hsmd");
        let requests = Family::<Request, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by operation and result (ok or the error code)",
            requests.clone(),
        );
        let latency = Family::<Operation, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from reading a request to its answer being ready, by operation",
            latency.clone(),
        );
        let keys = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "keys",
            "Keys by type, backend and lifecycle state (deleted keys as state \"deleted\")",
            keys.clone(),
        );
        let backend_up = Family::<Backend, Gauge>::default();
        registry.register(
            "backend_up",
            "Whether each backend is healthy (1) or not (0)",
            backend_up.clone(),
        );
        let backend_unanswered = Family::<Backend, Gauge>::default();
        registry.register(
            "backend_unanswered_requests",
            "Requests sent to a device backend (a PKCS#11 token) that wait for its answer now",
            backend_unanswered.clone(),
        );
        let auth_failures = Family::<Reason, Counter>::default();
        registry.register(
            "auth_failures",
            "Refusals: connection_refused (the gate), permission_denied (the policy), unlock_failed (a wrong secret)",
            auth_failures.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Requests refused for going over a rate limit",
            rate_limited.clone(),
        );
        let unlocked = Gauge::default();
        registry.register(
            "unlocked",
            "Whether the master key is in memory (1) or not (0)",
            unlocked.clone(),
        );
        let initialized = Gauge::default();
        registry.register(
            "initialized",
            "Whether a keystore exists (1) or not (0)",
            initialized.clone(),
        );
        let audit_buffer = Gauge::default();
        registry.register(
            "audit_buffer_events",
            "Audit events waiting to be written",
            audit_buffer.clone(),
        );
        let audit_up = Gauge::default();
        registry.register(
            "audit_up",
            "Whether the audit log is being written (1); 0 while it cannot be, and audited requests are refused",
            audit_up.clone(),
        );
        let audit_refused = Counter::default();
        registry.register(
            "audit_refused_requests",
            "Audited requests refused because the audit log could not be written",
            audit_refused.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_dropped_events",
            "Events of requests that changed nothing, counted instead of written while the audit log was full or failing",
            audit_dropped.clone(),
        );
        let log_dropped = Family::<Reason, Counter>::default();
        registry.register(
            "log_lines_dropped",
            "Log lines not written to stderr: queue_full (stderr not keeping up) or write_failed (stderr broken)",
            log_dropped.clone(),
        );
        let connections = Gauge::default();
        registry.register("connections", "Open client connections", connections.clone());
        let connections_refused = Family::<Reason, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections refused for a limit: per_uid (limits.max_connections_per_uid) or total (limits.max_connections)",
            connections_refused.clone(),
        );
        let frame_memory = Gauge::default();
        registry.register(
            "frame_memory_bytes",
            "Bytes of request frames held now, from header to written answer (limits.frame_memory)",
            frame_memory.clone(),
        );
        let frame_memory_waits = Counter::default();
        registry.register(
            "frame_memory_waits",
            "Times a connection stopped reading to wait for room under limits.frame_memory or its per-uid share",
            frame_memory_waits.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            keys,
            backend_up,
            backend_unanswered,
            auth_failures,
            rate_limited,
            unlocked,
            initialized,
            audit_buffer,
            audit_up,
            audit_refused,
            audit_dropped,
            log_dropped,
            connections,
            connections_refused,
            frame_memory,
            frame_memory_waits,
        }
    }

    /// Counts one answered request and its latency.
    pub fn request(&self, operation: &'static str, result: &'static str, elapsed: Duration) {
        self.requests.get_or_create(&Request { operation, result }).inc();
        self.latency
            .get_or_create(&Operation { operation })
            .observe(elapsed.as_secs_f64());
        if result == "permission-denied" {
            self.auth_failure("permission_denied");
        } else if result == "unlock-failed" {
            self.auth_failure("unlock_failed");
        }
    }

    /// Counts a refusal by reason.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.get_or_create(&Reason { reason }).inc();
    }

    /// Counts a connection refused for a limit (`per_uid` or `total`).
    pub fn connection_refused(&self, limit: &'static str) {
        self.connections_refused.get_or_create(&Reason { reason: limit }).inc();
    }

    /// Counts a connection waiting for room for its next frame.
    pub fn frame_memory_wait(&self) {
        self.frame_memory_waits.inc();
    }

    /// Counts a rate-limited request.
    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// The metrics as OpenMetrics text, with the gauges set from `now`.
    #[must_use]
    pub fn render(&self, now: &Snapshot) -> String {
        use protocol::ServiceState;
        if let Some(state) = now.state {
            self.unlocked.set(i64::from(state == ServiceState::Unlocked));
            self.initialized.set(i64::from(state != ServiceState::Uninitialized));
        }
        self.audit_buffer.set(
            now.audit
                .as_ref()
                .map_or(0, |a| i64::try_from(a.pending).unwrap_or(i64::MAX)),
        );
        if let Some(a) = &now.audit {
            self.audit_up.set(i64::from(a.healthy));
            self.audit_refused
                .inc_by(a.refused_total.saturating_sub(self.audit_refused.get()));
            self.audit_dropped
                .inc_by(a.dropped_total.saturating_sub(self.audit_dropped.get()));
        }
        let (full, failed) = crate::logging::dropped_lines();
        for (reason, total) in [("queue_full", full), ("write_failed", failed)] {
            let counter = self.log_dropped.get_or_create(&Reason { reason });
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        self.connections.set(i64::from(now.connections));
        self.frame_memory
            .set(i64::try_from(now.frame_memory).unwrap_or(i64::MAX));
        for b in &now.backends {
            self.backend_up
                .get_or_create(&Backend {
                    backend: crate::backend::static_name(&b.name),
                })
                .set(i64::from(b.healthy));
        }
        for (backend, waiting) in &now.backend_unanswered {
            self.backend_unanswered
                .get_or_create(&Backend { backend })
                .set(i64::from(*waiting));
        }
        self.keys.clear();
        if let Some(keys) = &now.keys {
            for k in keys {
                let state = if k.deleted_unix.is_some() {
                    "deleted"
                } else {
                    k.state.as_str()
                };
                self.keys
                    .get_or_create(&KeyLabels {
                        key_type: k.key_type.as_str().to_owned(),
                        backend: k.backend.clone(),
                        state: state.to_owned(),
                    })
                    .inc();
            }
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        text
    }
}

/// What renders the metrics text now (blocking: it may list the keys).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `addr` (loopback) until `shutdown`, each answer
/// made by `render` off the reactor.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken, render: Render) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics listener on");
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let render = Arc::clone(&render);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    let mut head = Vec::with_capacity(1024);
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = stream.read(&mut buf).await?;
                        if n == 0 || head.len() + n > 8192 {
                            return Ok::<(), std::io::Error>(());
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let first = head.split(|b| *b == b'\r').next().unwrap_or_default();
                    let (status, ctype, body) = if first.starts_with(b"GET /metrics ") {
                        let body = tokio::task::spawn_blocking(move || render()).await.unwrap_or_default();
                        ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
                    } else {
                        ("404 Not Found", "text/plain", "only GET /metrics is served here\n".to_owned())
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    stream.write_all(response.as_bytes()).await?;
                    stream.shutdown().await
                })
                .await;
            });
        }
    });
    Ok(())
}
