//! The `soft` backend: keys made and used in software inside hsmd, their
//! secrets sealed under the master key in the keystore (the reference *is* the
//! secret). Operations take microseconds, so they may run on the reactor.

use std::sync::Arc;

use protocol::KeyType;
use zeroize::Zeroizing;

use super::material::{self, Material};
use super::{Backend, BackendError, Health, KeyHandle, KeyLabel, NewKey};

/// The backend's name.
pub const NAME: &str = "soft";

/// The software backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Soft;

impl Backend for Soft {
    fn name(&self) -> &'static str {
        NAME
    }

    fn generate(&self, key_type: KeyType, _label: KeyLabel<'_>) -> Result<NewKey, BackendError> {
        if key_type.rsa().is_some() {
            return Err(BackendError::Unsupported(format!(
                "the soft backend does not make {} keys: hsmd holds RSA private keys only in hardware, \
                 since software RSA here is not constant time (RUSTSEC-2023-0071); \
                 create the key with --backend pkcs11 or --backend tpm",
                key_type.as_str()
            )));
        }
        let material = Material::generate(key_type).map_err(|e| BackendError::Failed {
            backend: NAME,
            reason: e.to_string(),
        })?;
        Ok(NewKey {
            reference: material.secret(),
            public: material.public_spki(),
        })
    }

    fn load(&self, key_type: KeyType, reference: &[u8]) -> Result<Arc<dyn KeyHandle>, BackendError> {
        Material::from_secret(key_type, reference)
            .map(|m| Arc::new(m) as Arc<dyn KeyHandle>)
            .ok_or(BackendError::BadReference { backend: NAME })
    }

    fn health(&self) -> Health {
        Health {
            healthy: true,
            detail: "software keys sealed in the keystore".into(),
        }
    }

    fn is_fast(&self) -> bool {
        true
    }
}

impl KeyHandle for Material {
    fn key_type(&self) -> KeyType {
        Material::key_type(self)
    }

    fn public_spki(&self) -> Option<Vec<u8>> {
        Material::public_spki(self)
    }

    fn sign(&self, digest: &[u8]) -> Result<Vec<u8>, BackendError> {
        Material::sign(self, digest).map_err(BackendError::Unsupported)
    }

    fn verify(&self, digest: &[u8], signature: &[u8]) -> Result<bool, BackendError> {
        Ok(Material::verify(self, digest, signature))
    }

    fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, BackendError> {
        Material::encrypt(self, plaintext, aad).map_err(BackendError::Unsupported)
    }

    fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, BackendError> {
        Material::decrypt(self, sealed, aad).map_err(BackendError::Unsupported)
    }

    fn mac(&self, data: &[u8]) -> Result<Vec<u8>, BackendError> {
        Material::mac(self, data).map_err(BackendError::Unsupported)
    }

    fn mac_verify(&self, data: &[u8], tag: &[u8]) -> Result<bool, BackendError> {
        Material::mac_verify(self, data, tag).map_err(BackendError::Unsupported)
    }
}

/// Checks a signature against a public key given as SubjectPublicKeyInfo DER,
/// as hsmd verifies for every backend (so verification needs no device).
/// Malformed keys or signatures are simply invalid.
#[must_use]
pub fn verify_spki(key_type: KeyType, spki: &[u8], digest: &[u8], signature: &[u8]) -> bool {
    use p256::pkcs8::DecodePublicKey as _;
    match key_type {
        KeyType::Ed25519 => ed25519_dalek::VerifyingKey::from_public_key_der(spki)
            .is_ok_and(|k| material::verify_ed25519(&k, digest, signature)),
        KeyType::EcdsaP256 => p256::ecdsa::VerifyingKey::from_public_key_der(spki)
            .is_ok_and(|k| material::verify_p256(&k, digest, signature)),
        KeyType::EcdsaP384 => p384::ecdsa::VerifyingKey::from_public_key_der(spki)
            .is_ok_and(|k| material::verify_p384(&k, digest, signature)),
        KeyType::Aes256Gcm | KeyType::HmacSha256 => false,
        _ => super::rsa_public::verify(key_type, spki, digest, signature),
    }
}
