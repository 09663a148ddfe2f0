//! The `tpm` backend: ECDSA P-256 and RSA 2048 (PSS or PKCS#1 v1.5) signing
//! keys created inside a TPM 2.0 under a primary storage key of the owner
//! hierarchy. The TPM returns each
//! key as a public and an encrypted private blob that only that TPM can load;
//! the keystore keeps both (sealed under the master key), and hsmd loads a key
//! for each signature and flushes it again. The primary key is re-derived from
//! a fixed template whenever hsmd connects, so nothing depends on saved
//! contexts, persistent handles or the null hierarchy: keys survive TPM resets
//! and reboots.
//!
//! One thread owns the TPM context (the TPM serves one command at a time);
//! the kernel resource manager (`/dev/tpmrm0`, the default TCTI) shares the
//! TPM with other programs.

use std::{
    str::FromStr as _,
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use protocol::KeyType;
use protocol::RsaScheme as Scheme;
use serde::{Deserialize, Serialize};
use tss_esapi::{
    attributes::ObjectAttributesBuilder,
    constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK},
    constants::SessionType,
    handles::KeyHandle as TpmHandle,
    interface_types::session_handles::PolicySession,
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm, RsaSchemeAlgorithm},
        ecc::EccCurve,
        key_bits::RsaKeyBits,
        resource_handles::Hierarchy,
    },
    structures::{
        Digest, EccPoint, EccScheme, HashScheme, KeyedHashScheme, PcrSelectionList, PcrSelectionListBuilder, PcrSlot,
        Private, Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyRsa, PublicKeyedHashParameters,
        PublicRsaParametersBuilder, RsaExponent, RsaScheme, SensitiveData, Signature, SignatureScheme,
        SymmetricDefinition, SymmetricDefinitionObject,
    },
    tcti_ldr::TctiNameConf,
    traits::{Marshall as _, UnMarshall as _},
    tss2_esys::TPMT_TK_HASHCHECK,
    Context,
};
use zeroize::Zeroizing;

use super::{rsa_public, soft::verify_spki, Backend, BackendError, Health, HealthCell, KeyHandle, KeyLabel, NewKey};

/// The backend's name.
pub const NAME: &str = "tpm";

/// How long one TPM command may take before the TPM is deemed unreachable.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

enum Job {
    Generate(KeyType),
    Sign {
        key_type: KeyType,
        public: Vec<u8>,
        private: Vec<u8>,
        digest: Vec<u8>,
    },
    Seal {
        secret: Zeroizing<Vec<u8>>,
        pcrs: Vec<u8>,
    },
    Unseal {
        public: Vec<u8>,
        private: Vec<u8>,
        pcrs: Vec<u8>,
    },
    Probe,
}

type Answer = Result<Done, BackendError>;
/// A job and where its answer goes.
type Envelope = (Job, mpsc::SyncSender<Answer>);

enum Done {
    Generated {
        public: Vec<u8>,
        private: Vec<u8>,
        spki: Vec<u8>,
    },
    Signature(Vec<u8>),
    Sealed {
        public: Vec<u8>,
        private: Vec<u8>,
    },
    Unsealed(Zeroizing<Vec<u8>>),
    Probed,
}

/// The TPM backend.
#[derive(Clone)]
pub struct Tpm {
    jobs: Arc<Mutex<mpsc::Sender<Envelope>>>,
    health: Arc<HealthCell>,
    tcti: String,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm").field("tcti", &self.tcti).finish_non_exhaustive()
    }
}

fn unavailable(reason: impl Into<String>) -> BackendError {
    BackendError::Unavailable {
        backend: NAME,
        reason: reason.into(),
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed {
        backend: NAME,
        reason: format!("{what}: {e}"),
    }
}

/// A key's object attributes: fixed to this TPM and its parent, generated
/// inside it, usable with an empty auth value, exempt from dictionary-attack
/// lockout.
fn key_attributes(
    finish: impl FnOnce(tss_esapi::attributes::ObjectAttributesBuilder) -> tss_esapi::attributes::ObjectAttributesBuilder,
) -> Result<tss_esapi::attributes::ObjectAttributes, tss_esapi::Error> {
    finish(
        ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true),
    )
    .build()
}

/// A P-256 key template with [`key_attributes`].
fn ecc_template(
    finish: impl FnOnce(tss_esapi::attributes::ObjectAttributesBuilder) -> tss_esapi::attributes::ObjectAttributesBuilder,
    parameters: PublicEccParametersBuilder,
) -> Result<Public, tss_esapi::Error> {
    let attributes = key_attributes(finish)?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(parameters.build()?)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// The storage primary's template: fixed, so the TPM derives the same key
/// from its owner seed every time.
fn primary_template() -> Result<Public, tss_esapi::Error> {
    ecc_template(
        |a| a.with_decrypt(true).with_restricted(true),
        PublicEccParametersBuilder::new_restricted_decryption_key(
            SymmetricDefinitionObject::AES_128_CFB,
            EccCurve::NistP256,
        ),
    )
}

/// The types this backend makes.
const KEY_TYPES: [KeyType; 3] = [KeyType::EcdsaP256, KeyType::RsaPss2048, KeyType::RsaPkcs1_2048];

/// A signing key of `key_type` (one of [`KEY_TYPES`]). The scheme is fixed
/// in the key's public area, so the TPM itself refuses any other.
fn signing_template(key_type: KeyType) -> Result<Public, tss_esapi::Error> {
    let Some((_, scheme)) = key_type.rsa() else {
        return ecc_template(
            |a| a.with_sign_encrypt(true),
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            ),
        );
    };
    let algorithm = match scheme {
        Scheme::Pss => RsaSchemeAlgorithm::RsaPss,
        Scheme::Pkcs1v15 => RsaSchemeAlgorithm::RsaSsa,
    };
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(key_attributes(|a| a.with_sign_encrypt(true))?)
        .with_rsa_parameters(
            PublicRsaParametersBuilder::new_unrestricted_signing_key(
                RsaScheme::create(algorithm, Some(HashingAlgorithm::Sha256))?,
                RsaKeyBits::Rsa2048,
                // 0: the TPM's default, 65537.
                RsaExponent::ZERO_EXPONENT,
            )
            .build()?,
        )
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
}

/// The signature scheme a key type signs with.
fn signature_scheme(key_type: KeyType) -> SignatureScheme {
    let hash_scheme = HashScheme::new(HashingAlgorithm::Sha256);
    match key_type.rsa() {
        Some((_, Scheme::Pss)) => SignatureScheme::RsaPss { hash_scheme },
        Some((_, Scheme::Pkcs1v15)) => SignatureScheme::RsaSsa { hash_scheme },
        None => SignatureScheme::EcDsa { hash_scheme },
    }
}

/// The SHA-256 bank selection of `pcrs`.
fn pcr_selection(pcrs: &[u8]) -> Result<PcrSelectionList, BackendError> {
    let slots = pcrs
        .iter()
        .map(|&i| {
            if i > 23 {
                return Err(BackendError::Unsupported(format!(
                    "PCR {i} does not exist; use 0 to 23"
                )));
            }
            PcrSlot::try_from(1u32 << i).map_err(|e| BackendError::Unsupported(format!("PCR {i}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| BackendError::Unsupported(format!("PCR selection: {e}")))
}

/// A policy session (a trial one to compute a digest) that has run
/// TPM2_PolicyPCR over the current values of `pcrs`.
fn pcr_policy(context: &mut Context, pcrs: &[u8], trial: bool) -> Result<PolicySession, BackendError> {
    let selection = pcr_selection(pcrs)?;
    let session = context
        .start_auth_session(
            None,
            None,
            None,
            if trial { SessionType::Trial } else { SessionType::Policy },
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(|e| failed("starting a policy session", e))?
        .ok_or_else(|| failed("starting a policy session", "no session"))?;
    let policy = PolicySession::try_from(session).map_err(|e| failed("policy session", e))?;
    // An empty digest: the TPM uses the PCRs' values now.
    if let Err(e) = context.policy_pcr(policy, Digest::default(), selection) {
        let _ = context.flush_context(tss_esapi::handles::SessionHandle::from(session).into());
        return Err(failed("PolicyPCR", e));
    }
    Ok(policy)
}

fn flush_session(context: &mut Context, policy: PolicySession) {
    let session: tss_esapi::interface_types::session_handles::AuthSession = policy.into();
    let _ = context.flush_context(tss_esapi::handles::SessionHandle::from(session).into());
}

/// Flushes transient objects and sessions an earlier connection left loaded.
/// Through the kernel resource manager there are none (it flushes what a
/// closed connection held, and shows each connection only its own); on a
/// direct connection (a simulator, `/dev/tpm0`) they would otherwise pile up
/// across restarts until the TPM has no room left ("out of memory for object
/// contexts").
fn flush_leftovers(context: &mut Context) {
    use tss_esapi::{
        constants::{
            tss::{TPM2_HMAC_SESSION_FIRST, TPM2_POLICY_SESSION_FIRST, TPM2_TRANSIENT_FIRST},
            CapabilityType,
        },
        structures::CapabilityData,
    };
    for first in [TPM2_TRANSIENT_FIRST, TPM2_HMAC_SESSION_FIRST, TPM2_POLICY_SESSION_FIRST] {
        let Ok((CapabilityData::Handles(handles), _)) = context.get_capability(CapabilityType::Handles, first, 64)
        else {
            continue;
        };
        for handle in handles.into_inner() {
            // Only the range asked for (the list may run past it).
            if u32::from(handle) >> 24 != first >> 24 {
                continue;
            }
            if let Ok(object) = context.tr_from_tpm_public(handle) {
                match context.flush_context(object) {
                    Ok(()) => tracing::info!(
                        handle = format!("{:#010x}", u32::from(handle)),
                        "flushed a TPM object left from before"
                    ),
                    Err(e) => tracing::debug!(error = %e, "could not flush a leftover TPM handle"),
                }
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // What this connection loaded goes with it (see flush_leftovers).
        if let Some((_, h)) = self.hot.take() {
            let _ = self.context.flush_context(h.into());
        }
        let _ = self.context.flush_context(self.primary.into());
        let session: tss_esapi::handles::SessionHandle = self.session.into();
        let _ = self.context.flush_context(session.into());
    }
}

/// A connection to the TPM with its primary key loaded.
struct Connection {
    context: Context,
    primary: TpmHandle,
    /// One HMAC session kept for the connection's life (a fresh one per
    /// command would cost two more TPM commands each time).
    session: tss_esapi::interface_types::session_handles::AuthSession,
    /// The last signing key loaded (its private blob and handle), kept
    /// loaded so repeated signatures with one key are one TPM command.
    hot: Option<(Vec<u8>, TpmHandle)>,
    vendor: String,
}

impl Connection {
    fn open(tcti: &str) -> Result<Self, BackendError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| unavailable(format!("TCTI {tcti:?}: {e}")))?;
        let mut context =
            Context::new(conf).map_err(|e| unavailable(format!("cannot reach the TPM at {tcti}: {e}")))?;
        flush_leftovers(&mut context);
        let template = primary_template().map_err(|e| failed("primary template", e))?;
        let primary = context
            .execute_with_nullauth_session(|ctx| ctx.create_primary(Hierarchy::Owner, template, None, None, None, None))
            .map_err(|e: tss_esapi::Error| unavailable(format!("cannot create the storage primary key: {e}")))?
            .key_handle;
        let vendor = tss_esapi::utils::get_tpm_vendor(&mut context).unwrap_or_else(|_| "unknown vendor".into());
        let session = context
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Hmac,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| unavailable(format!("cannot start a TPM session: {e}")))?
            .ok_or_else(|| unavailable("the TPM gave no session"))?;
        let (attributes, mask) = tss_esapi::attributes::SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        context
            .tr_sess_set_attributes(session, attributes, mask)
            .map_err(|e| unavailable(format!("cannot set up the TPM session: {e}")))?;
        Ok(Self {
            context,
            primary,
            session,
            hot: None,
            vendor,
        })
    }

    /// Runs `f` with the connection's HMAC session.
    fn authed<T>(&mut self, f: impl FnOnce(&mut Context) -> tss_esapi::Result<T>) -> tss_esapi::Result<T> {
        self.context.execute_with_session(Some(self.session), f)
    }

    /// The loaded handle of a signing key, loading it (and flushing the one
    /// loaded before) if it is not the hot one.
    fn loaded(&mut self, public: &[u8], private: Vec<u8>) -> Result<TpmHandle, BackendError> {
        if let Some((blob, handle)) = &self.hot {
            if *blob == private {
                return Ok(*handle);
            }
        }
        if let Some((_, old)) = self.hot.take() {
            let _ = self.context.flush_context(old.into());
        }
        let public = Public::unmarshall(public).map_err(|_| BackendError::BadReference { backend: NAME })?;
        let blob = Private::try_from(private.clone()).map_err(|_| BackendError::BadReference { backend: NAME })?;
        let primary = self.primary;
        let handle = self
            .authed(|ctx| ctx.load(primary, blob, public))
            .map_err(|e| failed("loading the key (not this TPM's?)", e))?;
        self.hot = Some((private, handle));
        Ok(handle)
    }

    fn run(&mut self, job: Job) -> Answer {
        match job {
            Job::Probe => {
                self.context
                    .get_random(8)
                    .map_err(|e| unavailable(format!("the TPM does not answer: {e}")))?;
                Ok(Done::Probed)
            }
            Job::Generate(key_type) => {
                let template = signing_template(key_type).map_err(|e| failed("key template", e))?;
                let primary = self.primary;
                let made = self
                    .authed(|ctx| ctx.create(primary, template, None, None, None, None))
                    .map_err(|e| failed("creating the key", e))?;
                let spki = spki_of(key_type, &made.out_public)
                    .ok_or_else(|| failed("the new key", format!("not a valid {} public key", key_type.as_str())))?;
                Ok(Done::Generated {
                    public: made.out_public.marshall().map_err(|e| failed("marshalling", e))?,
                    private: made.out_private.value().to_vec(),
                    spki,
                })
            }
            Job::Seal { secret, pcrs } => {
                let policy = if pcrs.is_empty() {
                    None
                } else {
                    let session = pcr_policy(&mut self.context, &pcrs, true)?;
                    let digest = self.context.policy_get_digest(session);
                    flush_session(&mut self.context, session);
                    Some(digest.map_err(|e| failed("reading the policy digest", e))?)
                };
                let attributes = ObjectAttributesBuilder::new()
                    .with_fixed_tpm(true)
                    .with_fixed_parent(true)
                    .with_no_da(true)
                    // With a PCR policy, only the policy opens it.
                    .with_user_with_auth(policy.is_none())
                    .build()
                    .map_err(|e| failed("sealed object attributes", e))?;
                let mut builder = PublicBuilder::new()
                    .with_public_algorithm(PublicAlgorithm::KeyedHash)
                    .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
                    .with_object_attributes(attributes)
                    .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
                    .with_keyed_hash_unique_identifier(Digest::default());
                if let Some(p) = policy {
                    builder = builder.with_auth_policy(p);
                }
                let template = builder.build().map_err(|e| failed("sealed object template", e))?;
                let data = SensitiveData::try_from(secret.to_vec()).map_err(|e| failed("secret", e))?;
                let primary = self.primary;
                let made = self
                    .authed(|ctx| ctx.create(primary, template, None, Some(data), None, None))
                    .map_err(|e| failed("sealing", e))?;
                Ok(Done::Sealed {
                    public: made.out_public.marshall().map_err(|e| failed("marshalling", e))?,
                    private: made.out_private.value().to_vec(),
                })
            }
            Job::Unseal { public, private, pcrs } => {
                let public = Public::unmarshall(&public).map_err(|_| BackendError::BadReference { backend: NAME })?;
                let private = Private::try_from(private).map_err(|_| BackendError::BadReference { backend: NAME })?;
                let primary = self.primary;
                let key = self
                    .authed(|ctx| ctx.load(primary, private, public))
                    .map_err(|e| failed("loading the sealed secret (not this TPM's?)", e))?;
                let result = if pcrs.is_empty() {
                    self.authed(|ctx| ctx.unseal(key.into()))
                        .map_err(|e| failed("unsealing", e))
                } else {
                    match pcr_policy(&mut self.context, &pcrs, false) {
                        Ok(policy) => {
                            let r = self
                                .context
                                .execute_with_session(Some(policy.into()), |ctx| ctx.unseal(key.into()))
                                .map_err(|e| {
                                    failed(
                                        "unsealing (a PCR the slot is bound to has changed since it was sealed)",
                                        e,
                                    )
                                });
                            flush_session(&mut self.context, policy);
                            r
                        }
                        Err(e) => Err(e),
                    }
                };
                let _ = self.context.flush_context(key.into());
                Ok(Done::Unsealed(Zeroizing::new(result?.value().to_vec())))
            }
            Job::Sign {
                key_type,
                public,
                private,
                digest,
            } => {
                let digest = Digest::try_from(digest).map_err(|e| BackendError::Unsupported(e.to_string()))?;
                let key = self.loaded(&public, private)?;
                let validation = TPMT_TK_HASHCHECK {
                    tag: TPM2_ST_HASHCHECK,
                    hierarchy: TPM2_RH_NULL,
                    digest: Default::default(),
                };
                let signature =
                    self.authed(|ctx| ctx.sign(key, digest, signature_scheme(key_type), validation.try_into()?));
                let signature = match signature {
                    Ok(s) => s,
                    Err(e) => {
                        // The handle may be what failed: load afresh next time.
                        if let Some((_, h)) = self.hot.take() {
                            let _ = self.context.flush_context(h.into());
                        }
                        return Err(failed("signing", e));
                    }
                };
                let sig = match (key_type.rsa(), signature) {
                    (Some((bits, Scheme::Pss)), Signature::RsaPss(sig))
                    | (Some((bits, Scheme::Pkcs1v15)), Signature::RsaSsa(sig)) => {
                        // Exactly the modulus length, big-endian (RFC 8017 I2OSP).
                        let raw = sig.signature().value();
                        let len = bits as usize / 8;
                        if raw.len() > len {
                            return Err(failed("signing", "an RSA signature longer than the modulus"));
                        }
                        let mut out = vec![0u8; len - raw.len()];
                        out.extend_from_slice(raw);
                        return Ok(Done::Signature(out));
                    }
                    (None, Signature::EcDsa(sig)) => sig,
                    _ => return Err(failed("signing", "the TPM answered with another signature scheme")),
                };
                let (r, s) = (sig.signature_r().value(), sig.signature_s().value());
                let mut rs = [0u8; 64];
                if r.len() > 32 || s.len() > 32 {
                    return Err(failed("signing", "r or s longer than 32 bytes"));
                }
                rs[32 - r.len()..32].copy_from_slice(r);
                rs[64 - s.len()..].copy_from_slice(s);
                let der = p256::ecdsa::Signature::from_slice(&rs)
                    .map_err(|e| failed("the TPM's signature", e))?
                    .to_der();
                Ok(Done::Signature(der.as_bytes().to_vec()))
            }
        }
    }
}

/// SubjectPublicKeyInfo DER of a TPM public area of `key_type`.
fn spki_of(key_type: KeyType, public: &Public) -> Option<Vec<u8>> {
    use p256::pkcs8::EncodePublicKey as _;
    if let Public::Rsa { unique, parameters, .. } = public {
        // Exponent 0 in the public area means the default, 65537.
        let e = match parameters.exponent().value() {
            0 => rsa_public::PUBLIC_EXPONENT,
            e => e,
        };
        return rsa_public::spki(key_type, unique.value(), &e.to_be_bytes());
    }
    let Public::Ecc { unique, .. } = public else {
        return None;
    };
    if key_type != KeyType::EcdsaP256 {
        return None;
    }
    let (x, y) = (unique.x().value(), unique.y().value());
    if x.len() > 32 || y.len() > 32 {
        return None;
    }
    let mut sec1 = [0u8; 65];
    sec1[0] = 4;
    sec1[33 - x.len()..33].copy_from_slice(x);
    sec1[65 - y.len()..].copy_from_slice(y);
    let key = p256::PublicKey::from_sec1_bytes(&sec1).ok()?;
    Some(key.to_public_key_der().ok()?.as_bytes().to_vec())
}

/// Owns the connection; reconnects on the next job after a failure.
fn serve(tcti: &str, jobs: &mpsc::Receiver<Envelope>, health: &HealthCell) {
    let mut connection: Option<Connection> = None;
    loop {
        let (job, reply) = match jobs.recv_timeout(Duration::from_secs(5)) {
            Ok(j) => j,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // A periodic probe keeps the health current.
                let (tx, _rx) = mpsc::sync_channel(1);
                (Job::Probe, tx)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if connection.is_none() {
            match Connection::open(tcti) {
                Ok(c) => {
                    health.set(
                        NAME,
                        Health {
                            healthy: true,
                            detail: format!("TPM 2.0 ({}) at {tcti}", c.vendor),
                        },
                    );
                    connection = Some(c);
                }
                Err(e) => {
                    health.set(
                        NAME,
                        Health {
                            healthy: false,
                            detail: e.to_string(),
                        },
                    );
                    let _ = reply.try_send(Err(e));
                    continue;
                }
            }
        }
        let Some(c) = connection.as_mut() else { continue };
        let mut answer = c.run(job);
        if let Err(BackendError::Failed { reason, .. }) = &answer {
            // A failure may be a lost connection: probe it now, and report
            // the TPM as gone if it is.
            if c.context.get_random(1).is_err() {
                answer = Err(unavailable(format!("the TPM at {tcti} stopped answering ({reason})")));
            }
        }
        if let Err(e @ BackendError::Unavailable { .. }) = &answer {
            health.set(
                NAME,
                Health {
                    healthy: false,
                    detail: e.to_string(),
                },
            );
            connection = None;
        }
        let _ = reply.try_send(answer);
    }
}

impl Tpm {
    /// Starts the TPM thread and tries to connect (the daemon starts even if
    /// the TPM is unreachable; its keys then fail with `BackendUnavailable`).
    ///
    /// # Errors
    /// The thread cannot start.
    pub fn start(tcti: &str) -> Result<Self, String> {
        let (tx, rx) = mpsc::channel();
        let health = Arc::new(HealthCell::new(Health {
            healthy: false,
            detail: format!("connecting to the TPM at {tcti}"),
        }));
        let (t, h) = (tcti.to_owned(), Arc::clone(&health));
        std::thread::Builder::new()
            .name("hsmd-tpm".into())
            .spawn(move || serve(&t, &rx, &h))
            .map_err(|e| format!("cannot start the TPM thread: {e}"))?;
        let me = Self {
            jobs: Arc::new(Mutex::new(tx)),
            health,
            tcti: tcti.to_owned(),
        };
        if let Err(e) = me.call(Job::Probe) {
            tracing::error!(error = %e, "the TPM is not reachable; tpm keys fail until it is");
        }
        Ok(me)
    }

    fn call(&self, job: Job) -> Answer {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send((job, tx))
            .map_err(|_| unavailable("the TPM thread stopped"))?;
        rx.recv_timeout(OP_TIMEOUT)
            .map_err(|_| unavailable(format!("the TPM at {} did not answer within {OP_TIMEOUT:?}", self.tcti)))?
    }
}

/// What the keystore keeps for a TPM key.
#[derive(Serialize, Deserialize)]
struct Reference {
    /// TPM2B_PUBLIC, marshalled, hex.
    public: String,
    /// TPM2B_PRIVATE (encrypted by the TPM under the primary), hex.
    private: String,
    /// SubjectPublicKeyInfo DER, hex.
    spki: String,
}

impl super::Sealer for Tpm {
    fn seal(&self, secret: &[u8], pcrs: &[u8]) -> Result<(Vec<u8>, Vec<u8>), BackendError> {
        match self.call(Job::Seal {
            secret: Zeroizing::new(secret.to_vec()),
            pcrs: pcrs.to_vec(),
        })? {
            Done::Sealed { public, private } => Ok((public, private)),
            _ => Err(failed("sealing", "unexpected answer")),
        }
    }

    fn unseal(&self, public: &[u8], private: &[u8], pcrs: &[u8]) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        match self.call(Job::Unseal {
            public: public.to_vec(),
            private: private.to_vec(),
            pcrs: pcrs.to_vec(),
        })? {
            Done::Unsealed(s) => Ok(s),
            _ => Err(failed("unsealing", "unexpected answer")),
        }
    }
}

impl Backend for Tpm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn generate(&self, key_type: KeyType, _label: KeyLabel<'_>) -> Result<NewKey, BackendError> {
        if !KEY_TYPES.contains(&key_type) {
            return Err(BackendError::Unsupported(format!(
                "the tpm backend makes {} keys, not {}",
                KEY_TYPES.map(KeyType::as_str).join(", "),
                key_type.as_str()
            )));
        }
        let Done::Generated { public, private, spki } = self.call(Job::Generate(key_type))? else {
            return Err(failed("generating", "unexpected answer"));
        };
        let reference = serde_json::to_vec(&Reference {
            public: hex::encode(public),
            private: hex::encode(private),
            spki: hex::encode(&spki),
        })
        .map_err(|e| failed("reference", e))?;
        Ok(NewKey {
            reference: Zeroizing::new(reference),
            public: Some(spki),
        })
    }

    fn load(&self, key_type: KeyType, reference: &[u8]) -> Result<Arc<dyn KeyHandle>, BackendError> {
        let bad = || BackendError::BadReference { backend: NAME };
        let r: Reference = serde_json::from_slice(reference).map_err(|_| bad())?;
        Ok(Arc::new(TpmKey {
            backend: self.clone(),
            key_type,
            public: hex::decode(r.public).map_err(|_| bad())?,
            private: hex::decode(r.private).map_err(|_| bad())?,
            spki: hex::decode(r.spki).map_err(|_| bad())?,
        }))
    }

    fn health(&self) -> Health {
        self.health.get()
    }
}

struct TpmKey {
    backend: Tpm,
    key_type: KeyType,
    public: Vec<u8>,
    private: Vec<u8>,
    spki: Vec<u8>,
}

impl std::fmt::Debug for TpmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmKey")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl TpmKey {
    fn unsupported(&self, what: &str) -> BackendError {
        BackendError::Unsupported(format!("a tpm {} key cannot {what}", self.key_type.as_str()))
    }
}

impl KeyHandle for TpmKey {
    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn public_spki(&self) -> Option<Vec<u8>> {
        Some(self.spki.clone())
    }

    fn sign(&self, digest: &[u8]) -> Result<Vec<u8>, BackendError> {
        match self.backend.call(Job::Sign {
            key_type: self.key_type,
            public: self.public.clone(),
            private: self.private.clone(),
            digest: digest.to_vec(),
        })? {
            Done::Signature(s) => rsa_public::release_signature(NAME, self.key_type, &self.spki, digest, s),
            _ => Err(failed("signing", "unexpected answer")),
        }
    }

    fn verify(&self, digest: &[u8], signature: &[u8]) -> Result<bool, BackendError> {
        Ok(verify_spki(self.key_type, &self.spki, digest, signature))
    }

    fn any_hash(&self) -> bool {
        // The key's signing scheme names its hash; the TPM refuses others.
        false
    }

    fn encrypt(&self, _plaintext: &[u8], _aad: &[u8]) -> Result<Vec<u8>, BackendError> {
        Err(self.unsupported("encrypt"))
    }

    fn decrypt(&self, _sealed: &[u8], _aad: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, BackendError> {
        Err(self.unsupported("decrypt"))
    }

    fn mac(&self, _data: &[u8]) -> Result<Vec<u8>, BackendError> {
        Err(self.unsupported("compute a MAC"))
    }

    fn mac_verify(&self, _data: &[u8], _tag: &[u8]) -> Result<bool, BackendError> {
        Err(self.unsupported("verify a MAC"))
    }
}
