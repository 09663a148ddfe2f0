//! Key backends: where a key's private material lives and who performs its
//! operations. One trait for all of them, so every key command, policy rule,
//! lifecycle state and audit line works the same whatever the backend:
//!
//! - `soft`: software keys, sealed under the master key in the keystore;
//! - `mock`: software keys with injected latency and failures (development and
//!   tests; the production profile refuses it);
//! - `pkcs11`: keys generated inside a PKCS#11 token, driven through a helper
//!   process so that no vendor module runs inside hsmd ([`pkcs11`]);
//! - `tpm`: ECDSA P-256 and RSA 2048 keys inside a TPM 2.0 (feature `tpm`).
//!
//! RSA keys live only in the hardware backends ([`rsa_public`] says why).
//!
//! The keystore keeps, for every key version, the backend's *reference* sealed
//! under the master key and bound to the key's row: for `soft` that is the
//! secret itself, for a token the object's identifier. [`Backend::load`] turns
//! a reference back into a usable [`KeyHandle`].

pub mod material;
pub mod mock;
pub mod pkcs11;
pub mod rsa_public;
pub mod soft;
#[cfg(feature = "tpm")]
pub mod tpm;

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use protocol::{BackendStatus, KeyType};
use thiserror::Error;
use zeroize::Zeroizing;

/// What went wrong inside a backend.
#[derive(Debug, Error)]
pub enum BackendError {
    /// The backend cannot be reached now (device gone, helper restarting, not
    /// configured); retrying later may work.
    #[error("the {backend} backend is unavailable: {reason}")]
    Unavailable {
        /// Which backend.
        backend: &'static str,
        /// Why, and what to do.
        reason: String,
    },
    /// The backend was reached and failed the operation.
    #[error("the {backend} backend failed: {reason}")]
    Failed {
        /// Which backend.
        backend: &'static str,
        /// What it said.
        reason: String,
    },
    /// The request does not fit the key or the backend (wrong key type for the
    /// operation, a type the backend cannot make).
    #[error("{0}")]
    Unsupported(String),
    /// The stored reference does not describe a key of this backend: the
    /// keystore record was altered.
    #[error("the {backend} backend does not recognise the stored key reference")]
    BadReference {
        /// Which backend.
        backend: &'static str,
    },
}

/// A newly generated key: what the keystore keeps for it.
pub struct NewKey {
    /// The backend's reference to the key (sealed by the keystore).
    pub reference: Zeroizing<Vec<u8>>,
    /// SubjectPublicKeyInfo DER for asymmetric keys.
    pub public: Option<Vec<u8>>,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("public", &self.public.is_some())
            .finish_non_exhaustive()
    }
}

/// Which key a backend object belongs to, for backends that label their
/// objects (a token's CKA_LABEL and CKA_ID).
#[derive(Debug, Clone, Copy)]
pub struct KeyLabel<'a> {
    /// The key's id in the keystore (hex).
    pub key_id: &'a str,
    /// The key's name.
    pub name: &'a str,
    /// The version being made.
    pub version: u32,
}

/// A backend's health, as `hsmctl status` and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Whether the backend works now.
    pub healthy: bool,
    /// What the backend is, or why it does not work.
    pub detail: String,
}

/// One place keys can live.
pub trait Backend: Send + Sync + fmt::Debug {
    /// The name keys record and `KeyOptions::backend` asks for.
    fn name(&self) -> &'static str;

    /// Generates a key of `key_type` inside the backend.
    ///
    /// # Errors
    /// [`BackendError::Unsupported`] for a type it cannot make; unavailability
    /// or failure of the device.
    fn generate(&self, key_type: KeyType, label: KeyLabel<'_>) -> Result<NewKey, BackendError>;

    /// Makes a usable handle from a stored reference.
    ///
    /// # Errors
    /// [`BackendError::BadReference`] if the reference describes no key here.
    fn load(&self, key_type: KeyType, reference: &[u8]) -> Result<Arc<dyn KeyHandle>, BackendError>;

    /// Removes the key's objects from the backend (destroy, purge). Backends
    /// whose material lives only in the keystore have nothing to remove.
    ///
    /// # Errors
    /// The device's refusal; the keystore erases its record regardless.
    fn destroy(&self, _key_type: KeyType, _reference: &[u8]) -> Result<(), BackendError> {
        Ok(())
    }

    /// Whether keys leave objects in the backend that [`Backend::destroy`]
    /// must remove (a token's objects; not software keys).
    fn holds_objects(&self) -> bool {
        false
    }

    /// The backend's health now. Must be cheap (no device round trip): it is
    /// read on the reactor by `Status`.
    fn health(&self) -> Health;

    /// Requests sent to the device that wait for its answer now, for a
    /// backend that queues them (a token behind its helper); `None` where
    /// every call runs to its end on the caller's thread.
    fn unanswered(&self) -> Option<u32> {
        None
    }

    /// Whether an operation with a loaded key finishes in microseconds on the
    /// calling thread (so it may run on the reactor).
    fn is_fast(&self) -> bool {
        false
    }
}

/// Where a signature started with [`KeyHandle::sign_then`] goes.
pub type Signed = Box<dyn FnOnce(Result<Vec<u8>, BackendError>) + Send>;

/// A usable key version. The operations take what the client sent after the
/// keystore checked the key's state, usages and the digest length.
pub trait KeyHandle: Send + Sync + fmt::Debug {
    /// The key's type.
    fn key_type(&self) -> KeyType;
    /// SubjectPublicKeyInfo DER; `None` for symmetric keys.
    fn public_spki(&self) -> Option<Vec<u8>>;
    /// Signs a digest (DER for ECDSA, 64 bytes for Ed25519).
    ///
    /// # Errors
    /// Not a signing key; the backend failing.
    fn sign(&self, digest: &[u8]) -> Result<Vec<u8>, BackendError>;
    /// Whether [`KeyHandle::sign_then`] can send a signature to the device
    /// now and return at once (so the reactor may start it): a token that
    /// answers over a socket, with room for another request.
    fn signs_later(&self) -> bool {
        false
    }
    /// Starts a signature and returns; `then` gets it, on the thread that
    /// reads the device's answer, and must not block. Where the key does
    /// not sign later ([`KeyHandle::signs_later`]), signs here.
    fn sign_then(&self, digest: &[u8], then: Signed) {
        then(self.sign(digest));
    }
    /// Checks a signature over a digest.
    ///
    /// # Errors
    /// As [`KeyHandle::sign`].
    fn verify(&self, digest: &[u8], signature: &[u8]) -> Result<bool, BackendError>;
    /// Whether an ECDSA or RSA PKCS#1 v1.5 key signs a digest of any of
    /// SHA-256/384/512 (soft and PKCS#11 sign the digest given, a PKCS#1
    /// signature naming its hash; a TPM key's scheme fixes its hash).
    fn any_hash(&self) -> bool {
        true
    }
    /// AES-256-GCM seal: 12-byte nonce ‖ ciphertext ‖ tag.
    ///
    /// # Errors
    /// Not an aes256-gcm key; the backend failing.
    fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, BackendError>;
    /// Opens what [`KeyHandle::encrypt`] sealed; `Ok(None)` when it does not authenticate.
    ///
    /// # Errors
    /// As [`KeyHandle::encrypt`].
    fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, BackendError>;
    /// HMAC-SHA-256.
    ///
    /// # Errors
    /// Not an hmac-sha256 key; the backend failing.
    fn mac(&self, data: &[u8]) -> Result<Vec<u8>, BackendError>;
    /// Checks an HMAC-SHA-256 tag in constant time.
    ///
    /// # Errors
    /// As [`KeyHandle::mac`].
    fn mac_verify(&self, data: &[u8], tag: &[u8]) -> Result<bool, BackendError>;
}

/// Seals small secrets to this machine's TPM, for TPM2 unlock slots.
pub trait Sealer: Send + Sync + fmt::Debug {
    /// Seals `secret`, bound to the current values of `pcrs` (SHA-256 bank;
    /// none: no PCR policy); returns the sealed object's public and private
    /// blobs.
    ///
    /// # Errors
    /// The TPM is unreachable or refuses.
    fn seal(&self, secret: &[u8], pcrs: &[u8]) -> Result<(Vec<u8>, Vec<u8>), BackendError>;

    /// Unseals what [`Sealer::seal`] made; fails if a bound PCR changed.
    ///
    /// # Errors
    /// The TPM is unreachable, the blobs are not this TPM's, or the PCR
    /// policy fails.
    fn unseal(&self, public: &[u8], private: &[u8], pcrs: &[u8]) -> Result<Zeroizing<Vec<u8>>, BackendError>;
}

/// The configured backends; `soft` is always there.
#[derive(Debug, Clone)]
pub struct Backends {
    default: &'static str,
    list: Vec<Arc<dyn Backend>>,
    sealer: Option<Arc<dyn Sealer>>,
    pkcs11: Option<Arc<pkcs11::Pkcs11>>,
}

impl Default for Backends {
    fn default() -> Self {
        Self {
            default: soft::NAME,
            list: vec![Arc::new(soft::Soft)],
            sealer: None,
            pkcs11: None,
        }
    }
}

impl Backends {
    /// `soft` plus `others`; `default` names the backend keys go to when
    /// their creation names none.
    ///
    /// # Errors
    /// `default` names no configured backend.
    pub fn new(default: &str, others: Vec<Arc<dyn Backend>>) -> Result<Self, String> {
        let mut list: Vec<Arc<dyn Backend>> = vec![Arc::new(soft::Soft)];
        list.extend(others);
        let Some(default) = list.iter().map(|b| b.name()).find(|n| *n == default) else {
            return Err(format!(
                "backends.default = {default:?} is not configured; configured: {}",
                list.iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
            ));
        };
        Ok(Self {
            default,
            list,
            sealer: None,
            pkcs11: None,
        })
    }

    /// The PKCS#11 backend, when configured (it takes its PIN from the keystore).
    #[must_use]
    pub fn pkcs11(&self) -> Option<&Arc<pkcs11::Pkcs11>> {
        self.pkcs11.as_ref()
    }

    /// The TPM sealer for TPM2 slots, when a TPM is configured.
    #[must_use]
    pub fn sealer(&self) -> Option<&Arc<dyn Sealer>> {
        self.sealer.as_ref()
    }

    /// The backend called `name`.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] naming the configured ones.
    pub fn get(&self, name: &str) -> Result<&Arc<dyn Backend>, BackendError> {
        self.list
            .iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| BackendError::Unavailable {
                backend: static_name(name),
                reason: format!(
                    "no backend {name:?} is configured in this hsmd (configured: {}); add a [backends.{name}] section",
                    self.names().join(", ")
                ),
            })
    }

    /// The default backend's name.
    #[must_use]
    pub fn default_name(&self) -> &'static str {
        self.default
    }

    /// The configured backends' names.
    #[must_use]
    pub fn names(&self) -> Vec<&'static str> {
        self.list.iter().map(|b| b.name()).collect()
    }

    /// Each queueing backend's count of requests waiting for the device.
    #[must_use]
    pub fn unanswered(&self) -> Vec<(&'static str, u32)> {
        self.list
            .iter()
            .filter_map(|b| Some((b.name(), b.unanswered()?)))
            .collect()
    }

    /// Every backend's health.
    #[must_use]
    pub fn statuses(&self) -> Vec<BackendStatus> {
        self.list
            .iter()
            .map(|b| {
                let h = b.health();
                BackendStatus {
                    name: b.name().to_owned(),
                    healthy: h.healthy,
                    detail: h.detail,
                }
            })
            .collect()
    }
}

/// The backends `[backends]` configures.
///
/// # Errors
/// A backend that cannot start, or a default that names none.
pub fn from_config(config: &crate::config::BackendsConfig) -> Result<Backends, String> {
    let mut others: Vec<Arc<dyn Backend>> = Vec::new();
    #[cfg_attr(not(feature = "tpm"), allow(unused_mut))]
    let mut sealer: Option<Arc<dyn Sealer>> = None;
    if let Some(m) = &config.mock {
        tracing::warn!("the mock backend is on: it injects delays and failures (development only)");
        others.push(Arc::new(mock::Mock::new(mock::Injection {
            latency: m.latency,
            failure_rate: m.failure_rate,
        })));
    }
    let mut p11 = None;
    if let Some(p) = &config.pkcs11 {
        let backend = Arc::new(pkcs11::Pkcs11::start(p)?);
        p11 = Some(Arc::clone(&backend));
        others.push(backend);
    }
    if let Some(t) = &config.tpm {
        #[cfg(feature = "tpm")]
        {
            let tpm = Arc::new(tpm::Tpm::start(&t.tcti)?);
            sealer = Some(Arc::clone(&tpm) as Arc<dyn Sealer>);
            others.push(tpm);
        }
        #[cfg(not(feature = "tpm"))]
        return Err(format!(
            "[backends.tpm] (tcti {:?}) is configured, but this hsmd was built without TPM support; \
             build it with `--features tpm` (needs libtss2-dev)",
            t.tcti
        ));
    }
    let mut backends = Backends::new(&config.default, others)?;
    backends.sealer = sealer;
    backends.pkcs11 = p11;
    Ok(backends)
}

/// Every backend name hsmd knows, for audit lines and metrics labels.
pub const KNOWN: [&str; 4] = [soft::NAME, mock::NAME, pkcs11::NAME, "tpm"];

/// The `'static` spelling of a known backend name (audit events carry
/// `'static` names); anything else is `"unknown"`.
#[must_use]
pub fn static_name(name: &str) -> &'static str {
    KNOWN.into_iter().find(|k| *k == name).unwrap_or("unknown")
}

/// A health value shared between a backend's operations (which learn first
/// when a device goes away) and `Status`.
#[derive(Debug)]
pub struct HealthCell(Mutex<Health>);

impl HealthCell {
    /// Starts as `health`.
    #[must_use]
    pub fn new(health: Health) -> Self {
        Self(Mutex::new(health))
    }

    /// The health now.
    #[must_use]
    pub fn get(&self) -> Health {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Records a new health; logs when it changes colour.
    pub fn set(&self, backend: &str, health: Health) {
        let mut h = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if h.healthy != health.healthy {
            if health.healthy {
                tracing::info!(backend, detail = %health.detail, "backend healthy again");
            } else {
                tracing::error!(backend, detail = %health.detail, "backend unhealthy");
            }
        }
        *h = health;
    }
}
