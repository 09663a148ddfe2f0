//! Who a new connection's peer is, and whether they may stay: the same on the
//! hsmd socket and the SSH agent socket, so both admit the same people.

use std::{sync::Arc, time::Duration};

use protocol::{ErrorCode, WireError};
use tokio::time::timeout;

use super::{Place, Shared};
use crate::{
    audit::{Class, Event, EventType, Meta, Outcome, Who},
    auth::{Admission, Credentials, PeerIdentity},
    ops::Caller,
};

/// How long identity lookups (NSS) may take before the peer is refused.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(5);

/// Looks the peer up and puts them through the connect-time gate and the
/// reserved places; a refusal is logged (and audited when the gate refused)
/// and comes back as the error to tell the peer.
pub(super) async fn identify(
    id: u64,
    shared: &Arc<Shared>,
    creds: Credentials,
    place: &Place,
) -> Result<Arc<Caller>, WireError> {
    let Ok(Ok(peer)) = timeout(IDENTITY_TIMEOUT, shared.lookups.resolve(creds)).await else {
        tracing::error!(
            connection = id,
            uid = creds.uid,
            "user database lookup failed or hung; refusing"
        );
        return Err(WireError::new(
            ErrorCode::Internal,
            "hsmd could not look up your identity; see its log",
        ));
    };
    let exe = peer.executable.as_ref().map(|p| p.display().to_string());
    let admitted_because = match shared.gate.admit(&peer) {
        Admission::Admitted(why) => why,
        Admission::Refused(why) => {
            tracing::warn!(user = ?peer.user, exe = ?exe, reason = %why, "connection refused");
            shared.metrics.auth_failure("connection_refused");
            if let Some(audit) = shared.audit.clone() {
                let event = Event {
                    event_type: EventType::AuthFailure,
                    who: Arc::new(who(&peer, exe, id)),
                    backend: None,
                    resource: "connection".into(),
                    action: "connect",
                    result: Outcome::Failure,
                    metadata: Meta::message(why.clone()),
                    risk_score: 6,
                    time: std::time::SystemTime::now(),
                };
                if let Some(ticket) = audit.submit(event, Class::Security, false) {
                    let _ = audit.wait(ticket).await;
                }
            }
            return Err(WireError::new(ErrorCode::PermissionDenied, why));
        }
    };
    if place.reserved && !may_use_reserve(shared, &peer) {
        let (max, kept) = (shared.limits.max_connections, shared.limits.reserved_connections);
        tracing::warn!(user = ?peer.user, "refusing connection: only the reserved places are free");
        shared.metrics.connection_refused("total");
        return Err(WireError::new(
            ErrorCode::TooManyConnections,
            format!(
                "hsmd is serving its maximum of {max} connections (limits.max_connections); the last \
                 {kept} are kept for root and the admin role (limits.reserved_connections); try again shortly"
            ),
        ));
    }
    tracing::debug!(user = ?peer.user, exe = ?exe, "connection admitted: {admitted_because}");
    let who = Arc::new(who(&peer, exe, id));
    Ok(Arc::new(Caller {
        peer,
        admitted_because,
        connection_id: id,
        who,
    }))
}

fn who(peer: &PeerIdentity, executable: Option<String>, connection: u64) -> Who {
    Who {
        uid: peer.creds.uid,
        user: peer.user.clone(),
        pid: peer.creds.pid,
        executable,
        connection,
        ssh_host_key: None,
    }
}

/// Whether the peer may hold one of the places kept back: root, and holders
/// of the admin role (with no policy file, everyone admitted is an admin).
fn may_use_reserve(shared: &Shared, peer: &PeerIdentity) -> bool {
    peer.creds.uid == 0 || shared.policy().roles_of(peer).iter().any(|(r, _)| r.name == "admin")
}
