//! The key set: the keystore's own record of which keys it holds (id and
//! name), sealed with a MAC under a key derived from the master key and
//! updated in the same transaction as every key creation and purge. Each key
//! row is already bound to the keystore by its sealed material and its policy
//! MAC, so an edited row is found when it is used; this record also finds a
//! row (or a version row) that was *removed* outside hsmd, or one put back
//! that hsmd had purged. The check runs at every unlock and names what it
//! finds; other keys keep working.

use std::collections::{BTreeMap, BTreeSet};

use hkdf::Hkdf;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{
    lock,
    store::{KeySetRecord, StoreError},
    Keys, VaultError,
};

type KeySetMac = Hmac<Sha256>;

/// The key that seals the key set.
pub(super) struct SetKey(Zeroizing<[u8; 32]>);

impl SetKey {
    pub(super) fn derive(master: &[u8; 32], store_id: &[u8]) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        // Infallible: 32 bytes is far below HKDF-SHA-256's output limit.
        let _ = Hkdf::<Sha256>::new(Some(store_id), master).expand(b"hsmd key set mac v1", &mut *key);
        Self(key)
    }

    fn mac(&self, json: &[u8]) -> Option<KeySetMac> {
        let mut m = KeySetMac::new_from_slice(&*self.0).ok()?;
        m.update(b"hsmd key set v1\0");
        m.update(json);
        Some(m)
    }

    /// Seals `set` as (json, mac).
    fn seal(&self, set: &BTreeMap<String, String>) -> Result<(Vec<u8>, Vec<u8>), String> {
        let json = serde_json::to_vec(set).map_err(|e| e.to_string())?;
        let mac = self
            .mac(&json)
            .ok_or("cannot make the key set's MAC")?
            .finalize()
            .into_bytes()
            .to_vec();
        Ok((json, mac))
    }

    /// Opens a recorded set (id → name), checking its MAC; a set never
    /// recorded starts from the keys there are.
    fn open(&self, record: KeySetRecord) -> Result<BTreeMap<String, String>, String> {
        match record {
            KeySetRecord::Absent { keys } => Ok(keys.into_iter().collect()),
            KeySetRecord::Sealed { json, mac } => {
                // verify_slice compares in constant time.
                let good = self.mac(&json).is_some_and(|m| m.verify_slice(&mac).is_ok());
                if !good {
                    return Err(
                        "the keystore's record of its keys fails its check: it was edited outside hsmd".to_owned(),
                    );
                }
                serde_json::from_slice(&json)
                    .map_err(|e| format!("the keystore's record of its keys is unreadable: {e}"))
            }
        }
    }

    /// The update that adds (`Some(name)`) or removes (`None`) key `id`.
    pub(super) fn change<'a>(
        &'a self,
        id: &'a str,
        name: Option<&'a str>,
    ) -> impl Fn(KeySetRecord) -> Result<(Vec<u8>, Vec<u8>), String> + 'a {
        move |record| {
            let mut set = self.open(record)?;
            match name {
                Some(n) => set.insert(id.to_owned(), n.to_owned()),
                None => set.remove(id),
            };
            self.seal(&set)
        }
    }
}

/// What the last unlock's check found, consulted when a key is looked up so
/// a removed key is reported as removed, not as never having existed.
#[derive(Debug, Default)]
pub(super) struct Findings {
    /// Keys in the record whose rows are gone: name → id.
    pub missing: BTreeMap<String, String>,
    /// Key rows not in the record: their ids.
    pub unknown: BTreeSet<String>,
    /// Version rows gone: (name, version).
    pub missing_versions: BTreeSet<(String, u32)>,
}

impl Findings {
    /// Why a lookup of `name` (at `version`) that found no row failed, if the
    /// check knows.
    pub(super) fn explain_absent(&self, name: &str, version: Option<u32>) -> Option<VaultError> {
        if self.missing.contains_key(name) {
            return Some(VaultError::Tampered(format!(
                "key {name:?} was removed from the keystore outside hsmd; restore it from a backup, or \
                 `hsmctl key purge {name} --yes` to forget it"
            )));
        }
        let v = version?;
        self.missing_versions.contains(&(name.to_owned(), v)).then(|| {
            VaultError::Tampered(format!(
                "version {v} of key {name:?} was removed from the keystore outside hsmd; restore it from a backup"
            ))
        })
    }
}

fn versions_text(v: &[u32]) -> String {
    v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

impl Keys<'_> {
    /// The key that seals the key set. Needs unlocked.
    pub(super) fn key_set_key(&self) -> Result<SetKey, VaultError> {
        let (master, store_id) = self.custody.master_and_id()?;
        Ok(SetKey::derive(&master, &store_id))
    }

    /// Maps a store failure of the key set to what it means.
    pub(super) fn key_set_error(e: StoreError) -> VaultError {
        match e {
            StoreError::KeySet(why) => {
                tracing::error!("keystore record tampered: {why}");
                VaultError::Tampered(format!("{why}; restore the keystore from a backup"))
            }
            other => other.into(),
        }
    }

    /// The check at unlock: every key row against the key set, every version
    /// row against its key's newest version, every key's policy against its
    /// MAC. Returns what it found, one sentence each, and remembers it.
    pub(super) fn check_key_set(&self) -> Result<Vec<String>, VaultError> {
        let key = self.key_set_key()?;
        let (record, inventory) = {
            let store = lock(&self.store);
            (store.key_set()?, store.key_inventory()?)
        };
        let mut warnings = Vec::new();
        let first = matches!(record, KeySetRecord::Absent { .. });
        let set = match key.open(record) {
            Ok(set) if first => {
                // Recorded from now on.
                let (json, mac) = key.seal(&set).map_err(VaultError::Invalid)?;
                lock(&self.store).set_key_set(&json, &mac)?;
                tracing::info!(keys = set.len(), "the keystore now records its key set");
                set
            }
            Ok(set) => set,
            Err(why) => {
                warnings.push(format!(
                    "{why}, so a key removed with it cannot be named; hsmd records the {} keys there are now",
                    inventory.len()
                ));
                let now: BTreeMap<String, String> = inventory.iter().map(|k| (k.id.clone(), k.name.clone())).collect();
                let (json, mac) = key.seal(&now).map_err(VaultError::Invalid)?;
                lock(&self.store).set_key_set(&json, &mac)?;
                now
            }
        };
        let mut findings = Findings::default();
        let present: BTreeSet<&str> = inventory.iter().map(|k| k.id.as_str()).collect();
        for (id, name) in &set {
            if !present.contains(id.as_str()) {
                warnings.push(format!(
                    "key {name:?} (id {id}) was removed from the keystore outside hsmd; restore it from a backup, \
                     or `hsmctl key purge {name} --yes` to forget it"
                ));
                findings.missing.insert(name.clone(), id.clone());
            }
        }
        for k in &inventory {
            if !set.contains_key(&k.id) {
                warnings.push(format!(
                    "key {:?} (id {}) is in the keystore but not in its record of keys: it was put there outside \
                     hsmd (a purged key brought back?); it is refused until purged",
                    k.name, k.id
                ));
                findings.unknown.insert(k.id.clone());
            }
            let gone: Vec<u32> = (1..=k.latest_version).filter(|v| !k.versions.contains(v)).collect();
            if !gone.is_empty() {
                warnings.push(format!(
                    "version{} {} of key {:?} {} removed from the keystore outside hsmd; restore {} from a backup",
                    if gone.len() == 1 { "" } else { "s" },
                    versions_text(&gone),
                    k.name,
                    if gone.len() == 1 { "was" } else { "were" },
                    if gone.len() == 1 { "it" } else { "them" },
                ));
                for v in gone {
                    findings.missing_versions.insert((k.name.clone(), v));
                }
            }
        }
        let rows = lock(&self.store).keys()?;
        for row in &rows {
            if let Err(VaultError::Tampered(why)) = self.verify_policy(row) {
                warnings.push(why);
            }
        }
        for w in &warnings {
            tracing::error!("keystore check at unlock: {w}");
        }
        *lock(&self.findings) = findings;
        Ok(warnings)
    }

    /// Refuses a key the check found outside the key set.
    pub(super) fn refuse_unknown(&self, id: &str, name: &str) -> Result<(), VaultError> {
        if lock(&self.findings).unknown.contains(id) {
            return Err(VaultError::Tampered(format!(
                "key {name:?} is not in the keystore's record of its keys: it was put there outside hsmd; \
                 `hsmctl key purge {name} --yes` removes it"
            )));
        }
        Ok(())
    }
}
