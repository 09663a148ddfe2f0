//! The daemon's one AES-256-GCM. Every sealing in hsmd (key wrapping, the
//! aes256-gcm key type, the file store's chunks) goes through this seam, so the
//! implementation is chosen here and nowhere else.
//!
//! It is `ring`'s: on this project's machines it seals 64 KiB chunks at
//! 5.6–6.3 GB/s per core, where `aes-gcm` 0.10 manages 1.1 and 0.11 about 1.7,
//! and the file store's throughput targets (BENCHMARKS.md) need that margin.
//! What that costs: `ring` does not wipe its expanded key schedule when a key
//! is dropped (RustCrypto's `zeroize` feature does). The raw key bytes hsmd
//! holds are still `Zeroizing`, the schedule lives in hsmd's locked,
//! never-dumped memory, and each one lives only as long as one operation or one
//! file transfer.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

/// Bytes of nonce.
pub const NONCE_LEN: usize = 12;
/// Bytes of authentication tag.
pub const TAG_LEN: usize = 16;

/// Sealed bytes did not authenticate (wrong key, edited bytes or context), or
/// a message was too long to seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("AES-256-GCM authentication failed")]
pub struct Unauthentic;

/// An AES-256-GCM key, ready to seal and open.
pub struct Aes256Gcm {
    key: LessSafeKey,
}

impl std::fmt::Debug for Aes256Gcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aes256Gcm").finish_non_exhaustive()
    }
}

impl Aes256Gcm {
    /// Expands `key`.
    #[must_use]
    // `UnboundKey::new` refuses only a key of the wrong length; the type
    // guarantees 32 bytes.
    #[allow(clippy::expect_used)]
    pub fn new(key: &[u8; 32]) -> Self {
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is an AES-256 key");
        Self {
            key: LessSafeKey::new(unbound),
        }
    }

    /// Encrypts `buf` in place and appends the tag.
    ///
    /// # Errors
    /// [`Unauthentic`] only for a message over GCM's 64 GiB limit.
    pub fn seal_in_place(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut Vec<u8>) -> Result<(), Unauthentic> {
        let tag = self.seal_detached(nonce, aad, buf)?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Encrypts `buf` in place and returns the tag.
    ///
    /// # Errors
    /// As [`Aes256Gcm::seal_in_place`].
    pub fn seal_detached(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], Unauthentic> {
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
            .map_err(|_| Unauthentic)?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts `buf` (ciphertext ‖ tag) in place, checking `aad`; returns the
    /// plaintext, the front of `buf`.
    ///
    /// # Errors
    /// [`Unauthentic`] for a wrong key, edited bytes or another `aad`.
    pub fn open_in_place<'a>(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &'a mut [u8],
    ) -> Result<&'a mut [u8], Unauthentic> {
        self.key
            .open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
            .map_err(|_| Unauthentic)
    }

    /// As [`Aes256Gcm::open_in_place`], shortening `buf` to the plaintext.
    ///
    /// # Errors
    /// As [`Aes256Gcm::open_in_place`].
    pub fn open_vec(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut Vec<u8>) -> Result<(), Unauthentic> {
        let len = self.open_in_place(nonce, aad, buf)?.len();
        buf.truncate(len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_only_what_it_sealed_under_the_same_nonce_and_context() {
        let k = Aes256Gcm::new(&[7u8; 32]);
        let n = [1u8; NONCE_LEN];
        let mut buf = b"attack at dawn".to_vec();
        k.seal_in_place(&n, b"ctx", &mut buf).unwrap();
        assert_eq!(buf.len(), 14 + TAG_LEN);
        let sealed = buf.clone();
        k.open_vec(&n, b"ctx", &mut buf).unwrap();
        assert_eq!(buf, b"attack at dawn");
        let mut b = sealed.clone();
        assert!(k.open_vec(&n, b"other", &mut b).is_err());
        let mut b = sealed.clone();
        assert!(k.open_vec(&[2u8; NONCE_LEN], b"ctx", &mut b).is_err());
        let mut b = sealed.clone();
        assert!(Aes256Gcm::new(&[8u8; 32]).open_vec(&n, b"ctx", &mut b).is_err());
        for i in 0..sealed.len() {
            let mut b = sealed.clone();
            b[i] ^= 0x80;
            assert!(k.open_vec(&n, b"ctx", &mut b).is_err(), "byte {i}");
        }
    }

    /// NIST SP 800-38D / McGrew–Viega test case 16 (AES-256, 60-byte
    /// plaintext, 20-byte AAD), so the seam is checked against the standard,
    /// not only against itself.
    #[test]
    fn matches_the_gcm_spec_test_vector() {
        let key: [u8; 32] = hex::decode("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
            .unwrap()
            .try_into()
            .unwrap();
        let nonce: [u8; 12] = hex::decode("cafebabefacedbaddecaf888").unwrap().try_into().unwrap();
        let pt = hex::decode(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        )
        .unwrap();
        let aad = hex::decode("feedfacedeadbeeffeedfacedeadbeefabaddad2").unwrap();
        let mut buf = pt.clone();
        let tag = Aes256Gcm::new(&key).seal_detached(&nonce, &aad, &mut buf).unwrap();
        assert_eq!(
            hex::encode(&buf),
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
        );
        assert_eq!(hex::encode(tag), "76fc6ece0f4e1768cddf8853bb2d551b");
    }
}
