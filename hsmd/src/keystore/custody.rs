//! Custody of the master key: the keystore's states, its unlock slots and
//! the back-off after wrong secrets, the backend PIN sealed under the master
//! key, and the key versions unwrapped while unlocked (dropped on lock).
//!
//! States (DESIGN.md): `uninitialized → locked ⇄ unlocked`. A random 256-bit
//! master key exists in memory only while unlocked; on disk it exists only
//! sealed under each unlock slot's key (see [`super::slots`]).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use protocol::{NewSlot, ServiceState, SlotInfo, UnlockSecret};
use zeroize::Zeroizing;

use crate::backend::{BackendError, Backends, KeyHandle};

use super::{
    crypto::{self, Key256},
    key_aad, lock, now_unix, parse_type,
    slots::{Argon2Cost, SlotError, SlotParams},
    store::{KeyRow, SlotRow, Store},
    VaultError,
};

/// Longest accepted passphrase, in bytes.
pub(super) const MAX_PASSPHRASE: usize = protocol::MAX_PASSPHRASE_LEN;
/// Shortest accepted passphrase, in bytes.
pub(super) const MIN_PASSPHRASE: usize = protocol::MIN_PASSPHRASE_LEN;
/// Longest slot label.
const MAX_LABEL: usize = 128;
/// First wait after a wrong secret; doubles with each further one.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Longest wait.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Where custody stands.
enum State {
    Uninitialized,
    Locked,
    Unlocked {
        master: Key256,
        since: Instant,
        last_used: Instant,
        /// Unwrapped keys by (id, version); dropped (and zeroized) on lock.
        keys: HashMap<(String, u32), Arc<dyn KeyHandle>>,
    },
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    not_before: Instant,
}

/// Custody of the master key. All methods may block (SQLite, Argon2): call
/// them from the blocking pool.
pub struct Custody {
    pub(super) store: Arc<Mutex<Store>>,
    state: Mutex<State>,
    store_id: Mutex<Option<Vec<u8>>>,
    pub(super) cost: Argon2Cost,
    failures: Mutex<HashMap<u32, Failures>>,
    /// Held for every key derivation: one Argon2id run at a time bounds memory
    /// (64 MiB each, locked), and makes parallel guesses meet the back-off.
    pub(super) kdf_gate: Mutex<()>,
    /// Where keys live (the TPM that seals slots, the token whose PIN is kept).
    pub(super) backends: Backends,
}

impl std::fmt::Debug for Custody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Custody")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// What a client asks its authenticator for to open a FIDO2 slot.
fn fido2_challenge(params: &SlotParams) -> Option<protocol::Fido2Challenge> {
    let SlotParams::Fido2 {
        rp_id,
        credential_id,
        hmac_salt,
        ..
    } = params
    else {
        return None;
    };
    Some(protocol::Fido2Challenge {
        rp_id: rp_id.clone(),
        credential_id: hex::decode(credential_id).ok()?,
        salt: hex::decode(hmac_salt).ok()?,
    })
}

/// The FIDO2 slots made with `credential_id`.
pub(super) fn fido2_rows(rows: &[SlotRow], credential_id: &[u8]) -> Vec<SlotRow> {
    rows.iter()
        .filter(|r| r.kind == "fido2")
        .filter(|r| {
            serde_json::from_str::<SlotParams>(&r.params)
                .ok()
                .and_then(|p| fido2_challenge(&p))
                .is_some_and(|c| c.credential_id == credential_id)
        })
        .cloned()
        .collect()
}

/// Tries `secret` against every slot of `kind` in `rows`; the first that opens
/// gives the slot id and the master key. Slots whose parameters were edited
/// are skipped (and logged): another slot may still unlock.
///
/// # Errors
/// [`VaultError::Invalid`] for a secret no slot of its kind could take (a key
/// file of the wrong size); [`VaultError::Tampered`] for a slot holding a
/// master key of the wrong size.
pub(super) fn open_master(
    store_id: &[u8],
    rows: &[SlotRow],
    kind: &str,
    secret: &[u8],
) -> Result<Option<(u32, Key256)>, VaultError> {
    let mut edited = Vec::new();
    for row in rows.iter().filter(|r| r.kind == kind) {
        if let Some(master) = open_slot(store_id, row, |_| Ok(Zeroizing::new(secret.to_vec())), &mut edited)? {
            return Ok(Some((row.id, master)));
        }
    }
    if !edited.is_empty() {
        // Not a wrong secret: the slot cannot even be tried. Saying so (and
        // not counting it toward the back-off) points at the keystore file.
        return Err(VaultError::Tampered(format!(
            "no {kind} slot opened, and {}; restore the keystore from a backup, or unlock with another slot",
            edited.join("; ")
        )));
    }
    Ok(None)
}

/// Opens one slot's sealed master key with the secret `secret_for` gives for
/// its parameters (the TPM2 slots' secret comes out of the TPM); `None` if the
/// secret does not open it.
fn open_slot(
    store_id: &[u8],
    row: &SlotRow,
    secret_for: impl FnOnce(&SlotParams) -> Result<Zeroizing<Vec<u8>>, VaultError>,
    edited: &mut Vec<String>,
) -> Result<Option<Key256>, VaultError> {
    let params: SlotParams = match serde_json::from_str(&row.params) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(slot = row.id, error = %e, "keystore record tampered: slot parameters unreadable");
            edited.push(format!("slot {}'s parameters were edited (unreadable: {e})", row.id));
            return Ok(None);
        }
    };
    if params.kind() != row.kind {
        tracing::error!(
            slot = row.id,
            "keystore record tampered: slot kind and parameters disagree"
        );
        edited.push(format!("slot {}'s kind and parameters disagree (edited)", row.id));
        return Ok(None);
    }
    let secret = secret_for(&params)?;
    let kek = match params.derive(&secret) {
        Ok(k) => k,
        Err(e @ SlotError::BadSecret(_)) => return Err(e.into()),
        Err(SlotError::BadParams(why)) => {
            tracing::error!(slot = row.id, why, "keystore record tampered: slot parameters refused");
            edited.push(format!("slot {}'s parameters were edited ({why})", row.id));
            return Ok(None);
        }
    };
    let aad = slot_aad(store_id, &row.kind, &row.params);
    // Logged and named in the refusal; the other slots are still tried.
    let mut seal_edited = |what: &str| {
        tracing::error!(
            slot = row.id,
            "keystore record tampered: slot's sealed master key {what}"
        );
        edited.push(format!("slot {}'s sealed master key {what}", row.id));
    };
    let Some((check, sealed)) = split_slot_seal(&row.wrapped) else {
        seal_edited("has the wrong length (edited)");
        return Ok(None);
    };
    let Ok(opened) = crypto::open(&kek, sealed, &aad) else {
        // With the right secret the check value matches: the seal itself was
        // edited. (The value is no secret: comparing it in variable time
        // tells nothing a guesser could not compute.)
        if check.is_some_and(|c| c == crypto::check_value(&kek, &aad)) {
            seal_edited("was edited (the secret given is right for it)");
        }
        return Ok(None);
    };
    let Ok(master) = <[u8; 32]>::try_from(opened.as_slice()) else {
        return Err(VaultError::Tampered(format!(
            "slot {} holds a master key of the wrong size",
            row.id
        )));
    };
    Ok(Some(Zeroizing::new(master)))
}

/// The meta row holding the PKCS#11 user PIN, sealed under the master key.
const BACKEND_PIN: &str = "pkcs11_pin";

fn backend_pin_aad(store_id: &[u8]) -> Vec<u8> {
    let mut aad = b"hsmd pkcs11 pin v1\0".to_vec();
    aad.extend_from_slice(store_id);
    aad
}

/// A slot's sealed master key: 12-byte nonce, 32 bytes sealed, 16-byte tag.
pub(super) const SEALED_MASTER_LEN: usize = crate::aead::NONCE_LEN + 32 + crate::aead::TAG_LEN;

/// A slot's stored bytes: a check value of the slot key, then the sealed
/// master key; slots made before check values are the seal alone. `None`
/// for any other length.
fn split_slot_seal(wrapped: &[u8]) -> Option<(Option<[u8; crypto::CHECK_LEN]>, &[u8])> {
    match wrapped.len() {
        SEALED_MASTER_LEN => Some((None, wrapped)),
        n if n == crypto::CHECK_LEN + SEALED_MASTER_LEN => {
            let (check, sealed) = wrapped.split_at(crypto::CHECK_LEN);
            Some((check.try_into().ok(), sealed))
        }
        _ => None,
    }
}

fn slot_aad(store_id: &[u8], kind: &str, params: &str) -> Vec<u8> {
    let mut aad = b"hsmd master key v1\0".to_vec();
    aad.extend_from_slice(store_id);
    aad.push(0);
    aad.extend_from_slice(kind.as_bytes());
    aad.push(0);
    aad.extend_from_slice(params.as_bytes());
    aad
}

impl Custody {
    /// Custody of the keystore in `store`: `locked` if it has a store id
    /// (it was initialized), else `uninitialized`.
    pub(super) fn new(store: Arc<Mutex<Store>>, store_id: Option<Vec<u8>>, cost: Argon2Cost) -> Self {
        let state = if store_id.is_some() {
            State::Locked
        } else {
            State::Uninitialized
        };
        Self {
            store,
            state: Mutex::new(state),
            store_id: Mutex::new(store_id),
            cost,
            failures: Mutex::new(HashMap::new()),
            kdf_gate: Mutex::new(()),
            backends: Backends::default(),
        }
    }

    /// The custody state.
    pub fn state(&self) -> ServiceState {
        match *lock(&self.state) {
            State::Uninitialized => ServiceState::Uninitialized,
            State::Locked => ServiceState::Locked,
            State::Unlocked { .. } => ServiceState::Unlocked,
        }
    }

    /// Creates the keystore with a fresh master key and `first` as its only slot,
    /// and leaves it unlocked.
    ///
    /// # Errors
    /// [`VaultError::AlreadyInitialized`], or an unacceptable secret.
    pub fn init(&self, first: &NewSlot) -> Result<u32, VaultError> {
        if self.state() != ServiceState::Uninitialized {
            return Err(VaultError::AlreadyInitialized);
        }
        let master = crypto::random_key()?;
        let store_id = crypto::random::<16>()?.to_vec();
        let row = self.seal_slot(first, &master, &store_id)?;
        let mut state = lock(&self.state);
        // Re-check under the lock: two inits may race.
        if !matches!(*state, State::Uninitialized) {
            return Err(VaultError::AlreadyInitialized);
        }
        let id = lock(&self.store).initialize(&store_id, &row)?;
        *lock(&self.store_id) = Some(store_id);
        let now = Instant::now();
        *state = State::Unlocked {
            master,
            since: now,
            last_used: now,
            keys: HashMap::new(),
        };
        Ok(id)
    }

    /// Tries `secret` against every slot of its kind; on success the master key
    /// is in memory (and a backend PIN kept sealed is handed over). Wrong
    /// secrets from one uid are met with a growing wait. Returns the slot that
    /// opened. [`super::Vault::unlock`] also checks the keys.
    ///
    /// # Errors
    /// [`VaultError::UnlockFailed`], [`VaultError::Backoff`], [`VaultError::NotInitialized`].
    pub fn unlock(&self, uid: u32, secret: &UnlockSecret) -> Result<u32, VaultError> {
        let _gate = lock(&self.kdf_gate);
        self.check_backoff(uid)?;
        let store_id = lock(&self.store_id).clone().ok_or(VaultError::NotInitialized)?;
        let rows = lock(&self.store).slots()?;
        let (kind, opened) = match secret {
            UnlockSecret::Passphrase(p) => ("passphrase", open_master(&store_id, &rows, "passphrase", p.expose())?),
            UnlockSecret::Keyfile(k) => ("keyfile", open_master(&store_id, &rows, "keyfile", k.expose())?),
            UnlockSecret::Tpm2 => ("tpm2", self.open_tpm2(&store_id, &rows)?),
            UnlockSecret::Fido2 { credential_id, secret } => (
                "fido2",
                open_master(&store_id, &fido2_rows(&rows, credential_id), "fido2", secret.expose())?,
            ),
        };
        if let Some((slot, master)) = opened {
            lock(&self.failures).remove(&uid);
            let now = Instant::now();
            {
                let mut state = lock(&self.state);
                if !matches!(*state, State::Unlocked { .. }) {
                    *state = State::Unlocked {
                        master,
                        since: now,
                        last_used: now,
                        keys: HashMap::new(),
                    };
                }
            }
            self.hand_over_backend_pin();
            return Ok(slot);
        }
        self.record_failure(uid);
        Err(VaultError::UnlockFailed { kind })
    }

    /// Tries every TPM2 slot: the TPM unseals its secret (refusing where a
    /// bound PCR changed). Refusals are logged and named if none opens.
    pub(super) fn open_tpm2(&self, store_id: &[u8], rows: &[SlotRow]) -> Result<Option<(u32, Key256)>, VaultError> {
        let tpm2: Vec<&SlotRow> = rows.iter().filter(|r| r.kind == "tpm2").collect();
        if tpm2.is_empty() {
            return Err(VaultError::Tpm2Refused(
                "this keystore has no tpm2 slot; `hsmctl slot list` shows its slots".into(),
            ));
        }
        let Some(sealer) = self.backends.sealer() else {
            return Err(VaultError::Tpm2Refused(
                "no TPM is configured ([backends.tpm]), so no tpm2 slot can be unsealed".into(),
            ));
        };
        let mut refusals = Vec::new();
        let mut edited = Vec::new();
        for row in tpm2 {
            let opened = open_slot(
                store_id,
                row,
                |params| {
                    let SlotParams::Tpm2 {
                        pcrs, public, private, ..
                    } = params
                    else {
                        return Err(VaultError::Tampered(format!("slot {} is not a tpm2 slot", row.id)));
                    };
                    let (public, private) = (
                        hex::decode(public).map_err(|e| VaultError::Tampered(format!("slot {}: {e}", row.id)))?,
                        hex::decode(private).map_err(|e| VaultError::Tampered(format!("slot {}: {e}", row.id)))?,
                    );
                    sealer
                        .unseal(&public, &private, pcrs)
                        .map_err(|e| VaultError::Tpm2Refused(format!("slot {}: {e}", row.id)))
                },
                &mut edited,
            );
            match opened {
                Ok(Some(master)) => return Ok(Some((row.id, master))),
                Ok(None) => refusals.push(format!("slot {}: the unsealed secret does not open it", row.id)),
                Err(VaultError::Tpm2Refused(why)) => {
                    tracing::warn!(slot = row.id, reason = %why, "tpm2 slot refused");
                    refusals.push(why);
                }
                Err(e) => return Err(e),
            }
        }
        refusals.extend(edited);
        Err(VaultError::Tpm2Refused(format!(
            "{}; unlock with another slot (passphrase or key file)",
            refusals.join("; ")
        )))
    }

    /// Seals a backend's PIN under the master key in the keystore and hands it
    /// to the backend (now, and at every unlock). Needs unlocked.
    ///
    /// # Errors
    /// [`VaultError::Invalid`] for a backend that takes no PIN or an
    /// unusable PIN; [`VaultError::Locked`].
    pub fn set_backend_pin(&self, backend: &str, pin: &[u8]) -> Result<(), VaultError> {
        if backend != "pkcs11" {
            return Err(VaultError::Invalid(format!(
                "the {backend} backend takes no PIN; only pkcs11 does"
            )));
        }
        let Some(p11) = self.backends.pkcs11() else {
            return Err(VaultError::Invalid(
                "no pkcs11 backend is configured ([backends.pkcs11])".into(),
            ));
        };
        let pin = std::str::from_utf8(pin)
            .ok()
            .filter(|p| (1..=256).contains(&p.len()) && !p.chars().any(char::is_control))
            .ok_or_else(|| VaultError::Invalid("a token PIN is 1 to 256 bytes of printable UTF-8".into()))?;
        let (master, store_id) = self.master_and_id()?;
        let sealed = crypto::seal(&master, pin.as_bytes(), &backend_pin_aad(&store_id))?;
        lock(&self.store).set_meta(BACKEND_PIN, &sealed)?;
        if !p11.pin_from_keystore() {
            tracing::warn!("backends.pkcs11.pin_file is set: the PIN from set-pin is used now and kept sealed, but the file's is used again at the next start");
        }
        p11.provide_pin(Zeroizing::new(pin.to_owned()));
        Ok(())
    }

    /// At unlock: hands the sealed PKCS#11 PIN to the backend that waits for it.
    /// Forgets the wrong secrets `uid` gave: it gave a right one.
    pub(super) fn clear_failures(&self, uid: u32) {
        lock(&self.failures).remove(&uid);
    }

    fn hand_over_backend_pin(&self) {
        let Some(p11) = self.backends.pkcs11().filter(|p| p.pin_from_keystore()) else {
            return;
        };
        let Ok((master, store_id)) = self.master_and_id() else {
            return;
        };
        match lock(&self.store).meta(BACKEND_PIN) {
            Ok(Some(sealed)) => match crypto::open(&master, &sealed, &backend_pin_aad(&store_id)) {
                Ok(pin) => match String::from_utf8(pin.to_vec()) {
                    Ok(p) => p11.provide_pin(Zeroizing::new(p)),
                    Err(_) => tracing::error!("keystore record tampered: the sealed PKCS#11 PIN is not text"),
                },
                Err(_) => tracing::error!("keystore record tampered: the sealed PKCS#11 PIN fails authentication"),
            },
            Ok(None) => tracing::warn!("no PKCS#11 PIN in the keystore yet: `hsmctl backend pkcs11 set-pin`"),
            Err(e) => tracing::error!(error = %e, "cannot read the sealed PKCS#11 PIN"),
        }
    }

    /// Refuses while `uid` must still wait after a wrong secret.
    pub(super) fn check_backoff(&self, uid: u32) -> Result<(), VaultError> {
        if let Some(f) = lock(&self.failures).get(&uid) {
            let now = Instant::now();
            if now < f.not_before {
                return Err(VaultError::Backoff {
                    uid,
                    retry_after: f.not_before - now,
                });
            }
        }
        Ok(())
    }

    pub(super) fn record_failure(&self, uid: u32) {
        let mut failures = lock(&self.failures);
        let f = failures.entry(uid).or_insert(Failures {
            count: 0,
            not_before: Instant::now(),
        });
        f.count = f.count.saturating_add(1);
        let wait = BACKOFF_BASE
            .saturating_mul(1u32 << (f.count - 1).min(16))
            .min(BACKOFF_MAX);
        f.not_before = Instant::now() + wait;
        tracing::warn!(
            uid,
            failures = f.count,
            wait_ms = wait.as_millis() as u64,
            "unlock failed"
        );
    }

    /// Forgets the master key (zeroized on drop). Locking a locked keystore is fine.
    ///
    /// # Errors
    /// [`VaultError::NotInitialized`].
    pub fn lock(&self) -> Result<(), VaultError> {
        let mut state = lock(&self.state);
        match *state {
            State::Uninitialized => Err(VaultError::NotInitialized),
            _ => {
                *state = State::Locked;
                Ok(())
            }
        }
    }

    /// Locks if unlocked longer than `max_unlocked`, or unused longer than
    /// `idle`; returns why it locked.
    pub fn enforce_timeouts(&self, idle: Option<Duration>, max_unlocked: Option<Duration>) -> Option<String> {
        let mut state = lock(&self.state);
        let State::Unlocked { since, last_used, .. } = *state else {
            return None;
        };
        let reason = if max_unlocked.is_some_and(|m| since.elapsed() >= m) {
            format!("unlocked for longer than {}", humantime::format_duration(max_unlocked?))
        } else if idle.is_some_and(|i| last_used.elapsed() >= i) {
            format!("unused for {}", humantime::format_duration(idle?))
        } else {
            return None;
        };
        *state = State::Locked;
        Some(reason)
    }

    /// The slots, without secrets.
    ///
    /// # Errors
    /// [`VaultError::NotInitialized`], or the file failing.
    pub fn slots(&self) -> Result<Vec<SlotInfo>, VaultError> {
        if self.state() == ServiceState::Uninitialized {
            return Err(VaultError::NotInitialized);
        }
        let rows = lock(&self.store).slots()?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let params = serde_json::from_str::<SlotParams>(&r.params).ok();
                SlotInfo {
                    id: r.id,
                    kdf: params.as_ref().map(SlotParams::describe),
                    fido2: params.as_ref().and_then(fido2_challenge),
                    kind: r.kind,
                    label: r.label,
                    created_unix: r.created_unix,
                }
            })
            .collect())
    }

    /// Adds a slot sealing the master key under `slot`'s secret. Needs unlocked.
    ///
    /// # Errors
    /// [`VaultError::Locked`], an unacceptable secret, or the file failing.
    pub fn add_slot(&self, slot: &NewSlot) -> Result<u32, VaultError> {
        let master = self.master()?;
        let store_id = lock(&self.store_id).clone().ok_or(VaultError::NotInitialized)?;
        let row = self.seal_slot(slot, &master, &store_id)?;
        Ok(lock(&self.store).add_slot(&row)?)
    }

    /// Removes a slot, never the last. Needs unlocked, so a locked daemon cannot
    /// be stripped of its slots by whoever reaches the socket.
    ///
    /// # Errors
    /// [`VaultError::Locked`], [`VaultError::NoSuchSlot`], [`VaultError::LastSlot`].
    pub fn remove_slot(&self, id: u32) -> Result<u32, VaultError> {
        self.master()?;
        match lock(&self.store).remove_slot(id)? {
            None => Err(VaultError::NoSuchSlot(id)),
            Some(false) => Err(VaultError::LastSlot(id)),
            Some(true) => Ok(id),
        }
    }

    /// Unwraps (or takes from the cache) a key version. Any failure to
    /// authenticate is reported as tampering of that key alone.
    pub(super) fn material(&self, row: &KeyRow) -> Result<Arc<dyn KeyHandle>, VaultError> {
        let cache_key = (row.id.clone(), row.version);
        let master = {
            let mut state = lock(&self.state);
            match &mut *state {
                State::Uninitialized => return Err(VaultError::NotInitialized),
                State::Locked => return Err(VaultError::Locked),
                State::Unlocked {
                    master,
                    last_used,
                    keys,
                    ..
                } => {
                    *last_used = Instant::now();
                    if let Some(m) = keys.get(&cache_key) {
                        return Ok(Arc::clone(m));
                    }
                    master.clone()
                }
            }
        };
        let store_id = lock(&self.store_id).clone().ok_or(VaultError::NotInitialized)?;
        let tampered = || {
            tracing::error!(key = %row.name, version = row.version, "keystore record tampered");
            VaultError::Tampered(format!(
                "key {:?} version {} failed authentication; restore it from a backup",
                row.name, row.version
            ))
        };
        let key_type = parse_type(row)?;
        let backend = self.backends.get(&row.backend)?;
        let reference = crypto::open(&master, &row.wrapped, &key_aad(&store_id, row)).map_err(|_| tampered())?;
        let material = match backend.load(key_type, &reference) {
            Ok(m) => m,
            Err(BackendError::BadReference { .. }) => return Err(tampered()),
            Err(e) => return Err(e.into()),
        };
        if material.public_spki() != row.public {
            return Err(tampered());
        }
        if let State::Unlocked { keys, .. } = &mut *lock(&self.state) {
            keys.insert(cache_key, Arc::clone(&material));
        }
        Ok(material)
    }

    /// Drops the unwrapped versions of key `id` (zeroized once unused).
    pub(super) fn forget_key(&self, id: &str) {
        if let State::Unlocked { keys, .. } = &mut *lock(&self.state) {
            keys.retain(|(k, _), _| k != id);
        }
    }

    /// Whether version `version` of key `id` is unwrapped in memory.
    pub(super) fn is_unwrapped(&self, id: &str, version: u32) -> bool {
        matches!(&*lock(&self.state), State::Unlocked { keys, .. } if keys.contains_key(&(id.to_owned(), version)))
    }

    /// Locks, and puts the keystore file at `incoming` in the store's place
    /// (a restore); returns where the old file was kept, if it was.
    pub(super) fn replace_store(
        &self,
        incoming: &std::path::Path,
        store_id: Vec<u8>,
    ) -> Result<Option<std::path::PathBuf>, VaultError> {
        // Nothing may use the old keys or master key from here on.
        *lock(&self.state) = State::Locked;
        let mut store = lock(&self.store);
        let kept = store.replace_with(incoming)?;
        *lock(&self.store_id) = Some(store_id);
        Ok(kept)
    }

    /// Locks (or leaves uninitialized), closes the keystore file, runs
    /// `change` on the state directory and opens the file again: whatever
    /// keystore is then in place is this daemon's, locked.
    pub(super) fn replaced_while<T>(&self, change: impl FnOnce() -> T) -> Result<T, VaultError> {
        let mut state = lock(&self.state);
        // Nothing may use the old keys or master key from here on.
        *state = State::Locked;
        let mut store = lock(&self.store);
        let out = store.closed_while(change)?;
        let store_id = store.store_id()?;
        *state = if store_id.is_some() {
            State::Locked
        } else {
            State::Uninitialized
        };
        *lock(&self.store_id) = store_id;
        Ok(out)
    }

    /// The master key and the store's id, for sealing under the master key.
    pub(super) fn master_and_id(&self) -> Result<(Key256, Vec<u8>), VaultError> {
        let master = self.master()?;
        let store_id = lock(&self.store_id).clone().ok_or(VaultError::NotInitialized)?;
        Ok((master, store_id))
    }

    /// A copy of the master key, for the operation at hand; marks it used.
    pub(super) fn master(&self) -> Result<Key256, VaultError> {
        match &mut *lock(&self.state) {
            State::Uninitialized => Err(VaultError::NotInitialized),
            State::Locked => Err(VaultError::Locked),
            State::Unlocked { master, last_used, .. } => {
                *last_used = Instant::now();
                Ok(master.clone())
            }
        }
    }

    /// Checks a new slot's secret and label, derives its key and seals `master`.
    /// Runs the KDF without holding any lock.
    fn seal_slot(&self, slot: &NewSlot, master: &Key256, store_id: &[u8]) -> Result<SlotRow, VaultError> {
        let (label, params, secret) = match slot {
            NewSlot::Passphrase { label, passphrase } => {
                let n = passphrase.len();
                if !(MIN_PASSPHRASE..=MAX_PASSPHRASE).contains(&n) {
                    return Err(VaultError::Invalid(format!(
                        "a passphrase must be {MIN_PASSPHRASE} to {MAX_PASSPHRASE} bytes; this one is {n}"
                    )));
                }
                let params = SlotParams::Argon2id {
                    cost: self.cost,
                    salt: hex::encode(crypto::random::<16>()?),
                };
                (label, params, Zeroizing::new(passphrase.expose().to_vec()))
            }
            NewSlot::Keyfile { label, key } => {
                let params = SlotParams::HkdfSha256 {
                    salt: hex::encode(crypto::random::<16>()?),
                };
                (label, params, Zeroizing::new(key.expose().to_vec()))
            }
            NewSlot::Fido2 {
                label,
                challenge,
                secret,
            } => {
                if challenge.credential_id.is_empty() || challenge.credential_id.len() > 1024 {
                    return Err(VaultError::Invalid("a FIDO2 credential id is 1 to 1024 bytes".into()));
                }
                if challenge.salt.len() != 32 {
                    return Err(VaultError::Invalid("the hmac-secret salt is exactly 32 bytes".into()));
                }
                if challenge.rp_id.is_empty()
                    || challenge.rp_id.len() > 128
                    || challenge.rp_id.chars().any(char::is_control)
                {
                    return Err(VaultError::Invalid(
                        "a relying party id is 1 to 128 printable bytes".into(),
                    ));
                }
                let params = SlotParams::Fido2 {
                    salt: hex::encode(crypto::random::<16>()?),
                    rp_id: challenge.rp_id.clone(),
                    credential_id: hex::encode(&challenge.credential_id),
                    hmac_salt: hex::encode(&challenge.salt),
                };
                (label, params, Zeroizing::new(secret.expose().to_vec()))
            }
            NewSlot::Tpm2 { label, pcrs } => {
                let Some(sealer) = self.backends.sealer() else {
                    return Err(VaultError::Invalid(
                        "no TPM is configured: add a [backends.tpm] section (and build hsmd with --features tpm)"
                            .into(),
                    ));
                };
                let mut pcrs = pcrs.clone();
                pcrs.sort_unstable();
                pcrs.dedup();
                if let Some(bad) = pcrs.iter().find(|&&p| p > 23) {
                    return Err(VaultError::Invalid(format!("PCR {bad} does not exist; use 0 to 23")));
                }
                let secret = Zeroizing::new(crypto::random::<32>()?.to_vec());
                let (public, private) = sealer.seal(&secret, &pcrs)?;
                let params = SlotParams::Tpm2 {
                    salt: hex::encode(crypto::random::<16>()?),
                    pcrs,
                    public: hex::encode(public),
                    private: hex::encode(private),
                };
                (label, params, secret)
            }
        };
        if label.len() > MAX_LABEL || label.chars().any(char::is_control) {
            return Err(VaultError::Invalid(format!(
                "a slot label is at most {MAX_LABEL} bytes of printable text"
            )));
        }
        let kek = {
            let _gate = lock(&self.kdf_gate);
            params.derive(&secret)?
        };
        let json = serde_json::to_string(&params).map_err(|source| VaultError::Encode {
            what: "a slot's parameters",
            source,
        })?;
        let kind = params.kind();
        let aad = slot_aad(store_id, kind, &json);
        let mut wrapped = crypto::check_value(&kek, &aad).to_vec();
        wrapped.extend_from_slice(&crypto::seal(&kek, master.as_ref(), &aad)?);
        Ok(SlotRow {
            id: 0,
            kind: kind.to_owned(),
            label: label.clone(),
            params: json,
            wrapped,
            created_unix: now_unix(),
        })
    }
}
