//! Reading the daemon's own records: the policy in force (and what it
//! decides for someone), the audit log, the metrics.

use std::time::Duration;

use protocol::{ErrorCode, Reply, WireError};

use super::{AuditSpec, Plan, Staged};
use crate::{
    audit::EventType,
    auth::{
        permission::{Permission, RESOURCES},
        policy::{Ask, Source as PolicySource},
        PeerIdentity,
    },
};

fn policy_read() -> AuditSpec {
    AuditSpec::new(EventType::PolicyRead, "policy".into(), "read", 1, false)
}

/// Reading the log is served while the log cannot be written: an operator
/// must be able to see what went wrong.
fn audit_read() -> AuditSpec {
    AuditSpec::new(EventType::AuditRead, "audit".into(), "read", 1, false).exempt()
}

fn audit_off() -> WireError {
    WireError::new(ErrorCode::NotAvailable, "the audit log is off (audit.enabled = false)")
}

pub(super) fn policy_show() -> Plan {
    Plan::start(|cx| {
        let policy = cx.shared.policy();
        let source = match policy.source() {
            PolicySource::Open => "none: no policy.path in the config, so every admitted peer is admin".to_owned(),
            PolicySource::File(p) => p.display().to_string(),
        };
        Ok(Reply::Policy {
            source,
            text: policy.text().to_owned(),
            roles: policy.role_names(),
        })
        .into()
    })
    .needs(Permission::PolicyRead, None)
    .audited(policy_read())
}

pub(super) fn policy_check(user: String, resource: String, action: String, key: Option<String>) -> Plan {
    Plan::start(move |cx| {
        let policy = cx.shared.policy();
        let vault = std::sync::Arc::clone(&cx.shared.vault);
        let gate = cx.shared.gate.clone();
        let asker = cx.caller.peer.creds.uid;
        Staged::Blocking(Box::new(move || {
            let Some(peer) = PeerIdentity::lookup(&user) else {
                return Err(WireError::new(
                    ErrorCode::NotFound,
                    format!("there is no user {user:?}"),
                ))
                .into();
            };
            // Roles count only for someone the daemon lets connect.
            if let crate::auth::Admission::Refused(why) = gate.admit(&peer) {
                return Ok(Reply::PolicyDecision {
                    allowed: false,
                    reason: format!("{why} (the connect-time gate refuses them before any role applies)"),
                })
                .into();
            }
            let (Some(resource), Some(action)) = (static_word(&resource, true), static_word(&action, false)) else {
                return Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    format!("unknown permission {resource}:{action}; `hsmctl policy show` lists them"),
                ))
                .into();
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
                || key.as_deref().and_then(|k| vault.keys().live_owner(k)),
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
            .into()
        }))
    })
    .needs(Permission::PolicyRead, None)
    .audited(policy_read())
}

/// The `'static` word for a resource or action given as text (or `*`), so a
/// check can be asked about it.
fn static_word(name: &str, resource: bool) -> Option<&'static str> {
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

pub(super) fn audit_verify() -> Plan {
    Plan::start(|cx| {
        let audit = cx.shared.audit.clone();
        Staged::Blocking(Box::new(move || {
            let Some(audit) = audit else {
                return Err(audit_off()).into();
            };
            match audit.verify() {
                Ok(v) => Ok(Reply::AuditVerified {
                    lines: v.lines,
                    first_seq: v.first_seq,
                    last_seq: v.last_seq,
                    files: v.files.iter().map(|f| f.display().to_string()).collect(),
                    recoveries: v.recoveries,
                })
                .into(),
                Err(broken) => {
                    tracing::error!(breaks = broken.breaks.len() as u64 + broken.more, first = %broken, "audit log verification failed");
                    Err(WireError::new(ErrorCode::Tampered, broken.to_string())).into()
                }
            }
        }))
    })
    .needs(Permission::AuditRead, None)
    .audited(audit_read())
}

pub(super) fn audit_show(
    since_secs: Option<u64>,
    event_type: Option<String>,
    user: Option<String>,
    key: Option<String>,
    result: Option<String>,
    limit: u32,
) -> Plan {
    Plan::start(move |cx| {
        let audit = cx.shared.audit.clone();
        Staged::Blocking(Box::new(move || {
            let Some(audit) = audit else {
                return Err(audit_off()).into();
            };
            let filter = crate::audit::Filter {
                since: since_secs.and_then(|s| std::time::SystemTime::now().checked_sub(Duration::from_secs(s))),
                event_type,
                user,
                key,
                result,
                limit: (limit as usize).clamp(1, 100_000),
            };
            if let Err(why) = filter.check() {
                return Err(WireError::new(ErrorCode::InvalidArgument, why)).into();
            }
            Ok(Reply::AuditLines(crate::audit::show(&audit.files(), &filter))).into()
        }))
    })
    .needs(Permission::AuditRead, None)
    .audited(audit_read())
}

/// Rendering lists the keys: off the reactor.
pub(super) fn metrics() -> Plan {
    Plan::start(|cx| {
        let shared = std::sync::Arc::clone(cx.shared);
        Staged::Blocking(Box::new(move || {
            Ok(Reply::Metrics {
                text: shared.render_metrics(),
            })
            .into()
        }))
    })
    .needs(Permission::MetricsRead, None)
}
