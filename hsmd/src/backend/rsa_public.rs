//! RSA public keys and signature checks, shared by the backends that keep RSA
//! private keys in hardware (pkcs11, tpm). hsmd itself never holds an RSA
//! private key: the software RSA available in Rust is not constant time
//! (RUSTSEC-2023-0071), and public-key operations leak nothing secret.
//!
//! Every RSA key type is bound to one scheme ([`RsaScheme`]), SHA-256 and a
//! public exponent of 65537; a signature is the modulus length, big-endian.

use protocol::{KeyType, RsaScheme};

use super::BackendError;
use rsa::{
    pkcs8::{DecodePublicKey as _, EncodePublicKey as _},
    traits::PublicKeyParts as _,
    BigUint, Pkcs1v15Sign, Pss, RsaPublicKey,
};
use sha2::{Sha256, Sha384, Sha512};

/// The public exponent of every RSA key hsmd makes (F4).
pub const PUBLIC_EXPONENT: u32 = 65_537;

/// The DER DigestInfo prefix for SHA-256 (RFC 8017 §9.2, note 1): what a
/// token's raw `CKM_RSA_PKCS` mechanism needs in front of the digest.
pub const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20,
];

/// The DER DigestInfo prefix for SHA-384 (RFC 8017 §9.2, note 1).
pub const SHA384_DIGEST_INFO: [u8; 19] = [
    0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30,
];

/// The DER DigestInfo prefix for SHA-512 (RFC 8017 §9.2, note 1).
pub const SHA512_DIGEST_INFO: [u8; 19] = [
    0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40,
];

/// The DigestInfo prefix for a SHA-2 digest of `len` bytes: a PKCS#1 v1.5
/// signature names its hash, so a digest's length picks it without
/// ambiguity (SHA-256, SHA-384, SHA-512).
#[must_use]
pub fn digest_info(len: usize) -> Option<&'static [u8; 19]> {
    match len {
        32 => Some(&SHA256_DIGEST_INFO),
        48 => Some(&SHA384_DIGEST_INFO),
        64 => Some(&SHA512_DIGEST_INFO),
        _ => None,
    }
}

/// The PSS salt length: the digest's (32 bytes for SHA-256), as the TPM uses
/// and as most verifiers expect.
pub const PSS_SALT_LEN: usize = 32;

/// SubjectPublicKeyInfo DER for a modulus and public exponent as a device
/// gives them (big-endian), if they make a key of `key_type`'s size with the
/// exponent hsmd asked for. A device that answers with another size or
/// exponent is refused rather than trusted.
#[must_use]
pub fn spki(key_type: KeyType, modulus: &[u8], exponent: &[u8]) -> Option<Vec<u8>> {
    let (bits, _) = key_type.rsa()?;
    let n = BigUint::from_bytes_be(modulus);
    let e = BigUint::from_bytes_be(exponent);
    if n.bits() != bits as usize || e != BigUint::from(PUBLIC_EXPONENT) {
        return None;
    }
    let key = RsaPublicKey::new(n, e).ok()?;
    Some(key.to_public_key_der().ok()?.as_bytes().to_vec())
}

/// Whether `signature` is a valid signature of `key_type`'s scheme over
/// `digest` under the key in `spki_der`: SHA-256 for PSS (the type binds
/// it); for PKCS#1 v1.5 a SHA-256, SHA-384 or SHA-512 digest, by its length. Malformed keys and
/// signatures, a signature of another length than the modulus, and a key of
/// another size than the type's are all simply invalid.
#[must_use]
pub fn verify(key_type: KeyType, spki_der: &[u8], digest: &[u8], signature: &[u8]) -> bool {
    let Some((bits, scheme)) = key_type.rsa() else {
        return false;
    };
    let Ok(key) = RsaPublicKey::from_public_key_der(spki_der) else {
        return false;
    };
    if key.n().bits() != bits as usize || signature.len() != key.size() {
        return false;
    }
    match (scheme, digest.len()) {
        (RsaScheme::Pss, 32) => key
            .verify(Pss::new_with_salt::<Sha256>(PSS_SALT_LEN), digest, signature)
            .is_ok(),
        (RsaScheme::Pkcs1v15, 32) => key.verify(Pkcs1v15Sign::new::<Sha256>(), digest, signature).is_ok(),
        (RsaScheme::Pkcs1v15, 48) => key.verify(Pkcs1v15Sign::new::<Sha384>(), digest, signature).is_ok(),
        (RsaScheme::Pkcs1v15, 64) => key.verify(Pkcs1v15Sign::new::<Sha512>(), digest, signature).is_ok(),
        _ => false,
    }
}

/// Passes on a signature a device made only if it verifies under the key's
/// public half. An RSA signature corrupted by a fault in the device's CRT
/// computation gives away the key's factors (the Bellcore attack), so a
/// faulty one is withheld. Other key types pass through unchecked.
///
/// # Errors
/// [`BackendError::Failed`] naming `backend` when an RSA signature does not verify.
pub fn release_signature(
    backend: &'static str,
    key_type: KeyType,
    spki_der: &[u8],
    digest: &[u8],
    signature: Vec<u8>,
) -> Result<Vec<u8>, BackendError> {
    if key_type.rsa().is_none() || verify(key_type, spki_der, digest, &signature) {
        return Ok(signature);
    }
    Err(BackendError::Failed {
        backend,
        reason: "the device returned an RSA signature that does not verify; it was withheld".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs every vector of a Wycheproof RSA verification set through
    /// hsmd's own `verify`: a valid vector must verify, an invalid one must
    /// not. The two schemes' sets are distinct types with the same fields.
    macro_rules! wycheproof_set {
        ($module:ident, $name:expr, $key_type:expr) => {{
            use wycheproof::TestResult;
            let (name, key_type) = ($name, $key_type);
            let mut ran = 0;
            for group in wycheproof::$module::TestSet::load(name).unwrap().test_groups {
                for t in group.tests {
                    let digest = <Sha256 as sha2::Digest>::digest(&t.msg);
                    let ok = verify(key_type, &group.der, &digest, &t.sig);
                    match t.result {
                        TestResult::Valid => assert!(ok, "{name:?} tc {} ({}) should verify", t.tc_id, t.comment),
                        TestResult::Invalid => {
                            assert!(!ok, "{name:?} tc {} ({}) must not verify", t.tc_id, t.comment);
                        }
                        TestResult::Acceptable => {}
                    }
                    ran += 1;
                }
            }
            ran
        }};
    }

    /// Wycheproof's verification sets for the schemes and sizes hsmd makes.
    #[test]
    fn wycheproof_rsa_pss_and_pkcs1_verification() {
        use wycheproof::{rsa_pkcs1_verify::TestName as Pkcs1, rsa_pss_verify::TestName as Pss};
        let ran = wycheproof_set!(rsa_pss_verify, Pss::RsaPss2048Sha256Mgf1SaltLen32, KeyType::RsaPss2048)
            + wycheproof_set!(rsa_pss_verify, Pss::RsaPss3072Sha256Mgf1SaltLen32, KeyType::RsaPss3072)
            + wycheproof_set!(rsa_pss_verify, Pss::RsaPss4096Sha256Mgf1SaltLen32, KeyType::RsaPss4096)
            + wycheproof_set!(rsa_pkcs1_verify, Pkcs1::Rsa2048Sha256, KeyType::RsaPkcs1_2048)
            + wycheproof_set!(rsa_pkcs1_verify, Pkcs1::Rsa3072Sha256, KeyType::RsaPkcs1_3072)
            + wycheproof_set!(rsa_pkcs1_verify, Pkcs1::Rsa4096Sha256, KeyType::RsaPkcs1_4096);
        assert!(ran > 400, "ran {ran} vectors");
    }

    #[test]
    fn a_key_of_another_size_or_exponent_is_refused() {
        let n2048 = {
            let mut n = vec![0xff; 256];
            n[255] = 0xf1;
            n
        };
        assert!(spki(KeyType::RsaPss2048, &n2048, &[1, 0, 1]).is_some());
        assert!(spki(KeyType::RsaPss3072, &n2048, &[1, 0, 1]).is_none(), "size");
        assert!(spki(KeyType::RsaPss2048, &n2048, &[3]).is_none(), "exponent");
        assert!(spki(KeyType::EcdsaP256, &n2048, &[1, 0, 1]).is_none(), "not RSA");
        let der = spki(KeyType::RsaPkcs1_2048, &n2048, &[1, 0, 1]).unwrap();
        // A 2048-bit key is never valid for a 4096-bit type, nor a PSS
        // signature check for garbage.
        assert!(!verify(KeyType::RsaPss4096, &der, &[0; 32], &[0; 512]));
        assert!(!verify(KeyType::RsaPss2048, &der, &[0; 32], &[0; 255]));
    }

    #[test]
    fn a_faulty_rsa_signature_is_withheld_and_a_good_one_released() {
        use wycheproof::rsa_pss_verify::{TestName, TestSet};
        let set = TestSet::load(TestName::RsaPss2048Sha256Mgf1SaltLen32).unwrap();
        let group = &set.test_groups[0];
        let t = group
            .tests
            .iter()
            .find(|t| t.result == wycheproof::TestResult::Valid)
            .unwrap();
        let digest = <Sha256 as sha2::Digest>::digest(&t.msg);
        let good = release_signature("pkcs11", KeyType::RsaPss2048, &group.der, &digest, t.sig.to_vec());
        assert_eq!(good.unwrap(), t.sig.to_vec());
        let mut faulty = t.sig.to_vec();
        faulty[17] ^= 0x40;
        let e = release_signature("tpm", KeyType::RsaPss2048, &group.der, &digest, faulty).unwrap_err();
        assert!(
            matches!(&e, BackendError::Failed { backend: "tpm", reason } if reason.contains("withheld")),
            "{e}"
        );
        // Not RSA: not this check's business (ECDSA is verified by clients).
        assert!(release_signature("tpm", KeyType::EcdsaP256, &[], &[0; 32], vec![1]).is_ok());
    }

    #[test]
    fn the_digest_info_prefixes_are_rfc_8017s() {
        // RFC 8017 §9.2 note 1.
        let hexes = [32, 48, 64].map(|n| hex::encode(digest_info(n).unwrap()));
        assert_eq!(
            hexes,
            [
                "3031300d060960864801650304020105000420",
                "3041300d060960864801650304020205000430",
                "3051300d060960864801650304020305000440",
            ]
        );
        assert!(digest_info(20).is_none());
    }
}
