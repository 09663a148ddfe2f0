//! The daemon's configuration file (TOML). Unknown keys are errors that name the
//! key and the line; every value is range-checked before the daemon uses it.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where the packaged configuration lives.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/hsmd/hsmd.toml";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `production` refuses to run with any setting that weakens the daemon
    /// (see [`Config::production_problems`]); `development` (the default) only warns.
    pub profile: Profile,
    /// Where the keystore and other state live.
    pub state_dir: PathBuf,
    /// The listening socket.
    pub socket: SocketConfig,
    /// The SSH agent socket.
    pub ssh_agent: SshAgentConfig,
    /// Who may connect at all (roles and permissions come later, in the policy).
    pub access: AccessConfig,
    /// Resource limits.
    pub limits: Limits,
    /// Logging.
    pub log: LogConfig,
    /// Memory protection.
    pub memory: MemoryConfig,
    /// Unlocking and automatic locking.
    pub unlock: UnlockConfig,
    /// Key lifecycle housekeeping.
    pub keys: KeysConfig,
    /// Roles and bindings.
    pub policy: PolicyConfig,
    /// Per-uid request rates.
    pub rate_limit: RateLimitConfig,
    /// The audit log.
    pub audit: AuditConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// The token file store.
    pub files: FilesConfig,
    /// Where keys live besides `soft`.
    pub backends: BackendsConfig,
}

/// `[backends]`: `soft` is always there; each other backend is on when its
/// section is present.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendsConfig {
    /// The backend of keys whose creation names none.
    pub default: String,
    /// `[backends.mock]`: development and tests only.
    pub mock: Option<MockConfig>,
    /// `[backends.pkcs11]`: a PKCS#11 token.
    pub pkcs11: Option<Pkcs11Config>,
    /// `[backends.tpm]`: the machine's TPM 2.0.
    pub tpm: Option<TpmConfig>,
}

/// `[backends.tpm]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TpmConfig {
    /// How to reach the TPM (a tss2 TCTI string): the kernel resource manager
    /// by default, so other programs can use the TPM too.
    pub tcti: String,
}

impl Default for TpmConfig {
    fn default() -> Self {
        Self {
            tcti: "device:/dev/tpmrm0".to_owned(),
        }
    }
}

/// `[backends.pkcs11]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pkcs11Config {
    /// The vendor's PKCS#11 module (loaded only in hsmd's helper process).
    pub module: PathBuf,
    /// The token, by label.
    pub token_label: Option<String>,
    /// The token, by serial number.
    pub token_serial: Option<String>,
    /// A file holding the token's user PIN, readable by hsmd's user only.
    /// Unset: the PIN is sealed in the keystore (`hsmctl backend pkcs11
    /// set-pin`) and handed to the token at each unlock.
    pub pin_file: Option<PathBuf>,
    /// Directories a module may be loaded from (its real path, symlinks resolved).
    pub allowed_module_dirs: Vec<PathBuf>,
    /// Sessions (one per helper worker thread), capped by the token's limit.
    pub sessions: u32,
    /// How long one token operation may take before the helper is deemed hung
    /// and restarted.
    #[serde(with = "humantime_serde")]
    pub op_timeout: Duration,
    /// How often the token's health is checked.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
}

impl Default for Pkcs11Config {
    fn default() -> Self {
        Self {
            module: PathBuf::new(),
            token_label: None,
            token_serial: None,
            pin_file: None,
            allowed_module_dirs: ["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib"]
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            sessions: 4,
            op_timeout: Duration::from_secs(10),
            health_interval: Duration::from_secs(5),
        }
    }
}

impl Default for BackendsConfig {
    fn default() -> Self {
        Self {
            default: "soft".to_owned(),
            mock: None,
            pkcs11: None,
            tpm: None,
        }
    }
}

/// `[backends.mock]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MockConfig {
    /// Added to every key generation and operation.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Fraction of generations and operations that fail (0.0 to 1.0).
    pub failure_rate: f64,
}

/// `[files]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// Threads that seal or open chunks, shared by all transfers running at
    /// once (each has at least one); 0: one per core.
    pub workers: u32,
    /// How long a transfer waits on a caller's pipe that neither gives nor
    /// takes bytes before it gives up.
    #[serde(with = "humantime_serde")]
    pub io_timeout: Duration,
    /// Transfers through a passed descriptor running at once; each has its
    /// own threads, apart from those that serve key operations.
    pub max_transfers: u32,
    /// … of which one uid may run; more get `busy`.
    pub max_transfers_per_uid: u32,
    /// Frame-path (`--via frames`) sessions open at once.
    pub max_sessions: u32,
    /// … of which one uid may hold; more get `busy`.
    pub max_sessions_per_uid: u32,
    /// Bytes of chunk buffers all descriptor transfers may hold at once. A
    /// transfer grows its buffers as it needs them while there is room; one
    /// that cannot get even its first is refused as `busy`.
    pub transfer_memory: u32,
    /// … of which one uid's transfers may hold.
    pub transfer_memory_per_uid: u32,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            workers: 0,
            io_timeout: Duration::from_secs(60),
            max_transfers: 16,
            max_transfers_per_uid: 4,
            max_sessions: 64,
            max_sessions_per_uid: 8,
            transfer_memory: 24 * 1024 * 1024,
            transfer_memory_per_uid: 18 * 1024 * 1024,
        }
    }
}

impl FilesConfig {
    /// Workers per transfer, with 0 resolved to the number of cores.
    #[must_use]
    pub fn workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            n => n as usize,
        }
    }
}

/// `[ssh_agent]`: hsmd's keys for ssh, ssh-add, `ssh-keygen -Y`, git and
/// sshd's `HostKeyAgent`, through the SSH agent protocol on a socket of its
/// own, with the main socket's mode, group, access and policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshAgentConfig {
    /// Where hsmd binds the agent socket when systemd does not pass one
    /// (`FileDescriptorName=ssh-agent`); off when unset.
    pub socket: Option<PathBuf>,
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` here (a loopback address, e.g. `127.0.0.1:9091`);
    /// off when unset. `hsmctl metrics` works either way.
    pub listen: Option<std::net::SocketAddr>,
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Write the audit log at all.
    pub enabled: bool,
    /// The log file; default `audit.log` in the state directory.
    pub path: Option<PathBuf>,
    /// How often written lines are synced to disk (security events are
    /// synced before their answer).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// The most events waiting to be written; at this many (the disk is
    /// slower than the requests, or failing), audited requests are refused.
    pub buffer_events: usize,
    /// Rotate the file when it passes this many bytes.
    pub max_file_bytes: u64,
    /// Rotated files kept.
    pub keep_files: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
            flush_interval: Duration::from_secs(1),
            buffer_events: 4096,
            max_file_bytes: 64 * 1024 * 1024,
            keep_files: 8,
        }
    }
}

/// The deployment profile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Everything is allowed; weak settings are warnings.
    #[default]
    Development,
    /// Weak settings are refused at start and by `--check-config`.
    Production,
}

impl From<Profile> for protocol::Profile {
    fn from(p: Profile) -> Self {
        match p {
            Profile::Development => Self::Development,
            Profile::Production => Self::Production,
        }
    }
}

/// One setting the production profile refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductionProblem {
    /// The dotted key.
    pub key: &'static str,
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

impl std::fmt::Display for ProductionProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}; {}", self.key, self.problem, self.fix)
    }
}

/// `[policy]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The policy file (roles, bindings); watched and reloaded when it changes.
    /// Unset: every admitted peer is admin (the connection gate is the only check).
    pub path: Option<PathBuf>,
}

/// `[rate_limit]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Sustained requests per second per uid; 0 turns the default limit off
    /// (roles may still set their own).
    pub per_second: u32,
    /// Requests a uid may send at once above the rate (default: twice the rate).
    pub burst: u32,
}

impl RateLimitConfig {
    /// The default rate, if on.
    #[must_use]
    pub fn rate(&self) -> Option<Rate> {
        (self.per_second > 0).then(|| Rate {
            per_second: self.per_second,
            burst: if self.burst == 0 {
                self.per_second.saturating_mul(2)
            } else {
                self.burst
            },
        })
    }
}

/// A per-uid request rate: a role's (in the policy), overriding the daemon's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests allowed at once above the rate.
    pub burst: u32,
}

/// Argon2id cost, per slot. Defaults are above OWASP's current minimums
/// (m = 19 MiB, t = 2, p = 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Argon2Cost {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Argon2Cost {
    /// OWASP's floor for Argon2id; nothing weaker is accepted.
    pub const FLOOR: Self = Self {
        memory_kib: 19 * 1024,
        iterations: 2,
        parallelism: 1,
    };
    /// Beyond these a stored slot is treated as tampered (an edited row must
    /// not make the daemon allocate gigabytes).
    const CEILING_MEMORY_KIB: u32 = 4 * 1024 * 1024;
    const CEILING_ITERATIONS: u32 = 64;
    const CEILING_PARALLELISM: u32 = 16;

    /// Whether the cost is within what hsmd accepts.
    #[must_use]
    pub fn problem(&self) -> Option<String> {
        if self.memory_kib < Self::FLOOR.memory_kib || self.iterations < Self::FLOOR.iterations || self.parallelism < 1
        {
            return Some(format!(
                "argon2id cost m={} t={} p={} is below the floor m={} t={} p=1",
                self.memory_kib,
                self.iterations,
                self.parallelism,
                Self::FLOOR.memory_kib,
                Self::FLOOR.iterations
            ));
        }
        if self.memory_kib > Self::CEILING_MEMORY_KIB
            || self.iterations > Self::CEILING_ITERATIONS
            || self.parallelism > Self::CEILING_PARALLELISM
        {
            return Some(format!(
                "argon2id cost m={} t={} p={} is above the ceiling m={} t={} p={}",
                self.memory_kib,
                self.iterations,
                self.parallelism,
                Self::CEILING_MEMORY_KIB,
                Self::CEILING_ITERATIONS,
                Self::CEILING_PARALLELISM
            ));
        }
        None
    }
}

impl Default for Argon2Cost {
    fn default() -> Self {
        Self {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

/// The largest chunk of the token file store (its format's limit); the
/// transfer buffers must hold two.
pub const MAX_FILE_CHUNK: u32 = 8 * 1024 * 1024;

/// `[keys]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// How long a deleted key can be restored before the daemon purges it (7 to 90 days).
    #[serde(with = "humantime_serde")]
    pub recovery_window: Duration,
    /// How often use counts and last-use times are written to the keystore
    /// (they are kept in memory in between, and written at a clean shutdown).
    #[serde(with = "humantime_serde")]
    pub usage_flush_interval: Duration,
    /// How often the daemon looks for due rotations and ended recovery windows.
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
    /// The shortest automatic rotation period a key may be given (1 second
    /// to 30 days). A period shorter than an hour rotates faster than anyone
    /// audits, and floods the key's version list.
    #[serde(with = "humantime_serde")]
    pub min_rotation_period: Duration,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            recovery_window: Duration::from_secs(30 * 86_400),
            usage_flush_interval: Duration::from_secs(30),
            maintenance_interval: Duration::from_secs(1),
            min_rotation_period: Duration::from_secs(3600),
        }
    }
}

/// `[unlock]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnlockConfig {
    /// A key file (32 bytes) to unlock with at start, for unattended boots
    /// (e.g. a systemd credential under `$CREDENTIALS_DIRECTORY`).
    pub keyfile: Option<PathBuf>,
    /// Unlock at start from the TPM2 slots (needs `[backends.tpm]`): an
    /// unattended boot with no passphrase; a changed PCR leaves hsmd locked.
    pub tpm2: bool,
    /// Lock after this long without a key operation. Off when unset.
    #[serde(with = "humantime_serde")]
    pub idle_lock: Option<Duration>,
    /// Lock this long after unlocking, however busy. Off when unset.
    #[serde(with = "humantime_serde")]
    pub max_unlocked: Option<Duration>,
    /// Argon2id memory (KiB) for new passphrase slots.
    pub argon2_memory_kib: u32,
    /// Argon2id passes for new passphrase slots.
    pub argon2_iterations: u32,
    /// Argon2id lanes for new passphrase slots.
    pub argon2_parallelism: u32,
}

impl Default for UnlockConfig {
    fn default() -> Self {
        let cost = Argon2Cost::default();
        Self {
            keyfile: None,
            tpm2: false,
            idle_lock: None,
            max_unlocked: None,
            argon2_memory_kib: cost.memory_kib,
            argon2_iterations: cost.iterations,
            argon2_parallelism: cost.parallelism,
        }
    }
}

impl UnlockConfig {
    /// The Argon2id cost for new passphrase slots.
    #[must_use]
    pub fn argon2_cost(&self) -> Argon2Cost {
        Argon2Cost {
            memory_kib: self.argon2_memory_kib,
            iterations: self.argon2_iterations,
            parallelism: self.argon2_parallelism,
        }
    }
}

/// `[memory]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Refuse to start when memory cannot be locked (keys could reach swap).
    /// `hsmd --dev` only warns, whatever this says.
    pub require_lock: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self { require_lock: true }
    }
}

/// `[socket]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    /// Path of the Unix socket (ignored under socket activation).
    pub path: PathBuf,
    /// Permission bits of the socket file, as an octal string.
    pub mode: OctalMode,
    /// Group that owns the socket file; unset keeps the daemon's own group.
    pub group: Option<String>,
}

/// `[access]`: the connect-time gate. Root is let in when `allow_root` is set;
/// anyone else must be listed by user or be a member of a listed group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Whether uid 0 may connect.
    pub allow_root: bool,
    /// User names or numeric uids that may connect.
    pub users: Vec<String>,
    /// Group names or numeric gids whose members may connect.
    pub groups: Vec<String>,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request frame body accepted, in bytes.
    pub max_frame_bytes: u32,
    /// Connections served at once; more get `TooManyConnections`.
    pub max_connections: u32,
    /// Connections one uid may hold; more get `TooManyConnections`, naming this.
    pub max_connections_per_uid: u32,
    /// Of `max_connections`, how many only root and callers with the admin
    /// role may take, so that they can always get in to look and to lock.
    pub reserved_connections: u32,
    /// Requests one connection may have in flight; further ones wait unread.
    pub max_requests_in_flight: u32,
    /// Bytes of request frames held at once, from a frame's header until its
    /// answer is written; a connection over it waits, unread.
    pub frame_memory: u32,
    /// … of which one uid may hold.
    pub frame_memory_per_uid: u32,
    /// A frame must arrive whole within this time once its first byte has.
    #[serde(with = "humantime_serde")]
    pub frame_timeout: Duration,
    /// A connection with nothing in flight is closed after this long without a request.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// On SIGTERM, how long requests in flight may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Threads for work that blocks (key operations, disk, slow backends).
    pub blocking_threads: u32,
    /// Threads running the reactor: 1 (one thread; the default, see BENCHMARKS.md)
    /// or more (tokio's multi-threaded scheduler).
    pub reactor_threads: u32,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `hsmd=debug,warn`, …
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

/// The longest log filter taken.
const MAX_LOG_FILTER: usize = 1024;

/// A log filter (`[log] level`, `HSMD_LOG`) parsed, or `None` when it is not
/// one: levels and `target=level` directives, comma-separated. Span and
/// field filters (`[span{field=value}]`) are not taken: tracing-subscriber
/// compiles their values as regular expressions, which some short texts
/// make take seconds, and slices some non-ASCII text inside a character and
/// panics; hsmd must refuse a bad config line, not hang or crash on it.
#[must_use]
pub fn log_filter(text: &str) -> Option<tracing_subscriber::EnvFilter> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '=' | ',' | '.' | '-' | ' ');
    if text.len() > MAX_LOG_FILTER || !text.chars().all(plain) {
        return None;
    }
    tracing_subscriber::EnvFilter::try_new(text).ok()
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A file mode written as an octal string (`"0660"`), as in `chmod`.
#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct OctalMode(pub u32);

impl fmt::Debug for OctalMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl TryFrom<String> for OctalMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
            Ok(m) if m <= 0o777 => Ok(Self(m)),
            _ => Err(format!(
                "invalid mode {s:?}: write permission bits as an octal string such as \"0660\""
            )),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            profile: Profile::default(),
            state_dir: PathBuf::from("/var/lib/hsmd"),
            socket: SocketConfig::default(),
            ssh_agent: SshAgentConfig::default(),
            access: AccessConfig::default(),
            limits: Limits::default(),
            log: LogConfig::default(),
            memory: MemoryConfig::default(),
            unlock: UnlockConfig::default(),
            keys: KeysConfig::default(),
            policy: PolicyConfig::default(),
            rate_limit: RateLimitConfig::default(),
            audit: AuditConfig::default(),
            metrics: MetricsConfig::default(),
            files: FilesConfig::default(),
            backends: BackendsConfig::default(),
        }
    }
}

impl Default for SocketConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from(protocol::DEFAULT_SOCKET),
            mode: OctalMode(0o660),
            group: None,
        }
    }
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            allow_root: true,
            users: Vec::new(),
            groups: vec!["hsmd".to_owned()],
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: protocol::frame::DEFAULT_MAX_FRAME,
            max_connections: 256,
            max_connections_per_uid: 32,
            reserved_connections: 8,
            max_requests_in_flight: 32,
            frame_memory: 8 * 1024 * 1024,
            frame_memory_per_uid: 4 * 1024 * 1024,
            frame_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(10),
            blocking_threads: 16,
            reactor_threads: 1,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has unknown keys or wrong types. The TOML
    /// error names the line, the column and the key.
    #[error("invalid config file {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value parsed but is out of range.
    #[error("invalid config{}: {key}: {problem}", origin.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Invalid {
        /// The file, if the value came from one.
        origin: Option<PathBuf>,
        /// The dotted key.
        key: &'static str,
        /// What is wrong and what is allowed.
        problem: String,
    },
}

impl Config {
    /// Every setting the production profile refuses, each naming the key and
    /// the fix. Reads the state directory's mode; `dev` is whether this is
    /// `hsmd --dev`; `policy_binds` loads the policy file at `policy.path` and
    /// says whether it binds anyone (the daemon passes the policy module's
    /// loader, so this module depends on no other).
    #[must_use]
    pub fn production_problems(
        &self,
        dev: bool,
        policy_binds: impl FnOnce(&Path) -> Result<bool, String>,
    ) -> Vec<ProductionProblem> {
        let mut out = Vec::new();
        let mut no = |key: &'static str, problem: String, fix: &str| {
            out.push(ProductionProblem {
                key,
                problem,
                fix: fix.to_owned(),
            });
        };
        if dev {
            no(
                "profile",
                "hsmd --dev is a throw-away instance".into(),
                "run without --dev, or set profile = \"development\"",
            );
        }
        let mode = self.socket.mode.0;
        if mode & !0o660 != 0 {
            no(
                "socket.mode",
                format!("{mode:04o} lets users outside the socket's owner and group connect"),
                "use 0660 (or narrower) and admit users through socket.group",
            );
        }
        match &self.policy.path {
            None => no(
                "policy.path",
                "no policy file: every admitted peer would be admin".into(),
                "write a policy (roles and bindings) and set policy.path",
            ),
            Some(path) => match policy_binds(path) {
                Ok(false) => no(
                    "policy.path",
                    format!("{} binds no user or group to any role", path.display()),
                    "add [[bind]] entries",
                ),
                Ok(true) => {}
                Err(e) => no("policy.path", e, "fix the policy file"),
            },
        }
        if !self.audit.enabled {
            no(
                "audit.enabled",
                "the audit log is off".into(),
                "set audit.enabled = true",
            );
        }
        if self.rate_limit.per_second == 0 {
            no(
                "rate_limit.per_second",
                "rate limits are off".into(),
                "set a per-uid rate, e.g. rate_limit.per_second = 1000 (roles may raise it)",
            );
        }
        if !self.memory.require_lock {
            no(
                "memory.require_lock",
                "hsmd would run even if keys could reach swap".into(),
                "set memory.require_lock = true and give hsmd CAP_IPC_LOCK or a large LimitMEMLOCK",
            );
        }
        if let Ok(meta) = std::fs::metadata(&self.state_dir) {
            use std::os::unix::fs::PermissionsExt as _;
            let m = meta.permissions().mode() & 0o777;
            if m & 0o077 != 0 {
                no(
                    "state_dir",
                    format!(
                        "{} is mode {m:04o}: others can read the keystore and audit log",
                        self.state_dir.display()
                    ),
                    "chmod 0700 it (systemd: StateDirectoryMode=0700)",
                );
            }
        }
        if self.backends.mock.is_some() {
            no(
                "backends.mock",
                "the mock backend injects failures and delays and is for development only".into(),
                "remove the [backends.mock] section",
            );
        }
        let level = self.log.level.to_ascii_lowercase();
        if level.contains("debug") || level.contains("trace") {
            no(
                "log.level",
                format!("{:?} logs every request in detail", self.log.level),
                "use info (or warn)",
            );
        }
        out
    }

    /// Reads and validates the file at `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and what is wrong with it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, Some(path))
    }

    /// Parses and validates configuration text; `origin` is used in messages.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(text: &str, origin: Option<&Path>) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.map_or_else(|| PathBuf::from("<text>"), Path::to_owned),
            source: Box::new(source),
        })?;
        config.validate().map_err(|(key, problem)| ConfigError::Invalid {
            origin: origin.map(Path::to_owned),
            key,
            problem,
        })?;
        Ok(config)
    }

    /// Checks ranges and relations the types cannot express.
    ///
    /// # Errors
    /// The dotted key at fault and what is allowed.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        use protocol::frame::MAX_FRAME_CEILING;
        let l = &self.limits;
        if !(1024..=MAX_FRAME_CEILING).contains(&l.max_frame_bytes) {
            return Err((
                "limits.max_frame_bytes",
                format!("{} is out of range; use 1024 to {MAX_FRAME_CEILING}", l.max_frame_bytes),
            ));
        }
        for (key, value, lo, hi) in [
            ("limits.max_connections", l.max_connections, 1, 65_536),
            ("limits.max_connections_per_uid", l.max_connections_per_uid, 1, 65_536),
            // More than max_connections - 1 keeps max_connections - 1.
            ("limits.reserved_connections", l.reserved_connections, 0, 65_536),
            ("limits.max_requests_in_flight", l.max_requests_in_flight, 1, 4096),
            ("limits.blocking_threads", l.blocking_threads, 1, 512),
            ("limits.reactor_threads", l.reactor_threads, 1, 64),
        ] {
            if !(lo..=hi).contains(&value) {
                return Err((key, format!("{value} is out of range; use {lo} to {hi}")));
            }
        }
        // A connection waits for room for its next frame: one whole frame must
        // fit in a uid's share, or it would wait forever.
        if l.frame_memory_per_uid < l.max_frame_bytes {
            return Err((
                "limits.frame_memory_per_uid",
                format!(
                    "{} is below limits.max_frame_bytes ({}): a largest frame could never be read",
                    l.frame_memory_per_uid, l.max_frame_bytes
                ),
            ));
        }
        if l.frame_memory < l.frame_memory_per_uid {
            return Err((
                "limits.frame_memory",
                format!(
                    "{} is below limits.frame_memory_per_uid ({}); use at least that",
                    l.frame_memory, l.frame_memory_per_uid
                ),
            ));
        }
        for (key, value) in [
            ("limits.frame_timeout", l.frame_timeout),
            ("limits.idle_timeout", l.idle_timeout),
        ] {
            if value < Duration::from_millis(100) {
                return Err((key, format!("{value:?} is too short; use at least 100ms")));
            }
        }
        if let Some(problem) = self.unlock.argon2_cost().problem() {
            return Err(("unlock.argon2_*", problem));
        }
        for (key, value) in [
            ("unlock.idle_lock", self.unlock.idle_lock),
            ("unlock.max_unlocked", self.unlock.max_unlocked),
        ] {
            if value.is_some_and(|v| v < Duration::from_secs(1)) {
                return Err((key, "use at least 1s, or leave it unset to turn it off".to_owned()));
            }
        }
        // The least a store of the largest chunks needs (two batches of one chunk).
        let least = 2 * (MAX_FILE_CHUNK as usize + 64);
        if (self.files.transfer_memory_per_uid as usize) < least {
            return Err((
                "files.transfer_memory_per_uid",
                format!("use at least {least} (two buffers of the largest chunk, 8 MiB)"),
            ));
        }
        if self.files.transfer_memory < self.files.transfer_memory_per_uid {
            return Err((
                "files.transfer_memory",
                "use at least files.transfer_memory_per_uid".to_owned(),
            ));
        }
        if self.files.workers > 64 {
            return Err(("files.workers", "use 1 to 64, or 0 for one per core".to_owned()));
        }
        if self.files.io_timeout < Duration::from_secs(1) {
            return Err(("files.io_timeout", "use at least 1s".to_owned()));
        }
        let f = &self.files;
        for (key, value, lo, hi) in [
            ("files.max_transfers", f.max_transfers, 1, 1024),
            (
                "files.max_transfers_per_uid",
                f.max_transfers_per_uid,
                1,
                f.max_transfers,
            ),
            ("files.max_sessions", f.max_sessions, 1, 65_536),
            ("files.max_sessions_per_uid", f.max_sessions_per_uid, 1, f.max_sessions),
        ] {
            if !(lo..=hi).contains(&value) {
                return Err((key, format!("{value} is out of range; use {lo} to {hi}")));
            }
        }
        let k = &self.keys;
        if !(Duration::from_secs(7 * 86_400)..=Duration::from_secs(90 * 86_400)).contains(&k.recovery_window) {
            return Err(("keys.recovery_window", "use 7 to 90 days (e.g. \"30d\")".to_owned()));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(30 * 86_400)).contains(&k.min_rotation_period) {
            return Err(("keys.min_rotation_period", "use 1s to 30d (e.g. \"1h\")".to_owned()));
        }
        for (key, value) in [
            ("keys.usage_flush_interval", k.usage_flush_interval),
            ("keys.maintenance_interval", k.maintenance_interval),
        ] {
            if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&value) {
                return Err((key, "use 100ms to 1h".to_owned()));
            }
        }
        if self.metrics.listen.is_some_and(|a| !a.ip().is_loopback()) {
            return Err((
                "metrics.listen",
                "the metrics listener has no authentication, so it binds loopback only (127.0.0.1:PORT or [::1]:PORT)"
                    .to_owned(),
            ));
        }
        let a = &self.audit;
        if a.path.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(("audit.path", "use an absolute path".to_owned()));
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(3600)).contains(&a.flush_interval) {
            return Err(("audit.flush_interval", "use 10ms to 1h".to_owned()));
        }
        if !(1..=1_000_000).contains(&a.buffer_events) {
            return Err(("audit.buffer_events", "use 1 to 1000000".to_owned()));
        }
        if a.max_file_bytes < 4096 || !(1..=1000).contains(&a.keep_files) {
            return Err((
                "audit.max_file_bytes",
                "use at least 4096 bytes, and audit.keep_files 1 to 1000".to_owned(),
            ));
        }
        if self.policy.path.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(("policy.path", "use an absolute path".to_owned()));
        }
        if self.rate_limit.per_second == 0 && self.rate_limit.burst > 0 {
            return Err(("rate_limit.burst", "set rate_limit.per_second as well".to_owned()));
        }
        if !self.socket.path.is_absolute() {
            return Err((
                "socket.path",
                format!("{} is not an absolute path", self.socket.path.display()),
            ));
        }
        if let Some(agent) = &self.ssh_agent.socket {
            if !agent.is_absolute() {
                return Err((
                    "ssh_agent.socket",
                    format!("{} is not an absolute path", agent.display()),
                ));
            }
            if *agent == self.socket.path {
                return Err((
                    "ssh_agent.socket",
                    "is the same path as socket.path; give the agent a socket of its own".to_owned(),
                ));
            }
        }
        if !self.state_dir.is_absolute() {
            return Err((
                "state_dir",
                format!("{} is not an absolute path", self.state_dir.display()),
            ));
        }
        if log_filter(&self.log.level).is_none() {
            return Err((
                "log.level",
                format!(
                    "{:?} is not a log filter; use error, warn, info, debug or trace, or \
                     target=level directives (e.g. hsmd=debug,warn), comma-separated",
                    self.log.level
                ),
            ));
        }
        if let Some(m) = &self.backends.mock {
            if !(0.0..=1.0).contains(&m.failure_rate) {
                return Err((
                    "backends.mock.failure_rate",
                    format!("{} is out of range; use 0.0 to 1.0", m.failure_rate),
                ));
            }
            if m.latency > Duration::from_secs(60) {
                return Err((
                    "backends.mock.latency",
                    format!("{:?} is out of range; use at most 60s", m.latency),
                ));
            }
        }
        if self.unlock.tpm2 && self.backends.tpm.is_none() {
            return Err((
                "unlock.tpm2",
                "needs a TPM: add a [backends.tpm] section (its tcti says how to reach the TPM)".into(),
            ));
        }
        if let Some(p) = &self.backends.pkcs11 {
            if p.module.as_os_str().is_empty() {
                return Err((
                    "backends.pkcs11.module",
                    "is not set; name the vendor's PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so)".into(),
                ));
            }
            if p.token_label.is_none() && p.token_serial.is_none() {
                return Err((
                    "backends.pkcs11.token_label",
                    "name the token by token_label or token_serial (or both)".into(),
                ));
            }
            if !(1..=64).contains(&p.sessions) {
                return Err((
                    "backends.pkcs11.sessions",
                    format!("{} is out of range; use 1 to 64", p.sessions),
                ));
            }
            if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&p.op_timeout) {
                return Err((
                    "backends.pkcs11.op_timeout",
                    format!("{:?} is out of range; use 100ms to 5m", p.op_timeout),
                ));
            }
            if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&p.health_interval) {
                return Err((
                    "backends.pkcs11.health_interval",
                    format!("{:?} is out of range; use 100ms to 1h", p.health_interval),
                ));
            }
        }
        let configured = |name: &str| match name {
            "soft" => true,
            "mock" => self.backends.mock.is_some(),
            "pkcs11" => self.backends.pkcs11.is_some(),
            "tpm" => self.backends.tpm.is_some(),
            _ => false,
        };
        if !configured(&self.backends.default) {
            return Err((
                "backends.default",
                format!(
                    "{:?} is not a configured backend; use soft, or a backend whose [backends.NAME] section is present",
                    self.backends.default
                ),
            ));
        }
        Ok(())
    }

    /// Things that are allowed but deserve a word in the log.
    #[must_use]
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.socket.mode.0 & 0o007 != 0 {
            w.push(format!(
                "socket.mode {:?} lets every local user reach the socket; the [access] check is then the only gate",
                self.socket.mode
            ));
        }
        if !self.access.allow_root && self.access.users.is_empty() && self.access.groups.is_empty() {
            w.push("[access] admits nobody: every connection will be refused".to_owned());
        }
        w
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_packaged_config_is_valid_and_names_every_section() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/hsmd.toml"));
        let mut c = Config::load(path).unwrap();
        // Shipped fit for production: hsmd refuses to start on an edit that weakens it.
        assert_eq!(c.profile, Profile::Production);
        // The policy it names is installed beside it; here, the repository's copy.
        assert_eq!(c.policy.path.as_deref(), Some(Path::new("/etc/hsmd/policy.toml")));
        c.policy.path = Some(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/policy.toml")).to_owned());
        let problems: Vec<String> = c
            .production_problems(false, policy_binds)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(problems.is_empty(), "{problems:?}");
        let text = std::fs::read_to_string(path).unwrap();
        for section in [
            "[socket]",
            "[access]",
            "[limits]",
            "[memory]",
            "[unlock]",
            "[policy]",
            "[rate_limit]",
            "[audit]",
            "[metrics]",
            "[keys]",
            "[files]",
            "[backends]",
            "profile",
        ] {
            assert!(text.contains(section), "{section} is not in the packaged config");
        }
    }

    use super::*;

    /// The daemon's loader of the policy file, as it passes it.
    fn policy_binds(path: &Path) -> Result<bool, String> {
        crate::auth::policy::Policy::load(path)
            .map(|p| !p.is_empty())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = Config::parse("", None).unwrap();
        assert_eq!(c.socket.path, PathBuf::from("/run/hsmd/hsmd.sock"));
        assert_eq!(c.socket.mode, OctalMode(0o660));
        assert_eq!(c.limits.max_frame_bytes, 1024 * 1024);
        assert!(c.access.allow_root);
        assert_eq!(c.access.groups, vec!["hsmd"]);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = "state_dir = \"/tmp/x\"\n[limits]\nmax_conections = 5\n";
        let e = Config::parse(text, Some(Path::new("/etc/hsmd/hsmd.toml"))).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/etc/hsmd/hsmd.toml"), "{msg}");
        assert!(msg.contains("max_conections"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn backends_are_checked_and_mock_is_not_for_production() {
        let c = Config::parse(
            "[backends]\ndefault = \"mock\"\n[backends.mock]\nlatency = \"5ms\"\nfailure_rate = 0.25\n",
            None,
        )
        .unwrap();
        let m = c.backends.mock.as_ref().unwrap();
        assert_eq!((m.latency, m.failure_rate), (Duration::from_millis(5), 0.25));
        assert!(c
            .production_problems(false, policy_binds)
            .iter()
            .any(|p| p.key == "backends.mock" && p.fix.contains("remove")));
        for (text, key) in [
            ("[backends.mock]\nfailure_rate = 1.5\n", "backends.mock.failure_rate"),
            ("[backends.mock]\nlatency = \"2m\"\n", "backends.mock.latency"),
            ("[backends]\ndefault = \"mock\"\n", "backends.default"),
            ("[backends]\ndefault = \"hsm9000\"\n", "backends.default"),
        ] {
            let e = Config::parse(text, None).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        assert!(Config::parse("", None)
            .unwrap()
            .production_problems(false, policy_binds)
            .iter()
            .all(|p| p.key != "backends.mock"));
    }

    #[test]
    fn durations_and_modes_are_human() {
        let c = Config::parse(
            "[socket]\nmode = \"0600\"\n[limits]\nidle_timeout = \"2m 30s\"\nframe_timeout = \"500ms\"\n",
            None,
        )
        .unwrap();
        assert_eq!(c.socket.mode, OctalMode(0o600));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(150));
        assert_eq!(c.limits.frame_timeout, Duration::from_millis(500));
        assert!(Config::parse("[socket]\nmode = \"0999\"\n", None).is_err());
        assert!(Config::parse("[socket]\nmode = \"7777\"\n", None).is_err());
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        for (text, key) in [
            ("[limits]\nmax_frame_bytes = 10\n", "limits.max_frame_bytes"),
            ("[limits]\nmax_frame_bytes = 4294967295\n", "limits.max_frame_bytes"),
            ("[limits]\nmax_frame_bytes = 8388608\n", "limits.frame_memory_per_uid"),
            ("[limits]\nframe_memory = 1048576\n", "limits.frame_memory"),
            ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
            ("[limits]\nidle_timeout = \"1ms\"\n", "limits.idle_timeout"),
            ("[socket]\npath = \"relative.sock\"\n", "socket.path"),
            ("[log]\nlevel = \"loud[\"\n", "log.level"),
            // Found by the config fuzz target: tracing-subscriber's parser
            // panicked on it.
            ("[log]\nlevel = \" is\u{58c}[transfer_memory_per_uidpold{=.to 85899344dma;x_frame_byte;d}}ons_per_uidle_dirs\"\n", "log.level"),
            // Found by the config fuzz target: took seconds to compile as
            // span and field filters.
            ("[log]\nlevel = \"iofo[polddddddddddd&d..........{= 4....}}}dd\"\n", "log.level"),
            ("[log]\nlevel = \"hsmd[request{uid=0}]=debug\"\n", "log.level"),
            ("[unlock]\nargon2_memory_kib = 1024\n", "unlock.argon2_*"),
            ("[unlock]\nidle_lock = \"10ms\"\n", "unlock.idle_lock"),
        ] {
            let msg = Config::parse(text, None).unwrap_err().to_string();
            assert!(msg.contains(key), "{text:?} gave {msg}");
        }
    }

    #[test]
    fn world_writable_socket_is_warned_about() {
        let c = Config::parse("[socket]\nmode = \"0666\"\n", None).unwrap();
        assert_eq!(c.warnings().len(), 1);
    }
}
