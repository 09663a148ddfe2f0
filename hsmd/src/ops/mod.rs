//! Every operation hsmd serves, each declared once: [`plan`] maps a request to
//! its [`Plan`] — the permission it needs, the audit line it writes, where it
//! runs and what it does — and [`pipeline`] carries every plan through the
//! same steps: authorize → run → audit → measure.
//!
//! The operations live in one module per group (`status`, `custody`,
//! `keys`, `files`, `backup`, `admin`). [`plan`] matches every
//! [`Operation`] without a wildcard, so a new operation does not build until
//! it has an entry.

mod admin;
mod audit_line;
mod backup;
mod custody;
mod files;
mod keys;
mod pending;
pub mod pipeline;
mod shared;
mod status;
pub mod transfer;

use std::{os::fd::OwnedFd, sync::Arc};

use protocol::{Operation, Reply, WireError};

pub use audit_line::AuditSpec;
pub use pending::Pending;
pub use pipeline::{route, Answer, Caller, Work};
pub use shared::{Counters, Shared};

use crate::{
    auth::permission::Permission,
    keystore::{Custody, Found, Keys, Vault, VaultError},
};

/// What a request asks to be allowed: a permission, on a key for the `keys`
/// permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// The permission.
    pub permission: Permission,
    /// The key it is asked on.
    pub key: Option<String>,
    /// The backend a key being created asks for (others are the key's own).
    pub backend: Option<String>,
}

/// An answer, and the backend of the key it used when it used one (for the
/// audit line, so the keystore is not asked again).
#[derive(Debug)]
pub struct Reached {
    /// The reply or the error.
    pub result: Result<Reply, WireError>,
    /// The key's backend, when the operation found its key.
    pub backend: Option<&'static str>,
}

impl From<Result<Reply, WireError>> for Reached {
    fn from(result: Result<Reply, WireError>) -> Self {
        Self { result, backend: None }
    }
}

/// A job that finishes an operation off the reactor.
pub type Job = Box<dyn FnOnce() -> Reached + Send + 'static>;

/// How far an operation got on the reactor.
pub enum Staged {
    /// Answered.
    Done(Reached),
    /// Finished on the blocking pool.
    Blocking(Job),
    /// Finished on a thread of its own: it waits on a descriptor the caller
    /// passed, which may stall for `files.io_timeout`.
    Transfer(Job),
    /// Sent to a device from the reactor; answered when the device answers.
    Later(Pending<Reached>),
}

impl From<Result<Reply, WireError>> for Staged {
    fn from(result: Result<Reply, WireError>) -> Self {
        Self::Done(result.into())
    }
}

/// The descriptor a request came with, as a file; an operation that needs
/// one and came without is refused.
fn passed(attached: Option<OwnedFd>, what: &str) -> Result<std::fs::File, WireError> {
    attached.map(std::fs::File::from).ok_or_else(|| {
        WireError::new(
            protocol::ErrorCode::InvalidArgument,
            format!("{what} needs the file descriptor sent with the request (SCM_RIGHTS), and none came"),
        )
    })
}

/// What the operation may use while it starts: the daemon's state, the
/// caller, the descriptor that came with the request.
pub struct Ctx<'a> {
    /// The daemon's shared state.
    pub shared: &'a Arc<Shared>,
    /// Who asked.
    pub caller: &'a Caller,
    /// The descriptor sent with the request, for those that carry one.
    pub attached: Option<OwnedFd>,
    /// The operation's name, for logs.
    what: &'static str,
    /// Whether a success is logged at info (state changes) or trace.
    logged: bool,
}

impl Ctx<'_> {
    /// Runs `f` on the blocking pool against the keystore (SQLite, Argon2,
    /// unwrapping), logging who asked and how it went.
    fn vault<F>(&self, f: F) -> Staged
    where
        F: FnOnce(&Vault) -> Result<Reply, VaultError> + Send + 'static,
    {
        let vault = Arc::clone(&self.shared.vault);
        let (uid, what, logged) = (self.caller.peer.creds.uid, self.what, self.logged);
        Staged::Blocking(Box::new(move || logged_result(uid, what, logged, f(&vault)).into()))
    }

    /// As `Ctx::vault`, on a thread of its own: it reads or writes a
    /// descriptor the caller passed, which may stall.
    fn transfer<F>(&self, f: F) -> Staged
    where
        F: FnOnce() -> Result<Reply, VaultError> + Send + 'static,
    {
        let (uid, what, logged) = (self.caller.peer.creds.uid, self.what, self.logged);
        Staged::Transfer(Box::new(move || logged_result(uid, what, logged, f()).into()))
    }

    /// As `Ctx::vault`, for what custody of the master key alone does.
    fn custody<F>(&self, f: F) -> Staged
    where
        F: FnOnce(&Custody) -> Result<Reply, VaultError> + Send + 'static,
    {
        self.vault(move |v| f(v.custody()))
    }

    /// As `Ctx::vault`, for what the key service alone does.
    fn keys<F>(&self, f: F) -> Staged
    where
        F: FnOnce(Keys<'_>) -> Result<Reply, VaultError> + Send + 'static,
    {
        self.vault(move |v| f(v.keys()))
    }
}

/// A key use: found once, on the reactor when its key is hot, else on the pool.
pub struct KeyUse {
    /// The key.
    pub name: String,
    /// The version asked for; `None` for the newest.
    pub version: Option<u32>,
    /// Bytes the operation processes, to keep large ones off the reactor.
    pub payload: usize,
    /// The operation, given the key.
    pub body: KeyBody,
    /// The operation for a key whose device answers later, when it has one.
    pub later: Option<LaterBody>,
}

/// What a key use does with its key.
pub type KeyBody = Box<dyn FnOnce(Keys<'_>, &Found) -> Result<Reply, VaultError> + Send + 'static>;

/// Where a key use started by a [`LaterBody`] sends its reply, from the
/// thread that reads the device's answer.
pub type Then = Box<dyn FnOnce(Result<Reply, VaultError>) + Send + 'static>;

/// A key use for a key whose device answers later: starts it on the reactor
/// without waiting and returns; gives `then` back, unused, when the key
/// cannot be used so now (then [`KeyUse::body`] runs on the pool).
pub type LaterBody = Box<dyn FnOnce(Keys<'_>, &Found, Then) -> Result<(), Then> + Send + 'static>;

impl KeyUse {
    /// Finds the key unless it was found already, and uses it.
    pub fn run(self, keys: Keys<'_>, found: Option<Found>, uid: u32, what: &'static str) -> Reached {
        let key = match found.map_or_else(|| keys.find(&self.name, self.version), Ok) {
            Ok(k) => k,
            Err(e) => return logged_result(uid, what, false, Err(e)).into(),
        };
        Reached {
            result: logged_result(uid, what, false, (self.body)(keys, &key)),
            backend: Some(key.backend()),
        }
    }
}

/// Where an operation runs, once authorized.
pub enum Run {
    /// Started on the reactor, which answers at once or hands a job on.
    Start(Box<dyn for<'a> FnOnce(Ctx<'a>) -> Staged>),
    /// A use of one key (these are also what a batch may hold).
    Key(KeyUse),
}

/// An operation, declared: what it needs, what it writes to the audit log,
/// and how it runs.
pub struct Plan {
    /// The permission checked before it runs; `None` for what every admitted
    /// peer may do.
    pub need: Option<Need>,
    /// A second permission it also needs (storing a file encrypts with the
    /// key that wraps it).
    pub also: Option<Need>,
    /// Its audit line; `None` for liveness and transfer plumbing.
    pub audit: Option<AuditSpec>,
    /// Whether a success is logged at info: it changed custody or a key.
    pub logged: bool,
    /// How it runs.
    pub run: Run,
}

impl Plan {
    /// An operation started on the reactor.
    fn start(f: impl for<'a> FnOnce(Ctx<'a>) -> Staged + 'static) -> Self {
        Self {
            need: None,
            also: None,
            audit: None,
            logged: false,
            run: Run::Start(Box::new(f)),
        }
    }

    /// An operation answered at once.
    fn answer(result: Result<Reply, WireError>) -> Self {
        Self::start(move |_| result.into())
    }

    /// An operation of custody alone on the blocking pool.
    fn custody(f: impl FnOnce(&Custody) -> Result<Reply, VaultError> + Send + 'static) -> Self {
        Self::start(move |cx| cx.custody(f))
    }

    /// An operation of the key service alone on the blocking pool.
    fn keys(f: impl FnOnce(Keys<'_>) -> Result<Reply, VaultError> + Send + 'static) -> Self {
        Self::start(move |cx| cx.keys(f))
    }

    /// A use of the key `name`.
    fn key_use(
        name: String,
        version: Option<u32>,
        payload: usize,
        body: impl FnOnce(Keys<'_>, &Found) -> Result<Reply, VaultError> + Send + 'static,
    ) -> Self {
        Self {
            need: None,
            also: None,
            audit: None,
            logged: false,
            run: Run::Key(KeyUse {
                name,
                version,
                payload,
                body: Box::new(body),
                later: None,
            }),
        }
    }

    /// How its key use runs when the key's device answers later.
    fn or_later(mut self, later: impl FnOnce(Keys<'_>, &Found, Then) -> Result<(), Then> + Send + 'static) -> Self {
        if let Run::Key(k) = &mut self.run {
            k.later = Some(Box::new(later));
        }
        self
    }

    /// Needs `permission` (on `key`, for key permissions).
    fn needs(mut self, permission: Permission, key: Option<&str>) -> Self {
        self.need = Some(Need {
            permission,
            key: key.map(str::to_owned),
            backend: None,
        });
        self
    }

    /// Needs `permission` on the key it uses.
    fn needs_on_key(self, permission: Permission) -> Self {
        let key = match &self.run {
            Run::Key(k) => Some(k.name.clone()),
            Run::Start(_) => None,
        };
        Self {
            need: Some(Need {
                permission,
                key,
                backend: None,
            }),
            ..self
        }
    }

    /// Checked against `backend` (a key creation's) rather than the key's own.
    fn on_backend(mut self, backend: Option<String>) -> Self {
        if let Some(need) = &mut self.need {
            need.backend = backend;
        }
        self
    }

    /// Writes `spec`'s audit line.
    fn audited(mut self, spec: AuditSpec) -> Self {
        self.audit = Some(spec);
        self
    }

    /// Logs its successes at info.
    fn logged(mut self) -> Self {
        self.logged = true;
        self
    }
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done(r) => f.debug_tuple("Staged::Done").field(r).finish(),
            Self::Blocking(_) => f.write_str("Staged::Blocking"),
            Self::Transfer(_) => f.write_str("Staged::Transfer"),
            Self::Later(_) => f.write_str("Staged::Later"),
        }
    }
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("caller", &self.caller.connection_id)
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for KeyUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyUse")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("payload", &self.payload)
            .field("later", &self.later.is_some())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Start(_) => f.write_str("Run::Start"),
            Self::Key(k) => f.debug_tuple("Run::Key").field(k).finish(),
        }
    }
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("need", &self.need)
            .field("also", &self.also)
            .field("audit", &self.audit)
            .field("logged", &self.logged)
            .field("run", &self.run)
            .finish()
    }
}

/// The plan for `op`: the one table of operations. `Batch` is carried by
/// the pipeline, which plans each item.
#[must_use]
pub fn plan(op: Operation) -> Plan {
    use Operation as O;
    match op {
        O::Hello(_) => status::hello(),
        O::Ping { payload } => status::ping(payload),
        O::Status => status::status(),
        O::WhoAmI => status::whoami(),
        O::DebugDelay { millis } => status::debug_delay(millis),
        O::DebugClock { advance_secs } => status::debug_clock(advance_secs),
        O::Batch { .. } => status::batch_here(),
        O::Init { slot } => custody::init(slot),
        O::Unlock { secret } => custody::unlock(secret),
        O::Lock => custody::lock(),
        O::SlotList => custody::slot_list(),
        O::SlotAdd { slot } => custody::slot_add(slot),
        O::SlotRemove { id } => custody::slot_remove(id),
        O::BackendSetPin { backend, pin } => custody::backend_set_pin(backend, pin),
        O::KeyCreate {
            name,
            key_type,
            usages,
            options,
        } => keys::create(name, key_type, usages, options),
        O::KeyList => keys::list(),
        O::KeyInfo { name } => keys::info(name),
        O::KeyExists { name } => keys::exists(name),
        O::KeyPublic { name } => keys::public(name),
        O::KeyDelete { name } => keys::delete(name),
        O::KeyRotate { name } => keys::rotate(name),
        O::KeySet { name, changes } => keys::set(name, changes),
        O::KeyTransition { name, to } => keys::transition(name, to),
        O::KeyRestore { name } => keys::restore(name),
        O::KeyPurge { name } => keys::purge(name),
        O::Sign(a) => keys::sign(a),
        O::Verify(a) => keys::verify(a),
        O::Encrypt(a) => keys::encrypt(a),
        O::Decrypt(a) => keys::decrypt(a),
        O::DecryptAnyVersion(a) => keys::decrypt_any_version(a),
        O::Mac(a) => keys::mac(a),
        O::MacVerify(a) => keys::mac_verify(a),
        O::SignMessage(a) => keys::sign_message(a),
        O::VerifyMessage(a) => keys::verify_message(a),
        O::SshIdentities => keys::ssh_identities(),
        O::Rewrap {
            name,
            version,
            sealed,
            aad,
            to_version,
        } => keys::rewrap(name, version, sealed, aad, to_version),
        O::DataKey { name, aad, plaintext } => keys::datakey(name, aad, plaintext),
        O::BackupCreate { protection } => backup::create(protection),
        O::TransferRead { transfer, offset, len } => backup::transfer_read(transfer, offset, len),
        O::TransferBegin { size } => backup::transfer_begin(size),
        O::TransferWrite {
            transfer,
            offset,
            bytes,
        } => backup::transfer_write(transfer, offset, bytes),
        O::BackupVerify { transfer, secret } => backup::verify(transfer, secret),
        O::BackupRestore {
            transfer,
            secret,
            force,
        } => backup::restore(transfer, secret, force),
        O::PolicyShow => admin::policy_show(),
        O::PolicyCheck {
            user,
            resource,
            action,
            key,
        } => admin::policy_check(user, resource, action, key),
        O::AuditVerify => admin::audit_verify(),
        O::AuditShow {
            since_secs,
            event_type,
            user,
            key,
            result,
            limit,
        } => admin::audit_show(since_secs, event_type, user, key, result, limit),
        O::Metrics => admin::metrics(),
        O::FileStoreBegin { name, key, chunk_size } => files::store_begin(name, key, chunk_size),
        O::FileStoreChunk {
            session,
            index,
            last,
            bytes,
        } => files::store_chunk(session, index, last, bytes),
        O::FileStoreFinish { session } => files::store_finish(session),
        O::FileRetrieveBegin { token } => files::retrieve_begin(token),
        O::FileRetrieveNext { session } => files::retrieve_next(session),
        O::FileList => files::list(),
        O::FileInfo { token } => files::info(token),
        O::FileDelete { token } => files::delete(token),
        O::FileStoreFd { name, key, chunk_size } => files::store_fd(name, key, chunk_size),
        O::FileRetrieveFd { token } => files::retrieve_fd(token),
        O::BackupWrite { protection, contents } => backup::write(protection, contents),
        O::BackupCheck { secret } => backup::check(secret),
        O::BackupRestoreArchive {
            secret,
            force,
            accept_unusable,
        } => backup::restore_archive(secret, force, accept_unusable),
    }
}

/// `result` as the wire sees it, logged: successes at info when `logged`
/// (state changes; reads and key use are too frequent to), refusals at warn,
/// failures of the store or of integrity at error.
fn logged_result(
    uid: u32,
    what: &'static str,
    logged: bool,
    result: Result<Reply, VaultError>,
) -> Result<Reply, WireError> {
    match result {
        Ok(reply) => {
            if logged {
                tracing::info!(uid, op = what, "custody operation succeeded");
            } else {
                tracing::trace!(uid, op = what, "operation succeeded");
            }
            Ok(reply)
        }
        Err(e) => {
            match &e {
                VaultError::Store(_) | VaultError::Crypto(_) | VaultError::Tampered(_) => {
                    tracing::error!(uid, op = what, error = %e, "custody operation failed");
                }
                _ => tracing::warn!(uid, op = what, error = %e, "custody operation refused"),
            }
            Err(e.to_wire())
        }
    }
}
