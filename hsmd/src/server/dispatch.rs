//! Routes an admitted request to the code that serves it. Cheap answers are
//! computed on the reactor; anything that may block is handed back as a job for
//! the blocking pool, so a slow request never stalls other connections.

use crate::audit::EventType;
use std::{os::fd::OwnedFd, sync::Arc, time::Duration};

use protocol::{
    ErrorCode, Operation, PeerInfo, Reply, StatusInfo, Transition, WireError, MAX_BATCH_ITEMS, PROTOCOL_VERSION,
};

use super::{Shared, VERSION};
use crate::{
    audit::{Auditor, Class, Ticket},
    auth::{
        policy::{Ask, Source as PolicySource, RESOURCES},
        PeerIdentity,
    },
    keystore::{Vault, VaultError, MAX_ARCHIVE},
};

/// The most a `DebugDelay` may hold a worker.
const MAX_DEBUG_DELAY_MS: u32 = 10_000;

/// What the connection knows about its peer, handed to every request.
#[derive(Debug)]
pub struct Caller {
    /// Who the peer is.
    pub peer: PeerIdentity,
    /// Why the gate let them in.
    pub admitted_because: String,
    /// The daemon's number for the connection.
    pub connection_id: u64,
    /// The peer as audit lines name it.
    pub who: Arc<crate::audit::Who>,
}

/// A request's answer, and the audit line it must wait for.
#[derive(Debug)]
pub struct Answer {
    /// The reply or the error.
    pub result: Result<Reply, WireError>,
    /// The line the answer may not go out before (see [`crate::audit::Ticket`]).
    pub audit: Option<Ticket>,
}

impl From<Result<Reply, WireError>> for Answer {
    fn from(result: Result<Reply, WireError>) -> Self {
        Self { result, audit: None }
    }
}

/// A job for the blocking pool.
pub type BlockingJob = Box<dyn FnOnce() -> Answer + Send + 'static>;

/// How a request will be answered.
pub enum Work {
    /// Already answered.
    Done(Answer),
    /// Must run on the blocking pool.
    Blocking(BlockingJob),
    /// Waits on a descriptor the caller passed (a pipe may stall for
    /// `files.io_timeout`): runs on a thread of its own, never taking the
    /// blocking pool's threads from key operations and identity lookups.
    Transfer(BlockingJob),
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Done(_) => "Work::Done",
            Self::Blocking(_) => "Work::Blocking",
            Self::Transfer(_) => "Work::Transfer",
        })
    }
}

/// Work whose answer waits for no audit line.
enum Plain {
    Done(Result<Reply, WireError>),
    Blocking(Box<dyn FnOnce() -> Result<Reply, WireError> + Send + 'static>),
    Transfer(Box<dyn FnOnce() -> Result<Reply, WireError> + Send + 'static>),
}

/// Decides how to answer `op` for `caller`; `attached` is the descriptor that
/// came with it, for the requests that carry one. `Hello` never reaches here:
/// the connection handles the handshake.
pub fn route(op: Operation, caller: &Caller, shared: &Arc<Shared>, attached: Option<OwnedFd>) -> Work {
    let started = std::time::Instant::now();
    let name = op.name();
    let metrics = Arc::clone(&shared.metrics);
    let label = |r: &Result<Reply, WireError>| match r {
        Ok(_) => "ok",
        Err(e) => e.code.as_str(),
    };
    match route_audited(op, caller, shared, attached) {
        Work::Done(answer) => {
            metrics.request(name, label(&answer.result), started.elapsed());
            Work::Done(answer)
        }
        Work::Blocking(job) => Work::Blocking(Box::new(move || {
            let answer = job();
            metrics.request(name, label(&answer.result), started.elapsed());
            answer
        })),
        Work::Transfer(job) => Work::Transfer(Box::new(move || {
            let answer = job();
            metrics.request(name, label(&answer.result), started.elapsed());
            answer
        })),
    }
}

/// Routes with an audit line for every operation that has one. An audited
/// request is admitted only while the audit log can be written, and its
/// answer waits for its line.
fn route_audited(op: Operation, caller: &Caller, shared: &Arc<Shared>, attached: Option<OwnedFd>) -> Work {
    let plain = |work: Plain| match work {
        Plain::Done(result) => Work::Done(result.into()),
        Plain::Blocking(job) => Work::Blocking(Box::new(move || job().into())),
        Plain::Transfer(job) => Work::Transfer(Box::new(move || job().into())),
    };
    if let Operation::Batch { items } = op {
        // Each item has its line; the batch is admitted as a whole.
        if let Some(Err(refused)) = shared.audit.as_ref().map(|a| a.admit()) {
            return Work::Done(Err(refused).into());
        }
        return batch(items, caller, shared, shared.audit.clone());
    }
    let Some(audit) = shared.audit.clone() else {
        return plain(route_inner(op, caller, shared, attached));
    };
    let Some(spec) = audit_spec(&op) else {
        return plain(route_inner(op, caller, shared, attached));
    };
    if !spec.exempt {
        if let Err(refused) = audit.admit() {
            return Work::Done(Err(refused).into());
        }
    }
    let who = Arc::clone(&caller.who);
    let vault = Arc::clone(&shared.vault);
    match route_inner(op, caller, shared, attached) {
        Plain::Done(result) => {
            // Written when the connection has handled what it has read.
            let (event, class) = spec.event(who, &result, &vault);
            let ticket = audit.submit_deferred(event, class, !spec.exempt);
            Work::Done(Answer { result, audit: ticket })
        }
        Plain::Blocking(job) => Work::Blocking(Box::new(move || {
            let result = job();
            let (event, class) = spec.event(who, &result, &vault);
            let ticket = audit.submit(event, class, !spec.exempt);
            Answer { result, audit: ticket }
        })),
        Plain::Transfer(job) => Work::Transfer(Box::new(move || {
            let result = job();
            let (event, class) = spec.event(who, &result, &vault);
            let ticket = audit.submit(event, class, !spec.exempt);
            Answer { result, audit: ticket }
        })),
    }
}

/// What the audit line of an operation says, decided before it runs.
struct AuditSpec {
    event_type: EventType,
    resource: String,
    /// The backend a key creation asked for; other key operations take the
    /// key's own when the event is written.
    backend: Option<&'static str>,
    action: &'static str,
    risk: u8,
    security: bool,
    /// Served while the audit log cannot be written (the panic button, and
    /// reading the log itself), its line written when it can be.
    exempt: bool,
}

impl AuditSpec {
    fn new(event_type: EventType, resource: String, action: &'static str, risk: u8, security: bool) -> Self {
        Self {
            event_type,
            resource,
            backend: None,
            action,
            risk,
            security,
            exempt: false,
        }
    }

    fn exempt(mut self) -> Self {
        self.exempt = true;
        self
    }

    /// The event for `result`, and how durable it must be before the answer.
    fn event(
        &self,
        who: Arc<crate::audit::Who>,
        result: &Result<Reply, WireError>,
        vault: &Vault,
    ) -> (crate::audit::Event, Class) {
        use crate::audit::{Event, Outcome};
        let mut metadata = crate::audit::Meta::default();
        let mut event_type = self.event_type;
        let mut risk = self.risk;
        let mut security = self.security;
        let outcome = match result {
            Ok(reply) => {
                let version = match reply {
                    Reply::Signature { version, .. }
                    | Reply::Encrypted { version, .. }
                    | Reply::MacTag { version, .. }
                    | Reply::DataKey { version, .. }
                    | Reply::PublicKey { version, .. } => Some(*version),
                    Reply::KeyCreated(k) | Reply::KeyUpdated(k) => Some(k.version),
                    _ => None,
                };
                metadata.version = version;
                if let Reply::Verified { valid } | Reply::MacVerified { valid } = reply {
                    metadata.valid = Some(*valid);
                }
                if let Reply::KeyUpdated(k) = reply {
                    metadata.state = Some(k.state.as_str());
                }
                if let Reply::KeyCreated(k) = reply {
                    metadata.state = Some(k.state.as_str());
                    let x = metadata.extra();
                    x.key_type = Some(k.key_type.as_str());
                    x.usages = Some(k.usages.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(","));
                    x.rotate_every_secs = k.rotate_every_secs;
                    x.activate_at_unix = k.activate_at_unix;
                    x.expire_at_unix = k.expire_at_unix;
                }
                if let Reply::File(f) | Reply::FileSession { info: f, .. } = reply {
                    metadata.token = Some(f.token.clone());
                    // The key that wrapped the file's data key, and its version.
                    metadata.version = Some(f.key_version);
                    metadata.extra().key = Some(f.key.clone());
                }
                Outcome::Success
            }
            Err(e) => {
                metadata.error = Some(e.code.as_str());
                metadata.message = Some(e.message.clone());
                match e.code {
                    ErrorCode::PermissionDenied => {
                        event_type = EventType::AccessDenied;
                        security = true;
                        risk = risk.max(6);
                    }
                    ErrorCode::RateLimited if self.event_type != EventType::Unlock => {
                        event_type = EventType::RateLimited
                    }
                    ErrorCode::Tampered => {
                        security = true;
                        risk = 10;
                    }
                    ErrorCode::UnlockFailed => {
                        event_type = if self.event_type == EventType::Unlock {
                            EventType::UnlockFailed
                        } else {
                            event_type
                        };
                        security = true;
                        risk = risk.max(6);
                    }
                    _ => risk = (risk + 3).min(10),
                }
                Outcome::Failure
            }
        };
        (
            Event {
                event_type,
                who,
                backend: match result {
                    Ok(Reply::KeyCreated(k) | Reply::KeyUpdated(k)) => Some(crate::backend::static_name(&k.backend)),
                    _ => self
                        .backend
                        .or_else(|| self.resource.strip_prefix("key:").and_then(|k| vault.known_backend(k))),
                },
                resource: self.resource.clone(),
                action: self.action,
                result: outcome,
                metadata,
                risk_score: risk,
                time: std::time::SystemTime::now(),
            },
            if security { Class::Security } else { Class::Operation },
        )
    }
}

/// How an operation is audited; `None` for liveness and transfer plumbing
/// (ping, status, whoami, debugging, transfer reads and writes) and for
/// batches, whose items are audited one by one.
fn audit_spec(op: &Operation) -> Option<AuditSpec> {
    let key = |n: &str| format!("key:{n}");
    let ks = || "keystore".to_owned();
    Some(match op {
        Operation::Hello(_)
        | Operation::Ping { .. }
        | Operation::Status
        | Operation::WhoAmI
        | Operation::DebugDelay { .. }
        | Operation::DebugClock { .. }
        | Operation::TransferRead { .. }
        | Operation::TransferWrite { .. }
        | Operation::TransferBegin { .. }
        | Operation::Batch { .. } => return None,
        Operation::Init { .. } => AuditSpec::new(EventType::KeystoreInitialized, ks(), "init", 5, true),
        Operation::Unlock { .. } => AuditSpec::new(EventType::Unlock, ks(), "unlock", 3, true),
        Operation::Lock => AuditSpec::new(EventType::Lock, ks(), "lock", 2, true).exempt(),
        Operation::SlotList => AuditSpec::new(EventType::SlotList, ks(), "slot-list", 1, false),
        Operation::SlotAdd { .. } => AuditSpec::new(EventType::SlotAdded, ks(), "slot-add", 6, true),
        Operation::SlotRemove { .. } => AuditSpec::new(EventType::SlotRemoved, ks(), "slot-remove", 6, true),
        Operation::BackendSetPin { backend, .. } => {
            let mut spec = AuditSpec::new(
                EventType::BackendPinSet,
                format!("backend:{backend}"),
                "backend-pin",
                7,
                true,
            );
            spec.backend = Some(crate::backend::static_name(backend));
            spec
        }
        Operation::KeyCreate { name, options, .. } => {
            let mut spec = AuditSpec::new(EventType::KeyCreated, key(name), "create", 3, true);
            spec.backend = options.backend.as_deref().map(crate::backend::static_name);
            spec
        }
        Operation::KeyList => AuditSpec::new(EventType::KeyList, "keys".into(), "list", 1, false),
        Operation::KeyInfo { name } => AuditSpec::new(EventType::KeyInfo, key(name), "info", 1, false),
        Operation::KeyPublic { name } => AuditSpec::new(EventType::KeyPublic, key(name), "public", 1, false),
        Operation::KeyDelete { name } => AuditSpec::new(EventType::KeyDeleted, key(name), "delete", 5, true),
        Operation::KeyRotate { name } => AuditSpec::new(EventType::KeyRotated, key(name), "rotate", 3, true),
        Operation::KeySet { name, .. } => AuditSpec::new(EventType::KeyUpdated, key(name), "set", 3, true),
        Operation::KeyTransition { name, to } => {
            let (action, risk) = match to {
                Transition::Disable => ("disable", 4),
                Transition::Enable => ("enable", 4),
                Transition::Deactivate => ("deactivate", 4),
                Transition::Compromise => ("compromise", 8),
                Transition::Destroy => ("destroy", 8),
            };
            AuditSpec::new(EventType::KeyStateChanged, key(name), action, risk, true)
        }
        Operation::KeyRestore { name } => AuditSpec::new(EventType::KeyRestored, key(name), "restore", 4, true),
        Operation::KeyPurge { name } => AuditSpec::new(EventType::KeyPurged, key(name), "purge", 8, true),
        Operation::Sign { name, .. } => AuditSpec::new(EventType::Sign, key(name), "sign", 1, false),
        Operation::Encrypt { name, .. } => AuditSpec::new(EventType::Encrypt, key(name), "encrypt", 1, false),
        Operation::Mac { name, .. } => AuditSpec::new(EventType::Mac, key(name), "mac", 1, false),
        Operation::Verify {
            name,
            allow_compromised,
            ..
        } => compromised_use(EventType::Verify, key(name), "verify", *allow_compromised),
        Operation::Decrypt {
            name,
            allow_compromised,
            ..
        } => compromised_use(EventType::Decrypt, key(name), "decrypt", *allow_compromised),
        Operation::MacVerify {
            name,
            allow_compromised,
            ..
        } => compromised_use(EventType::MacVerify, key(name), "mac-verify", *allow_compromised),
        Operation::Rewrap { name, .. } => AuditSpec::new(EventType::Rewrap, key(name), "rewrap", 2, false),
        Operation::DataKey { name, plaintext, .. } => {
            if *plaintext {
                AuditSpec::new(EventType::Datakey, key(name), "datakey-plaintext", 6, true)
            } else {
                AuditSpec::new(EventType::Datakey, key(name), "datakey", 2, false)
            }
        }
        Operation::BackupCreate { .. } => AuditSpec::new(EventType::BackupCreated, ks(), "backup", 6, true),
        Operation::BackupVerify { .. } => AuditSpec::new(EventType::BackupVerified, ks(), "backup-verify", 1, false),
        Operation::BackupRestore { .. } => AuditSpec::new(EventType::BackupRestored, ks(), "restore", 9, true),
        Operation::PolicyShow | Operation::PolicyCheck { .. } => {
            AuditSpec::new(EventType::PolicyRead, "policy".into(), "read", 1, false)
        }
        Operation::AuditVerify | Operation::AuditShow { .. } => {
            AuditSpec::new(EventType::AuditRead, "audit".into(), "read", 1, false).exempt()
        }
        Operation::Metrics | Operation::FileStoreChunk { .. } | Operation::FileRetrieveNext { .. } => return None,
        // The wrapping key is the resource: `audit show --key K` finds the
        // files K wrapped, and a refusal names the key it was about.
        Operation::FileStoreFd { key: k, .. } => AuditSpec::new(EventType::FileStored, key(k), "store", 2, false),
        Operation::FileStoreBegin { key: k, .. } => {
            AuditSpec::new(EventType::FileStoreStarted, key(k), "store", 1, false)
        }
        Operation::FileStoreFinish { .. } => AuditSpec::new(EventType::FileStored, "files".into(), "store", 2, false),
        Operation::FileRetrieveBegin { token } | Operation::FileRetrieveFd { token } => {
            AuditSpec::new(EventType::FileRetrieved, format!("file:{token}"), "retrieve", 2, false)
        }
        Operation::FileList => AuditSpec::new(EventType::FileList, "files".into(), "list", 1, false),
        Operation::FileInfo { token } => AuditSpec::new(EventType::FileInfo, format!("file:{token}"), "info", 1, false),
        Operation::FileDelete { token } => {
            AuditSpec::new(EventType::FileDeleted, format!("file:{token}"), "delete", 4, true)
        }
    })
}

/// Uses that open or check with a compromised key are security events at high risk.
fn compromised_use(event: EventType, resource: String, action: &'static str, allowed: bool) -> AuditSpec {
    if allowed {
        AuditSpec::new(event, resource, action, 9, true)
    } else {
        AuditSpec::new(event, resource, action, 1, false)
    }
}

fn route_inner(op: Operation, caller: &Caller, shared: &Arc<Shared>, attached: Option<OwnedFd>) -> Plain {
    if let Some(ask) = ask_of(&op) {
        // A new key is checked against the backend it asks for.
        let backend = match &op {
            Operation::KeyCreate { options, .. } => options.backend.as_deref(),
            _ => None,
        };
        if let Err(denied) = authorize(shared, caller, ask, backend) {
            return Plain::Done(Err(denied));
        }
    }
    // A store wraps the file's data key with the key it names: that is
    // encrypting with it, so it takes `keys:encrypt` on that key too.
    if let Operation::FileStoreFd { key, .. } | Operation::FileStoreBegin { key, .. } = &op {
        let ask = Ask {
            resource: "keys",
            action: "encrypt",
            key: Some(key),
        };
        if let Err(denied) = authorize(shared, caller, ask, None) {
            return Plain::Done(Err(denied));
        }
    }
    match op {
        Operation::Ping { payload } => Plain::Done(Ok(Reply::Pong { payload })),
        Operation::Status => Plain::Done(Ok(Reply::Status(status(shared)))),
        Operation::WhoAmI => Plain::Done(Ok(Reply::WhoAmI(whoami(caller, shared)))),
        op @ (Operation::FileStoreBegin { .. }
        | Operation::FileStoreChunk { .. }
        | Operation::FileStoreFinish { .. }
        | Operation::FileRetrieveBegin { .. }
        | Operation::FileRetrieveNext { .. }
        | Operation::FileList
        | Operation::FileInfo { .. }
        | Operation::FileDelete { .. }
        | Operation::FileStoreFd { .. }
        | Operation::FileRetrieveFd { .. }) => {
            let Some(files) = shared.files.clone() else {
                return Plain::Done(Err(WireError::new(
                    ErrorCode::NotAvailable,
                    "the file store is not open",
                )));
            };
            let uid = caller.peer.creds.uid;
            // files:admin lets a caller use files others stored.
            let any = shared
                .policy()
                .check(
                    &caller.peer,
                    Ask {
                        resource: "files",
                        action: "admin",
                        key: None,
                    },
                    "soft",
                    || None,
                )
                .is_ok();
            if let Operation::FileStoreBegin { chunk_size, .. } = &op {
                let room = shared.limits.max_frame_bytes.saturating_sub(1024);
                if *chunk_size > room {
                    return Plain::Done(Err(WireError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "a chunk of {chunk_size} bytes does not fit hsmd's frame limit of {} bytes; use at most {room} \
                             (or raise limits.max_frame_bytes)",
                            shared.limits.max_frame_bytes
                        ),
                    )));
                }
            }
            let vault = Arc::clone(&shared.vault);
            let who = (uid, caller.connection_id);
            if matches!(op, Operation::FileStoreFd { .. } | Operation::FileRetrieveFd { .. }) {
                // Its place is taken here, so a uid over its share is told
                // at once and no thread is started for it.
                let place = match files.transfer_place(uid) {
                    Ok(p) => p,
                    Err(busy) => return Plain::Done(Err(busy)),
                };
                return Plain::Transfer(Box::new(move || {
                    file_op(&files, &vault, who, any, op, attached, Some(place))
                }));
            }
            Plain::Blocking(Box::new(move || file_op(&files, &vault, who, any, op, attached, None)))
        }
        Operation::Metrics => {
            let s = Arc::clone(shared);
            Plain::Blocking(Box::new(move || {
                Ok(Reply::Metrics {
                    text: s.render_metrics(),
                })
            }))
        }
        Operation::AuditVerify => {
            let audit = shared.audit.clone();
            Plain::Blocking(Box::new(move || {
                let Some(audit) = audit else {
                    return Err(WireError::new(
                        ErrorCode::NotAvailable,
                        "the audit log is off (audit.enabled = false)",
                    ));
                };
                match audit.verify() {
                    Ok(v) => Ok(Reply::AuditVerified {
                        lines: v.lines,
                        first_seq: v.first_seq,
                        last_seq: v.last_seq,
                        files: v.files.iter().map(|f| f.display().to_string()).collect(),
                        recoveries: v.recoveries,
                    }),
                    Err(broken) => {
                        tracing::error!(breaks = broken.breaks.len() as u64 + broken.more, first = %broken, "audit log verification failed");
                        Err(WireError::new(ErrorCode::Tampered, broken.to_string()))
                    }
                }
            }))
        }
        Operation::AuditShow {
            since_secs,
            event_type,
            user,
            key,
            result,
            limit,
        } => {
            let audit = shared.audit.clone();
            Plain::Blocking(Box::new(move || {
                let Some(audit) = audit else {
                    return Err(WireError::new(
                        ErrorCode::NotAvailable,
                        "the audit log is off (audit.enabled = false)",
                    ));
                };
                let filter = crate::audit::Filter {
                    since: since_secs.and_then(|s| std::time::SystemTime::now().checked_sub(Duration::from_secs(s))),
                    event_type,
                    user,
                    key,
                    result,
                    limit: (limit as usize).clamp(1, 100_000),
                };
                filter
                    .check()
                    .map_err(|why| WireError::new(ErrorCode::InvalidArgument, why))?;
                Ok(Reply::AuditLines(crate::audit::show(&audit.files(), &filter)))
            }))
        }
        Operation::PolicyShow => {
            let policy = shared.policy();
            let source = match policy.source() {
                PolicySource::Open => "none: no policy.path in the config, so every admitted peer is admin".to_owned(),
                PolicySource::File(p) => p.display().to_string(),
            };
            Plain::Done(Ok(Reply::Policy {
                source,
                text: policy.text().to_owned(),
                roles: policy.role_names(),
            }))
        }
        Operation::PolicyCheck {
            user,
            resource,
            action,
            key,
        } => {
            let policy = shared.policy();
            let vault = Arc::clone(&shared.vault);
            let gate = shared.gate.clone();
            let asker = caller.peer.creds.uid;
            Plain::Blocking(Box::new(move || {
                let Some(peer) = PeerIdentity::lookup(&user) else {
                    return Err(WireError::new(
                        ErrorCode::NotFound,
                        format!("there is no user {user:?}"),
                    ));
                };
                // Roles count only for someone the daemon lets connect.
                if let crate::auth::Admission::Refused(why) = gate.admit(&peer) {
                    return Ok(Reply::PolicyDecision {
                        allowed: false,
                        reason: format!("{why} (the connect-time gate refuses them before any role applies)"),
                    });
                }
                let (Some(resource), Some(action)) = (static_name(&resource, true), static_name(&action, false)) else {
                    return Err(WireError::new(
                        ErrorCode::InvalidArgument,
                        format!("unknown permission {resource}:{action}; `hsmctl policy show` lists them"),
                    ));
                };
                let ask = Ask {
                    resource,
                    action,
                    key: key.as_deref(),
                };
                let decision = policy.decide(
                    &peer,
                    ask,
                    "soft",
                    || key.as_deref().and_then(|k| vault.live_owner(k)),
                    peer.creds.uid == asker,
                );
                Ok(match decision {
                    Ok(g) => Reply::PolicyDecision {
                        allowed: true,
                        reason: format!(
                            "allowed by role {} (permission {}), which {} has through {}",
                            g.role.name,
                            g.permission,
                            peer.describe(),
                            g.why
                        ),
                    },
                    Err(why) => Reply::PolicyDecision {
                        allowed: false,
                        reason: why,
                    },
                })
            }))
        }
        Operation::DebugDelay { millis } => {
            if !shared.dev {
                return Plain::Done(Err(WireError::new(
                    ErrorCode::NotAvailable,
                    "debug-delay is served only by hsmd --dev",
                )));
            }
            if millis > MAX_DEBUG_DELAY_MS {
                return Plain::Done(Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    format!("debug-delay of {millis} ms is over the limit of {MAX_DEBUG_DELAY_MS} ms"),
                )));
            }
            Plain::Blocking(Box::new(move || {
                std::thread::sleep(Duration::from_millis(u64::from(millis)));
                Ok(Reply::Delayed { millis })
            }))
        }
        Operation::Lock => {
            // The panic button: answered at once, never queued behind other work.
            let result = shared.vault.lock().map_err(|e| e.to_wire());
            if result.is_ok() {
                tracing::info!(uid = caller.peer.creds.uid, "locked: master key zeroized");
            }
            Plain::Done(result.map(|()| Reply::Locked))
        }
        Operation::Init { slot } => custody(shared, caller, "init", move |v| {
            v.init(&slot).map(|slot| Reply::Initialized { slot })
        }),
        Operation::Unlock { secret } => {
            let uid = caller.peer.creds.uid;
            custody(shared, caller, "unlock", move |v| {
                v.unlock(uid, &secret)
                    .map(|(slot, warnings)| Reply::Unlocked { slot, warnings })
            })
        }
        Operation::SlotList => custody(shared, caller, "slot-list", |v| v.slots().map(Reply::Slots)),
        Operation::SlotAdd { slot } => custody(shared, caller, "slot-add", move |v| {
            v.add_slot(&slot).map(|slot| Reply::SlotAdded { slot })
        }),
        Operation::SlotRemove { id } => custody(shared, caller, "slot-remove", move |v| {
            v.remove_slot(id).map(|slot| Reply::SlotRemoved { slot })
        }),
        Operation::BackendSetPin { backend, pin } => custody(shared, caller, "backend-set-pin", move |v| {
            v.set_backend_pin(&backend, pin.expose())
                .map(|()| Reply::BackendPinSet { backend })
        }),
        Operation::KeyCreate {
            name,
            key_type,
            usages,
            options,
        } => {
            let (uid, user) = (caller.peer.creds.uid, caller.peer.user.clone());
            custody(shared, caller, "key-create", move |v| {
                v.create_key(&name, key_type, &usages, &options, uid, user.as_deref())
                    .map(|k| Reply::KeyCreated(Box::new(k)))
            })
        }
        Operation::KeyList => {
            // Only the keys the caller may list.
            let (policy, peer) = (shared.policy(), caller.peer.clone());
            custody(shared, caller, "key-list", move |v| {
                v.list_keys().map(|keys| {
                    Reply::Keys(
                        keys.into_iter()
                            .filter(|k| {
                                let ask = Ask {
                                    resource: "keys",
                                    action: "list",
                                    key: Some(&k.name),
                                };
                                policy
                                    .check(&peer, ask, &k.backend, || k.owner_exists.then_some(k.owner_uid))
                                    .is_ok()
                            })
                            .collect(),
                    )
                })
            })
        }
        Operation::KeyInfo { name } => custody(shared, caller, "key-info", move |v| {
            v.key_info(&name).map(|k| Reply::Key(Box::new(k)))
        }),
        Operation::KeyPublic { name } => custody(shared, caller, "key-public", move |v| {
            v.public_key(&name)
                .map(|(key_type, version, spki_der)| Reply::PublicKey {
                    key_type,
                    version,
                    spki_der,
                })
        }),
        Operation::KeyDelete { name } => {
            let window = shared.recovery_window;
            custody(shared, caller, "key-delete", move |v| {
                v.delete_key(&name, window).map(|k| Reply::KeyUpdated(Box::new(k)))
            })
        }
        Operation::KeyRotate { name } => custody(shared, caller, "key-rotate", move |v| {
            v.rotate_key(&name).map(|k| Reply::KeyUpdated(Box::new(k)))
        }),
        Operation::KeySet { name, changes } => custody(shared, caller, "key-set", move |v| {
            v.set_key(&name, &changes).map(|k| Reply::KeyUpdated(Box::new(k)))
        }),
        Operation::KeyTransition { name, to } => custody(shared, caller, "key-transition", move |v| {
            v.transition_key(&name, to).map(|k| Reply::KeyUpdated(Box::new(k)))
        }),
        Operation::KeyRestore { name } => custody(shared, caller, "key-restore", move |v| {
            v.restore_key(&name).map(|k| Reply::KeyUpdated(Box::new(k)))
        }),
        Operation::KeyPurge { name } => custody(shared, caller, "key-purge", move |v| {
            v.purge_key(&name).map(|()| Reply::KeyPurged { name })
        }),
        Operation::DataKey { name, aad, plaintext } => custody(shared, caller, "datakey", move |v| {
            v.datakey(&name, &aad, plaintext).map(|k| Reply::DataKey {
                version: k.version,
                sealed: k.sealed,
                plaintext: k.plaintext.map(|p| protocol::SecretBytes::new(p.to_vec())),
            })
        }),
        Operation::Rewrap {
            name,
            version,
            sealed,
            aad,
            to_version,
        } => custody(shared, caller, "rewrap", move |v| {
            v.rewrap(&name, version, &sealed, &aad, to_version)
                .map(|(version, sealed)| Reply::Encrypted { version, sealed })
        }),
        Operation::Batch { .. } => Plain::Done(Err(WireError::new(
            ErrorCode::Internal,
            "a batch is routed before it reaches here",
        ))),
        Operation::DebugClock { advance_secs } => {
            if !shared.dev {
                return Plain::Done(Err(WireError::new(
                    ErrorCode::NotAvailable,
                    "debug-clock is served only by hsmd --dev",
                )));
            }
            Plain::Done(
                shared
                    .vault
                    .advance_clock(advance_secs)
                    .map(|now_unix| Reply::Clock { now_unix })
                    .map_err(|e| e.to_wire()),
            )
        }
        Operation::BackupCreate { protection } => {
            let (transfers, uid) = (Arc::clone(&shared.transfers), caller.peer.creds.uid);
            custody(shared, caller, "backup-create", move |v| {
                let (archive, manifest) = v.create_backup(&protection)?;
                let size = archive.len() as u64;
                let transfer = transfers.offer(uid, archive).map_err(VaultError::Wire)?;
                Ok(Reply::BackupReady {
                    transfer,
                    size,
                    manifest,
                })
            })
        }
        Operation::TransferRead { transfer, offset, len } => {
            // Room for the reply's framing within the frame limit.
            let max = (shared.limits.max_frame_bytes as usize).saturating_sub(1024);
            Plain::Done(
                shared
                    .transfers
                    .read(caller.peer.creds.uid, transfer, offset, len, max)
                    .map(|bytes| Reply::TransferData { bytes }),
            )
        }
        Operation::TransferBegin { size } => Plain::Done(
            shared
                .transfers
                .begin(caller.peer.creds.uid, size, MAX_ARCHIVE)
                .map(|transfer| Reply::TransferStarted { transfer }),
        ),
        Operation::TransferWrite {
            transfer,
            offset,
            bytes,
        } => Plain::Done(
            shared
                .transfers
                .write(caller.peer.creds.uid, transfer, offset, &bytes)
                .map(|received| Reply::TransferAck { received }),
        ),
        Operation::BackupVerify { transfer, secret } => {
            let uid = caller.peer.creds.uid;
            let archive = match shared.transfers.take(uid, transfer) {
                Ok(a) => a,
                Err(e) => return Plain::Done(Err(e)),
            };
            custody(shared, caller, "backup-verify", move |v| {
                v.verify_backup(uid, &archive, secret.as_ref())
                    .map(Reply::BackupVerified)
            })
        }
        Operation::BackupRestore {
            transfer,
            secret,
            force,
        } => {
            let uid = caller.peer.creds.uid;
            let archive = match shared.transfers.take(uid, transfer) {
                Ok(a) => a,
                Err(e) => return Plain::Done(Err(e)),
            };
            custody(shared, caller, "backup-restore", move |v| {
                v.restore_backup(uid, &archive, &secret, force).map(Reply::Restored)
            })
        }
        op @ (Operation::Sign { .. }
        | Operation::Verify { .. }
        | Operation::Encrypt { .. }
        | Operation::Decrypt { .. }
        | Operation::Mac { .. }
        | Operation::MacVerify { .. }) => {
            let what = op.name();
            let hot = hot_hint(&op);
            key_use(shared, caller, what, hot, move |v| key_use_op(v, op))
        }
        Operation::Hello(_) => Plain::Done(Err(WireError::new(
            ErrorCode::ProtocolViolation,
            "hello may only be the first request on a connection",
        ))),
    }
}

/// A batch: each item authorized on its own (a refused item is refused in
/// its slot and the others still run) and audited on its own; the answer
/// waits for every item's line. On the pool: a batch may hold many slow
/// items, and one hand-off is cheap spread over all of them.
fn batch(items: Vec<protocol::BatchItem>, caller: &Caller, shared: &Arc<Shared>, audit: Option<Arc<Auditor>>) -> Work {
    if items.len() > MAX_BATCH_ITEMS {
        return Work::Done(
            Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "a batch holds at most {MAX_BATCH_ITEMS} items; this one has {}",
                    items.len()
                ),
            ))
            .into(),
        );
    }
    let items: Vec<(Operation, Result<(), WireError>)> = items
        .into_iter()
        .map(|item| {
            let op = Operation::from(item);
            let allowed = ask_of(&op).map_or(Ok(()), |ask| authorize(shared, caller, ask, None));
            (op, allowed)
        })
        .collect();
    let (who, vault) = (Arc::clone(&caller.who), Arc::clone(&shared.vault));
    Work::Blocking(Box::new(move || {
        let mut ticket: Option<Ticket> = None;
        let results = items
            .into_iter()
            .map(|(op, allowed)| {
                let spec = audit_spec(&op);
                let result = allowed.and_then(|()| key_use_op(&vault, op).map_err(|e| e.to_wire()));
                if let (Some(audit), Some(spec)) = (&audit, spec) {
                    let (event, class) = spec.event(Arc::clone(&who), &result, &vault);
                    if let Some(t) = audit.submit(event, class, true) {
                        ticket = Some(ticket.map_or(t, |held| held.join(t)));
                    }
                }
                result
            })
            .collect();
        Answer {
            result: Ok(Reply::Batch(results)),
            audit: ticket,
        }
    }))
}

/// Performs one file store operation (on the blocking pool).
fn file_op(
    files: &crate::filestore::Files,
    vault: &Vault,
    (uid, connection): (u32, u64),
    any: bool,
    op: Operation,
    attached: Option<OwnedFd>,
    place: Option<crate::shares::Share>,
) -> Result<Reply, WireError> {
    let place =
        || place.ok_or_else(|| WireError::new(ErrorCode::Internal, "a descriptor transfer came without its place"));
    let passed = |what: &str| {
        attached.map(std::fs::File::from).ok_or_else(|| {
            WireError::new(
                ErrorCode::InvalidArgument,
                format!("{what} needs the file descriptor sent with the request (SCM_RIGHTS), and none came"),
            )
        })
    };
    match op {
        Operation::FileStoreFd { name, key, chunk_size } => {
            let input = passed("file-store")?;
            files
                .store_fd(vault, uid, (&name, &key, chunk_size), &input, place()?)
                .map(Reply::File)
        }
        Operation::FileRetrieveFd { token } => {
            let output = passed("file-retrieve")?;
            files
                .retrieve_fd(vault, uid, &token, any, &output, place()?)
                .map(Reply::File)
        }
        Operation::FileStoreBegin { name, key, chunk_size } => files
            .begin_store(vault, (uid, connection), &name, &key, chunk_size)
            .map(|(session, info)| Reply::FileSession { session, info }),
        Operation::FileStoreChunk {
            session,
            index,
            last,
            bytes,
        } => files
            .store_chunk(uid, session, index, last, bytes.expose())
            .map(|index| Reply::FileChunkStored { index }),
        Operation::FileStoreFinish { session } => files.finish_store(uid, session).map(Reply::File),
        Operation::FileRetrieveBegin { token } => files
            .begin_retrieve(vault, (uid, connection), &token, any)
            .map(|(session, info)| Reply::FileSession { session, info }),
        Operation::FileRetrieveNext { session } => {
            files
                .retrieve_next(uid, session)
                .map(|(index, last, bytes)| Reply::FileChunk {
                    index,
                    last,
                    bytes: protocol::SecretBytes::new(bytes.to_vec()),
                })
        }
        Operation::FileList => files.list(uid, any).map(Reply::Files),
        Operation::FileInfo { token } => files.info(uid, &token, any).map(Reply::File),
        Operation::FileDelete { token } => files.delete(uid, &token, any).map(|()| Reply::FileDeleted { token }),
        other => Err(WireError::new(
            ErrorCode::Internal,
            format!("{} is not a file operation", other.name()),
        )),
    }
}

/// The key, version and payload size of a key operation, to decide whether it
/// may run on the reactor.
fn hot_hint(op: &Operation) -> (String, Option<u32>, usize) {
    match op {
        Operation::Sign { name, digest } => (name.clone(), None, digest.len()),
        Operation::Verify {
            name, version, digest, ..
        } => (name.clone(), Some(*version), digest.len()),
        Operation::Encrypt {
            name,
            version,
            plaintext,
            aad,
        } => (name.clone(), *version, plaintext.len() + aad.len()),
        Operation::Decrypt {
            name,
            version,
            sealed,
            aad,
            ..
        } => (name.clone(), Some(*version), sealed.len() + aad.len()),
        Operation::Mac { name, data } => (name.clone(), None, data.len()),
        Operation::MacVerify {
            name, version, data, ..
        } => (name.clone(), Some(*version), data.len()),
        // Never hot.
        _ => (String::new(), None, usize::MAX),
    }
}

/// Performs one key operation (alone or as a batch item).
fn key_use_op(v: &Vault, op: Operation) -> Result<Reply, VaultError> {
    match op {
        Operation::Sign { name, digest } => v
            .sign(&name, &digest)
            .map(|(version, signature)| Reply::Signature { version, signature }),
        Operation::Verify {
            name,
            version,
            digest,
            signature,
            allow_compromised,
        } => v
            .verify(&name, version, &digest, &signature, allow_compromised)
            .map(|valid| Reply::Verified { valid }),
        Operation::Encrypt {
            name,
            version,
            plaintext,
            aad,
        } => {
            // The request's copy of the plaintext is wiped as it drops.
            v.encrypt(&name, version, plaintext.expose(), &aad)
                .map(|(version, sealed)| Reply::Encrypted { version, sealed })
        }
        Operation::Decrypt {
            name,
            version,
            sealed,
            aad,
            allow_compromised,
        } => v
            .decrypt(&name, version, &sealed, &aad, allow_compromised)
            .map(|p| Reply::Decrypted {
                plaintext: protocol::SecretBytes::new(p.to_vec()),
            }),
        Operation::Mac { name, data } => v.mac(&name, &data).map(|(version, tag)| Reply::MacTag { version, tag }),
        Operation::MacVerify {
            name,
            version,
            data,
            tag,
            allow_compromised,
        } => v
            .mac_verify(&name, version, &data, &tag, allow_compromised)
            .map(|valid| Reply::MacVerified { valid }),
        other => Err(VaultError::Invalid(format!("{} is not a key operation", other.name()))),
    }
}

/// Payloads up to this size may be served on the reactor when the key is hot.
const INLINE_MAX_PAYLOAD: usize = 64 * 1024;

/// A key operation: on the reactor when the key is hot and the payload small
/// (see [`Vault::is_hot`]), else on the blocking pool.
/// `hot` is the key's name, the version asked for, and the payload size.
fn key_use<F>(
    shared: &Arc<Shared>,
    caller: &Caller,
    what: &'static str,
    hot: (String, Option<u32>, usize),
    f: F,
) -> Plain
where
    F: FnOnce(&Vault) -> Result<Reply, VaultError> + Send + 'static,
{
    let (name, version, payload) = hot;
    if payload <= INLINE_MAX_PAYLOAD && shared.vault.is_hot(&name, version) {
        return match custody(shared, caller, what, f) {
            Plain::Blocking(job) | Plain::Transfer(job) => Plain::Done(job()),
            done @ Plain::Done(_) => done,
        };
    }
    custody(shared, caller, what, f)
}

/// A custody operation on the blocking pool (SQLite, Argon2), logged with who
/// asked and how it went.
fn custody<F>(shared: &Arc<Shared>, caller: &Caller, what: &'static str, f: F) -> Plain
where
    F: FnOnce(&Vault) -> Result<Reply, VaultError> + Send + 'static,
{
    let vault = Arc::clone(&shared.vault);
    let uid = caller.peer.creds.uid;
    Plain::Blocking(Box::new(move || match f(&vault) {
        Ok(reply) => {
            // State changes are logged; reads and key use are too frequent to.
            if matches!(
                what,
                "init"
                    | "unlock"
                    | "slot-add"
                    | "slot-remove"
                    | "key-create"
                    | "key-delete"
                    | "key-rotate"
                    | "key-set"
                    | "key-transition"
                    | "key-restore"
                    | "key-purge"
                    | "backup-create"
                    | "backup-restore"
            ) {
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
    }))
}

fn status(shared: &Shared) -> StatusInfo {
    StatusInfo {
        state: shared.vault.state(),
        daemon_version: VERSION.to_owned(),
        protocol_version: PROTOCOL_VERSION,
        uptime_secs: shared.started.elapsed().as_secs(),
        backends: shared.vault.backends().statuses(),
        connections: shared.counters.connections(),
        max_connections: shared.limits.max_connections,
        requests_in_flight: shared.counters.in_flight(),
        dev_mode: shared.dev,
        profile: shared.profile,
        pid: std::process::id(),
        memory_locked: shared.memory_locked,
        keystore_writes: shared.vault.keystore_writes(),
        audit: match &shared.audit {
            None => protocol::AuditStatus::default(),
            Some(a) => {
                let h = a.health();
                protocol::AuditStatus {
                    enabled: true,
                    healthy: h.healthy,
                    detail: h.detail,
                    pending_events: h.pending as u64,
                    last_seq: h.last_seq,
                }
            }
        },
    }
}

fn whoami(caller: &Caller, shared: &Shared) -> PeerInfo {
    let p = &caller.peer;
    let policy = shared.policy();
    PeerInfo {
        uid: p.creds.uid,
        user: p.user.clone(),
        group: p.group.clone(),
        groups: p.groups.clone(),
        pid: p.creds.pid.unwrap_or(0),
        executable: p.executable.as_ref().map(|e| e.display().to_string()),
        connection_id: caller.connection_id,
        admitted_because: caller.admitted_because.clone(),
        roles: policy
            .roles_of(p)
            .iter()
            .map(|(r, why)| format!("{} ({why})", r.name))
            .collect(),
        permissions: policy.permissions_of(p),
    }
}

/// The permission a request needs; `None` for what every admitted peer may do
/// (hello, ping, status, whoami, dev-only debugging, reading its own
/// transfers) and for batches, whose items are checked one by one.
fn ask_of(op: &Operation) -> Option<Ask<'_>> {
    fn keys<'a>(action: &'static str, name: &'a str) -> Option<Ask<'a>> {
        Some(Ask {
            resource: "keys",
            action,
            key: Some(name),
        })
    }
    let files = |action: &'static str| {
        Some(Ask {
            resource: "files",
            action,
            key: None,
        })
    };
    let keystore = |action: &'static str| {
        Some(Ask {
            resource: "keystore",
            action,
            key: None,
        })
    };
    match op {
        Operation::Hello(_)
        | Operation::Ping { .. }
        | Operation::Status
        | Operation::WhoAmI
        | Operation::DebugDelay { .. }
        | Operation::DebugClock { .. }
        | Operation::TransferRead { .. }
        | Operation::TransferWrite { .. }
        | Operation::Batch { .. } => None,
        Operation::Init { .. } => keystore("init"),
        Operation::Unlock { .. } => keystore("unlock"),
        Operation::Lock => keystore("lock"),
        Operation::SlotList => keystore("slot-list"),
        Operation::SlotAdd { .. } => keystore("slot-add"),
        Operation::SlotRemove { .. } => keystore("slot-remove"),
        Operation::BackendSetPin { .. } => keystore("backend-pin"),
        Operation::BackupCreate { .. } | Operation::TransferBegin { .. } | Operation::BackupVerify { .. } => {
            keystore("backup")
        }
        Operation::BackupRestore { .. } => keystore("restore"),
        Operation::KeyList => Some(Ask {
            resource: "keys",
            action: "list",
            key: None,
        }),
        Operation::KeyCreate { name, .. } => keys("create", name),
        Operation::KeyInfo { name } => keys("info", name),
        Operation::KeyPublic { name } => keys("public", name),
        Operation::KeyDelete { name } => keys("delete", name),
        Operation::KeyRotate { name } => keys("rotate", name),
        Operation::KeySet { name, .. } => keys("set", name),
        Operation::KeyTransition { name, to } => keys(
            match to {
                Transition::Disable => "disable",
                Transition::Enable => "enable",
                Transition::Deactivate => "deactivate",
                Transition::Compromise => "compromise",
                Transition::Destroy => "destroy",
            },
            name,
        ),
        Operation::KeyRestore { name } => keys("restore", name),
        Operation::KeyPurge { name } => keys("purge", name),
        Operation::Sign { name, .. } => keys("sign", name),
        Operation::Verify { name, .. } => keys("verify", name),
        Operation::Encrypt { name, .. } => keys("encrypt", name),
        Operation::Decrypt { name, .. } => keys("decrypt", name),
        Operation::Mac { name, .. } => keys("mac", name),
        Operation::MacVerify { name, .. } => keys("mac-verify", name),
        Operation::Rewrap { name, .. } => keys("rewrap", name),
        Operation::DataKey { name, plaintext, .. } => {
            keys(if *plaintext { "datakey-plaintext" } else { "datakey" }, name)
        }
        Operation::PolicyShow | Operation::PolicyCheck { .. } => Some(Ask {
            resource: "policy",
            action: "read",
            key: None,
        }),
        Operation::AuditVerify | Operation::AuditShow { .. } => Some(Ask {
            resource: "audit",
            action: "read",
            key: None,
        }),
        Operation::Metrics => Some(Ask {
            resource: "metrics",
            action: "read",
            key: None,
        }),
        Operation::FileStoreBegin { .. }
        | Operation::FileStoreChunk { .. }
        | Operation::FileStoreFinish { .. }
        | Operation::FileStoreFd { .. } => files("store"),
        Operation::FileRetrieveBegin { .. } | Operation::FileRetrieveNext { .. } | Operation::FileRetrieveFd { .. } => {
            files("retrieve")
        }
        Operation::FileList => files("list"),
        Operation::FileInfo { .. } => files("info"),
        Operation::FileDelete { .. } => files("delete"),
    }
}

/// Checks `ask` against the policy in force; a refusal is logged and says
/// which permission was missing.
fn authorize(shared: &Shared, caller: &Caller, ask: Ask<'_>, backend: Option<&str>) -> Result<(), WireError> {
    let policy = shared.policy();
    // The owner is looked up only for permissions limited to owned keys; the
    // key's row is usually cached, else this is one indexed SQLite read.
    let owner = || ask.key.and_then(|k| shared.vault.live_owner(k));
    // The key's backend: read from the keystore (one indexed read, as for the
    // owner) only when some permission depends on it.
    let default = shared.vault.backends().default_name();
    let backend = if policy.restricts_backends() {
        backend
            .map(crate::backend::static_name)
            .or_else(|| ask.key.and_then(|k| shared.vault.key_backend(k)))
            .unwrap_or(default)
    } else {
        // No permission names a backend: which one it is cannot matter.
        default
    };
    match policy.check(&caller.peer, ask, backend, owner) {
        Ok(_) => Ok(()),
        Err(why) => {
            tracing::warn!(uid = caller.peer.creds.uid, permission = %ask, "access denied");
            Err(WireError::new(ErrorCode::PermissionDenied, why))
        }
    }
}

/// The `'static` name of a known resource or action (so a check can be asked
/// about one given as text).
fn static_name(name: &str, resource: bool) -> Option<&'static str> {
    if name == "*" {
        return Some("*");
    }
    if resource {
        RESOURCES.iter().map(|(r, _)| *r).find(|r| *r == name)
    } else {
        RESOURCES
            .iter()
            .flat_map(|(_, a)| a.iter().copied())
            .find(|a| *a == name)
    }
}
