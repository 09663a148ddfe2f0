//! The audit line an operation writes: what it says is decided before the
//! operation runs (event, resource, action, risk), and completed from its
//! outcome (versions, validity, the error, the key's backend).

use std::sync::Arc;

use protocol::{ErrorCode, Reply, WireError};

use crate::{
    audit::{Class, EventType},
    keystore::Vault,
};

/// What the audit line of an operation says, decided before it runs.
#[derive(Debug)]
pub struct AuditSpec {
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
    /// A message signature's hash (`pure` for Ed25519) and the message's length.
    message: Option<(&'static str, u64)>,
}

impl AuditSpec {
    pub(super) fn new(event_type: EventType, resource: String, action: &'static str, risk: u8, security: bool) -> Self {
        Self {
            event_type,
            resource,
            backend: None,
            action,
            risk,
            security,
            exempt: false,
            message: None,
        }
    }

    /// For a message signature: the hash it is over and the message's length
    /// (the line never holds the message).
    pub(super) fn over_message(mut self, hash: &'static str, len: usize) -> Self {
        self.message = Some((hash, len as u64));
        self
    }

    /// For a key creation: the backend it asked for.
    pub(super) fn on_backend(mut self, backend: Option<&str>) -> Self {
        self.backend = backend.map(crate::backend::static_name);
        self
    }

    /// Whether it is served while the audit log cannot be written.
    pub(super) fn is_exempt(&self) -> bool {
        self.exempt
    }

    pub(super) fn exempt(mut self) -> Self {
        self.exempt = true;
        self
    }

    /// The event for `result`, and how durable it must be before the answer.
    pub(super) fn event(
        &self,
        who: Arc<crate::audit::Who>,
        result: &Result<Reply, WireError>,
        used: Option<&'static str>,
        vault: &Vault,
    ) -> (crate::audit::Event, Class) {
        use crate::audit::{Event, Outcome};
        let mut metadata = crate::audit::Meta::default();
        if let Some((hash, len)) = self.message {
            metadata.hash = Some(hash);
            metadata.message_bytes = Some(len);
        }
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
                    | Reply::PublicKey { version, .. }
                    | Reply::DecryptedWith { version, .. } => Some(*version),
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
                    // The key the operation found; else the one a creation
                    // asked for; else the cached row's, if there is one.
                    _ => used.or(self.backend).or_else(|| {
                        self.resource
                            .strip_prefix("key:")
                            .and_then(|k| vault.keys().known_backend(k))
                    }),
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

/// Uses that open or check with a compromised key are security events at high risk.
pub(super) fn compromised_use(event: EventType, resource: String, action: &'static str, allowed: bool) -> AuditSpec {
    if allowed {
        AuditSpec::new(event, resource, action, 9, true)
    } else {
        AuditSpec::new(event, resource, action, 1, false)
    }
}
