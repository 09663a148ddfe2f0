//! Routes an admitted request to the code that serves it. Cheap answers are
//! computed on the reactor; anything that may block is handed back as a job for
//! the blocking pool, so a slow request never stalls other connections.

use std::{sync::Arc, time::Duration};

use protocol::{ErrorCode, Operation, PeerInfo, Reply, StatusInfo, WireError, PROTOCOL_VERSION};

use super::{Shared, VERSION};
use crate::auth::PeerIdentity;

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
}

/// A job for the blocking pool.
pub type BlockingJob = Box<dyn FnOnce() -> Result<Reply, WireError> + Send + 'static>;

/// How a request will be answered.
pub enum Work {
    /// Already answered.
    Done(Result<Reply, WireError>),
    /// Must run on the blocking pool.
    Blocking(BlockingJob),
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Done(_) => "Work::Done",
            Self::Blocking(_) => "Work::Blocking",
        })
    }
}

/// Decides how to answer `op` for `caller`. `Hello` never reaches here: the
/// connection handles the handshake.
pub fn route(op: Operation, caller: &Caller, shared: &Arc<Shared>) -> Work {
    match op {
        Operation::Ping { payload } => Work::Done(Ok(Reply::Pong { payload })),
        Operation::Status => Work::Done(Ok(Reply::Status(status(shared)))),
        Operation::WhoAmI => Work::Done(Ok(Reply::WhoAmI(whoami(caller)))),
        Operation::DebugDelay { millis } => {
            if !shared.dev {
                return Work::Done(Err(WireError::new(
                    ErrorCode::NotAvailable,
                    "debug-delay is served only by hsmd --dev",
                )));
            }
            if millis > MAX_DEBUG_DELAY_MS {
                return Work::Done(Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    format!("debug-delay of {millis} ms is over the limit of {MAX_DEBUG_DELAY_MS} ms"),
                )));
            }
            Work::Blocking(Box::new(move || {
                std::thread::sleep(Duration::from_millis(u64::from(millis)));
                Ok(Reply::Delayed { millis })
            }))
        }
        Operation::Hello(_) => Work::Done(Err(WireError::new(
            ErrorCode::ProtocolViolation,
            "hello may only be the first request on a connection",
        ))),
    }
}

fn status(shared: &Shared) -> StatusInfo {
    StatusInfo {
        state: shared.state,
        daemon_version: VERSION.to_owned(),
        protocol_version: PROTOCOL_VERSION,
        uptime_secs: shared.started.elapsed().as_secs(),
        backends: Vec::new(),
        connections: shared.counters.connections(),
        max_connections: shared.limits.max_connections,
        requests_in_flight: shared.counters.in_flight(),
        dev_mode: shared.dev,
        pid: std::process::id(),
        memory_locked: shared.memory_locked,
    }
}

fn whoami(caller: &Caller) -> PeerInfo {
    let p = &caller.peer;
    PeerInfo {
        uid: p.creds.uid,
        user: p.user.clone(),
        group: p.group.clone(),
        groups: p.groups.clone(),
        pid: p.creds.pid.unwrap_or(0),
        executable: p.executable.as_ref().map(|e| e.display().to_string()),
        connection_id: caller.connection_id,
        admitted_because: caller.admitted_because.clone(),
        roles: Vec::new(),
    }
}
