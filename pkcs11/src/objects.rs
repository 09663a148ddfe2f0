//! hsmd's keys as PKCS#11 objects: a private-key and a public-key object for
//! each signing key the caller may see, a secret-key object for each AES key,
//! with the attributes programs read.
//!
//! Objects are the process's view of `KeyList`: the caller's uid decides what
//! hsmd lists, so what one program sees another may not. Handles stay the
//! same for a key (by its id, which rotation keeps) for the life of the
//! process; a listing refreshes the attributes (a rotated key's new public
//! half).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use cryptoki_sys::*;
use protocol::{KeyInfo, KeyState, KeyType, RsaScheme, Usage};

use crate::error::{Error, Result};

/// DER of the named curve OIDs, as `CKA_EC_PARAMS` holds them.
pub(crate) const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
pub(crate) const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// id-Ed25519 (RFC 8410), the form PKCS#11 3.1 recommends for Edwards keys.
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// The DER prefix of every Ed25519 SubjectPublicKeyInfo.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// An object's class, as this module serves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// `CKO_PRIVATE_KEY`: signs through hsmd; its secret never leaves it.
    Private,
    /// `CKO_PUBLIC_KEY`: the newest version's public half.
    Public,
    /// `CKO_SECRET_KEY`: an AES key that encrypts and decrypts through hsmd.
    Secret,
}

impl Class {
    fn ck(self) -> CK_OBJECT_CLASS {
        match self {
            Self::Private => CKO_PRIVATE_KEY,
            Self::Public => CKO_PUBLIC_KEY,
            Self::Secret => CKO_SECRET_KEY,
        }
    }
}

/// One attribute's value as the object holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    /// Readable bytes (a `CK_ULONG` in native order, a `CK_BBOOL` as one byte).
    Value(Vec<u8>),
    /// A secret attribute the object has but never reveals.
    Sensitive,
}

/// A key as an object.
#[derive(Debug)]
pub struct Object {
    /// The hsmd key's name (`CKA_LABEL`).
    pub name: String,
    /// Its type.
    pub key_type: KeyType,
    /// Which half.
    pub class: Class,
    /// The key version whose public half the object shows: the newest when
    /// it was listed, the one that verifies through it. (A secret key's
    /// ciphertexts are opened by whichever version made them.)
    pub version: u32,
    attrs: BTreeMap<CK_ATTRIBUTE_TYPE, Attr>,
}

impl Object {
    /// The attribute's value, if the object has it.
    #[must_use]
    pub fn attr(&self, kind: CK_ATTRIBUTE_TYPE) -> Option<&Attr> {
        self.attrs.get(&kind)
    }

    /// A boolean attribute's value (`false` when absent).
    #[must_use]
    pub fn flag(&self, kind: CK_ATTRIBUTE_TYPE) -> bool {
        matches!(self.attrs.get(&kind), Some(Attr::Value(v)) if v.as_slice() == [CK_TRUE])
    }

    /// Whether every attribute of `template` has the same value here.
    #[must_use]
    pub fn matches(&self, template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> bool {
        template
            .iter()
            .all(|(kind, want)| matches!(self.attrs.get(kind), Some(Attr::Value(v)) if v == want))
    }
}

fn ulong(v: CK_ULONG) -> Attr {
    Attr::Value(v.to_ne_bytes().to_vec())
}

fn bool_attr(v: bool) -> Attr {
    Attr::Value(vec![if v { CK_TRUE } else { CK_FALSE }])
}

/// DER `OCTET STRING` around `bytes` (how `CKA_EC_POINT` is encoded).
fn octet_string(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0x04];
    let len = bytes.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(bytes);
    out
}

/// The key-type-specific public attributes, from the SubjectPublicKeyInfo.
fn public_attrs(key_type: KeyType, spki: &[u8]) -> Result<Vec<(CK_ATTRIBUTE_TYPE, Attr)>> {
    use p256::pkcs8::DecodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    let bad = |why: String| {
        Error::call(
            CKR_DEVICE_ERROR,
            format!("hsmd sent a public key that does not parse: {why}"),
        )
    };
    Ok(match key_type {
        KeyType::Ed25519 => {
            let raw = spki
                .strip_prefix(&ED25519_SPKI_PREFIX[..])
                .filter(|k| k.len() == 32)
                .ok_or_else(|| bad("not an Ed25519 key".into()))?;
            vec![
                (CKA_EC_PARAMS, Attr::Value(ED25519_PARAMS.to_vec())),
                (CKA_EC_POINT, Attr::Value(octet_string(raw))),
            ]
        }
        KeyType::EcdsaP256 => {
            let key = p256::PublicKey::from_public_key_der(spki).map_err(|e| bad(e.to_string()))?;
            let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key, false);
            vec![
                (CKA_EC_PARAMS, Attr::Value(P256_PARAMS.to_vec())),
                (CKA_EC_POINT, Attr::Value(octet_string(point.as_bytes()))),
            ]
        }
        KeyType::EcdsaP384 => {
            let key = p384::PublicKey::from_public_key_der(spki).map_err(|e| bad(e.to_string()))?;
            let point = p384::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key, false);
            vec![
                (CKA_EC_PARAMS, Attr::Value(P384_PARAMS.to_vec())),
                (CKA_EC_POINT, Attr::Value(octet_string(point.as_bytes()))),
            ]
        }
        t if t.rsa().is_some() => {
            let key = rsa::RsaPublicKey::from_public_key_der(spki).map_err(|e| bad(e.to_string()))?;
            let bits = key.n().bits() as CK_ULONG;
            vec![
                (CKA_MODULUS, Attr::Value(key.n().to_bytes_be())),
                (CKA_PUBLIC_EXPONENT, Attr::Value(key.e().to_bytes_be())),
                (CKA_MODULUS_BITS, ulong(bits)),
            ]
        }
        other => {
            return Err(bad(format!("an {} key has no public half", other.as_str())));
        }
    })
}

/// The PKCS#11 key type of an hsmd key type.
#[must_use]
pub fn ck_key_type(key_type: KeyType) -> Option<CK_KEY_TYPE> {
    Some(match key_type {
        KeyType::Ed25519 => CKK_EC_EDWARDS,
        KeyType::EcdsaP256 | KeyType::EcdsaP384 => CKK_EC,
        KeyType::Aes256Gcm => CKK_AES,
        t if t.rsa().is_some() => CKK_RSA,
        _ => return None,
    })
}

/// Whether a key of this type has a public half to fetch (its objects need it).
#[must_use]
pub fn has_public(key_type: KeyType) -> bool {
    key_type.is_asymmetric()
}

/// The objects of one key: its private and public halves, or its secret key
/// (`spki` is `None` for a symmetric key).
fn key_objects(info: &KeyInfo, spki: Option<&[u8]>) -> Result<Vec<Object>> {
    let Some(ck_type) = ck_key_type(info.key_type) else {
        return Err(Error::call(CKR_GENERAL_ERROR, "not a key this module serves"));
    };
    let id = hex::decode(&info.id).unwrap_or_else(|_| info.id.as_bytes().to_vec());
    let active = info.state == KeyState::Active;
    let signs = info.usages.contains(&Usage::Sign) && active;
    let verifies = info.usages.contains(&Usage::Verify);
    let common = |class: Class| -> BTreeMap<CK_ATTRIBUTE_TYPE, Attr> {
        BTreeMap::from([
            (CKA_CLASS, ulong(class.ck())),
            (CKA_TOKEN, bool_attr(true)),
            // Whether a program may use the key is hsmd's policy for its uid,
            // not a login: nothing is hidden until C_Login.
            (CKA_PRIVATE, bool_attr(false)),
            (CKA_MODIFIABLE, bool_attr(false)),
            (CKA_COPYABLE, bool_attr(false)),
            (CKA_DESTROYABLE, bool_attr(class != Class::Public)),
            (CKA_LABEL, Attr::Value(info.name.as_bytes().to_vec())),
            (CKA_KEY_TYPE, ulong(ck_type)),
            (CKA_ID, Attr::Value(id.clone())),
            (CKA_START_DATE, Attr::Value(Vec::new())),
            (CKA_END_DATE, Attr::Value(Vec::new())),
            (CKA_DERIVE, bool_attr(false)),
            (CKA_LOCAL, bool_attr(true)),
            (CKA_KEY_GEN_MECHANISM, ulong(CK_UNAVAILABLE_INFORMATION)),
        ])
    };
    let object = |class, attrs| Object {
        name: info.name.clone(),
        key_type: info.key_type,
        class,
        version: info.version,
        attrs,
    };
    let Some(spki) = spki else {
        let mut secret = common(Class::Secret);
        secret.extend(never_leaves());
        secret.extend([
            (CKA_VALUE, Attr::Sensitive),
            (CKA_VALUE_LEN, ulong(32)),
            (CKA_ENCRYPT, bool_attr(info.usages.contains(&Usage::Encrypt) && active)),
            // hsmd's lifecycle lets a deactivated key still open what it sealed.
            (CKA_DECRYPT, bool_attr(info.usages.contains(&Usage::Decrypt))),
            (CKA_SIGN, bool_attr(false)),
            (CKA_VERIFY, bool_attr(false)),
            (CKA_WRAP, bool_attr(false)),
            (CKA_UNWRAP, bool_attr(false)),
            (CKA_TRUSTED, bool_attr(false)),
        ]);
        return Ok(vec![object(Class::Secret, secret)]);
    };
    let public = public_attrs(info.key_type, spki)?;
    let with_spki = |class| {
        let mut attrs = common(class);
        attrs.insert(CKA_SUBJECT, Attr::Value(Vec::new()));
        attrs.insert(CKA_PUBLIC_KEY_INFO, Attr::Value(spki.to_vec()));
        attrs
    };

    let mut private = with_spki(Class::Private);
    private.extend(never_leaves());
    private.extend([
        (CKA_SIGN, bool_attr(signs)),
        (CKA_SIGN_RECOVER, bool_attr(false)),
        (CKA_DECRYPT, bool_attr(false)),
        (CKA_UNWRAP, bool_attr(false)),
    ]);
    match info.key_type {
        KeyType::Ed25519 | KeyType::EcdsaP256 | KeyType::EcdsaP384 => {
            // The curve is public; the point is the public key's. CKA_VALUE
            // is the private scalar, which hsmd never gives out.
            private.extend(public.iter().filter(|(k, _)| *k == CKA_EC_PARAMS).cloned());
            private.insert(CKA_VALUE, Attr::Sensitive);
        }
        _ => {
            private.extend(public.iter().filter(|(k, _)| *k != CKA_MODULUS_BITS).cloned());
            for secret in [
                CKA_PRIVATE_EXPONENT,
                CKA_PRIME_1,
                CKA_PRIME_2,
                CKA_EXPONENT_1,
                CKA_EXPONENT_2,
                CKA_COEFFICIENT,
            ] {
                private.insert(secret, Attr::Sensitive);
            }
        }
    }

    let mut public_obj = with_spki(Class::Public);
    public_obj.extend(public);
    public_obj.extend([
        (CKA_VERIFY, bool_attr(verifies)),
        (CKA_VERIFY_RECOVER, bool_attr(false)),
        (CKA_ENCRYPT, bool_attr(false)),
        (CKA_WRAP, bool_attr(false)),
        (CKA_TRUSTED, bool_attr(false)),
    ]);
    Ok(vec![object(Class::Private, private), object(Class::Public, public_obj)])
}

/// What every private and secret key object says of its secret: it is
/// sensitive, and never was nor will be extractable.
fn never_leaves() -> [(CK_ATTRIBUTE_TYPE, Attr); 6] {
    [
        (CKA_SENSITIVE, bool_attr(true)),
        (CKA_ALWAYS_SENSITIVE, bool_attr(true)),
        (CKA_EXTRACTABLE, bool_attr(false)),
        (CKA_NEVER_EXTRACTABLE, bool_attr(true)),
        (CKA_WRAP_WITH_TRUSTED, bool_attr(false)),
        (CKA_ALWAYS_AUTHENTICATE, bool_attr(false)),
    ]
}

/// Whether a listed key becomes objects here: a signing or AES type, not
/// deleted or destroyed.
#[must_use]
pub fn is_served(info: &KeyInfo) -> bool {
    ck_key_type(info.key_type).is_some() && info.deleted_unix.is_none() && info.state != KeyState::Destroyed
}

/// The handles the process has given out, and the objects behind them.
#[derive(Debug, Default)]
pub struct Objects {
    by_key: HashMap<(String, Class), CK_OBJECT_HANDLE>,
    by_handle: HashMap<CK_OBJECT_HANDLE, Arc<Object>>,
    /// Public halves already fetched, by key id and version.
    spki: HashMap<(String, u32), Vec<u8>>,
    last: CK_OBJECT_HANDLE,
}

impl Objects {
    /// A cached public key for this key version, if fetched before.
    #[must_use]
    pub fn cached_spki(&self, info: &KeyInfo) -> Option<&[u8]> {
        self.spki.get(&(info.id.clone(), info.version)).map(Vec::as_slice)
    }

    /// Replaces the objects with those of `keys` (each with its public key,
    /// `None` for a symmetric key) and returns the handles of those that
    /// match `template`.
    ///
    /// # Errors
    /// A public key that does not parse.
    pub fn refresh(
        &mut self,
        keys: Vec<(KeyInfo, Option<Vec<u8>>)>,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<Vec<CK_OBJECT_HANDLE>> {
        let mut found = Vec::new();
        let mut seen = HashMap::new();
        for (info, spki) in keys {
            for object in key_objects(&info, spki.as_deref())? {
                let key = (info.id.clone(), object.class);
                let handle = match self.by_key.get(&key) {
                    Some(h) => *h,
                    None => {
                        self.last += 1;
                        self.by_key.insert(key.clone(), self.last);
                        self.last
                    }
                };
                if object.matches(template) {
                    found.push(handle);
                }
                seen.insert(handle, Arc::new(object));
            }
            if let Some(spki) = spki {
                self.spki.insert((info.id.clone(), info.version), spki);
            }
        }
        // A key no longer listed (deleted, or policy changed) has no object;
        // its handle is not reused.
        self.by_handle = seen;
        Ok(found)
    }

    /// The object behind a handle.
    ///
    /// # Errors
    /// `CKR_OBJECT_HANDLE_INVALID` for a handle not (or no longer) given out.
    pub fn get(&self, handle: CK_OBJECT_HANDLE) -> Result<Arc<Object>> {
        self.by_handle
            .get(&handle)
            .cloned()
            .ok_or_else(|| Error::call(CKR_OBJECT_HANDLE_INVALID, format!("no object has handle {handle}")))
    }

    /// Forgets the object behind a handle (its key was deleted).
    pub fn remove(&mut self, handle: CK_OBJECT_HANDLE) {
        self.by_handle.remove(&handle);
    }

    /// The handle of a key's object of `class`, if the key is listed.
    #[must_use]
    pub fn handle_of(&self, name: &str, class: Class) -> Option<CK_OBJECT_HANDLE> {
        self.by_handle
            .iter()
            .find(|(_, o)| o.name == name && o.class == class)
            .map(|(h, _)| *h)
    }
}

/// The length of a signature the key makes, in PKCS#11's encoding.
#[must_use]
pub fn signature_len(key_type: KeyType) -> usize {
    match key_type {
        KeyType::Ed25519 | KeyType::EcdsaP256 => 64,
        KeyType::EcdsaP384 => 96,
        t => t.rsa().map_or(0, |(bits, _)| bits as usize / 8),
    }
}

/// The RSA scheme of an RSA key type.
#[must_use]
pub fn rsa_scheme(key_type: KeyType) -> Option<RsaScheme> {
    key_type.rsa().map(|(_, s)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_points_get_long_form_lengths() {
        assert_eq!(octet_string(&[7; 3]), [4, 3, 7, 7, 7]);
        let p384 = octet_string(&[1; 97]);
        assert_eq!(&p384[..2], &[4, 97]);
        let big = octet_string(&[1; 200]);
        assert_eq!(&big[..3], &[4, 0x81, 200]);
        assert_eq!(&octet_string(&[1; 300])[..4], &[4, 0x82, 1, 44]);
    }
}
