//! Key material of the software backend (`soft`): generation, public keys, and
//! signatures over digests the client computed. Private material lives only in
//! zeroizing types, or in AWS-LC's key objects, which cleanse it when freed.
//!
//! ECDSA signs with AWS-LC (constant time; its P-256 and P-384 field
//! arithmetic is formally verified), about nine times the pure-Rust p256 here
//! (42 k against 4.9 k P-256 signatures a second on one core); RustCrypto's
//! p256 and p384 keep generation, the stored scalar, public keys and
//! verification.

use aws_lc_rs::{
    digest,
    signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING},
};
use ed25519_dalek::Signer as _;
use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use protocol::KeyType;
use zeroize::Zeroizing;

use crate::crypto::{self, CryptoError};

/// Unwrapped key material.
pub enum Material {
    /// An Ed25519 signing key.
    Ed25519(ed25519_dalek::SigningKey),
    /// A P-256 ECDSA signing key, and the same key in AWS-LC, which signs.
    P256(p256::ecdsa::SigningKey, Box<EcdsaKeyPair>),
    /// A P-384 ECDSA signing key, and the same key in AWS-LC, which signs.
    P384(p384::ecdsa::SigningKey, Box<EcdsaKeyPair>),
    /// A 256-bit symmetric key (AES-256-GCM or HMAC-SHA-256).
    Symmetric(KeyType, Zeroizing<[u8; 32]>),
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Material({}, [redacted])", self.key_type().as_str())
    }
}

impl Material {
    /// A fresh key of `key_type` from the OS random source.
    ///
    /// # Errors
    /// [`CryptoError::Random`].
    pub fn generate(key_type: KeyType) -> Result<Self, CryptoError> {
        if key_type.rsa().is_some() {
            return Err(CryptoError::Unsupported(key_type.as_str()));
        }
        loop {
            let secret = Zeroizing::new(match key_type {
                KeyType::EcdsaP384 => crypto::random::<48>()?.to_vec(),
                _ => crypto::random::<32>()?.to_vec(),
            });
            // A random scalar is out of range with probability ~2^-32 on
            // P-256 (less on P-384): draw again.
            if let Some(m) = Self::from_secret(key_type, &secret) {
                return Ok(m);
            }
        }
    }

    /// Rebuilds material from its stored secret bytes; `None` if they are not a
    /// valid key of that type.
    #[must_use]
    pub fn from_secret(key_type: KeyType, secret: &[u8]) -> Option<Self> {
        Some(match key_type {
            KeyType::Ed25519 => Self::Ed25519(ed25519_dalek::SigningKey::from_bytes(secret.try_into().ok()?)),
            KeyType::EcdsaP256 => {
                let key = p256::ecdsa::SigningKey::from_slice(secret).ok()?;
                let point = key.verifying_key().to_encoded_point(false);
                let signer = aws_signer(&ECDSA_P256_SHA256_ASN1_SIGNING, secret, point.as_bytes())?;
                Self::P256(key, signer)
            }
            KeyType::EcdsaP384 => {
                let key = p384::ecdsa::SigningKey::from_slice(secret).ok()?;
                let point = key.verifying_key().to_encoded_point(false);
                let signer = aws_signer(&ECDSA_P384_SHA384_ASN1_SIGNING, secret, point.as_bytes())?;
                Self::P384(key, signer)
            }
            KeyType::Aes256Gcm | KeyType::HmacSha256 => {
                Self::Symmetric(key_type, Zeroizing::new(secret.try_into().ok()?))
            }
            // RSA private keys are never in software (backend::rsa_public).
            _ => return None,
        })
    }

    /// The secret bytes to store (wrapped).
    #[must_use]
    pub fn secret(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(match self {
            Self::Ed25519(k) => k.to_bytes().to_vec(),
            Self::P256(k, _) => k.to_bytes().to_vec(),
            Self::P384(k, _) => k.to_bytes().to_vec(),
            Self::Symmetric(_, k) => k.to_vec(),
        })
    }

    /// The key's type.
    #[must_use]
    pub fn key_type(&self) -> KeyType {
        match self {
            Self::Ed25519(_) => KeyType::Ed25519,
            Self::P256(..) => KeyType::EcdsaP256,
            Self::P384(..) => KeyType::EcdsaP384,
            Self::Symmetric(t, _) => *t,
        }
    }

    /// The public key as SubjectPublicKeyInfo DER; `None` for symmetric keys.
    #[must_use]
    pub fn public_spki(&self) -> Option<Vec<u8>> {
        use p256::pkcs8::EncodePublicKey;
        let doc = match self {
            Self::Ed25519(k) => k.verifying_key().to_public_key_der().ok()?,
            Self::P256(k, _) => k.verifying_key().to_public_key_der().ok()?,
            Self::P384(k, _) => k.verifying_key().to_public_key_der().ok()?,
            Self::Symmetric(..) => return None,
        };
        Some(doc.as_bytes().to_vec())
    }

    /// Signs `digest` (already checked to be the type's digest length): Ed25519
    /// over the 64-byte SHA-512 digest as its message; ECDSA over the digest as
    /// the prehash, DER-encoded.
    ///
    /// ECDSA uses the leftmost bits of a digest longer than the curve's order
    /// (FIPS 186-5 §6.4.1), so AWS-LC signs the first 32 (P-256) or 48 (P-384)
    /// bytes of any digest that long; a shorter one (SHA-256 on P-384) goes to
    /// RustCrypto, which AWS-LC's digest import would not take.
    ///
    /// # Errors
    /// A message if the key cannot sign.
    pub fn sign(&self, digest: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Self::Ed25519(k) => Ok(k.sign(digest).to_bytes().to_vec()),
            Self::P256(_, signer) if digest.len() >= 32 => aws_sign(signer, &digest[..32], &digest::SHA256),
            Self::P384(_, signer) if digest.len() >= 48 => aws_sign(signer, &digest[..48], &digest::SHA384),
            Self::P256(k, _) => {
                let sig: p256::ecdsa::Signature = k.sign_prehash(digest).map_err(|e| e.to_string())?;
                Ok(sig.to_der().as_bytes().to_vec())
            }
            Self::P384(k, _) => {
                let sig: p384::ecdsa::Signature = k.sign_prehash(digest).map_err(|e| e.to_string())?;
                Ok(sig.to_der().as_bytes().to_vec())
            }
            Self::Symmetric(t, _) => Err(format!("an {} key cannot sign", t.as_str())),
        }
    }

    /// The 32-byte key of an aes256-gcm or hmac-sha256 key of that type.
    fn symmetric(&self, want: KeyType) -> Result<&[u8; 32], String> {
        match self {
            Self::Symmetric(t, k) if *t == want => Ok(k),
            other => Err(format!(
                "an {} key cannot do that; use an {} key",
                other.key_type().as_str(),
                want.as_str()
            )),
        }
    }

    /// AES-256-GCM seal: 12-byte random nonce ‖ ciphertext ‖ tag.
    ///
    /// # Errors
    /// Not an aes256-gcm key, or no randomness.
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, String> {
        crypto::seal(self.symmetric(KeyType::Aes256Gcm)?, plaintext, aad).map_err(|e| e.to_string())
    }

    /// AES-256-GCM open; `Ok(None)` when authentication fails.
    ///
    /// # Errors
    /// Not an aes256-gcm key.
    pub fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
        Ok(crypto::open(self.symmetric(KeyType::Aes256Gcm)?, sealed, aad).ok())
    }

    /// HMAC-SHA-256 tag.
    ///
    /// # Errors
    /// Not an hmac-sha256 key.
    pub fn mac(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        use hmac::Mac as _;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(self.symmetric(KeyType::HmacSha256)?)
            .map_err(|e| e.to_string())?;
        m.update(data);
        Ok(m.finalize().into_bytes().to_vec())
    }

    /// Checks an HMAC-SHA-256 tag in constant time.
    ///
    /// # Errors
    /// Not an hmac-sha256 key.
    pub fn mac_verify(&self, data: &[u8], tag: &[u8]) -> Result<bool, String> {
        use hmac::Mac as _;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(self.symmetric(KeyType::HmacSha256)?)
            .map_err(|e| e.to_string())?;
        m.update(data);
        Ok(m.verify_slice(tag).is_ok())
    }

    /// Whether `signature` is valid over `digest`. Malformed signatures are
    /// simply invalid.
    #[must_use]
    pub fn verify(&self, digest: &[u8], signature: &[u8]) -> bool {
        match self {
            Self::Ed25519(k) => verify_ed25519(&k.verifying_key(), digest, signature),
            Self::P256(k, _) => verify_p256(k.verifying_key(), digest, signature),
            Self::P384(k, _) => verify_p384(k.verifying_key(), digest, signature),
            Self::Symmetric(..) => false,
        }
    }
}

/// The AWS-LC key for a scalar and its public point; `None` if they do not match.
fn aws_signer(
    algorithm: &'static aws_lc_rs::signature::EcdsaSigningAlgorithm,
    scalar: &[u8],
    point: &[u8],
) -> Option<Box<EcdsaKeyPair>> {
    EcdsaKeyPair::from_private_key_and_public_key(algorithm, scalar, point)
        .ok()
        .map(Box::new)
}

/// An AWS-LC ECDSA signature (DER) over a digest of `algorithm`'s length.
fn aws_sign(signer: &EcdsaKeyPair, digest: &[u8], algorithm: &'static digest::Algorithm) -> Result<Vec<u8>, String> {
    let digest = digest::Digest::import_less_safe(digest, algorithm).map_err(|e| e.to_string())?;
    let signature = signer
        .sign_digest(&digest)
        .map_err(|e| format!("ECDSA signing failed: {e}"))?;
    Ok(signature.as_ref().to_vec())
}

/// Ed25519 verification as hsmd does it: strict (no malleable or small-order
/// signatures), 64-byte signatures only.
#[must_use]
pub fn verify_ed25519(key: &ed25519_dalek::VerifyingKey, message: &[u8], signature: &[u8]) -> bool {
    ed25519_dalek::Signature::from_slice(signature).is_ok_and(|s| key.verify_strict(message, &s).is_ok())
}

/// ECDSA P-256 verification of a DER signature over a SHA-256 prehash.
#[must_use]
pub fn verify_p256(key: &p256::ecdsa::VerifyingKey, prehash: &[u8], der: &[u8]) -> bool {
    p256::ecdsa::Signature::from_der(der).is_ok_and(|s| key.verify_prehash(prehash, &s).is_ok())
}

/// ECDSA P-384 verification of a DER signature over a SHA-384 prehash.
#[must_use]
pub fn verify_p384(key: &p384::ecdsa::VerifyingKey, prehash: &[u8], der: &[u8]) -> bool {
    p384::ecdsa::Signature::from_der(der).is_ok_and(|s| key.verify_prehash(prehash, &s).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signing_type_round_trips_and_rejects_other_digests() {
        for t in [KeyType::Ed25519, KeyType::EcdsaP256, KeyType::EcdsaP384] {
            let k = Material::generate(t).unwrap();
            let again = Material::from_secret(t, &k.secret()).unwrap();
            assert_eq!(k.public_spki(), again.public_spki(), "{t:?} survives storage");
            let n = t.digest_len().unwrap();
            let digest = vec![7u8; n];
            let sig = k.sign(&digest).unwrap();
            assert!(again.verify(&digest, &sig), "{t:?}");
            let mut other = digest.clone();
            other[0] ^= 1;
            assert!(!k.verify(&other, &sig), "{t:?} other digest");
            let mut bad = sig.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(!k.verify(&digest, &bad), "{t:?} flipped signature");
            assert!(!k.verify(&digest, b"garbage"), "{t:?} garbage");
        }
    }

    #[test]
    fn ecdsa_signs_digests_of_every_length_its_hashes_give() {
        // AWS-LC signs the leftmost bytes of a long digest; RustCrypto, which
        // verifies, must agree on what was signed, whichever path signed it.
        for t in [KeyType::EcdsaP256, KeyType::EcdsaP384] {
            let k = Material::generate(t).unwrap();
            for len in [32, 48, 64] {
                let digest: Vec<u8> = (0..len as u8).collect();
                let sig = k.sign(&digest).unwrap();
                assert!(k.verify(&digest, &sig), "{t:?} over {len} bytes");
                let mut other = digest.clone();
                other[len - 1] ^= 1;
                let curve_bytes = if t == KeyType::EcdsaP256 { 32 } else { 48 };
                assert_eq!(
                    k.verify(&other, &sig),
                    len > curve_bytes,
                    "{t:?}: a change past the curve's size is outside what ECDSA signs"
                );
            }
        }
    }

    #[test]
    fn hmac_matches_rfc_4868_auth256_1_and_checks_tags() {
        // RFC 4868, test case AUTH256-1: a 32-byte key of 0x0b over "Hi There".
        let k = Material::from_secret(KeyType::HmacSha256, &[0x0b; 32]).unwrap();
        let tag = k.mac(b"Hi There").unwrap();
        assert_eq!(
            hex::encode(&tag),
            "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"
        );
        assert!(k.mac_verify(b"Hi There", &tag).unwrap());
        assert!(!k.mac_verify(b"Hi there", &tag).unwrap());
        assert!(!k.mac_verify(b"Hi There", &tag[..31]).unwrap());
        assert!(k.encrypt(b"x", b"").is_err(), "an HMAC key does not encrypt");
    }

    #[test]
    fn aes_gcm_round_trips_and_binds_its_aad() {
        let k = Material::generate(KeyType::Aes256Gcm).unwrap();
        let sealed = k.encrypt(b"plain", b"aad").unwrap();
        assert_eq!(k.decrypt(&sealed, b"aad").unwrap().unwrap().as_slice(), b"plain");
        assert!(k.decrypt(&sealed, b"other").unwrap().is_none());
        assert!(k.mac(b"x").is_err(), "an AES key does not MAC");
    }

    /// Wycheproof: every vector of a verification set through hsmd's own
    /// verify function; a key that does not parse must only have invalid tests.
    fn wycheproof_ecdsa<K>(
        name: wycheproof::ecdsa::TestName,
        parse: impl Fn(&[u8]) -> Option<K>,
        hash: impl Fn(&[u8]) -> Vec<u8>,
        verify: impl Fn(&K, &[u8], &[u8]) -> bool,
    ) -> usize {
        use wycheproof::TestResult;
        let set = wycheproof::ecdsa::TestSet::load(name).unwrap();
        let mut n = 0;
        for group in set.test_groups {
            let key = parse(&group.der);
            for t in group.tests {
                let ok = key.as_ref().is_some_and(|k| verify(k, &hash(&t.msg), &t.sig));
                match t.result {
                    TestResult::Valid => assert!(ok, "{name:?} tc {} ({}) should verify", t.tc_id, t.comment),
                    TestResult::Invalid => assert!(!ok, "{name:?} tc {} ({}) must not verify", t.tc_id, t.comment),
                    TestResult::Acceptable => {}
                }
                n += 1;
            }
        }
        n
    }

    #[test]
    fn wycheproof_ecdsa_p256_and_p384_verification() {
        use p256::pkcs8::DecodePublicKey;
        use sha2::Digest;
        let n = wycheproof_ecdsa(
            wycheproof::ecdsa::TestName::EcdsaSecp256r1Sha256,
            |der| p256::ecdsa::VerifyingKey::from_public_key_der(der).ok(),
            |m| sha2::Sha256::digest(m).to_vec(),
            verify_p256,
        );
        let m = wycheproof_ecdsa(
            wycheproof::ecdsa::TestName::EcdsaSecp384r1Sha384,
            |der| p384::ecdsa::VerifyingKey::from_public_key_der(der).ok(),
            |m| sha2::Sha384::digest(m).to_vec(),
            verify_p384,
        );
        assert!(n > 300 && m > 300, "ran {n} P-256 and {m} P-384 vectors");
    }

    #[test]
    fn wycheproof_ed25519_verification() {
        use wycheproof::TestResult;
        let set = wycheproof::eddsa::TestSet::load(wycheproof::eddsa::TestName::Ed25519).unwrap();
        let mut n = 0;
        for group in set.test_groups {
            let key = <[u8; 32]>::try_from(&group.key.pk[..])
                .ok()
                .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok());
            for t in group.tests {
                let ok = key.as_ref().is_some_and(|k| verify_ed25519(k, &t.msg, &t.sig));
                match t.result {
                    TestResult::Valid => assert!(ok, "tc {} ({}) should verify", t.tc_id, t.comment),
                    TestResult::Invalid => assert!(!ok, "tc {} ({}) must not verify", t.tc_id, t.comment),
                    TestResult::Acceptable => {}
                }
                n += 1;
            }
        }
        assert!(n > 100, "ran {n} vectors");
    }

    #[test]
    fn wycheproof_aes_256_gcm_through_the_keystore_seal_format() {
        use wycheproof::TestResult;
        let set = wycheproof::aead::TestSet::load(wycheproof::aead::TestName::AesGcm).unwrap();
        let mut n = 0;
        for group in set.test_groups {
            // hsmd uses 256-bit keys, 96-bit nonces and 128-bit tags only.
            if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
                continue;
            }
            for t in group.tests {
                let key: [u8; 32] = t.key[..].try_into().unwrap();
                let mut sealed = t.nonce.to_vec();
                sealed.extend_from_slice(&t.ct);
                sealed.extend_from_slice(&t.tag);
                let opened = crypto::open(&key, &sealed, &t.aad);
                match t.result {
                    TestResult::Valid => {
                        assert_eq!(opened.unwrap().as_slice(), &t.pt[..], "tc {} ({})", t.tc_id, t.comment);
                    }
                    TestResult::Invalid => assert!(opened.is_err(), "tc {} ({}) must not open", t.tc_id, t.comment),
                    TestResult::Acceptable => {}
                }
                n += 1;
            }
        }
        assert!(n > 50, "ran {n} vectors");
    }

    #[test]
    fn symmetric_keys_have_no_public_half_and_cannot_sign() {
        let k = Material::generate(KeyType::Aes256Gcm).unwrap();
        assert!(k.public_spki().is_none());
        assert!(k.sign(&[0; 32]).is_err());
        assert!(format!("{k:?}").contains("redacted"));
    }
}
