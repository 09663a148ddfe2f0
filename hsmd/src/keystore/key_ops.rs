//! Keys: creation, versions and rotation, settings, lifecycle transitions, soft
//! delete, and every use, each checked against the key's state (see
//! [`lifecycle`]) before any material is touched.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use hkdf::Hkdf;
use hmac::{Hmac, Mac as _};
use protocol::{HashAlg, KeyChanges, KeyInfo, KeyOptions, KeyState, KeyType, Transition, Usage, VersionInfo};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::backend::{Backend, KeyHandle, KeyLabel};

/// Where a signature started with [`Keys::sign_later`] goes: the version
/// that signed and the signature, or why there is none.
pub type SignedThen = Box<dyn FnOnce(Result<(u32, Vec<u8>), VaultError>) + Send>;

use super::{
    crypto, key_aad, keys,
    lifecycle::{self, Action, Allowed},
    lock, now_unix, parse_type,
    store::{KeyPolicy, KeyRow},
    Keys, VaultError,
};

/// Longest description, in bytes.
const MAX_DESCRIPTION: usize = 1024;
/// Most labels on one key.
const MAX_LABELS: usize = 32;
/// Longest label value, in bytes.
const MAX_LABEL_VALUE: usize = 256;
/// Longest automatic rotation period or lifetime setting (100 years).
const MAX_PERIOD: u64 = 100 * 365 * 86_400;

/// A data key made by [`Keys::datakey`].
#[derive(Debug)]
pub struct DataKey {
    /// The version that sealed it.
    pub version: u32,
    /// Sealed as `Keys::encrypt` seals.
    pub sealed: Vec<u8>,
    /// In plain, when asked and allowed.
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
}

/// A data key for hsmd's own use: [`Keys::internal_data_key`].
#[derive(Debug)]
pub struct InternalDataKey {
    /// The version that sealed it.
    pub version: u32,
    /// Sealed as `Keys::encrypt` seals.
    pub sealed: Vec<u8>,
    /// The key itself.
    pub key: Zeroizing<[u8; 32]>,
}

/// Uses of one key version not yet written to the keystore.
#[derive(Debug, Default)]
pub(super) struct UseCounter {
    count: AtomicU64,
    last_used: AtomicU64,
}

/// A key a request names, looked up once ([`Keys::find`] or
/// [`Keys::find_hot`]): the request path reads its backend for the audit
/// line and the operation uses it, without a second lookup.
#[derive(Debug, Clone)]
pub struct Found(Arc<Cached>);

impl Cached {
    /// Checks that `digest` has the length the key type's signatures cover.
    fn check_digest(&self, digest: &[u8]) -> Result<(), VaultError> {
        let key_type = self.key_type.clone().map_err(VaultError::Tampered)?;
        let Some(expected) = key_type.digest_len() else {
            return Err(VaultError::Invalid(format!(
                "an {} key does not sign",
                key_type.as_str()
            )));
        };
        if digest.len() != expected {
            return Err(VaultError::Invalid(format!(
                "an {} signature covers a {expected}-byte digest, not {} bytes",
                key_type.as_str(),
                digest.len()
            )));
        }
        Ok(())
    }
}

impl Cached {
    /// What a key signs for a message: the message itself for Ed25519 (not
    /// copied), else its hash, the one named or the key type's own. A hash
    /// other than the type's own is refused where the backend signs with a
    /// fixed hash. Neither is secret: the message is the client's to sign.
    fn message_input<'m>(
        &self,
        message: &'m [u8],
        hash: Option<HashAlg>,
        handle: &dyn KeyHandle,
    ) -> Result<std::borrow::Cow<'m, [u8]>, VaultError> {
        use sha2::Digest as _;
        if message.len() > protocol::MAX_SIGN_MESSAGE {
            return Err(VaultError::Invalid(format!(
                "a message to sign is at most {} bytes; this one is {}. Hash it and sign the digest instead",
                protocol::MAX_SIGN_MESSAGE,
                message.len()
            )));
        }
        let key_type = self.key_type.clone().map_err(VaultError::Tampered)?;
        let own = match key_type {
            KeyType::Ed25519 => {
                if let Some(h) = hash {
                    return Err(VaultError::Invalid(format!(
                        "an ed25519 key signs the message itself (pure Ed25519), not its {} hash; ask for no hash",
                        h.as_str()
                    )));
                }
                return Ok(std::borrow::Cow::Borrowed(message));
            }
            KeyType::EcdsaP384 => HashAlg::Sha384,
            KeyType::Aes256Gcm | KeyType::HmacSha256 => {
                return Err(VaultError::Invalid(format!(
                    "an {} key does not sign",
                    key_type.as_str()
                )))
            }
            // ecdsa-p256 and every RSA type.
            _ => HashAlg::Sha256,
        };
        let hash = hash.unwrap_or(own);
        if hash != own {
            let why = if matches!(key_type.rsa(), Some((_, protocol::RsaScheme::Pss))) {
                Some("an rsa-pss key's type binds its hash (SHA-256, MGF1-SHA-256)")
            } else if !handle.any_hash() {
                Some("its backend signs with the key type's own hash only")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(VaultError::Invalid(format!(
                    "key {:?} cannot sign over {}: {why}; ask for {} or no hash",
                    self.row.name,
                    hash.as_str(),
                    own.as_str()
                )));
            }
        }
        Ok(std::borrow::Cow::Owned(match hash {
            HashAlg::Sha256 => sha2::Sha256::digest(message).to_vec(),
            HashAlg::Sha384 => sha2::Sha384::digest(message).to_vec(),
            HashAlg::Sha512 => sha2::Sha512::digest(message).to_vec(),
        }))
    }
}

impl Found {
    /// The name of the backend that holds the key.
    #[must_use]
    pub fn backend(&self) -> &'static str {
        crate::backend::static_name(&self.0.row.backend)
    }

    /// The key's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.0.row.name
    }
}

/// A key version's row as cached, with its use counter.
#[derive(Debug)]
pub(super) struct Cached {
    pub(super) row: KeyRow,
    /// The row's type and usages, parsed once when it was read: every use
    /// checks them. An unknown type is tampering, said when the key is used.
    key_type: Result<KeyType, String>,
    usages: Vec<Usage>,
    counter: Arc<UseCounter>,
    /// Whether the policy MAC was checked (it can be only while unlocked).
    verified: bool,
}

type PolicyMac = Hmac<Sha256>;

/// The MAC over the fields that decide what a key may do, under a key derived
/// from the master key: editing the state, dates, minimum versions or deletion
/// marks in the file makes the key fail as tampered.
fn policy_mac(master: &[u8; 32], store_id: &[u8], row: &KeyRow) -> Vec<u8> {
    policy_hmac(master, store_id, row).map_or_else(Vec::new, |m| m.finalize().into_bytes().to_vec())
}

fn policy_hmac(master: &[u8; 32], store_id: &[u8], row: &KeyRow) -> Option<PolicyMac> {
    let mut mac_key = Zeroizing::new([0u8; 32]);
    // Infallible: 32 bytes is far below HKDF-SHA-256's output limit.
    let _ = Hkdf::<Sha256>::new(Some(store_id), master).expand(b"hsmd key policy mac v1", &mut *mac_key);
    let mut m = PolicyMac::new_from_slice(&*mac_key).ok()?;
    let p = &row.policy;
    for part in [row.id.as_bytes(), row.name.as_bytes(), p.state.as_bytes()] {
        m.update(&(part.len() as u32).to_be_bytes());
        m.update(part);
    }
    for n in [
        Some(p.state_changed_unix),
        p.activate_at_unix,
        p.activated_unix,
        p.expire_at_unix,
        p.rotate_every_secs,
        Some(u64::from(p.min_decrypt_version)),
        Some(u64::from(p.min_encrypt_version)),
        Some(u64::from(p.latest_version)),
        p.deleted_unix,
        p.purge_at_unix,
        Some(u64::from(p.allow_plaintext_datakey)),
        Some(u64::from(row.owner_uid)),
    ] {
        match n {
            Some(v) => {
                m.update(&[1]);
                m.update(&v.to_be_bytes());
            }
            None => m.update(&[0]),
        }
    }
    // Only when recorded, so keys sealed before names were recorded still check;
    // removing a recorded name breaks the MAC.
    if let Some(name) = &row.owner_name {
        m.update(&[2]);
        m.update(&(name.len() as u32).to_be_bytes());
        m.update(name.as_bytes());
    }
    Some(m)
}

/// Whether `uid` still names the user who made the key.
fn owner_is_live(uid: u32, recorded: Option<&str>) -> bool {
    match nix::unistd::User::from_uid(uid.into()) {
        Ok(Some(user)) => recorded.is_none_or(|name| name == user.name),
        // A uid without a user entry is live only if it had none when the key
        // was made: then the uid is all there ever was to go by.
        Ok(None) => recorded.is_none(),
        Err(_) => false,
    }
}

fn stored_state(row: &KeyRow) -> Result<KeyState, VaultError> {
    KeyState::parse(&row.policy.state)
        .ok_or_else(|| VaultError::Tampered(format!("key {:?} has unknown state {:?}", row.name, row.policy.state)))
}

/// Removes an object a backend made for a key that was then not stored (its
/// name was taken, or a concurrent rotation won), so it does not linger in a
/// token. Failures are only logged: the keystore holds no reference to it.
fn discard(backend: &dyn Backend, key_type: KeyType, reference: &[u8]) {
    if let Err(e) = backend.destroy(key_type, reference) {
        tracing::warn!(backend = backend.name(), error = %e, "could not remove an unused key object");
    }
}

fn check_text(what: &str, text: &str, max: usize) -> Result<(), VaultError> {
    if text.len() > max || text.chars().any(char::is_control) {
        return Err(VaultError::Invalid(format!(
            "a {what} is at most {max} bytes of printable text"
        )));
    }
    Ok(())
}

fn check_label_name(name: &str) -> Result<(), VaultError> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(VaultError::Invalid(format!(
            "label name {name:?} is not allowed: 1 to 63 of a-z 0-9 . _ -, starting with a letter or digit"
        )))
    }
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), VaultError> {
    if labels.len() > MAX_LABELS {
        return Err(VaultError::Invalid(format!("a key has at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        check_label_name(k)?;
        check_text("label value", v, MAX_LABEL_VALUE)?;
    }
    Ok(())
}

/// A rotation period: at least `min` seconds (`keys.min_rotation_period`),
/// at most 100 years.
fn check_period(secs: u64, min: u64) -> Result<(), VaultError> {
    if secs < min {
        return Err(VaultError::Invalid(format!(
            "the rotation period must be at least {} (this daemon's keys.min_rotation_period)",
            protocol::format_period(min)
        )));
    }
    if secs > MAX_PERIOD {
        return Err(VaultError::Invalid(
            "the rotation period must be at most 100 years".into(),
        ));
    }
    Ok(())
}

/// The last second of the year 9999: times past it are refused, so every
/// stored time can be printed as a date.
const MAX_TIME: u64 = 253_402_300_799;

fn check_time(what: &str, t: Option<u64>) -> Result<(), VaultError> {
    match t {
        Some(t) if t > MAX_TIME => Err(VaultError::Invalid(format!("the {what} is after the year 9999"))),
        _ => Ok(()),
    }
}

fn labels_json(labels: &BTreeMap<String, String>) -> Result<String, VaultError> {
    serde_json::to_string(labels).map_err(|source| VaultError::Encode {
        what: "a key's labels",
        source,
    })
}

impl Keys<'_> {
    /// The lifecycle clock: the system's, plus what `DebugClock` added (dev mode).
    pub(super) fn now(&self) -> u64 {
        now_unix().saturating_add(self.clock_offset.load(Ordering::Relaxed))
    }

    /// Moves the lifecycle clock forward (dev mode's `DebugClock`); returns it.
    ///
    /// # Errors
    /// [`VaultError::Invalid`] past the end of the year 9999, which times
    /// are written up to (RFC 3339 has four digits for the year).
    pub fn advance_clock(&self, secs: u64) -> Result<u64, VaultError> {
        /// 9999-12-31T23:59:59Z.
        const LAST: u64 = 253_402_300_799;
        let result = self
            .clock_offset
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |offset| {
                let to = offset.checked_add(secs)?;
                (now_unix().saturating_add(to) <= LAST).then_some(to)
            });
        match result {
            Ok(_) => Ok(self.now()),
            Err(_) => Err(VaultError::Invalid(format!(
                "the dev clock cannot go past the year 9999 (it is at {} now; advance it by less)",
                self.now()
            ))),
        }
    }

    /// The backend of a key whose row is cached (the cache only: this is
    /// called on the reactor); `None` if it is not there.
    pub fn known_backend(&self, name: &str) -> Option<&'static str> {
        let rows = lock(&self.rows);
        let row = match rows.get(&(name.to_owned(), None)) {
            Some(c) => Some(c),
            None => rows.iter().find(|((n, _), _)| n == name).map(|(_, c)| c),
        };
        row.map(|c| crate::backend::static_name(&c.row.backend))
    }

    /// A key's backend, read from the keystore if its row is not cached.
    pub fn key_backend(&self, name: &str) -> Option<&'static str> {
        self.cached(name, None)
            .ok()
            .map(|c| crate::backend::static_name(&c.row.backend))
    }

    /// The uid that created a key, if that user still exists as it was: the
    /// uid has the same user name as when the key was made. A deleted or
    /// recycled uid owns nothing. Blocking (a user-database lookup).
    pub fn live_owner(&self, name: &str) -> Option<u32> {
        let c = self.cached(name, None).ok()?;
        owner_is_live(c.row.owner_uid, c.row.owner_name.as_deref()).then_some(c.row.owner_uid)
    }

    /// Write transactions committed to the keystore since the daemon started.
    pub fn keystore_writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// What follows an unlock: seals the policies of keys that predate policy
    /// MACs, then checks the key set. Returns what the check found wrong, one
    /// sentence each (see `key_set`).
    pub(super) fn after_unlock(&self) -> Vec<String> {
        if let Err(e) = self.seal_pending_policies() {
            tracing::error!(error = %e, "could not seal the policies of keys from before this version");
        }
        self.check_key_set()
            .unwrap_or_else(|e| vec![format!("the check of the keystore's keys could not run: {e}")])
    }

    /// Seals the policy of keys that predate policy MACs; run once, at the
    /// first unlock after the upgrade.
    fn seal_pending_policies(&self) -> Result<(), VaultError> {
        if !lock(&self.store).policy_seal_pending()? {
            return Ok(());
        }
        let (master, store_id) = self.custody.master_and_id()?;
        let mut rows = lock(&self.store).keys()?;
        for row in &mut rows {
            row.policy.mac = Some(policy_mac(&master, &store_id, row));
        }
        lock(&self.store).update_policies(&rows)?;
        tracing::info!(keys = rows.len(), "key policies sealed under the master key");
        Ok(())
    }

    fn seal(&self, row: &mut KeyRow) -> Result<(), VaultError> {
        let (master, store_id) = self.custody.master_and_id()?;
        row.policy.mac = Some(policy_mac(&master, &store_id, row));
        Ok(())
    }

    pub(super) fn verify_policy(&self, row: &KeyRow) -> Result<(), VaultError> {
        let (master, store_id) = self.custody.master_and_id()?;
        // verify_slice compares in constant time.
        let good = match (row.policy.mac.as_deref(), policy_hmac(&master, &store_id, row)) {
            (Some(mac), Some(m)) => m.verify_slice(mac).is_ok(),
            _ => false,
        };
        if good {
            Ok(())
        } else {
            tracing::error!(key = %row.name, "keystore record tampered: key policy fails its MAC");
            Err(VaultError::Tampered(format!(
                "the lifecycle settings of key {:?} (state, dates, minimum versions, deletion) were edited outside hsmd; restore it from a backup",
                row.name
            )))
        }
    }

    /// The key's row at `version` (`None`: newest), from the cache when there.
    /// Rows are cached only once their policy MAC checked out.
    pub(super) fn cached(&self, name: &str, version: Option<u32>) -> Result<Arc<Cached>, VaultError> {
        if self.custody.state() == protocol::ServiceState::Uninitialized {
            return Err(VaultError::NotInitialized);
        }
        let cache_key = (name.to_owned(), version);
        if let Some(c) = lock(&self.rows).get(&cache_key) {
            return Ok(Arc::clone(c));
        }
        let Some(row) = lock(&self.store).key(name, version)? else {
            if let Some(removed) = lock(&self.findings).explain_absent(name, version) {
                return Err(removed);
            }
            return Err(match version {
                Some(v) => VaultError::NoSuchKey(format!("{name:?} version {v}")),
                None => VaultError::NoSuchKey(format!("{name:?}")),
            });
        };
        let counter = Arc::clone(lock(&self.usage).entry((row.id.clone(), row.version)).or_default());
        let verified = match self.verify_policy(&row) {
            Ok(()) => true,
            Err(VaultError::Locked) => false,
            Err(e) => return Err(e),
        };
        let key_type = parse_type(&row).map_err(|e| match e {
            VaultError::Tampered(why) => why,
            other => other.to_string(),
        });
        let usages = row.usages.split(',').filter_map(Usage::parse).collect();
        let cached = Arc::new(Cached {
            row,
            key_type,
            usages,
            counter,
            verified,
        });
        if verified {
            lock(&self.rows).insert(cache_key, Arc::clone(&cached));
        }
        Ok(cached)
    }

    /// Drops cached rows: after anything that changes a key.
    fn invalidate(&self, key_id: Option<&str>) {
        lock(&self.rows).clear();
        if let Some(id) = key_id {
            self.custody.forget_key(id);
        }
    }

    /// Metadata as clients see it: state in force, versions with their counts
    /// (flushed plus not yet flushed).
    fn info(&self, row: &KeyRow) -> Result<KeyInfo, VaultError> {
        let now = self.now();
        let p = &row.policy;
        let stored = stored_state(row)?;
        let state = lifecycle::effective(stored, p.activate_at_unix, p.expire_at_unix, now);
        // A state reached by the clock (an activation or expiry time passing)
        // is not written back; it began at that time, not at the last write.
        let since = match state {
            s if s == stored => p.state_changed_unix,
            KeyState::Deactivated => p.expire_at_unix.unwrap_or(p.state_changed_unix),
            KeyState::Active => p.activate_at_unix.unwrap_or(p.state_changed_unix),
            _ => p.state_changed_unix,
        }
        .max(p.state_changed_unix);
        let stored_versions = lock(&self.store).versions(&row.id)?;
        let usage = lock(&self.usage);
        let versions: Vec<VersionInfo> = stored_versions
            .into_iter()
            .map(|v| {
                let (pending, last) = usage.get(&(row.id.clone(), v.version)).map_or((0, 0), |c| {
                    (c.count.load(Ordering::Relaxed), c.last_used.load(Ordering::Relaxed))
                });
                let last_used = match (v.last_used_unix, last) {
                    (x, 0) => x,
                    (Some(a), b) => Some(a.max(b)),
                    (None, b) => Some(b),
                };
                VersionInfo {
                    version: v.version,
                    created_unix: v.created_unix,
                    use_count: v.use_count + pending,
                    last_used_unix: last_used,
                }
            })
            .collect();
        drop(usage);
        let latest_created = versions
            .iter()
            .find(|v| v.version == p.latest_version)
            .map_or(row.created_unix, |v| v.created_unix);
        let labels = serde_json::from_str(&row.labels).unwrap_or_default();
        Ok(KeyInfo {
            name: row.name.clone(),
            id: row.id.clone(),
            key_type: parse_type(row)?,
            backend: row.backend.clone(),
            usages: row.usages.split(',').filter_map(Usage::parse).collect(),
            version: p.latest_version,
            created_unix: row.created_unix,
            owner_uid: row.owner_uid,
            owner_name: row.owner_name.clone(),
            owner_exists: owner_is_live(row.owner_uid, row.owner_name.as_deref()),
            state,
            state_changed_unix: since,
            activated_unix: p.activated_unix.or_else(|| p.activate_at_unix.filter(|&t| t <= now)),
            activate_at_unix: p.activate_at_unix,
            expire_at_unix: p.expire_at_unix,
            last_used_unix: versions.iter().filter_map(|v| v.last_used_unix).max(),
            last_rotated_unix: (p.latest_version > 1).then_some(latest_created),
            rotate_every_secs: p.rotate_every_secs,
            next_rotation_unix: p
                .rotate_every_secs
                .filter(|_| matches!(state, KeyState::Active | KeyState::PreActive) && p.deleted_unix.is_none())
                .map(|e| latest_created.saturating_add(e)),
            min_decrypt_version: p.min_decrypt_version,
            min_encrypt_version: p.min_encrypt_version,
            versions,
            description: row.description.clone(),
            labels,
            allow_plaintext_datakey: p.allow_plaintext_datakey,
            deleted_unix: p.deleted_unix,
            purge_at_unix: p.purge_at_unix,
        })
    }

    /// Generates a key inside the daemon and stores it wrapped. Needs unlocked.
    ///
    /// # Errors
    /// [`VaultError::Invalid`] for a bad name, usages or options,
    /// [`VaultError::KeyExists`], [`VaultError::Locked`].
    pub fn create_key(
        &self,
        name: &str,
        key_type: KeyType,
        usages: &[Usage],
        options: &KeyOptions,
        owner_uid: u32,
        owner_name: Option<&str>,
    ) -> Result<KeyInfo, VaultError> {
        keys::check_name(name).map_err(VaultError::Invalid)?;
        let usages = keys::check_usages(key_type, usages).map_err(VaultError::Invalid)?;
        check_text("description", &options.description, MAX_DESCRIPTION)?;
        check_labels(&options.labels)?;
        if let Some(p) = options.rotate_every_secs {
            check_period(p, self.min_rotation_secs)?;
        }
        check_time("activation time", options.activate_at_unix)?;
        check_time("expiry time", options.expire_at_unix)?;
        let now = self.now();
        if let (Some(a), Some(e)) = (options.activate_at_unix, options.expire_at_unix) {
            if e <= a {
                return Err(VaultError::Invalid(
                    "the expiry time must come after the activation time".into(),
                ));
            }
        }
        if options.allow_plaintext_datakey && key_type != KeyType::Aes256Gcm {
            return Err(VaultError::Invalid("only aes256-gcm keys make data keys".into()));
        }
        let pre_active = options.activate_at_unix.is_some_and(|t| t > now);
        let (master, store_id) = self.custody.master_and_id()?;
        let backend = self
            .backends
            .get(options.backend.as_deref().unwrap_or(self.backends.default_name()))?;
        if lock(&self.store).key(name, None)?.is_some() {
            // Before the backend makes an object that would then be orphaned.
            return Err(VaultError::KeyExists(name.to_owned()));
        }
        let id = hex::encode(crypto::random::<16>()?);
        let made = backend.generate(
            key_type,
            KeyLabel {
                key_id: &id,
                name,
                version: 1,
            },
        )?;
        let mut row = KeyRow {
            id,
            name: name.to_owned(),
            key_type: key_type.as_str().to_owned(),
            backend: backend.name().to_owned(),
            usages: usages.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(","),
            owner_uid,
            owner_name: owner_name.map(str::to_owned),
            created_unix: now,
            version: 1,
            wrapped: Vec::new(),
            public: made.public.clone(),
            version_created_unix: now,
            policy: KeyPolicy {
                state: if pre_active {
                    KeyState::PreActive
                } else {
                    KeyState::Active
                }
                .as_str()
                .to_owned(),
                state_changed_unix: now,
                activate_at_unix: options.activate_at_unix.filter(|_| pre_active),
                activated_unix: (!pre_active).then_some(now),
                expire_at_unix: options.expire_at_unix,
                rotate_every_secs: options.rotate_every_secs,
                min_decrypt_version: 1,
                min_encrypt_version: 1,
                latest_version: 1,
                deleted_unix: None,
                purge_at_unix: None,
                allow_plaintext_datakey: options.allow_plaintext_datakey,
                mac: None,
            },
            description: options.description.clone(),
            labels: labels_json(&options.labels)?,
        };
        row.wrapped = crypto::seal(&master, &made.reference, &key_aad(&store_id, &row))?;
        row.policy.mac = Some(policy_mac(&master, &store_id, &row));
        let set = super::key_set::SetKey::derive(&master, &store_id);
        let inserted = lock(&self.store).insert_key(&row, &set.change(&row.id, Some(&row.name)));
        let inserted = match inserted {
            Ok(i) => i,
            Err(e) => {
                discard(backend.as_ref(), key_type, &made.reference);
                return Err(Self::key_set_error(e));
            }
        };
        if !inserted {
            discard(backend.as_ref(), key_type, &made.reference);
            return Err(VaultError::KeyExists(name.to_owned()));
        }
        self.invalidate(None);
        self.info(&row)
    }

    /// Every key's metadata, deleted ones included. Works while locked:
    /// metadata is not secret (but is checked against its MAC only when unlocked).
    ///
    /// # Errors
    /// [`VaultError::NotInitialized`], or the file failing.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, VaultError> {
        if self.custody.state() == protocol::ServiceState::Uninitialized {
            return Err(VaultError::NotInitialized);
        }
        let rows = lock(&self.store).keys()?;
        rows.iter().map(|r| self.info(r)).collect()
    }

    /// One key's metadata.
    ///
    /// # Errors
    /// [`VaultError::NoSuchKey`], [`VaultError::Tampered`].
    pub fn key_info(&self, name: &str) -> Result<KeyInfo, VaultError> {
        let c = self.cached(name, None)?;
        self.info(&c.row)
    }

    /// Reads a key for a change, runs `change` on a copy, seals and writes it.
    /// Changes are serialized so two of them never both apply to one old row.
    fn modify<F>(&self, name: &str, change: F) -> Result<KeyInfo, VaultError>
    where
        F: FnOnce(&mut KeyRow, KeyState, u64) -> Result<(), VaultError>,
    {
        let _gate = lock(&self.manage_gate);
        self.custody.master()?;
        let c = self.cached(name, None)?;
        if !c.verified {
            self.verify_policy(&c.row)?;
        }
        let mut row = c.row.clone();
        let now = self.now();
        let p = &row.policy;
        let state = lifecycle::effective(stored_state(&row)?, p.activate_at_unix, p.expire_at_unix, now);
        change(&mut row, state, now)?;
        self.seal(&mut row)?;
        lock(&self.store).update_policy(&row)?;
        self.invalidate(None);
        self.info(&row)
    }

    fn refuse_if_deleted(row: &KeyRow) -> Result<(), VaultError> {
        match row.policy.purge_at_unix {
            Some(at) if row.policy.deleted_unix.is_some() => Err(VaultError::KeyState(format!(
                "key {:?} is deleted and will be purged at {}; `hsmctl key restore {}` brings it back",
                row.name,
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(at)),
                row.name
            ))),
            _ => Ok(()),
        }
    }

    /// Changes settings and metadata. Needs unlocked.
    ///
    /// # Errors
    /// [`VaultError::Invalid`] for a bad value, [`VaultError::KeyState`] for a deleted key.
    pub fn set_key(&self, name: &str, changes: &KeyChanges) -> Result<KeyInfo, VaultError> {
        self.modify(name, |row, _state, _now| {
            Self::refuse_if_deleted(row)?;
            let key_type = parse_type(row)?;
            if let Some(d) = &changes.description {
                check_text("description", d, MAX_DESCRIPTION)?;
                row.description.clone_from(d);
            }
            let mut labels: BTreeMap<String, String> = serde_json::from_str(&row.labels).unwrap_or_default();
            for (k, v) in &changes.set_labels {
                labels.insert(k.clone(), v.clone());
            }
            for k in &changes.remove_labels {
                labels.remove(k);
            }
            check_labels(&labels)?;
            row.labels = labels_json(&labels)?;
            let p = &mut row.policy;
            if let Some(r) = changes.rotate_every_secs {
                if let Some(secs) = r {
                    check_period(secs, self.min_rotation_secs)?;
                }
                p.rotate_every_secs = r;
            }
            if let Some(e) = changes.expire_at_unix {
                check_time("expiry time", e)?;
                p.expire_at_unix = e;
            }
            if let Some(v) = changes.min_decrypt_version {
                if v == 0 || v > p.latest_version {
                    return Err(VaultError::Invalid(format!(
                        "the minimum decryption version must be between 1 and the newest version, {}",
                        p.latest_version
                    )));
                }
                p.min_decrypt_version = v;
                // What may not be opened any more must not be made any more.
                p.min_encrypt_version = p.min_encrypt_version.max(v);
            }
            if let Some(v) = changes.min_encrypt_version {
                if v < p.min_decrypt_version || v > p.latest_version {
                    return Err(VaultError::Invalid(format!(
                        "the minimum encryption version must be between the minimum decryption version ({}) and the newest version ({})",
                        p.min_decrypt_version, p.latest_version
                    )));
                }
                p.min_encrypt_version = v;
            }
            if let Some(a) = changes.allow_plaintext_datakey {
                if a && key_type != KeyType::Aes256Gcm {
                    return Err(VaultError::Invalid("only aes256-gcm keys make data keys".into()));
                }
                p.allow_plaintext_datakey = a;
            }
            Ok(())
        })
    }

    /// Moves a key to another lifecycle state. Needs unlocked.
    ///
    /// # Errors
    /// [`VaultError::KeyState`] when the change is not allowed from the state in force.
    pub fn transition_key(&self, name: &str, to: Transition) -> Result<KeyInfo, VaultError> {
        if to == Transition::Destroy {
            return self.destroy_key(name);
        }
        self.modify(name, |row, state, now| {
            Self::refuse_if_deleted(row)?;
            let next = lifecycle::transition(name, state, to).map_err(VaultError::KeyState)?;
            let p = &mut row.policy;
            if next == KeyState::Active && state == KeyState::PreActive {
                p.activate_at_unix = None;
                p.activated_unix = Some(now);
            }
            if next == KeyState::Active {
                p.activated_unix.get_or_insert(now);
            }
            p.state = next.as_str().to_owned();
            p.state_changed_unix = now;
            if next == KeyState::Compromised {
                tracing::warn!(key = name, risk = "high", "key marked compromised");
            }
            Ok(())
        })
    }

    fn destroy_key(&self, name: &str) -> Result<KeyInfo, VaultError> {
        let _gate = lock(&self.manage_gate);
        self.custody.master()?;
        let c = self.cached(name, None)?;
        if !c.verified {
            self.verify_policy(&c.row)?;
        }
        let mut row = c.row.clone();
        Self::refuse_if_deleted(&row)?;
        let now = self.now();
        let state = lifecycle::effective(
            stored_state(&row)?,
            row.policy.activate_at_unix,
            row.policy.expire_at_unix,
            now,
        );
        let next = lifecycle::transition(name, state, Transition::Destroy).map_err(VaultError::KeyState)?;
        row.policy.state = next.as_str().to_owned();
        row.policy.state_changed_unix = now;
        row.policy.rotate_every_secs = None;
        self.seal(&mut row)?;
        self.remove_backend_objects(&c.row);
        lock(&self.store).destroy_material(&row)?;
        self.invalidate(Some(&row.id));
        tracing::warn!(key = name, "key destroyed: every version's material erased");
        self.info(&row)
    }

    /// Removes every version's object from the key's backend, for backends
    /// that keep objects (a token); the keystore's record goes regardless, so
    /// failures are logged with what remains. Needs unlocked.
    fn remove_backend_objects(&self, row: &KeyRow) {
        let Ok(backend) = self.backends.get(&row.backend) else {
            tracing::warn!(key = %row.name, backend = %row.backend, "backend not configured: its key objects stay");
            return;
        };
        if !backend.holds_objects() {
            return;
        }
        let Ok((master, store_id)) = self.custody.master_and_id() else {
            return;
        };
        let Ok(key_type) = parse_type(row) else { return };
        for version in 1..=row.policy.latest_version {
            let Ok(Some(v)) = lock(&self.store).key(&row.name, Some(version)) else {
                continue;
            };
            if v.wrapped.is_empty() {
                continue;
            }
            let Ok(reference) = crypto::open(&master, &v.wrapped, &key_aad(&store_id, &v)) else {
                tracing::error!(key = %row.name, version, "key reference fails authentication: its backend object stays");
                continue;
            };
            match backend.destroy(key_type, &reference) {
                Ok(()) => {
                    tracing::info!(key = %row.name, version, backend = backend.name(), "backend key object removed")
                }
                Err(e) => tracing::warn!(
                    key = %row.name, version, backend = backend.name(), error = %e,
                    "could not remove the backend's key object; it stays in the device"
                ),
            }
        }
    }

    /// Adds a version with fresh material; new signatures and ciphertexts use
    /// it. Needs unlocked.
    ///
    /// # Errors
    /// [`VaultError::KeyState`] unless the key is active or pre-active.
    pub fn rotate_key(&self, name: &str) -> Result<KeyInfo, VaultError> {
        let _gate = lock(&self.manage_gate);
        let (master, store_id) = self.custody.master_and_id()?;
        let c = self.cached(name, None)?;
        if !c.verified {
            self.verify_policy(&c.row)?;
        }
        let mut row = c.row.clone();
        Self::refuse_if_deleted(&row)?;
        let now = self.now();
        let p = &row.policy;
        let state = lifecycle::effective(stored_state(&row)?, p.activate_at_unix, p.expire_at_unix, now);
        lifecycle::check(name, state, Action::Rotate, false).map_err(VaultError::KeyState)?;
        let key_type = parse_type(&row)?;
        let backend = self.backends.get(&row.backend)?;
        row.version = row.policy.latest_version + 1;
        let made = backend.generate(
            key_type,
            KeyLabel {
                key_id: &row.id,
                name,
                version: row.version,
            },
        )?;
        row.policy.latest_version = row.version;
        row.version_created_unix = now;
        row.public = made.public.clone();
        row.wrapped = crypto::seal(&master, &made.reference, &key_aad(&store_id, &row))?;
        row.policy.mac = Some(policy_mac(&master, &store_id, &row));
        if !lock(&self.store).add_version(&row)? {
            discard(backend.as_ref(), key_type, &made.reference);
            return Err(VaultError::KeyState(format!(
                "key {name:?} was rotated by another request at the same moment; look at `hsmctl key info {name}`"
            )));
        }
        self.invalidate(None);
        tracing::info!(key = name, version = row.version, "key rotated");
        self.info(&row)
    }

    /// Soft delete: the key stays, unusable, for `window`, then is purged.
    ///
    /// # Errors
    /// [`VaultError::Locked`], [`VaultError::NoSuchKey`], [`VaultError::KeyState`] if deleted already.
    pub fn delete_key(&self, name: &str, window: Duration) -> Result<KeyInfo, VaultError> {
        let info = self.modify(name, |row, _state, now| {
            if row.policy.deleted_unix.is_some() {
                return Self::refuse_if_deleted(row);
            }
            row.policy.deleted_unix = Some(now);
            row.policy.purge_at_unix = Some(now.saturating_add(window.as_secs()));
            Ok(())
        })?;
        self.invalidate(Some(&info.id));
        Ok(info)
    }

    /// Brings a deleted key back.
    ///
    /// # Errors
    /// [`VaultError::KeyState`] if the key is not deleted.
    pub fn restore_key(&self, name: &str) -> Result<KeyInfo, VaultError> {
        self.modify(name, |row, _state, _now| {
            if row.policy.deleted_unix.is_none() {
                return Err(VaultError::KeyState(format!("key {name:?} is not deleted")));
            }
            row.policy.deleted_unix = None;
            row.policy.purge_at_unix = None;
            Ok(())
        })
    }

    /// Removes a deleted key for good. Needs unlocked.
    ///
    /// # Errors
    /// [`VaultError::KeyState`] if the key was not deleted first.
    pub fn purge_key(&self, name: &str) -> Result<(), VaultError> {
        let _gate = lock(&self.manage_gate);
        let set = self.key_set_key()?;
        let missing = lock(&self.findings).missing.get(name).cloned();
        if let Some(id) = missing {
            // Its rows are already gone (the check at unlock said so): forget it.
            lock(&self.store)
                .forget_key(&set.change(&id, None))
                .map_err(Self::key_set_error)?;
            lock(&self.findings).missing.remove(name);
            tracing::warn!(key = name, "a key removed outside hsmd is forgotten");
            return Ok(());
        }
        let c = self.cached(name, None)?;
        let unknown = lock(&self.findings).unknown.contains(&c.row.id);
        if c.row.policy.deleted_unix.is_none() && !unknown {
            return Err(VaultError::KeyState(format!(
                "key {name:?} is not deleted; `hsmctl key delete {name}` first, then purge"
            )));
        }
        self.remove_backend_objects(&c.row);
        lock(&self.store)
            .purge_key(name, &set.change(&c.row.id, None))
            .map_err(Self::key_set_error)?;
        lock(&self.findings).unknown.remove(&c.row.id);
        lock(&self.usage).retain(|(id, _), _| *id != c.row.id);
        self.invalidate(Some(&c.row.id));
        tracing::warn!(key = name, "key purged");
        Ok(())
    }

    /// Checks everything a use needs, then counts the use: the key exists and
    /// is not deleted, its state allows `action`, the version is not below the
    /// key's minimum, its usages include `usage`; returns the row and material.
    fn prepare(
        &self,
        key: &Found,
        version: Option<u32>,
        action: Action,
        usage: Usage,
        allow_compromised: bool,
    ) -> Result<(Arc<Cached>, Arc<dyn KeyHandle>), VaultError> {
        let c = Arc::clone(&key.0);
        let name = c.row.name.as_str();
        if !c.verified {
            self.verify_policy(&c.row)?;
        }
        let row = &c.row;
        self.refuse_unknown(&row.id, name)?;
        Self::refuse_if_deleted(row)?;
        let p = &row.policy;
        let now = self.now();
        let state = lifecycle::effective(stored_state(row)?, p.activate_at_unix, p.expire_at_unix, now);
        let allowed = lifecycle::check(name, state, action, allow_compromised).map_err(VaultError::KeyState)?;
        if action.processes_only() || action == Action::Rewrap {
            if row.version < p.min_decrypt_version {
                return Err(VaultError::KeyState(format!(
                    "key {name:?} version {} is below its minimum decryption version {}: it no longer {}s; \
                     `hsmctl key set {name} --min-decrypt-version {}` would allow it again",
                    row.version,
                    p.min_decrypt_version,
                    if matches!(action, Action::Verify) {
                        "verifie"
                    } else {
                        "decrypt"
                    },
                    row.version
                )));
            }
        } else if version.is_some() && row.version < p.min_encrypt_version {
            return Err(VaultError::KeyState(format!(
                "key {name:?} version {} is below its minimum encryption version {}",
                row.version, p.min_encrypt_version
            )));
        }
        if allowed == Allowed::HighRisk {
            tracing::warn!(
                key = name,
                version = row.version,
                action = action.as_str(),
                risk = "high",
                "compromised key used because the request allowed it"
            );
        }
        if !c.usages.contains(&usage) {
            return Err(VaultError::UsageNotAllowed {
                name: row.name.clone(),
                usage: usage.as_str(),
                usages: row.usages.replace(',', ", "),
            });
        }
        let material = self.custody.material(row)?;
        c.counter.count.fetch_add(1, Ordering::Relaxed);
        c.counter.last_used.fetch_max(now, Ordering::Relaxed);
        Ok((c, material))
    }

    /// The public key. Needs unlocked (the key is unwrapped to check it).
    ///
    /// # Errors
    /// [`VaultError::Invalid`] for a symmetric key; as [`Keys::sign`].
    pub fn public_key(&self, name: &str) -> Result<(KeyType, u32, Vec<u8>), VaultError> {
        let c = self.cached(name, None)?;
        if !c.verified {
            self.verify_policy(&c.row)?;
        }
        let row = &c.row;
        self.refuse_unknown(&row.id, name)?;
        Self::refuse_if_deleted(row)?;
        let p = &row.policy;
        let state = lifecycle::effective(stored_state(row)?, p.activate_at_unix, p.expire_at_unix, self.now());
        lifecycle::check(name, state, Action::PublicKey, false).map_err(VaultError::KeyState)?;
        let material = self.custody.material(row)?;
        let spki = material.public_spki().ok_or_else(|| {
            VaultError::Invalid(format!(
                "key {name:?} is an {} key and has no public half",
                row.key_type
            ))
        })?;
        Ok((material.key_type(), row.version, spki))
    }

    /// Signs a digest with the key's newest version.
    ///
    /// # Errors
    /// [`VaultError::Locked`], [`VaultError::NoSuchKey`], [`VaultError::KeyState`],
    /// [`VaultError::UsageNotAllowed`], [`VaultError::Invalid`] for a digest of
    /// the wrong length, [`VaultError::Tampered`].
    pub fn sign(&self, key: &Found, digest: &[u8]) -> Result<(u32, Vec<u8>), VaultError> {
        let (c, material) = self.prepare(key, None, Action::Sign, Usage::Sign, false)?;
        c.check_digest(digest)?;
        let signature = material.sign(digest)?;
        Ok((c.row.version, signature))
    }

    /// Whether `key`'s device can take a signature from the reactor now and
    /// answer later ([`KeyHandle::signs_later`]); `key` from
    /// [`Keys::find_loaded`].
    pub fn signs_later(&self, key: &Found) -> bool {
        self.custody.material(&key.0.row).is_ok_and(|m| m.signs_later())
    }

    /// As [`Keys::sign`], for a key that [`Keys::signs_later`]: checks the
    /// key and sends the request without waiting; `then` gets the version
    /// and signature, or the error, on the thread that reads the device's
    /// answer.
    pub fn sign_later(&self, key: &Found, digest: &[u8], then: SignedThen) {
        let prepared = self
            .prepare(key, None, Action::Sign, Usage::Sign, false)
            .and_then(|(c, material)| c.check_digest(digest).map(|()| (c.row.version, material)));
        match prepared {
            Err(e) => then(Err(e)),
            Ok((version, material)) => material.sign_then(
                digest,
                Box::new(move |signed| then(signed.map(|s| (version, s)).map_err(VaultError::from))),
            ),
        }
    }

    /// As [`Keys::sign_message`], started as [`Keys::sign_later`] is.
    pub fn sign_message_later(&self, key: &Found, message: &[u8], hash: Option<HashAlg>, then: SignedThen) {
        let prepared = self
            .prepare(key, None, Action::Sign, Usage::Sign, false)
            .and_then(|(c, material)| {
                let signed = c.message_input(message, hash, material.as_ref())?.into_owned();
                Ok((c.row.version, material, signed))
            });
        match prepared {
            Err(e) => then(Err(e)),
            Ok((version, material, signed)) => material.sign_then(
                &signed,
                Box::new(move |s| then(s.map(|s| (version, s)).map_err(VaultError::from))),
            ),
        }
    }

    /// Checks a signature made by `version` of the key.
    ///
    /// # Errors
    /// As [`Keys::sign`].
    pub fn verify(
        &self,
        key: &Found,
        digest: &[u8],
        signature: &[u8],
        allow_compromised: bool,
    ) -> Result<bool, VaultError> {
        let version = Some(key.0.row.version);
        let (c, material) = self.prepare(key, version, Action::Verify, Usage::Verify, allow_compromised)?;
        c.check_digest(digest)?;
        Ok(material.verify(digest, signature)?)
    }

    /// Signs `message` with the key's newest version: pure Ed25519 over the
    /// message, ECDSA and RSA over its `hash` (the key type's own if `None`).
    ///
    /// # Errors
    /// As [`Keys::sign`]; [`VaultError::Invalid`] for a message over
    /// [`protocol::MAX_SIGN_MESSAGE`] or a hash the key or its backend cannot
    /// sign over.
    pub fn sign_message(
        &self,
        key: &Found,
        message: &[u8],
        hash: Option<HashAlg>,
    ) -> Result<(u32, Vec<u8>), VaultError> {
        let (c, material) = self.prepare(key, None, Action::Sign, Usage::Sign, false)?;
        let signed = c.message_input(message, hash, material.as_ref())?;
        let signature = material.sign(&signed)?;
        Ok((c.row.version, signature))
    }

    /// Checks a signature made by [`Keys::sign_message`] with `version` of the key.
    ///
    /// # Errors
    /// As [`Keys::sign_message`].
    pub fn verify_message(
        &self,
        key: &Found,
        message: &[u8],
        hash: Option<HashAlg>,
        signature: &[u8],
        allow_compromised: bool,
    ) -> Result<bool, VaultError> {
        let version = Some(key.0.row.version);
        let (c, material) = self.prepare(key, version, Action::Verify, Usage::Verify, allow_compromised)?;
        let signed = c.message_input(message, hash, material.as_ref())?;
        Ok(material.verify(&signed, signature)?)
    }

    /// Seals with the key's newest version, or `version`.
    ///
    /// # Errors
    /// As [`Keys::sign`], and [`VaultError::Invalid`] for a key that is not aes256-gcm.
    pub fn encrypt(
        &self,
        key: &Found,
        version: Option<u32>,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(u32, Vec<u8>), VaultError> {
        let (c, material) = self.prepare(key, version, Action::Encrypt, Usage::Encrypt, false)?;
        let sealed = material.encrypt(plaintext, aad)?;
        Ok((c.row.version, sealed))
    }

    /// Opens what [`Keys::encrypt`] sealed with `version`.
    ///
    /// # Errors
    /// [`VaultError::DecryptFailed`] when authentication fails; as [`Keys::sign`].
    pub fn decrypt(
        &self,
        key: &Found,
        sealed: &[u8],
        aad: &[u8],
        allow_compromised: bool,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let version = Some(key.0.row.version);
        let (c, material) = self.prepare(key, version, Action::Decrypt, Usage::Decrypt, allow_compromised)?;
        material
            .decrypt(sealed, aad)?
            .ok_or_else(|| VaultError::DecryptFailed(c.row.name.clone()))
    }

    /// Opens what some version of `name` sealed, for a caller that does not
    /// know which (a PKCS#11 `C_Decrypt` holds only the ciphertext): tries
    /// the versions the key still decrypts with, newest first, down to its
    /// minimum decryption version, and answers with the one that opened it.
    /// A version that is gone from the keystore is passed over.
    ///
    /// # Errors
    /// [`VaultError::DecryptFailed`] when no version opens it; as [`Keys::decrypt`].
    pub fn decrypt_any_version(
        &self,
        name: &str,
        sealed: &[u8],
        aad: &[u8],
        allow_compromised: bool,
    ) -> Result<(u32, Zeroizing<Vec<u8>>), VaultError> {
        let newest = self.find(name, None)?;
        let (latest, lowest) = (newest.0.row.version, newest.0.row.policy.min_decrypt_version);
        for version in (lowest..=latest).rev() {
            let key = if version == latest {
                newest.clone()
            } else {
                match self.find(name, Some(version)) {
                    Ok(key) => key,
                    Err(VaultError::NoSuchKey(_)) => continue,
                    Err(e) => return Err(e),
                }
            };
            let (_, material) =
                self.prepare(&key, Some(version), Action::Decrypt, Usage::Decrypt, allow_compromised)?;
            if let Some(plaintext) = material.decrypt(sealed, aad)? {
                return Ok((version, plaintext));
            }
        }
        Err(VaultError::DecryptFailed(name.to_owned()))
    }

    /// Opens a ciphertext and seals its plaintext again under the newest
    /// version (or `to_version`), with the same associated data; the plaintext
    /// exists only inside this call.
    ///
    /// # Errors
    /// As [`Keys::decrypt`] and [`Keys::encrypt`].
    pub fn rewrap(
        &self,
        name: &str,
        version: u32,
        sealed: &[u8],
        aad: &[u8],
        to_version: Option<u32>,
    ) -> Result<(u32, Vec<u8>), VaultError> {
        let (_, from) = self.prepare(
            &self.find(name, Some(version))?,
            Some(version),
            Action::Rewrap,
            Usage::Decrypt,
            false,
        )?;
        let (to_row, to) = self.prepare(
            &self.find(name, to_version)?,
            to_version,
            Action::Rewrap,
            Usage::Encrypt,
            false,
        )?;
        if let Some(v) = to_version {
            if v < to_row.row.policy.min_encrypt_version {
                return Err(VaultError::KeyState(format!(
                    "key {name:?} version {v} is below its minimum encryption version {}",
                    to_row.row.policy.min_encrypt_version
                )));
            }
        }
        let plaintext = from
            .decrypt(sealed, aad)?
            .ok_or_else(|| VaultError::DecryptFailed(name.to_owned()))?;
        let resealed = to.encrypt(&plaintext, aad)?;
        Ok((to_row.row.version, resealed))
    }

    /// A fresh 32-byte data key sealed by the key's newest version, and in
    /// plain too when asked and the key allows it.
    ///
    /// # Errors
    /// [`VaultError::UsageNotAllowed`] for a plaintext data key the key does not
    /// allow; as [`Keys::encrypt`].
    pub fn datakey(&self, name: &str, aad: &[u8], plaintext: bool) -> Result<DataKey, VaultError> {
        let (c, material) = self.prepare(&self.find(name, None)?, None, Action::DataKey, Usage::Encrypt, false)?;
        if plaintext && !c.row.policy.allow_plaintext_datakey {
            return Err(VaultError::UsageNotAllowed {
                name: name.to_owned(),
                usage: "return plaintext data keys",
                usages: format!(
                    "{}; `hsmctl key set {name} --allow-plaintext-datakey true` permits it",
                    c.row.usages.replace(',', ", ")
                ),
            });
        }
        let key = Zeroizing::new(crypto::random::<32>()?.to_vec());
        let sealed = material.encrypt(&key, aad)?;
        Ok(DataKey {
            version: c.row.version,
            sealed,
            plaintext: plaintext.then_some(key),
        })
    }

    /// A fresh data key for hsmd's own use (the file store), sealed by the
    /// key's newest version: the plain key never leaves the daemon, so the key's
    /// plaintext-data-key permission does not apply; its state and usages do.
    ///
    /// # Errors
    /// As [`Keys::encrypt`].
    pub fn internal_data_key(&self, name: &str, aad: &[u8]) -> Result<InternalDataKey, VaultError> {
        let (c, material) = self.prepare(&self.find(name, None)?, None, Action::DataKey, Usage::Encrypt, false)?;
        let key = Zeroizing::new(crypto::random::<32>()?);
        let sealed = material.encrypt(key.as_ref(), aad)?;
        Ok(InternalDataKey {
            version: c.row.version,
            sealed,
            key,
        })
    }

    /// HMAC-SHA-256 with the key's newest version.
    ///
    /// # Errors
    /// As [`Keys::sign`].
    pub fn mac(&self, key: &Found, data: &[u8]) -> Result<(u32, Vec<u8>), VaultError> {
        let (c, material) = self.prepare(key, None, Action::Mac, Usage::Mac, false)?;
        let tag = material.mac(data)?;
        Ok((c.row.version, tag))
    }

    /// Checks a tag made by `version`.
    ///
    /// # Errors
    /// As [`Keys::sign`].
    pub fn mac_verify(
        &self,
        key: &Found,
        data: &[u8],
        tag: &[u8],
        allow_compromised: bool,
    ) -> Result<bool, VaultError> {
        let version = Some(key.0.row.version);
        let (_, material) = self.prepare(key, version, Action::MacVerify, Usage::Mac, allow_compromised)?;
        Ok(material.mac_verify(data, tag)?)
    }

    /// The key `name` (at `version`, or its newest), from the cache or else
    /// the keystore (blocking: one indexed SQLite read).
    ///
    /// # Errors
    /// [`VaultError::NotInitialized`], [`VaultError::NoSuchKey`] (or why the key
    /// is gone), [`VaultError::Tampered`], [`VaultError::Store`].
    pub fn find(&self, name: &str, version: Option<u32>) -> Result<Found, VaultError> {
        self.cached(name, version).map(Found)
    }

    /// The key `name` if using it now needs neither disk nor a slow
    /// computation: its row is cached and checked, its material unwrapped, and
    /// its type cheap (see [`cheap_on_the_reactor`]). Such requests are served
    /// on the reactor, sparing two thread wake-ups. Never blocks.
    pub fn find_hot(&self, name: &str, version: Option<u32>) -> Option<Found> {
        let found = self.find_loaded(name, version)?;
        if !found.0.key_type.as_ref().is_ok_and(|t| cheap_on_the_reactor(*t)) {
            return None;
        }
        // A device round trip (or the mock's latency) must not stall the reactor.
        if !self.backends.get(&found.0.row.backend).is_ok_and(|b| b.is_fast()) {
            return None;
        }
        Some(found)
    }

    /// The key `name` if finding it needs no disk and no unwrapping: its
    /// row cached and checked, its material loaded, whatever its type and
    /// backend. Never blocks.
    pub fn find_loaded(&self, name: &str, version: Option<u32>) -> Option<Found> {
        let c = lock(&self.rows).get(&(name.to_owned(), version)).map(Arc::clone)?;
        let unwrapped = self.custody.is_unwrapped(&c.row.id, c.row.version);
        unwrapped.then_some(Found(c))
    }

    /// Writes the use counts gathered since the last flush, in one
    /// transaction; returns how many versions it updated. Counts that fail to
    /// write are kept for the next flush.
    ///
    /// # Errors
    /// [`VaultError::Store`].
    pub fn flush_usage(&self) -> Result<usize, VaultError> {
        let taken: Vec<(String, u32, u64, u64)> = lock(&self.usage)
            .iter()
            .filter_map(|((id, version), c)| {
                let n = c.count.swap(0, Ordering::Relaxed);
                (n > 0).then(|| (id.clone(), *version, n, c.last_used.load(Ordering::Relaxed)))
            })
            .collect();
        if taken.is_empty() {
            return Ok(0);
        }
        if let Err(e) = lock(&self.store).add_usage(&taken) {
            let usage = lock(&self.usage);
            for (id, version, n, _) in &taken {
                if let Some(c) = usage.get(&(id.clone(), *version)) {
                    c.count.fetch_add(*n, Ordering::Relaxed);
                }
            }
            return Err(e.into());
        }
        Ok(taken.len())
    }

    /// Lifecycle work the daemon does by itself, while unlocked (a purge and a
    /// rotation change the key set and need the master key): purges deleted
    /// keys whose recovery window has ended, and rotates keys whose rotation
    /// is due, including rotations that fell due while the daemon was
    /// stopped. It also notices activation and expiry times that have come
    /// since it last looked (locked or not). Returns what happened, for the
    /// audit log.
    ///
    /// # Errors
    /// [`VaultError::Store`] if the keystore cannot be read.
    pub fn maintain(&self) -> Result<Maintenance, VaultError> {
        let now = self.now();
        let mut done = Maintenance {
            done: Vec::new(),
            seen_until: now,
        };
        if self.custody.state() == protocol::ServiceState::Uninitialized {
            return Ok(done);
        }
        done.done = self.lifecycle_times(now)?;
        if self.custody.state() != protocol::ServiceState::Unlocked {
            return Ok(done);
        }
        let purges = lock(&self.store).due_purges(now)?;
        for name in purges {
            let Ok(c) = self.cached(&name, None) else { continue };
            let backend = c.row.backend.clone();
            let purged = (|| {
                let set = self.key_set_key()?;
                self.remove_backend_objects(&c.row);
                let update = set.change(&c.row.id, None);
                let purged = lock(&self.store).purge_key(&name, &update);
                purged.map_err(Self::key_set_error)
            })();
            self.invalidate(Some(&c.row.id));
            match purged {
                Ok(true) => done.done.push(Maintained::Purged { name, backend }),
                Ok(false) => {}
                Err(e) => done.done.push(Maintained::Failed {
                    name,
                    backend,
                    action: "purge",
                    error: e.to_wire(),
                }),
            }
        }
        let due = lock(&self.store).due_rotations(now)?;
        for name in due {
            let backend = self.key_backend(&name).unwrap_or("unknown").to_owned();
            match self.rotate_key(&name) {
                Ok(info) => done.done.push(Maintained::Rotated {
                    name,
                    backend,
                    version: info.version,
                }),
                Err(e) => done.done.push(Maintained::Failed {
                    name,
                    backend,
                    action: "rotate",
                    error: e.to_wire(),
                }),
            }
        }
        Ok(done)
    }

    /// Activation and expiry times that came since the last look (recorded in
    /// the keystore, so each is reported once, and those that came while the
    /// daemon was stopped are reported at the next start).
    fn lifecycle_times(&self, now: u64) -> Result<Vec<Maintained>, VaultError> {
        const MARK: &str = "lifecycle_seen_unix";
        let seen = lock(&self.store)
            .meta(MARK)?
            .and_then(|v| String::from_utf8_lossy(&v).parse::<u64>().ok());
        let Some(seen) = seen else {
            lock(&self.store).set_meta(MARK, now.to_string().as_bytes())?;
            return Ok(Vec::new());
        };
        if now <= seen {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let came = |t: &u64| *t > seen && *t <= now;
        for k in lock(&self.store).lifecycle_times(seen, now)? {
            if let Some(at) = k
                .activate_at_unix
                .filter(|t| came(t) && k.state == KeyState::PreActive.as_str())
            {
                out.push(Maintained::Activated {
                    name: k.name.clone(),
                    backend: k.backend.clone(),
                    at,
                });
            }
            let ends = k.state != KeyState::Compromised.as_str() && k.state != KeyState::Destroyed.as_str();
            if let Some(at) = k.expire_at_unix.filter(|t| came(t) && ends) {
                out.push(Maintained::Expired {
                    name: k.name,
                    backend: k.backend,
                    at,
                });
            }
        }
        Ok(out)
    }

    /// Records that activation and expiry times up to `until` have been
    /// reported: call it after their audit lines are written, so a crash
    /// reports them again rather than never.
    ///
    /// # Errors
    /// [`VaultError::Store`].
    pub fn lifecycle_reported(&self, until: u64) -> Result<(), VaultError> {
        lock(&self.store).set_meta("lifecycle_seen_unix", until.to_string().as_bytes())?;
        Ok(())
    }
}

/// What one round of [`Keys::maintain`] did.
#[derive(Debug, Clone)]
pub struct Maintenance {
    /// Each change, in order.
    pub done: Vec<Maintained>,
    /// Activation and expiry times up to here were looked at.
    pub seen_until: u64,
}

/// What the daemon did by itself in [`Keys::maintain`].
#[derive(Debug, Clone)]
pub enum Maintained {
    /// A key rotated by its rotation policy.
    Rotated {
        /// The key.
        name: String,
        /// Its backend.
        backend: String,
        /// The new version.
        version: u32,
    },
    /// A deleted key purged at the end of its recovery window.
    Purged {
        /// The key.
        name: String,
        /// Its backend.
        backend: String,
    },
    /// A pre-active key's activation time came.
    Activated {
        /// The key.
        name: String,
        /// Its backend.
        backend: String,
        /// When (Unix seconds).
        at: u64,
    },
    /// A key's expiry time came: it only verifies and decrypts from now on.
    Expired {
        /// The key.
        name: String,
        /// Its backend.
        backend: String,
        /// When (Unix seconds).
        at: u64,
    },
    /// A scheduled purge or rotation failed.
    Failed {
        /// The key.
        name: String,
        /// Its backend.
        backend: String,
        /// `purge` or `rotate`.
        action: &'static str,
        /// Why.
        error: protocol::WireError,
    },
}

/// Whether one operation with a software key of this type costs about what
/// the two thread wake-ups of a hand-off to the pool cost (tens of
/// microseconds; BENCHMARKS.md). ECDSA P-256 signs and verifies as fast as
/// Ed25519 does; P-384 takes hundreds of microseconds and RSA milliseconds,
/// too long to hold every other connection on the reactor.
fn cheap_on_the_reactor(key_type: KeyType) -> bool {
    match key_type {
        KeyType::Ed25519 | KeyType::EcdsaP256 | KeyType::Aes256Gcm | KeyType::HmacSha256 => true,
        KeyType::EcdsaP384
        | KeyType::RsaPss2048
        | KeyType::RsaPss3072
        | KeyType::RsaPss4096
        | KeyType::RsaPkcs1_2048
        | KeyType::RsaPkcs1_3072
        | KeyType::RsaPkcs1_4096 => false,
    }
}
