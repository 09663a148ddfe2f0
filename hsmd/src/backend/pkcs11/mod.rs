//! The `pkcs11` backend: keys generated inside a PKCS#11 token (sensitive,
//! never extractable), found again by CKA_ID, used through a helper process
//! that hsmd spawns and supervises (see [`helper`]).
//!
//! The keystore's reference to a token key is its token's serial, its CKA_ID
//! (the key's id and version) and its public key; verification uses the
//! public key in hsmd, so only signing and AES-GCM reach the token.

pub mod helper;
pub mod link;
pub mod wire;

use std::{
    io::{BufReader, BufWriter, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use protocol::KeyType;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use self::{
    link::{Link, Lost},
    wire::{Failure, Open, Reply, Request, Response},
};
use super::{soft::verify_spki, Backend, BackendError, Health, HealthCell, KeyHandle, KeyLabel, NewKey};
use crate::config::Pkcs11Config;

/// The backend's name.
pub const NAME: &str = "pkcs11";

/// First wait before restarting a helper that died or could not open the
/// token; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why a helper could not be started.
enum StartError {
    /// The token refused the PIN: not to be retried with the same PIN.
    PinRefused(String),
    /// Anything else (module, token absent, helper): retried with back-off.
    Other(String),
}

impl From<String> for StartError {
    fn from(why: String) -> Self {
        Self::Other(why)
    }
}

impl From<&str> for StartError {
    fn from(why: &str) -> Self {
        Self::Other(why.to_owned())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Checks the module against the allow-list: its real path (symlinks
/// resolved) lies in one of the allowed directories, and neither it nor its
/// directory is writable by others. A module that does not exist (yet) passes
/// if its directory is allowed: the backend is then unavailable until it
/// appears, and the check is repeated before every load.
///
/// # Errors
/// The rule broken, naming the configuration key.
pub fn check_module(module: &Path, allowed: &[PathBuf]) -> Result<PathBuf, String> {
    if !module.is_absolute() {
        return Err(format!(
            "backends.pkcs11.module {} must be an absolute path",
            module.display()
        ));
    }
    let real = match std::fs::canonicalize(module) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = module.parent().and_then(|p| std::fs::canonicalize(p).ok());
            match (parent, module.file_name()) {
                (Some(p), Some(f)) => p.join(f),
                _ => module.to_owned(),
            }
        }
        Err(e) => return Err(format!("backends.pkcs11.module {}: {e}", module.display())),
    };
    let inside = allowed
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .any(|d| real.parent().is_some_and(|p| p.starts_with(&d)));
    if !inside {
        return Err(format!(
            "backends.pkcs11.module {} is outside backends.pkcs11.allowed_module_dirs ({}): hsmd loads vendor \
             modules only from those directories; install the module there or add its directory to the list",
            real.display(),
            allowed
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for path in [Some(real.as_path()), real.parent()].into_iter().flatten() {
        let Ok(meta) = std::fs::metadata(path) else { continue };
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(format!(
                "backends.pkcs11.module: {} is writable by group or others, so anyone could replace the module",
                path.display()
            ));
        }
    }
    Ok(real)
}

/// Reads the user PIN from its file, which only hsmd's user may read.
///
/// # Errors
/// What is wrong with the file.
pub fn read_pin(path: &Path) -> Result<Zeroizing<String>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("backends.pkcs11.pin_file {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "backends.pkcs11.pin_file {} is mode {:04o}: others could read the PIN; chmod 0600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("backends.pkcs11.pin_file {}: {e}", path.display()))?,
    );
    let pin = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned());
    if pin.is_empty() {
        return Err(format!("backends.pkcs11.pin_file {} is empty", path.display()));
    }
    Ok(pin)
}

/// What the keystore keeps for a token key (sealed under the master key).
#[derive(Serialize, Deserialize)]
struct Reference {
    /// The token's serial when the key was made.
    token: String,
    /// CKA_ID, hex.
    id: String,
    /// SubjectPublicKeyInfo DER, hex, of key pairs.
    public: Option<String>,
}

struct Inner {
    module: PathBuf,
    /// The configured path and allow-list, checked again before each load.
    configured_module: PathBuf,
    allowed_module_dirs: Vec<PathBuf>,
    token_label: Option<String>,
    token_serial: Option<String>,
    /// The user PIN: from the pin file at start, or handed over from the
    /// keystore at unlock (`hsmctl backend pkcs11 set-pin`); `None` until then,
    /// and again after the token refused it.
    pin: Mutex<Option<Zeroizing<String>>>,
    pin_from_keystore: bool,
    sessions: u32,
    op_timeout: Duration,
    health_interval: Duration,
    exe: PathBuf,
    conn: Mutex<Option<Arc<Link>>>,
    /// Signalled when `conn` changes or a start attempt fails.
    conn_changed: Condvar,
    /// A helper died and its replacement is on the way: requests wait for it
    /// rather than fail (false while the token cannot be opened).
    restarting: AtomicBool,
    /// Woken when a helper dies or must be replaced.
    wake: Condvar,
    wake_flag: Mutex<bool>,
    health: HealthCell,
    restarts: AtomicU64,
}

/// The PKCS#11 backend.
#[derive(Clone)]
pub struct Pkcs11 {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pkcs11 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11")
            .field("module", &self.inner.module)
            .finish_non_exhaustive()
    }
}

impl Pkcs11 {
    /// Checks the configuration (allow-list, PIN file) and starts the helper
    /// supervisor; waits for the first attempt to open the token, but starts
    /// even if the token is not there (its keys then fail with
    /// `BackendUnavailable` until it is).
    ///
    /// # Errors
    /// A module outside the allow-list, an unreadable or exposed PIN file.
    pub fn start(config: &Pkcs11Config) -> Result<Self, String> {
        let module = check_module(&config.module, &config.allowed_module_dirs)?;
        if !module.is_file() {
            tracing::error!(module = %module.display(), "the PKCS#11 module does not exist; the pkcs11 backend stays unavailable until it does");
        }
        let pin = config.pin_file.as_deref().map(read_pin).transpose()?;
        let exe = std::env::current_exe().map_err(|e| format!("cannot find hsmd's own executable: {e}"))?;
        let inner = Arc::new(Inner {
            module,
            configured_module: config.module.clone(),
            allowed_module_dirs: config.allowed_module_dirs.clone(),
            token_label: config.token_label.clone(),
            token_serial: config.token_serial.clone(),
            pin_from_keystore: pin.is_none(),
            pin: Mutex::new(pin),
            sessions: config.sessions,
            op_timeout: config.op_timeout,
            health_interval: config.health_interval,
            exe,
            conn: Mutex::new(None),
            conn_changed: Condvar::new(),
            restarting: AtomicBool::new(true),
            wake: Condvar::new(),
            wake_flag: Mutex::new(false),
            health: HealthCell::new(Health {
                healthy: false,
                detail: "starting the PKCS#11 helper".into(),
            }),
            restarts: AtomicU64::new(0),
        });
        let (first_tx, first_rx) = mpsc::channel();
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("hsmd-pkcs11".into())
            .spawn(move || supervise(&weak, Some(first_tx)))
            .map_err(|e| format!("cannot start the PKCS#11 supervisor: {e}"))?;
        let _ = first_rx.recv_timeout(config.op_timeout.max(Duration::from_secs(5)));
        Ok(Self { inner })
    }

    fn call(&self, request: Request) -> Result<Reply, BackendError> {
        let conn = self.inner.live_conn().ok_or_else(|| BackendError::Unavailable {
            backend: NAME,
            reason: self.inner.health.get().detail,
        })?;
        let answer = conn.call(request, self.inner.op_timeout);
        self.settle(&conn, answer)
    }

    /// The running helper if it can take a request from the reactor now:
    /// never waits for one being restarted (a thread does that).
    fn conn_for_reactor(&self) -> Option<Arc<Link>> {
        let conn = lock(&self.inner.conn).as_ref().map(Arc::clone)?;
        conn.takes_calls_from_reactor().then_some(conn)
    }

    /// Sends `request` from the reactor over `conn` (from
    /// [`Pkcs11::conn_for_reactor`]); `then` gets the reply on the thread
    /// that reads it.
    fn call_then(
        &self,
        conn: Arc<Link>,
        request: Request,
        then: impl FnOnce(Result<Reply, BackendError>) + Send + 'static,
    ) {
        let me = self.clone();
        let settle_on = Arc::clone(&conn);
        conn.call_then(
            request,
            self.inner.op_timeout,
            Box::new(move |answer| then(me.settle(&settle_on, answer))),
        );
    }

    /// What the helper's answer (or its absence) means for the caller; a
    /// helper that failed is replaced.
    fn settle(&self, conn: &Arc<Link>, answer: Result<link::Answer, Lost>) -> Result<Reply, BackendError> {
        let unavailable = |reason: String| BackendError::Unavailable { backend: NAME, reason };
        match answer {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(Failure::Unavailable(why))) => {
                // The token went away under the helper: a fresh helper is how
                // hsmd reconnects once it is back.
                self.replace(conn, why.clone());
                Err(unavailable(why))
            }
            Ok(Err(Failure::Failed(why))) => Err(BackendError::Failed {
                backend: NAME,
                reason: why,
            }),
            Ok(Err(Failure::Unsupported(why))) => Err(BackendError::Unsupported(why)),
            Ok(Err(Failure::PinRefused(why))) => Err(unavailable(why)),
            Err(Lost::Unsent(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                let why = format!(
                    "the PKCS#11 helper (pid {}) did not take a request within {:?}; it was stopped and is restarted",
                    conn.pid, self.inner.op_timeout
                );
                self.replace(conn, why.clone());
                Err(unavailable(why))
            }
            Err(Lost::Unsent(e)) => {
                self.replace(
                    conn,
                    format!("the PKCS#11 helper (pid {}) stopped reading: {e}", conn.pid),
                );
                Err(unavailable(format!("the PKCS#11 helper stopped reading: {e}")))
            }
            Err(Lost::TimedOut) => {
                let why = format!(
                    "the PKCS#11 module did not answer within {:?}; its helper (pid {}) was stopped and is restarted",
                    self.inner.op_timeout, conn.pid
                );
                self.replace(conn, why.clone());
                Err(unavailable(why))
            }
            Err(Lost::Ended(why)) => {
                // Gone, or speaking out of turn: either way it is replaced.
                let why = format!("{why}; it is restarted");
                self.replace(conn, why.clone());
                Err(unavailable(why))
            }
        }
    }

    /// Marks the backend red and has the supervisor replace `conn`.
    fn replace(&self, conn: &Arc<Link>, why: String) {
        self.inner.health.set(
            NAME,
            Health {
                healthy: false,
                detail: why,
            },
        );
        conn.kill();
        self.inner.helper_gone();
    }

    /// Hands over the user PIN (from the keystore) and has the supervisor
    /// open the token with it.
    pub fn provide_pin(&self, pin: Zeroizing<String>) {
        *lock(&self.inner.pin) = Some(pin);
        *lock(&self.inner.wake_flag) = true;
        self.inner.wake.notify_all();
    }

    /// Whether the PIN comes from the keystore (no `pin_file`).
    #[must_use]
    pub fn pin_from_keystore(&self) -> bool {
        self.inner.pin_from_keystore
    }

    /// Whether the backend holds no user PIN yet (it waits for the one
    /// sealed in the keystore, handed over at unlock): the token is then not
    /// opened, so its health says nothing about whether it is there.
    #[must_use]
    pub fn awaits_pin(&self) -> bool {
        lock(&self.inner.pin).is_none()
    }

    fn token_serial(&self) -> Option<String> {
        lock(&self.inner.conn).as_ref().map(|c| c.token.serial.clone())
    }
}

impl Inner {
    /// The running helper; while one is being restarted, waits for it (up to
    /// the operation timeout) so that a crash costs only the requests it was
    /// serving.
    fn live_conn(&self) -> Option<Arc<Link>> {
        let deadline = Instant::now() + self.op_timeout;
        let mut guard = lock(&self.conn);
        loop {
            if let Some(c) = guard.as_ref().filter(|c| c.alive()) {
                return Some(Arc::clone(c));
            }
            let now = Instant::now();
            if !self.restarting.load(Ordering::SeqCst) || now >= deadline {
                return None;
            }
            guard = self
                .conn_changed
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// A helper died or must go: requests wait for the next one, and the
    /// supervisor is woken to start it.
    fn helper_gone(&self) {
        self.restarting.store(true, Ordering::SeqCst);
        *lock(&self.wake_flag) = true;
        self.wake.notify_all();
    }

    /// Publishes the outcome of a start attempt.
    fn set_conn(&self, conn: Option<Arc<Link>>) {
        let mut guard = lock(&self.conn);
        if conn.is_none() {
            self.restarting.store(false, Ordering::SeqCst);
        }
        *guard = conn;
        self.conn_changed.notify_all();
    }
}

/// Starts helpers, restarts them with back-off when they die, and checks the
/// token's health while one runs. Ends when the backend is dropped.
fn supervise(inner: &std::sync::Weak<Inner>, mut first: Option<mpsc::Sender<()>>) {
    let mut backoff = BACKOFF_MIN;
    // Set when the token refused the PIN: the health then keeps saying so
    // (it says what to do) while hsmd waits for another.
    let mut refused = false;
    loop {
        let Some(me) = inner.upgrade() else { return };
        if lock(&me.pin).is_none() {
            if !refused {
                me.health.set(
                    NAME,
                    Health {
                        healthy: false,
                        detail: "waiting for the token's user PIN: it is sealed in the keystore and handed over \
                                 at unlock; set it with `hsmctl backend pkcs11 set-pin`"
                            .to_owned(),
                    },
                );
            }
            me.set_conn(None);
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            let flag = lock(&me.wake_flag);
            let (mut flag, _) = me
                .wake
                .wait_timeout_while(flag, Duration::from_secs(1), |f| !*f)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *flag = false;
            drop(flag);
            backoff = BACKOFF_MIN;
            continue;
        }
        let started = Instant::now();
        match spawn(&me) {
            Ok(conn) => {
                tracing::info!(
                    pid = conn.pid,
                    token = %conn.token.label,
                    serial = %conn.token.serial,
                    sessions = conn.token.sessions,
                    "PKCS#11 helper ready"
                );
                me.health.set(
                    NAME,
                    Health {
                        healthy: true,
                        detail: detail(&me, &conn),
                    },
                );
                me.set_conn(Some(Arc::clone(&conn)));
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
                watch(&me, &conn);
                me.restarting.store(true, Ordering::SeqCst);
                *lock(&me.conn) = None;
                let status = conn.stop();
                tracing::warn!(pid = conn.pid, status = ?status, "PKCS#11 helper ended; restarting it");
                me.restarts.fetch_add(1, Ordering::Relaxed);
                // Keep a more specific reason (token removed, hung module).
                if me.health.get().healthy {
                    me.health.set(
                        NAME,
                        Health {
                            healthy: false,
                            detail: format!(
                                "the PKCS#11 helper (pid {}) ended ({status:?}); restarting it",
                                conn.pid
                            ),
                        },
                    );
                }
                // A helper that ran a while earns a quick restart.
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = BACKOFF_MIN;
                }
            }
            Err(e) => {
                // A refused PIN is not retried: each try counts against the
                // token's retry limit.
                let give_up = matches!(e, StartError::PinRefused(_));
                let why = match e {
                    StartError::PinRefused(why) => {
                        let why = format!(
                            "{why}; hsmd will not try it again, so as not to lock the token, until a new PIN is set \
                             (`hsmctl backend pkcs11 set-pin`) or hsmd restarts"
                        );
                        tracing::error!(error = %why, "the PKCS#11 token refused the PIN");
                        why
                    }
                    StartError::Other(why) => {
                        tracing::error!(error = %why, retry_in = ?backoff, "the PKCS#11 token cannot be opened");
                        why
                    }
                };
                refused = give_up;
                me.health.set(
                    NAME,
                    Health {
                        healthy: false,
                        detail: why,
                    },
                );
                me.set_conn(None);
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
                if give_up {
                    *lock(&me.pin) = None;
                }
            }
        }
        drop(me);
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn detail(inner: &Inner, conn: &Link) -> String {
    format!(
        "token {:?} (serial {}, {} {}) via {}, {} sessions, helper pid {}",
        conn.token.label,
        conn.token.serial,
        conn.token.manufacturer,
        conn.token.model,
        inner.module.display(),
        conn.token.sessions,
        conn.pid
    )
}

/// Waits while the helper lives, asking the token for its health every
/// `health_interval`; returns when the helper must be replaced.
fn watch(inner: &Arc<Inner>, conn: &Arc<Link>) {
    let backend = Pkcs11 {
        inner: Arc::clone(inner),
    };
    loop {
        {
            let flag = lock(&inner.wake_flag);
            let (mut flag, _) = inner
                .wake
                .wait_timeout_while(flag, inner.health_interval, |f| !*f)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *flag = false;
        }
        if !conn.alive() {
            return;
        }
        match backend.call(Request::Health) {
            Ok(_) => {
                if !inner.health.get().healthy {
                    inner.health.set(
                        NAME,
                        Health {
                            healthy: true,
                            detail: detail(inner, conn),
                        },
                    );
                }
            }
            Err(e) => {
                inner.health.set(
                    NAME,
                    Health {
                        healthy: false,
                        detail: e.to_string(),
                    },
                );
                if !conn.alive() {
                    return;
                }
            }
        }
    }
}

/// Starts a helper and has it open the token.
fn spawn(inner: &Arc<Inner>) -> Result<Arc<Link>, StartError> {
    // The module may have been replaced since start (by a symlink elsewhere).
    let module = check_module(&inner.configured_module, &inner.allowed_module_dirs)?;
    if !module.is_file() {
        return Err(format!("the PKCS#11 module {} does not exist", module.display()).into());
    }
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let theirs_out = theirs.try_clone().map_err(|e| format!("socketpair: {e}"))?;
    let child = Command::new(&inner.exe)
        .arg("--pkcs11-helper")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs_out)))
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the PKCS#11 helper {}: {e}", inner.exe.display()))?;
    let mut child = Some(child);
    // Stops the helper that could not open the token.
    let stop = |child: &mut Option<Child>| {
        if let Some(mut c) = child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    let fail = |child: &mut Option<Child>, why: String| -> StartError {
        stop(child);
        StartError::Other(why)
    };
    let mut writer = BufWriter::new(ours.try_clone().map_err(|e| format!("socketpair: {e}"))?);
    let _ = ours.set_read_timeout(Some(inner.op_timeout.max(Duration::from_secs(5))));
    let mut reader = BufReader::new(ours);
    let pin = lock(&inner.pin).clone().ok_or("no PIN for the token yet")?;
    let open = Open {
        module,
        token_label: inner.token_label.clone(),
        token_serial: inner.token_serial.clone(),
        pin,
        sessions: inner.sessions,
    };
    if let Err(e) = wire::write_frame(&mut writer, &open).and_then(|()| writer.flush()) {
        return Err(fail(
            &mut child,
            format!("the PKCS#11 helper did not take its orders: {e}"),
        ));
    }
    let token = match wire::read_frame::<Response>(&mut reader) {
        Ok(Some(Response {
            result: Ok(Reply::Token(t)),
            ..
        })) => t,
        Ok(Some(Response {
            result: Err(Failure::PinRefused(why)),
            ..
        })) => {
            stop(&mut child);
            return Err(StartError::PinRefused(why));
        }
        Ok(Some(Response {
            result: Err(Failure::Unavailable(why) | Failure::Failed(why) | Failure::Unsupported(why)),
            ..
        })) => return Err(fail(&mut child, why)),
        Ok(_) => return Err(fail(&mut child, "the PKCS#11 helper answered out of turn".into())),
        Err(e) => {
            return Err(fail(
                &mut child,
                format!("the PKCS#11 helper ended while opening the token: {e}"),
            ))
        }
    };
    // A frame begun must end within the operation timeout (a leader waits
    // for the start of one with its own deadline).
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(inner.op_timeout.max(Duration::from_millis(1))));
    // And a request must be taken within it: a thread writing to a hung
    // helper whose socket is full would otherwise wait forever, and every
    // request queued for the socket behind it. The reactor's writes never
    // wait, so this bounds the blocking ones.
    if let Err(e) = reader
        .get_ref()
        .set_write_timeout(Some(inner.op_timeout.max(Duration::from_millis(1))))
    {
        return Err(fail(
            &mut child,
            format!("cannot bound writes to the PKCS#11 helper: {e}"),
        ));
    }
    let Some(child) = child.take() else {
        return Err("the PKCS#11 helper vanished".into());
    };
    if !reader.buffer().is_empty() {
        return Err("the PKCS#11 helper answered out of turn".into());
    }
    drop(writer);
    let owner = Arc::downgrade(inner);
    Link::start(child, reader.into_inner(), token, move || {
        if let Some(inner) = owner.upgrade() {
            inner.helper_gone();
        }
    })
    .map_err(|e| StartError::Other(format!("cannot start watching the PKCS#11 helper: {e}")))
}

impl Backend for Pkcs11 {
    fn name(&self) -> &'static str {
        NAME
    }

    fn generate(&self, key_type: KeyType, label: KeyLabel<'_>) -> Result<NewKey, BackendError> {
        let mut id = hex::decode(label.key_id).map_err(|_| BackendError::Unsupported("bad key id".into()))?;
        id.extend_from_slice(&label.version.to_be_bytes());
        let Reply::Generated { public } = self.call(Request::Generate {
            key_type,
            id: id.clone(),
            label: format!("hsmd:{}:v{}", label.name, label.version),
        })?
        else {
            return Err(BackendError::Failed {
                backend: NAME,
                reason: "the helper answered a generation with something else".into(),
            });
        };
        let token = self.token_serial().unwrap_or_default();
        let reference = serde_json::to_vec(&Reference {
            token,
            id: hex::encode(&id),
            public: public.as_ref().map(hex::encode),
        })
        .map_err(|e| BackendError::Failed {
            backend: NAME,
            reason: e.to_string(),
        })?;
        Ok(NewKey {
            reference: Zeroizing::new(reference),
            public,
        })
    }

    fn load(&self, key_type: KeyType, reference: &[u8]) -> Result<Arc<dyn KeyHandle>, BackendError> {
        let bad = || BackendError::BadReference { backend: NAME };
        let r: Reference = serde_json::from_slice(reference).map_err(|_| bad())?;
        let id = hex::decode(&r.id).map_err(|_| bad())?;
        let public = r.public.map(hex::decode).transpose().map_err(|_| bad())?;
        Ok(Arc::new(TokenKey {
            backend: self.clone(),
            key_type,
            token: r.token,
            id,
            public,
        }))
    }

    fn destroy(&self, _key_type: KeyType, reference: &[u8]) -> Result<(), BackendError> {
        let r: Reference =
            serde_json::from_slice(reference).map_err(|_| BackendError::BadReference { backend: NAME })?;
        let id = hex::decode(&r.id).map_err(|_| BackendError::BadReference { backend: NAME })?;
        self.call(Request::Destroy { id }).map(|_| ())
    }

    fn holds_objects(&self) -> bool {
        true
    }

    fn health(&self) -> Health {
        let mut h = self.inner.health.get();
        let restarts = self.inner.restarts.load(Ordering::Relaxed);
        if restarts > 0 {
            h.detail.push_str(&format!("; helper restarted {restarts} times"));
        }
        h
    }

    fn unanswered(&self) -> Option<u32> {
        Some(lock(&self.inner.conn).as_ref().map_or(0, |c| c.unanswered()))
    }
}

struct TokenKey {
    backend: Pkcs11,
    key_type: KeyType,
    token: String,
    id: Vec<u8>,
    public: Option<Vec<u8>>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("key_type", &self.key_type)
            .field("id", &hex::encode(&self.id))
            .finish_non_exhaustive()
    }
}

impl TokenKey {
    fn unsupported(&self, what: &str) -> BackendError {
        BackendError::Unsupported(format!("an {} key cannot {what}", self.key_type.as_str()))
    }

    /// Refuses to use a key with another token that happens to be configured
    /// now (its CKA_ID could name an unrelated object there).
    fn check_token(&self) -> Result<(), BackendError> {
        if self.token.is_empty() {
            return Ok(());
        }
        // Compared under the lock: no copy of the serial per operation.
        match lock(&self.backend.inner.conn).as_ref() {
            Some(now) if now.token.serial != self.token => Err(BackendError::Unavailable {
                backend: NAME,
                reason: format!(
                    "this key lives in the token with serial {}, but the configured token has serial {}",
                    self.token, now.token.serial
                ),
            }),
            _ => Ok(()),
        }
    }
}

impl TokenKey {
    /// The helper's request for a signature over `digest`.
    fn sign_request(&self, digest: &[u8]) -> Result<Request, BackendError> {
        if self.public.is_none() {
            return Err(self.unsupported("sign"));
        }
        self.check_token()?;
        Ok(Request::Sign {
            key_type: self.key_type,
            id: self.id.clone(),
            digest: digest.to_vec(),
        })
    }
}

/// A signature the helper returned, checked against the public key before
/// it leaves hsmd (see [`super::rsa_public::release_signature`]).
fn release(
    key_type: KeyType,
    public: Option<&[u8]>,
    digest: &[u8],
    reply: Result<Reply, BackendError>,
) -> Result<Vec<u8>, BackendError> {
    match reply? {
        Reply::Signature(s) => {
            super::rsa_public::release_signature(NAME, key_type, public.unwrap_or_default(), digest, s)
        }
        _ => Err(BackendError::Failed {
            backend: NAME,
            reason: "the helper answered a signature with something else".into(),
        }),
    }
}

impl KeyHandle for TokenKey {
    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn public_spki(&self) -> Option<Vec<u8>> {
        self.public.clone()
    }

    fn sign(&self, digest: &[u8]) -> Result<Vec<u8>, BackendError> {
        let request = self.sign_request(digest)?;
        let reply = self.backend.call(request);
        release(self.key_type, self.public.as_deref(), digest, reply)
    }

    fn signs_later(&self) -> bool {
        self.public.is_some() && self.backend.conn_for_reactor().is_some()
    }

    fn sign_then(&self, digest: &[u8], then: super::Signed) {
        let request = match self.sign_request(digest) {
            Ok(r) => r,
            Err(e) => return then(Err(e)),
        };
        let Some(conn) = self.backend.conn_for_reactor() else {
            // The helper went, or filled up, since `signs_later`: a thread
            // would wait here, the reactor must not.
            return then(Err(BackendError::Unavailable {
                backend: NAME,
                reason: "the PKCS#11 helper cannot take another request now; retry".into(),
            }));
        };
        let (key_type, public, signed) = (self.key_type, self.public.clone(), digest.to_vec());
        self.backend.call_then(conn, request, move |reply| {
            then(release(key_type, public.as_deref(), &signed, reply));
        });
    }

    fn verify(&self, digest: &[u8], signature: &[u8]) -> Result<bool, BackendError> {
        let public = self.public.as_deref().ok_or_else(|| self.unsupported("verify"))?;
        Ok(verify_spki(self.key_type, public, digest, signature))
    }

    fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, BackendError> {
        if self.key_type != KeyType::Aes256Gcm {
            return Err(self.unsupported("encrypt"));
        }
        self.check_token()?;
        let mut iv = [0u8; 12];
        getrandom::fill(&mut iv).map_err(|e| BackendError::Failed {
            backend: NAME,
            reason: format!("no randomness for the nonce: {e}"),
        })?;
        match self.backend.call(Request::Encrypt {
            id: self.id.clone(),
            iv: iv.to_vec(),
            plaintext: Zeroizing::new(plaintext.to_vec()),
            aad: aad.to_vec(),
        })? {
            Reply::Sealed(ct) => {
                let mut out = iv.to_vec();
                out.extend_from_slice(&ct);
                Ok(out)
            }
            _ => Err(BackendError::Failed {
                backend: NAME,
                reason: "the helper answered an encryption with something else".into(),
            }),
        }
    }

    fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, BackendError> {
        if self.key_type != KeyType::Aes256Gcm {
            return Err(self.unsupported("decrypt"));
        }
        if sealed.len() < 12 + 16 {
            return Ok(None);
        }
        self.check_token()?;
        let (iv, ciphertext) = sealed.split_at(12);
        match self.backend.call(Request::Decrypt {
            id: self.id.clone(),
            iv: iv.to_vec(),
            ciphertext: ciphertext.to_vec(),
            aad: aad.to_vec(),
        })? {
            Reply::Plain(p) => Ok(p),
            _ => Err(BackendError::Failed {
                backend: NAME,
                reason: "the helper answered a decryption with something else".into(),
            }),
        }
    }

    fn mac(&self, _data: &[u8]) -> Result<Vec<u8>, BackendError> {
        Err(self.unsupported("compute a MAC"))
    }

    fn mac_verify(&self, _data: &[u8], _tag: &[u8]) -> Result<bool, BackendError> {
        Err(self.unsupported("verify a MAC"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_outside_the_allow_list_or_writable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let module = dir.path().join("libvendor.so");
        std::fs::write(&module, b"not really").unwrap();
        std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_module(&module, &[PathBuf::from("/usr/lib")]).unwrap_err();
        assert!(
            e.contains("outside backends.pkcs11.allowed_module_dirs (/usr/lib)"),
            "{e}"
        );
        assert!(check_module(&module, &[dir.path().to_owned()]).is_ok());
        // A symlink from an allowed directory to elsewhere does not get in.
        let allowed = tempfile::tempdir().unwrap();
        let link = allowed.path().join("libvendor.so");
        std::os::unix::fs::symlink(&module, &link).unwrap();
        assert!(check_module(&link, &[allowed.path().to_owned()]).is_err());
        std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = check_module(&module, &[dir.path().to_owned()]).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        // Missing but in an allowed directory: allowed (unavailable until it appears).
        assert!(check_module(&dir.path().join("missing.so"), &[dir.path().to_owned()]).is_ok());
        assert!(check_module(Path::new("relative.so"), &[dir.path().to_owned()]).is_err());
    }

    #[test]
    fn pin_files_must_be_private_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "1234\n").unwrap();
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_pin(&pin).unwrap().as_str(), "1234");
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(read_pin(&pin).unwrap_err().contains("chmod 0600"));
        std::fs::write(&pin, "\n").unwrap();
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_pin(&pin).unwrap_err().contains("empty"));
    }
}
