//! The request path, the same for every operation: plan it ([`super::plan`]),
//! admit it while the audit log can be written, authorize it, run it (on the
//! reactor when cheap, else on the blocking pool or a thread of its own, so a
//! slow request never stalls other connections), write its audit line, and
//! count it in the metrics.

use std::{os::fd::OwnedFd, sync::Arc};

use protocol::{ErrorCode, Operation, Reply, WireError, MAX_BATCH_ITEMS};

use super::{logged_result, pending, plan, Ctx, KeyUse, Need, Pending, Plan, Reached, Run, Shared, Staged};
use crate::{
    audit::{Auditor, Ticket},
    auth::PeerIdentity,
};

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
    /// Sent to a device from the reactor: answered when the device answers,
    /// with no thread waiting meanwhile.
    Later(Pending<Answer>),
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Done(_) => "Work::Done",
            Self::Blocking(_) => "Work::Blocking",
            Self::Transfer(_) => "Work::Transfer",
            Self::Later(_) => "Work::Later",
        })
    }
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
        Work::Later(pending) => Work::Later(pending.map(move |answer| {
            metrics.request(name, label(&answer.result), started.elapsed());
            answer
        })),
    }
}

/// Plans `op` and carries it through admission, authorization and its run,
/// with an audit line for every operation that has one. An audited request
/// is admitted only while the audit log can be written, and its answer waits
/// for its line.
fn route_audited(op: Operation, caller: &Caller, shared: &Arc<Shared>, attached: Option<OwnedFd>) -> Work {
    if let Operation::Batch { items } = op {
        // Each item has its line; the batch is admitted as a whole.
        if let Some(Err(refused)) = shared.audit.as_ref().map(|a| a.admit()) {
            return Work::Done(Err(refused).into());
        }
        return batch(items, caller, shared, shared.audit.clone());
    }
    let what = op.name();
    let Plan {
        need,
        also,
        audit: spec,
        logged,
        run,
    } = plan(op);
    let audited = shared.audit.clone().zip(spec);
    if let Some((audit, spec)) = &audited {
        if !spec.is_exempt() {
            if let Err(refused) = audit.admit() {
                return Work::Done(Err(refused).into());
            }
        }
    }
    let allowed = need
        .iter()
        .chain(also.iter())
        .try_for_each(|need| authorize(shared, caller, need));
    let staged = match allowed {
        Err(denied) => Staged::from(Err(denied)),
        Ok(()) => start(run, caller, shared, attached, what, logged),
    };
    let Some((audit, spec)) = audited else {
        return match staged {
            Staged::Done(reached) => Work::Done(reached.result.into()),
            Staged::Blocking(job) => Work::Blocking(Box::new(move || job().result.into())),
            Staged::Transfer(job) => Work::Transfer(Box::new(move || job().result.into())),
            Staged::Later(pending) => Work::Later(pending.map(|reached| reached.result.into())),
        };
    };
    let (who, vault) = (Arc::clone(&caller.who), Arc::clone(&shared.vault));
    match staged {
        Staged::Done(reached) => {
            // Written when the connection has handled what it has read.
            let (event, class) = spec.event(who, &reached.result, reached.backend, &vault);
            let ticket = audit.submit_deferred(event, class, !spec.is_exempt());
            Work::Done(Answer {
                result: reached.result,
                audit: ticket,
            })
        }
        Staged::Blocking(job) => Work::Blocking(then_audit(job, spec, audit, who, vault)),
        Staged::Transfer(job) => Work::Transfer(then_audit(job, spec, audit, who, vault)),
        // Written by the thread that brings the answer (the reactor, mostly),
        // which has no connection loop to write it later.
        Staged::Later(pending) => Work::Later(pending.map(move |reached| {
            let (event, class) = spec.event(who, &reached.result, reached.backend, &vault);
            let ticket = audit.submit(event, class, !spec.is_exempt());
            Answer {
                result: reached.result,
                audit: ticket,
            }
        })),
    }
}

/// `job`, followed by its audit line, written as soon as it is done (off the
/// reactor, nothing else waits for the connection).
fn then_audit(
    job: super::Job,
    spec: super::AuditSpec,
    audit: Arc<Auditor>,
    who: Arc<crate::audit::Who>,
    vault: Arc<crate::keystore::Vault>,
) -> BlockingJob {
    Box::new(move || {
        let reached = job();
        let (event, class) = spec.event(who, &reached.result, reached.backend, &vault);
        let ticket = audit.submit(event, class, !spec.is_exempt());
        Answer {
            result: reached.result,
            audit: ticket,
        }
    })
}

/// Payloads up to this size may be served on the reactor when the key is hot.
const INLINE_MAX_PAYLOAD: usize = 64 * 1024;

/// Starts an authorized operation. A key use runs on the reactor when its key
/// is hot and its payload small (see [`crate::keystore::Keys::find_hot`]), else on the pool.
fn start(
    run: Run,
    caller: &Caller,
    shared: &Arc<Shared>,
    attached: Option<OwnedFd>,
    what: &'static str,
    logged: bool,
) -> Staged {
    let uid = caller.peer.creds.uid;
    match run {
        Run::Start(f) => f(Ctx {
            shared,
            caller,
            attached,
            what,
            logged,
        }),
        Run::Key(key_use) => {
            let hot = (key_use.payload <= INLINE_MAX_PAYLOAD)
                .then(|| shared.vault.keys().find_hot(&key_use.name, key_use.version))
                .flatten();
            if let Some(found) = hot {
                return Staged::Done(key_use.run(shared.vault.keys(), Some(found), uid, what));
            }
            let key_use = match start_later(key_use, shared, uid, what) {
                Ok(pending) => return Staged::Later(pending),
                Err(k) => k,
            };
            let vault = Arc::clone(&shared.vault);
            Staged::Blocking(Box::new(move || key_use.run(vault.keys(), None, uid, what)))
        }
    }
}

/// Starts a key use on the reactor when its key is loaded and its device
/// answers later (a token behind its helper): the request goes out now, and
/// the answer is awaited without a thread. Gives the key use back otherwise.
fn start_later(
    mut key_use: KeyUse,
    shared: &Arc<Shared>,
    uid: u32,
    what: &'static str,
) -> Result<Pending<Reached>, KeyUse> {
    if key_use.payload > INLINE_MAX_PAYLOAD {
        return Err(key_use);
    }
    let Some(later) = key_use.later.take() else {
        return Err(key_use);
    };
    let keys = shared.vault.keys();
    let Some(found) = keys.find_loaded(&key_use.name, key_use.version) else {
        return Err(key_use);
    };
    let (pending, fill) = pending::device_answer();
    let backend = found.backend();
    let then = Box::new(move |result| {
        fill.fill(Reached {
            result: logged_result(uid, what, false, result),
            backend: Some(backend),
        });
    });
    match later(keys, &found, then) {
        Ok(()) => Ok(pending),
        Err(_unused) => Err(key_use),
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
    struct Item {
        what: &'static str,
        spec: Option<super::AuditSpec>,
        run: Result<KeyUse, WireError>,
    }
    let items: Vec<Item> = items
        .into_iter()
        .map(|item| {
            let op = Operation::from(item);
            let what = op.name();
            let plan = plan(op);
            let allowed = plan
                .need
                .as_ref()
                .map_or(Ok(()), |need| authorize(shared, caller, need));
            let run = allowed.and_then(|()| match plan.run {
                Run::Key(k) => Ok(k),
                Run::Start(_) => Err(WireError::new(
                    ErrorCode::Internal,
                    format!("{what} is not a key operation and cannot be in a batch"),
                )),
            });
            Item {
                what,
                spec: plan.audit,
                run,
            }
        })
        .collect();
    let (who, vault, uid) = (
        Arc::clone(&caller.who),
        Arc::clone(&shared.vault),
        caller.peer.creds.uid,
    );
    Work::Blocking(Box::new(move || {
        let mut ticket: Option<Ticket> = None;
        let results = items
            .into_iter()
            .map(|item| {
                let reached = match item.run {
                    Ok(k) => k.run(vault.keys(), None, uid, item.what),
                    Err(e) => Err(e).into(),
                };
                if let (Some(audit), Some(spec)) = (&audit, item.spec) {
                    let (event, class) = spec.event(Arc::clone(&who), &reached.result, reached.backend, &vault);
                    if let Some(t) = audit.submit(event, class, true) {
                        ticket = Some(ticket.map_or(t, |held| held.join(t)));
                    }
                }
                reached.result
            })
            .collect();
        Answer {
            result: Ok(Reply::Batch(results)),
            audit: ticket,
        }
    }))
}

/// Checks `need` against the policy in force; a refusal is logged and says
/// which permission was missing.
fn authorize(shared: &Shared, caller: &Caller, need: &Need) -> Result<(), WireError> {
    let policy = shared.policy();
    let ask = need.permission.on(need.key.as_deref());
    // The owner is looked up only for permissions limited to owned keys; the
    // key's row is usually cached, else this is one indexed SQLite read.
    let owner = || ask.key.and_then(|k| shared.vault.keys().live_owner(k));
    // The key's backend: read from the keystore (one indexed read, as for the
    // owner) only when some permission depends on it.
    let default = shared.vault.backends().default_name();
    let backend = if policy.restricts_backends() {
        need.backend
            .as_deref()
            .map(crate::backend::static_name)
            .or_else(|| ask.key.and_then(|k| shared.vault.keys().key_backend(k)))
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
