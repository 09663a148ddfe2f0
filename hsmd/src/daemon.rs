//! Putting the daemon together: configuration, listener, server, signals,
//! systemd notifications, shutdown.

use crate::audit::EventType;
use std::{
    fs,
    io::Write,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use thiserror::Error;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    auth::AccessGate,
    config::{Config, ConfigError, LogFormat, OctalMode, DEFAULT_CONFIG_PATH},
    keystore::{Vault, VaultError},
    logging, secure_mem,
    server::{self, listener, Shared},
    systemd,
};

/// Command-line choices that shape the daemon (see `hsmd --help`).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--config`: the config file; without it the default path, if present.
    pub config: Option<PathBuf>,
    /// `--dev`: a throw-away instance.
    pub dev: bool,
    /// `--user`: one person's own daemon (see [`user_paths`]).
    pub user: bool,
    /// `--state-dir`: overrides `state_dir`.
    pub state_dir: Option<PathBuf>,
    /// `--socket`: overrides `socket.path`.
    pub socket: Option<PathBuf>,
    /// `--log-format`: overrides `log.format`.
    pub log_format: Option<LogFormat>,
}

/// Why the daemon did not start or did not stop cleanly.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No socket to listen on.
    #[error(transparent)]
    Listen(#[from] listener::ListenError),
    /// The state directory could not be prepared.
    #[error("cannot prepare state directory {}: {source}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// Another hsmd holds the state directory's lock.
    #[error("another hsmd ({}) is using the state directory {}; stop it first, or give this one another state_dir", match pid { Some(p) => format!("pid {p}"), None => "pid unknown".to_owned() }, path.display())]
    StateDirInUse {
        /// The state directory.
        path: PathBuf,
        /// The pid the holder wrote into the lock file, if it could be read.
        pid: Option<u32>,
    },
    /// The keystore could not be opened or initialized.
    #[error(transparent)]
    Keystore(#[from] VaultError),
    /// Memory hardening that the configuration requires failed.
    #[error(transparent)]
    Memory(#[from] secure_mem::MemoryError),
    /// The metrics listener cannot bind.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The audit log cannot be opened.
    #[error("cannot open the audit log {}: {source}", path.display())]
    Audit {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The production profile refuses the configuration.
    #[error("profile = \"production\" refuses this configuration:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Production(Vec<crate::config::ProductionProblem>),
    /// The policy file was refused.
    #[error("{0}; fix it or remove policy.path")]
    Policy(#[from] crate::auth::policy::PolicyError),
    /// A configured backend cannot start.
    #[error("cannot start the key backends: {0}")]
    Backend(String),
    /// A restore interrupted midway cannot be finished.
    #[error("{0}")]
    Restore(String),
    /// The async runtime or a signal handler could not be set up.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Where the effective configuration came from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A file.
    File(PathBuf),
    /// Built-in defaults (no file given, none at the default path).
    Defaults,
}

/// The configuration the daemon will run with, after files, defaults and flags.
#[derive(Debug, Clone)]
pub struct Effective {
    /// The merged configuration.
    pub config: Config,
    /// Where it came from.
    pub source: ConfigSource,
    /// Whether this is `--dev`.
    pub dev: bool,
    /// Whether this is `--user`.
    pub user: bool,
}

/// Where `hsmd --user` keeps its state, its config and its sockets, from the
/// XDG base directories: `$XDG_DATA_HOME/hsmd` (else `~/.local/share/hsmd`),
/// `$XDG_CONFIG_HOME/hsmd/hsmd.toml` (else `~/.config/hsmd/hsmd.toml`) and
/// `$XDG_RUNTIME_DIR/hsmd/` (which the user's session must provide).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPaths {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The config file read if it exists.
    pub config: PathBuf,
    /// The directory of the hsmd and SSH agent sockets (`hsmd.sock`,
    /// `ssh-agent.sock`); `None` when `--socket` was given and
    /// `XDG_RUNTIME_DIR` is unset (then there is no agent socket unless
    /// configured).
    pub runtime: Option<PathBuf>,
}

/// The paths of `hsmd --user`, from the environment.
///
/// # Errors
/// [`ConfigError::Invalid`] when `XDG_RUNTIME_DIR` is unset (and `--socket`
/// was not given) or no home directory is known.
pub fn user_paths(socket_given: bool) -> Result<UserPaths, ConfigError> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let home = var("HOME").or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.dir)
    });
    let invalid = |key, problem: &str| ConfigError::Invalid {
        origin: None,
        key,
        problem: problem.to_owned(),
    };
    let under_home = |xdg: &str, rest: &str| {
        var(xdg)
            .or_else(|| home.as_ref().map(|h| h.join(rest)))
            .ok_or_else(|| invalid("state_dir", "hsmd --user needs $HOME or the XDG base directories set"))
    };
    let runtime = match var("XDG_RUNTIME_DIR") {
        Some(dir) => Some(dir.join("hsmd")),
        None if socket_given => None,
        None => {
            return Err(invalid(
                "socket.path",
                "hsmd --user puts its sockets in $XDG_RUNTIME_DIR/hsmd, and XDG_RUNTIME_DIR is not set; \
                 log in through a session that sets it (systemd --user does), or give --socket",
            ))
        }
    };
    Ok(UserPaths {
        state_dir: under_home("XDG_DATA_HOME", ".local/share")?.join("hsmd"),
        config: under_home("XDG_CONFIG_HOME", ".config")?.join("hsmd/hsmd.toml"),
        runtime,
    })
}

/// Loads the configuration the way `hsmd` does: `--config`, else the default
/// path if it exists (not in dev mode), else built-in defaults; then flags.
///
/// # Errors
/// [`ConfigError`] for a file that cannot be read or is invalid.
pub fn effective_config(opts: &Options) -> Result<Effective, ConfigError> {
    let user = if opts.user {
        Some(user_paths(opts.socket.is_some())?)
    } else {
        None
    };
    let (mut config, source) = match (&opts.config, &user) {
        (Some(path), _) => (Config::load(path)?, ConfigSource::File(path.clone())),
        (None, Some(paths)) if paths.config.exists() => {
            (Config::load(&paths.config)?, ConfigSource::File(paths.config.clone()))
        }
        (None, Some(_)) => {
            // Like ssh-agent, a person's own daemon runs without locked
            // memory when their memlock limit is small (most sessions');
            // it says so in its log.
            let mut config = Config::default();
            config.memory.require_lock = false;
            (config, ConfigSource::Defaults)
        }
        (None, None) if !opts.dev && Path::new(DEFAULT_CONFIG_PATH).exists() => (
            Config::load(Path::new(DEFAULT_CONFIG_PATH))?,
            ConfigSource::File(DEFAULT_CONFIG_PATH.into()),
        ),
        (None, None) => (Config::default(), ConfigSource::Defaults),
    };
    if let Some(paths) = user {
        // Paths left at the system's defaults move to the user's directories;
        // only the owner may reach the sockets, whatever the file says.
        let system = Config::default();
        if config.state_dir == system.state_dir {
            config.state_dir = paths.state_dir;
        }
        if let Some(runtime) = &paths.runtime {
            if config.socket.path == system.socket.path {
                config.socket.path = runtime.join("hsmd.sock");
            }
            config
                .ssh_agent
                .socket
                .get_or_insert_with(|| runtime.join("ssh-agent.sock"));
        }
        config.socket.mode = OctalMode(0o600);
        config.socket.group = None;
    }
    if opts.dev && opts.config.is_none() {
        // Only the owner (and root) may reach a dev socket.
        config.socket.mode = OctalMode(0o600);
        config.socket.group = None;
    }
    if let Some(dir) = &opts.state_dir {
        config.state_dir.clone_from(dir);
    }
    if let Some(path) = &opts.socket {
        config.socket.path.clone_from(path);
    }
    if let Some(format) = opts.log_format {
        config.log.format = format;
    }
    config.validate().map_err(|(key, problem)| ConfigError::Invalid {
        origin: match &source {
            ConfigSource::File(p) => Some(p.clone()),
            ConfigSource::Defaults => None,
        },
        key,
        problem,
    })?;
    Ok(Effective {
        config,
        source,
        dev: opts.dev,
        user: opts.user,
    })
}

/// `hsmd --check-config`: validates everything that can be checked without
/// starting, and returns the lines to print (warnings included).
///
/// # Errors
/// The first fatal problem.
pub fn check_config(opts: &Options) -> Result<Vec<String>, DaemonError> {
    let eff = effective_config(opts)?;
    let mut lines = vec![match &eff.source {
        ConfigSource::File(p) => format!("config {} is valid", p.display()),
        ConfigSource::Defaults if eff.user => {
            "no config file in $XDG_CONFIG_HOME/hsmd; the built-in defaults for --user are valid".to_owned()
        }
        ConfigSource::Defaults => format!("no config file at {DEFAULT_CONFIG_PATH}; the built-in defaults are valid"),
    }];
    if let Some(group) = &eff.config.socket.group {
        if nix::unistd::Group::from_name(group).ok().flatten().is_none() {
            return Err(listener::ListenError::NoSuchGroup { group: group.clone() }.into());
        }
    }
    if eff.config.profile == crate::config::Profile::Production {
        let problems = eff.config.production_problems(eff.dev, policy_binds);
        if !problems.is_empty() {
            return Err(DaemonError::Production(problems));
        }
        lines.push("profile production: no setting weakens the daemon".to_owned());
    }
    if let Some(p) = &eff.config.backends.pkcs11 {
        // The checks start-up makes, short of loading the module.
        crate::backend::pkcs11::check_module(&p.module, &p.allowed_module_dirs).map_err(DaemonError::Backend)?;
        if let Some(pin) = &p.pin_file {
            crate::backend::pkcs11::read_pin(pin).map_err(DaemonError::Backend)?;
        }
    }
    if let Some(path) = &eff.config.policy.path {
        // As start-up and every reload load it: a policy that would be
        // refused is an invalid configuration.
        let policy = crate::auth::policy::Policy::load(path)?;
        lines.push(format!(
            "policy {} is valid ({} roles)",
            path.display(),
            policy.role_names().len()
        ));
    }
    // hsmd --user serves its owner whatever [access] says.
    let access_warnings = if eff.user {
        Vec::new()
    } else {
        AccessGate::from_config(&eff.config.access).1
    };
    for w in eff.config.warnings().into_iter().chain(access_warnings) {
        lines.push(format!("warning: {w}"));
    }
    Ok(lines)
}

/// Runs the daemon until SIGTERM or SIGINT.
///
/// # Errors
/// [`DaemonError`] if it cannot start.
pub fn run(opts: &Options) -> Result<(), DaemonError> {
    // Everything hsmd creates (keystore, its WAL, key files) is private to it.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // Dev mode's scratch directory lives as long as the daemon and is removed
    // after; it is made only when --state-dir or --socket leaves it a use (a
    // killed daemon cannot remove it).
    let scratch = if opts.dev && (opts.state_dir.is_none() || opts.socket.is_none()) {
        Some(
            tempfile::Builder::new()
                .prefix("hsmd-dev-")
                .tempdir()
                .map_err(|source| DaemonError::StateDir {
                    path: std::env::temp_dir(),
                    source,
                })?,
        )
    } else {
        None
    };
    let mut opts = opts.clone();
    if let Some(dir) = &scratch {
        opts.state_dir.get_or_insert_with(|| dir.path().join("state"));
        opts.socket.get_or_insert_with(|| dir.path().join("hsmd.sock"));
    }
    let eff = effective_config(&opts)?;
    let config = &eff.config;
    logging::init(&config.log.level, config.log.format);
    match &eff.source {
        ConfigSource::File(p) => tracing::info!(config = %p.display(), "configuration loaded"),
        ConfigSource::Defaults if eff.user => {
            tracing::info!("hsmd --user: no config file; running on built-in defaults")
        }
        ConfigSource::Defaults if !eff.dev => tracing::info!(
            "no config file at {DEFAULT_CONFIG_PATH} and no --config given; running on built-in defaults"
        ),
        ConfigSource::Defaults => {}
    }
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let weak = config.production_problems(eff.dev, policy_binds);
    if config.profile == crate::config::Profile::Production && !weak.is_empty() {
        return Err(DaemonError::Production(weak));
    }
    if !eff.dev {
        for p in &weak {
            tracing::warn!("not fit for profile = \"production\": {p}");
        }
    }
    // Before any secret can exist in this process.
    let hardening = secure_mem::harden(config.memory.require_lock && !eff.dev)?;
    match &hardening.not_locked_because {
        None => tracing::info!("all memory locked (mlockall); core dumps off; not dumpable"),
        Some(why) => tracing::warn!("memory is NOT locked, keys could reach swap: {why}"),
    }
    // Held until exit: a second hsmd on this directory refuses to start,
    // before it opens (and would repair) the keystore or the audit log.
    let _state_lock = prepare_state_dir(&config.state_dir)?;
    // A restore a stop interrupted is finished before anything is opened.
    let audit_dir = config
        .audit
        .path
        .as_deref()
        .and_then(Path::parent)
        .unwrap_or(&config.state_dir)
        .to_owned();
    let restore_finished =
        crate::backup::restore::resume(&config.state_dir, &audit_dir).map_err(DaemonError::Restore)?;
    let backends = crate::backend::from_config(&config.backends).map_err(DaemonError::Backend)?;
    tracing::info!(backends = %backends.names().join(", "), default = backends.default_name(), "key backends ready");
    let vault = Arc::new(
        Vault::open(&config.state_dir, config.unlock.argon2_cost())?
            .with_backends(backends)
            .with_min_rotation(config.keys.min_rotation_period),
    );
    let dev_keyfile = if eff.dev {
        dev_initialize(&vault, &config.state_dir)?
    } else {
        None
    };
    let audit = open_audit(config, &vault)?;
    let policy = match &config.policy.path {
        Some(path) => {
            let policy = crate::auth::policy::Policy::load(path)?;
            tracing::info!(path = %path.display(), roles = policy.role_names().len(), "policy loaded");
            Some(policy)
        }
        None => None,
    };
    let config_sha256 = match &eff.source {
        ConfigSource::File(p) => fs::read(p).ok().map(|b| crate::audit::sha256_hex(&b)),
        ConfigSource::Defaults => None,
    };
    if let Some(a) = &audit {
        record_start(a, &eff, config_sha256.as_deref(), policy.as_ref());
    }
    if let Some(what) = restore_finished {
        tracing::warn!("{what}");
        if let Some(a) = &audit {
            let event = crate::audit::Event::by_daemon(
                EventType::BackupRestored,
                "keystore",
                "restore",
                crate::audit::Outcome::Success,
                9,
                crate::audit::Meta::message(what),
            );
            if let Err(e) = a.record_sync(event) {
                tracing::error!("{}", e.message);
            }
        }
    }
    if let Some(path) = &config.unlock.keyfile {
        unlock_at_start(&vault, path, audit.as_deref());
    }
    if config.unlock.tpm2 && vault.custody().state() == protocol::ServiceState::Locked {
        let unlocked = vault.unlock(nix::unistd::getuid().as_raw(), &protocol::UnlockSecret::Tpm2);
        record_unlock_at_start(audit.as_deref(), "the TPM", &unlocked);
    }

    let gate = if eff.dev {
        AccessGate::dev(nix::unistd::getuid().as_raw())
    } else if eff.user {
        AccessGate::only(nix::unistd::getuid().as_raw())
    } else {
        let (gate, warnings) = AccessGate::from_config(&config.access);
        for w in warnings {
            tracing::warn!("{w}");
        }
        gate
    };

    let mut builder = if config.limits.reactor_threads > 1 {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.limits.reactor_threads as usize);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = builder
        .enable_all()
        .max_blocking_threads(config.limits.blocking_threads as usize)
        .thread_stack_size(crate::secure_mem::THREAD_STACK)
        .thread_name("hsmd-worker")
        .build()
        .map_err(DaemonError::Runtime)?;
    let mut shared = Shared::new(config.limits.clone(), gate, eff.dev, vault);
    shared.memory_locked = hardening.locked;
    shared.profile = config.profile.into();
    shared.recovery_window = config.keys.recovery_window;
    shared.limiters = crate::auth::rate::Limiters::new(config.rate_limit.rate());
    if let Some(policy) = policy {
        shared.set_policy(policy);
    }
    shared.audit = audit;
    let tuning = crate::filestore::pipeline::Tuning {
        workers: config.files.workers(),
        io_timeout: config.files.io_timeout,
        workers_busy: Arc::default(),
        memory: Arc::new(crate::budget::Budget::new(
            config.files.transfer_memory as usize,
            config.files.transfer_memory_per_uid as usize,
        )),
    };
    let capacity = crate::filestore::service::Capacity {
        transfers: config.files.max_transfers as usize,
        transfers_per_uid: config.files.max_transfers_per_uid as usize,
        sessions: config.files.max_sessions as usize,
        sessions_per_uid: config.files.max_sessions_per_uid as usize,
    };
    let files =
        crate::filestore::Files::open(&config.state_dir, tuning, capacity).map_err(|e| DaemonError::StateDir {
            path: config.state_dir.join("files"),
            source: std::io::Error::other(e.to_string()),
        })?;
    shared.files = Some(Arc::new(files));
    let shared = Arc::new(shared);
    let config_file = match &eff.source {
        ConfigSource::File(p) => Some(p.clone()),
        ConfigSource::Defaults => None,
    };
    // Dev mode's state is deleted at exit only when it is in the scratch directory.
    let throw_away = scratch.as_ref().is_some_and(|d| config.state_dir.starts_with(d.path()));
    let result = runtime.block_on(serve_until_signalled(
        config,
        Arc::clone(&shared),
        (dev_keyfile.as_deref(), throw_away),
        (config_file, config_sha256),
    ));
    // Blocking jobs past the grace period are abandoned, not awaited.
    runtime.shutdown_timeout(Duration::from_millis(100));
    if let Some(audit) = &shared.audit {
        let why = match &result {
            Ok(()) => "stopped by a signal".to_owned(),
            Err(e) => format!("stopped: {e}"),
        };
        if let Err(e) = audit.record_sync(crate::audit::Event::by_daemon(
            EventType::DaemonStopped,
            "daemon",
            "stop",
            crate::audit::Outcome::Success,
            3,
            crate::audit::Meta::message(why),
        )) {
            tracing::error!("{}", e.message);
        }
        audit.close();
    }
    drop(scratch);
    logging::flush(Duration::from_secs(1));
    result
}

/// Opens the audit log (unless it is off), reading it back and repairing what
/// a crash left (see [`crate::audit`]).
fn open_audit(config: &Config, vault: &Arc<Vault>) -> Result<Option<Arc<crate::audit::Auditor>>, DaemonError> {
    if !config.audit.enabled {
        tracing::warn!("the audit log is off (audit.enabled = false)");
        return Ok(None);
    }
    let settings = crate::audit::Settings {
        path: config
            .audit
            .path
            .clone()
            .unwrap_or_else(|| config.state_dir.join("audit.log")),
        max_file_bytes: config.audit.max_file_bytes,
        keep_files: config.audit.keep_files,
        buffer_events: config.audit.buffer_events,
        flush_interval: config.audit.flush_interval,
    };
    let path = settings.path.clone();
    let anchors: Arc<dyn crate::audit::AnchorStore> = Arc::clone(vault) as Arc<dyn crate::audit::AnchorStore>;
    let auditor =
        crate::audit::Auditor::open(settings, anchors).map_err(|source| DaemonError::Audit { path, source })?;
    tracing::info!(path = %auditor.path().display(), "audit log open");
    Ok(Some(Arc::new(auditor)))
}

/// `DAEMON_STARTED`: what runs, with what configuration and policy.
fn record_start(
    audit: &crate::audit::Auditor,
    eff: &Effective,
    config_sha256: Option<&str>,
    policy: Option<&crate::auth::policy::Policy>,
) {
    let mut meta = crate::audit::Meta::message(if eff.dev {
        "hsmd --dev started".to_owned()
    } else {
        "hsmd started".to_owned()
    });
    let x = meta.extra();
    x.daemon_version = Some(server::VERSION);
    x.profile = Some(protocol::Profile::from(eff.config.profile).as_str());
    x.config = Some(match &eff.source {
        ConfigSource::File(p) => p.display().to_string(),
        ConfigSource::Defaults => "built-in defaults".to_owned(),
    });
    x.config_sha256 = config_sha256.map(str::to_owned);
    x.policy_sha256 = policy.map(|p| crate::audit::sha256_hex(p.text().as_bytes()));
    if let Err(e) = audit.record_sync(crate::audit::Event::by_daemon(
        EventType::DaemonStarted,
        "daemon",
        "start",
        crate::audit::Outcome::Success,
        3,
        meta,
    )) {
        tracing::error!("{}", e.message);
    }
}

/// Logs and audits an unlock hsmd made by itself at start.
fn record_unlock_at_start(
    audit: Option<&crate::audit::Auditor>,
    how: &str,
    unlocked: &Result<(u32, Vec<String>), VaultError>,
) {
    use crate::audit::{Event, Meta, Outcome};
    let event = match unlocked {
        Ok((slot, warnings)) => {
            tracing::info!(slot, "unlocked at start with {how}");
            let mut message = format!("unlocked at start with {how} (slot {slot})");
            if !warnings.is_empty() {
                message = format!("{message}; the keystore check found: {}", warnings.join("; "));
            }
            let risk = if warnings.is_empty() { 3 } else { 9 };
            Event::by_daemon(
                EventType::Unlock,
                "keystore",
                "unlock",
                Outcome::Success,
                risk,
                Meta::message(message),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "{how} did not unlock at start; staying locked (unlock with another slot)");
            let mut meta = Meta::message(format!("{how} did not unlock at start: {e}"));
            meta.error = Some(e.to_wire().code.as_str());
            Event::by_daemon(EventType::UnlockFailed, "keystore", "unlock", Outcome::Failure, 6, meta)
        }
    };
    if let Some(audit) = audit {
        if let Err(e) = audit.record_sync(event) {
            tracing::error!("{}", e.message);
        }
    }
}

async fn serve_until_signalled(
    config: &Config,
    shared: Arc<Shared>,
    (dev_keyfile, throw_away): (Option<&Path>, bool),
    (config_file, config_sha256): (Option<PathBuf>, Option<String>),
) -> Result<(), DaemonError> {
    let activated = listener::from_systemd()?;
    let listener = match activated.hsmd {
        Some(l) => l,
        None => listener::bind(&config.socket)?,
    };
    let agent = match (activated.ssh_agent, &config.ssh_agent.socket) {
        (Some(l), _) => Some(l),
        // The agent socket is reached by the same people as the main one.
        (None, Some(path)) => Some(listener::bind(&crate::config::SocketConfig {
            path: path.clone(),
            ..config.socket.clone()
        })?),
        (None, None) => None,
    };
    if let Some(agent) = &agent {
        tracing::info!(socket = %agent.path.display(), activated = agent.is_activated(), "SSH agent socket listening");
    }
    let path = listener.path.display().to_string();
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?;

    if shared.dev {
        announce_dev(&path, &config.state_dir, throw_away, dev_keyfile);
    }
    tracing::info!(
        socket = %path,
        activated = listener.is_activated(),
        version = server::VERSION,
        "hsmd is listening"
    );
    // The socket is bound and listening: connections are accepted from here on.
    systemd::ready(&format!("serving on {path}"));
    if let Some(period) = systemd::spawn_watchdog(shared.shutdown.clone()) {
        tracing::info!(?period, "systemd watchdog enabled");
    }
    spawn_auto_lock(config, &shared);
    let maintenance = crate::maintenance::spawn(config, &shared);
    crate::reload::Reloader::new(
        Arc::clone(&shared),
        config.policy.path.clone(),
        config_file,
        config_sha256,
    )
    .spawn()
    .map_err(DaemonError::Runtime)?;
    if let Some(addr) = config.metrics.listen {
        let s = Arc::clone(&shared);
        crate::metrics::serve(addr, shared.shutdown.clone(), Arc::new(move || s.render_metrics()))
            .await
            .map_err(|source| DaemonError::Metrics { addr, source })?;
    }

    let stop = shared.shutdown.clone();
    let signals = tokio::spawn(async move {
        let name = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        tracing::info!("{name} received; stopping");
        systemd::stopping("stopping: finishing requests in flight");
        stop.cancel();
    });

    let tracker = server::serve(&listener.socket, agent.as_ref().map(|a| &a.socket), Arc::clone(&shared)).await;
    listener.close();
    if let Some(agent) = agent {
        agent.close();
    }
    signals.abort();
    let open = shared.counters.connections();
    let grace = config.limits.shutdown_grace;
    if open > 0 {
        systemd::status(&format!("stopping: finishing {open} connections"));
    }
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            in_flight = shared.counters.in_flight(),
            "requests still running after the {} shutdown grace are abandoned",
            humantime::format_duration(grace)
        );
    }
    // Use counts gathered since the last flush are written before exit.
    let _ = maintenance.await;
    let vault = Arc::clone(&shared.vault);
    match tokio::task::spawn_blocking(move || vault.keys().flush_usage()).await {
        Ok(Ok(n)) if n > 0 => tracing::info!(versions = n, "key use counts written"),
        Ok(Err(e)) => tracing::error!(error = %e, "could not write key use counts at shutdown"),
        _ => {}
    }
    tracing::info!("hsmd stopped");
    Ok(())
}

/// The state directory's lock file (`flock`, released by the kernel when
/// hsmd exits however it exits); it holds the holder's pid.
const STATE_LOCK_FILE: &str = "hsmd.lock";

/// Whether the policy file at `path` loads and binds anyone, for the
/// production profile's check.
fn policy_binds(path: &Path) -> Result<bool, String> {
    crate::auth::policy::Policy::load(path)
        .map(|p| !p.is_empty())
        .map_err(|e| e.to_string())
}

fn prepare_state_dir(dir: &Path) -> Result<fs::File, DaemonError> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let err = |source| DaemonError::StateDir {
        path: dir.to_owned(),
        source,
    };
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    } else if !dir.is_dir() {
        return Err(err(std::io::Error::other("exists and is not a directory")));
    }
    let path = dir.join(STATE_LOCK_FILE);
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|source| DaemonError::StateDir {
            path: path.clone(),
            source,
        })?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = (&lock).take(32).read_to_string(&mut text);
            return Err(DaemonError::StateDirInUse {
                path: dir.to_owned(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(fs::TryLockError::Error(source)) => return Err(DaemonError::StateDir { path, source }),
    }
    let pid = format!("{}\n", std::process::id());
    lock.set_len(0)
        .and_then(|()| std::io::Write::write_all(&mut &lock, pid.as_bytes()))
        .map_err(|source| DaemonError::StateDir {
            path: path.clone(),
            source,
        })?;
    Ok(lock)
}

/// `--dev` comes up initialized and unlocked: a fresh master key behind one
/// key-file slot whose file lives in the state dir, so `lock` and `unlock` can be
/// tried. A state dir that already holds a keystore is used as it is (locked).
fn dev_initialize(vault: &Vault, state_dir: &Path) -> Result<Option<PathBuf>, DaemonError> {
    if vault.custody().state() != protocol::ServiceState::Uninitialized {
        return Ok(None);
    }
    let key = zeroize::Zeroizing::new(crate::keystore::crypto::random::<32>().map_err(VaultError::from)?);
    let path = state_dir.join("dev.key");
    fs::write(&path, key.as_ref()).map_err(|source| DaemonError::StateDir {
        path: path.clone(),
        source,
    })?;
    vault.custody().init(&protocol::NewSlot::Keyfile {
        label: "hsmd --dev".to_owned(),
        key: protocol::SecretBytes::new(key.to_vec()),
    })?;
    Ok(Some(path))
}

/// `unlock.keyfile`: unattended unlock at start. Failure leaves hsmd locked and
/// serving, so an operator can still unlock by hand; it is logged as an error
/// and audited.
fn unlock_at_start(vault: &Vault, path: &Path, audit: Option<&crate::audit::Auditor>) {
    use std::os::unix::fs::PermissionsExt;
    if vault.custody().state() != protocol::ServiceState::Locked {
        return;
    }
    let key = match fs::read(path) {
        Ok(k) => zeroize::Zeroizing::new(k),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read unlock.keyfile; staying locked");
            return;
        }
    };
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "unlock.keyfile is readable by others; make it 0600 or 0400");
        }
    }
    let secret = protocol::UnlockSecret::Keyfile(protocol::SecretBytes::new(key.to_vec()));
    let unlocked = vault.unlock(nix::unistd::getuid().as_raw(), &secret);
    record_unlock_at_start(audit, &format!("unlock.keyfile ({})", path.display()), &unlocked);
}

/// Locks by itself after `unlock.idle_lock` or `unlock.max_unlocked`, if set.
fn spawn_auto_lock(config: &Config, shared: &Arc<Shared>) {
    let (idle, max) = (config.unlock.idle_lock, config.unlock.max_unlocked);
    let Some(shortest) = [idle, max].into_iter().flatten().min() else {
        return;
    };
    let period = (shortest / 10).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                () = shared.shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if let Some(why) = shared.vault.custody().enforce_timeouts(idle, max) {
                        tracing::info!("locked automatically: {why}");
                    }
                }
            }
        }
    });
}

fn announce_dev(socket: &str, state_dir: &Path, throw_away: bool, keyfile: Option<&Path>) {
    let uid = nix::unistd::getuid();
    let who = if uid.is_root() {
        "root only".to_owned()
    } else {
        let name = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map_or_else(|| format!("uid {uid}"), |u| format!("{} (uid {uid})", u.name));
        format!("{name} and root, nobody else")
    };
    let bar = "=".repeat(72);
    logging::print(&format!(
        "{bar}\n  hsmd --dev: A THROW-AWAY INSTANCE. NOT FOR PRODUCTION.\n  \
         State lives in {} and {}.\n  \
         It serves {who}.\n  \
         It is unlocked; after `hsmctl lock`, unlock again with\n    \
         hsmctl unlock --keyfile {}\n{bar}",
        state_dir.display(),
        if throw_away {
            "is deleted when hsmd exits"
        } else {
            "is kept when hsmd exits (--state-dir)"
        },
        keyfile.map_or_else(|| "<the key file you used>".to_owned(), |p| p.display().to_string()),
    ));
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "export HSMD_SOCKET={socket}");
    let _ = out.flush();
}
