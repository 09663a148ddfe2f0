//! Liveness and identity: what every admitted peer may ask, unaudited, on
//! the reactor. And the dev-only operations tests use.

use std::time::Duration;

use protocol::{ErrorCode, PeerInfo, Reply, StatusInfo, WireError, PROTOCOL_VERSION};

use super::{Caller, Plan, Shared, Staged};

/// The most a `DebugDelay` may hold a worker.
const MAX_DEBUG_DELAY_MS: u32 = 10_000;

/// The handshake is the connection's; a second one is a mistake.
pub(super) fn hello() -> Plan {
    Plan::answer(Err(WireError::new(
        ErrorCode::ProtocolViolation,
        "hello may only be the first request on a connection",
    )))
}

/// A batch is split into its items before it is planned.
pub(super) fn batch_here() -> Plan {
    Plan::answer(Err(WireError::new(
        ErrorCode::Internal,
        "a batch is routed before it reaches here",
    )))
}

pub(super) fn ping(payload: Vec<u8>) -> Plan {
    Plan::answer(Ok(Reply::Pong { payload }))
}

pub(super) fn status() -> Plan {
    Plan::start(|cx| Ok(Reply::Status(status_of(cx.shared))).into())
}

pub(super) fn whoami() -> Plan {
    Plan::start(|cx| Ok(Reply::WhoAmI(whoami_of(cx.caller, cx.shared))).into())
}

pub(super) fn debug_delay(millis: u32) -> Plan {
    Plan::start(move |cx| {
        if !cx.shared.dev {
            return Err(WireError::new(
                ErrorCode::NotAvailable,
                "debug-delay is served only by hsmd --dev",
            ))
            .into();
        }
        if millis > MAX_DEBUG_DELAY_MS {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!("debug-delay of {millis} ms is over the limit of {MAX_DEBUG_DELAY_MS} ms"),
            ))
            .into();
        }
        Staged::Blocking(Box::new(move || {
            std::thread::sleep(Duration::from_millis(u64::from(millis)));
            Ok(Reply::Delayed { millis }).into()
        }))
    })
}

pub(super) fn debug_clock(advance_secs: u64) -> Plan {
    Plan::start(move |cx| {
        if !cx.shared.dev {
            return Err(WireError::new(
                ErrorCode::NotAvailable,
                "debug-clock is served only by hsmd --dev",
            ))
            .into();
        }
        cx.shared
            .vault
            .keys()
            .advance_clock(advance_secs)
            .map(|now_unix| Reply::Clock { now_unix })
            .map_err(|e| e.to_wire())
            .into()
    })
}

fn status_of(shared: &Shared) -> StatusInfo {
    StatusInfo {
        state: shared.vault.custody().state(),
        daemon_version: crate::VERSION.to_owned(),
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
        keystore_writes: shared.vault.keys().keystore_writes(),
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

fn whoami_of(caller: &Caller, shared: &Shared) -> PeerInfo {
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
