//! The daemon's own key work, on a timer: scheduled rotations, purges at the
//! end of recovery windows, activation and expiry times coming due (every
//! `keys.maintenance_interval`), and use-count flushes (every
//! `keys.usage_flush_interval`). Each change is an audit line whose actor is
//! hsmd itself, written before the next one; while the audit log cannot be
//! written, nothing is changed.

use crate::audit::EventType;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::{
    audit::{Event, Meta, Outcome},
    config::Config,
    keystore::Maintained,
    server::Shared,
};

/// The audit event for one thing maintenance did.
fn event(done: &Maintained) -> Event {
    let key = |name: &str| format!("key:{name}");
    let at = |t: u64| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t));
    let (event_type, name, backend, action, result, risk, meta) = match done {
        Maintained::Rotated { name, backend, version } => {
            let mut meta = Meta::message(format!("rotated to version {version} by its rotation policy"));
            meta.version = Some(*version);
            (
                EventType::KeyRotated,
                name,
                backend,
                "rotate",
                Outcome::Success,
                3,
                meta,
            )
        }
        Maintained::Purged { name, backend } => (
            EventType::KeyPurged,
            name,
            backend,
            "purge",
            Outcome::Success,
            8,
            Meta::message("purged: its recovery window ended"),
        ),
        Maintained::Activated { name, backend, at: t } => {
            let mut meta = Meta::message(format!("its activation time came ({}): it is active", at(*t)));
            meta.state = Some("active");
            (
                EventType::KeyStateChanged,
                name,
                backend,
                "activate",
                Outcome::Success,
                4,
                meta,
            )
        }
        Maintained::Expired { name, backend, at: t } => {
            let mut meta = Meta::message(format!(
                "its expiry time came ({}): it is deactivated and only verifies and decrypts",
                at(*t)
            ));
            meta.state = Some("deactivated");
            (
                EventType::KeyStateChanged,
                name,
                backend,
                "expire",
                Outcome::Success,
                4,
                meta,
            )
        }
        Maintained::Failed {
            name,
            backend,
            action,
            error,
        } => {
            let mut meta = Meta::message(format!("scheduled {action} failed: {}", error.message));
            meta.error = Some(error.code.as_str());
            let event_type = if *action == "purge" {
                EventType::KeyPurged
            } else {
                EventType::KeyRotated
            };
            (event_type, name, backend, *action, Outcome::Failure, 6, meta)
        }
    };
    let mut e = Event::by_daemon(event_type, key(name), action, result, risk, meta);
    e.backend = Some(crate::backend::static_name(backend));
    e
}

/// One round of maintenance, on the blocking pool.
fn maintain(shared: &Shared) {
    if let Some(audit) = &shared.audit {
        if let Err(refused) = audit.admit() {
            tracing::warn!("key maintenance waits: {}", refused.message);
            return;
        }
    }
    let done = match shared.vault.keys().maintain() {
        Ok(done) => done,
        Err(e) => {
            tracing::error!(error = %e, "key maintenance failed");
            return;
        }
    };
    for d in &done.done {
        let e = event(d);
        tracing::info!(key = %e.resource, event = e.event_type.as_str(), action = e.action, "{}", e.metadata.message.as_deref().unwrap_or_default());
        if let Some(audit) = &shared.audit {
            if let Err(refused) = audit.record_sync(e) {
                // Held in memory and written when the log can be.
                tracing::error!("{}", refused.message);
            }
        }
    }
    if let Err(e) = shared.vault.keys().lifecycle_reported(done.seen_until) {
        tracing::error!(error = %e, "cannot record which activation and expiry times were reported");
    }
}

/// Starts the maintenance task; it ends at shutdown after a last use-count flush.
pub fn spawn(config: &Config, shared: &Arc<Shared>) -> JoinHandle<()> {
    let shared = Arc::clone(shared);
    let (every, flush_every) = (config.keys.maintenance_interval, config.keys.usage_flush_interval);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(flush_every);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        flush.tick().await;
        loop {
            tokio::select! {
                () = shared.shutdown.cancelled() => break,
                _ = tick.tick() => {
                    let s = Arc::clone(&shared);
                    let _ = tokio::task::spawn_blocking(move || maintain(&s)).await;
                }
                _ = flush.tick() => {
                    let vault = Arc::clone(&shared.vault);
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || vault.keys().flush_usage()).await {
                        tracing::error!(error = %e, "could not write key use counts; will retry");
                    }
                }
            }
        }
    })
}
