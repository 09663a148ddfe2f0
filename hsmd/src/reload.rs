//! Reloading what can change while hsmd runs: the policy file, when it
//! changes (watched) and on SIGHUP; and on SIGHUP a check of the config file,
//! whose settings apply at the next start.
//!
//! A change is a change of the file's identity (inode, size, modification and
//! change times), not an event: hsmd's own reads of the file produce events
//! too, and must not reload it again. Each change is reloaded once and is one
//! audit line (`POLICY_RELOADED`, or `CONFIG_ERROR` for a file that is
//! refused, in which case the previous policy stays in force).

use crate::audit::EventType;
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::signal::unix::{signal, SignalKind};

use crate::{
    audit::{sha256_hex, Event, Meta, Outcome},
    auth::policy::Policy,
    config::Config,
    server::Shared,
};

/// What tells one version of a file from another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

fn identity(path: &Path) -> Option<Identity> {
    let m = std::fs::metadata(path).ok()?;
    Some(Identity {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec()),
        ctime_ns: m.ctime().saturating_mul(1_000_000_000).saturating_add(m.ctime_nsec()),
    })
}

/// The files hsmd reloads or checks, and what it last saw of them.
#[derive(Debug)]
pub struct Reloader {
    shared: Arc<Shared>,
    policy: Option<PathBuf>,
    /// The policy file as last loaded (or refused).
    seen: Mutex<Option<Identity>>,
    config: Option<PathBuf>,
    /// SHA-256 of the config file hsmd started with.
    config_sha256: Option<String>,
}

fn record(shared: &Shared, event: Event) {
    if let Some(audit) = &shared.audit {
        if let Err(e) = audit.record_sync(event) {
            tracing::error!("{}", e.message);
        }
    }
}

impl Reloader {
    /// For the policy file at `policy` (already loaded) and the config file
    /// at `config` (whose bytes hashed to `config_sha256` at start).
    #[must_use]
    pub fn new(
        shared: Arc<Shared>,
        policy: Option<PathBuf>,
        config: Option<PathBuf>,
        config_sha256: Option<String>,
    ) -> Arc<Self> {
        let seen = Mutex::new(policy.as_deref().and_then(identity));
        Arc::new(Self {
            shared,
            policy,
            seen,
            config,
            config_sha256,
        })
    }

    /// Reloads the policy if its file changed since it was last read (or
    /// always, when `forced`). Blocking.
    pub fn reload_policy(&self, forced: bool) {
        let Some(path) = &self.policy else { return };
        let now = identity(path);
        {
            let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !forced && *seen == now {
                return;
            }
            *seen = now;
        }
        match Policy::load(path) {
            Ok(policy) => {
                let digest = sha256_hex(policy.text().as_bytes());
                let changed = policy.text() != self.shared.policy().text();
                if changed {
                    self.shared.set_policy(policy);
                }
                tracing::info!(path = %path.display(), changed, "policy reloaded");
                let mut meta = Meta::message(format!(
                    "{}: {}",
                    path.display(),
                    if changed {
                        "the new policy is in force"
                    } else {
                        "the same policy as before"
                    }
                ));
                let x = meta.extra();
                x.changed = Some(changed);
                x.policy_sha256 = Some(digest);
                record(
                    &self.shared,
                    Event::by_daemon(EventType::PolicyReloaded, "policy", "reload", Outcome::Success, 4, meta),
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "policy reload refused; the previous policy stays in force");
                record(
                    &self.shared,
                    Event::by_daemon(
                        EventType::ConfigError,
                        "policy",
                        "reload",
                        Outcome::Failure,
                        7,
                        Meta::message(format!("{e}; the previous policy stays in force")),
                    ),
                );
            }
        }
    }

    /// Checks the config file as the next start would read it. Blocking.
    pub fn check_config(&self) {
        let Some(path) = &self.config else {
            tracing::info!("SIGHUP: hsmd runs on built-in defaults; there is no config file to check");
            return;
        };
        let event = match Config::load(path) {
            Err(e) => {
                tracing::error!(error = %e, "the config file would be refused at the next start");
                Event::by_daemon(
                    EventType::ConfigError,
                    "config",
                    "check",
                    Outcome::Failure,
                    7,
                    Meta::message(format!(
                        "{e}; hsmd would refuse it at the next start; the running configuration stays"
                    )),
                )
            }
            Ok(_) => {
                let digest = std::fs::read(path).ok().map(|b| sha256_hex(&b));
                let changed = digest != self.config_sha256;
                if changed {
                    tracing::warn!(path = %path.display(), "the config file changed since start; its settings apply at the next restart");
                }
                let mut meta = Meta::message(format!(
                    "{} is valid; {}",
                    path.display(),
                    if changed {
                        "it changed since hsmd started, and its settings apply at the next restart (the policy \
                         file is reloaded now)"
                    } else {
                        "it is the one hsmd started with"
                    }
                ));
                let x = meta.extra();
                x.changed = Some(changed);
                x.config_sha256 = digest;
                Event::by_daemon(EventType::ConfigChecked, "config", "check", Outcome::Success, 3, meta)
            }
        };
        record(&self.shared, event);
    }

    /// Watches the policy file and waits for SIGHUP, until shutdown.
    ///
    /// # Errors
    /// The SIGHUP handler cannot be installed.
    pub fn spawn(self: Arc<Self>) -> std::io::Result<()> {
        let mut hangup = signal(SignalKind::hangup())?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = self.policy.as_deref().and_then(|path| watch(path, tx));
        tokio::spawn(async move {
            let mut watching = watcher.is_some();
            let _watcher = watcher;
            loop {
                let forced = tokio::select! {
                    () = self.shared.shutdown.cancelled() => break,
                    got = rx.recv(), if watching => {
                        if got.is_none() {
                            // No watcher: only SIGHUP is left.
                            watching = false;
                            continue;
                        }
                        // Let a burst of events from one save settle, then read once.
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        while rx.try_recv().is_ok() {}
                        false
                    }
                    _ = hangup.recv() => {
                        tracing::info!("SIGHUP: reloading the policy and checking the config file");
                        true
                    }
                };
                let me = Arc::clone(&self);
                let _ = tokio::task::spawn_blocking(move || {
                    me.reload_policy(forced);
                    if forced {
                        me.check_config();
                    }
                })
                .await;
            }
        });
        Ok(())
    }
}

/// Watches the policy file's directory (editors replace files, which ends a
/// watch on the old inode), passing on events that can change the file.
fn watch(path: &Path, tx: tokio::sync::mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::{
        event::{AccessKind, AccessMode},
        EventKind, Watcher as _,
    };
    let name = path.file_name().map(std::ffi::OsStr::to_owned);
    let dir = path.parent().map(Path::to_owned).unwrap_or_default();
    let mut watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(e) = event else { return };
        // Reads (hsmd's own among them) change nothing.
        let may_change = match e.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        };
        if may_change && e.paths.iter().any(|p| p.file_name() == name.as_deref()) {
            let _ = tx.send(());
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the policy file; changes need SIGHUP or a restart");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::error!(dir = %dir.display(), error = %e, "cannot watch the policy file; changes need SIGHUP or a restart");
        return None;
    }
    Some(watcher)
}
