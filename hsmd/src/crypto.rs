//! The keystore's primitives: AES-256-GCM sealing with associated data, and
//! randomness from the OS. Sealed form: 12-byte random nonce ‖ ciphertext ‖ tag.

use thiserror::Error;
use zeroize::Zeroizing;

/// A 256-bit key that is wiped when dropped.
pub type Key256 = Zeroizing<[u8; 32]>;

use crate::aead::{Aes256Gcm, NONCE_LEN, TAG_LEN};

/// A cryptographic step failed.
#[derive(Debug, Error)]
pub enum CryptoError {
    /// Authentication failed: wrong key, or the sealed bytes or their context changed.
    #[error("authentication failed")]
    Authentication,
    /// The operating system's random source failed.
    #[error("the system random source failed: {0}")]
    Random(String),
    /// The type has no software implementation (RSA lives only in hardware).
    #[error("hsmd makes no software {0} keys")]
    Unsupported(&'static str),
}

/// Fills a fresh array from the OS random source.
///
/// # Errors
/// [`CryptoError::Random`] if the OS refuses.
pub fn random<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| CryptoError::Random(e.to_string()))?;
    Ok(out)
}

/// A fresh random 256-bit key.
///
/// # Errors
/// [`CryptoError::Random`] if the OS refuses.
pub fn random_key() -> Result<Key256, CryptoError> {
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(key.as_mut()).map_err(|e| CryptoError::Random(e.to_string()))?;
    Ok(key)
}

/// Length of a [`check_value`].
pub const CHECK_LEN: usize = 16;

/// A key check value: HKDF-SHA-256 of `key` under a salt of its own, expanded
/// over `context`, 16 bytes. Stored beside a seal, it tells a wrong key (the
/// values differ) from a seal whose bytes were edited (they match, the seal
/// fails). It tells a guesser no more than the seal does, and costs a guess
/// the same key derivation.
#[must_use]
pub fn check_value(key: &[u8; 32], context: &[u8]) -> [u8; CHECK_LEN] {
    let mut out = [0u8; CHECK_LEN];
    // Infallible: 16 bytes is far below HKDF-SHA-256's output limit.
    let _ = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"hsmd key check v1"), key).expand(context, &mut out);
    out
}

/// Encrypts `plaintext` under `key`, binding `aad`.
///
/// # Errors
/// [`CryptoError::Random`] if no nonce can be drawn.
pub fn seal(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let nonce: [u8; NONCE_LEN] = random()?;
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = Aes256Gcm::new(key)
        .seal_detached(&nonce, aad, &mut out[NONCE_LEN..])
        // Only a plaintext over 64 GiB fails.
        .map_err(|_| CryptoError::Authentication)?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Decrypts what [`seal`] produced, checking `aad`.
///
/// # Errors
/// [`CryptoError::Authentication`] for a wrong key, edited bytes or other `aad`.
pub fn open(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Authentication);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Authentication)?;
    let mut buf = Zeroizing::new(ct.to_vec());
    Aes256Gcm::new(key)
        .open_vec(nonce, aad, &mut buf)
        .map_err(|_| CryptoError::Authentication)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_open_only_with_the_same_key_and_context() {
        let key = random_key().unwrap();
        let sealed = seal(&key, b"master", b"ctx").unwrap();
        assert_eq!(open(&key, &sealed, b"ctx").unwrap().as_slice(), b"master");
        assert!(open(&key, &sealed, b"other").is_err());
        let other = random_key().unwrap();
        assert!(open(&other, &sealed, b"ctx").is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(open(&key, &bad, b"ctx").is_err(), "flipped byte {i} went unnoticed");
        }
        assert!(open(&key, &sealed[..20], b"ctx").is_err());
    }

    #[test]
    fn nonces_are_fresh() {
        let key = random_key().unwrap();
        assert_ne!(seal(&key, b"x", b"").unwrap(), seal(&key, b"x", b"").unwrap());
    }
}
