//! hsmd's keys and signatures in OpenSSH's encodings (RFC 4253 §6.6, RFC 5656,
//! RFC 8332, RFC 8709): the public key blob and `authorized_keys` line of a
//! key, and the SSH signature blob around a signature hsmd made. What both
//! `hsmctl key public --format openssh` and hsmd's agent socket write.
//!
//! OpenSSH takes Ed25519, ECDSA on nistp256 and nistp384, and RSA with
//! PKCS#1 v1.5 padding (`rsa-sha2-256`, `rsa-sha2-512`); it has no RSA-PSS,
//! so `rsa-pss` keys have no OpenSSH form.

use ssh_key::{
    public::{EcdsaPublicKey, Ed25519PublicKey, KeyData, RsaPublicKey},
    Algorithm, EcdsaCurve, PublicKey, Signature,
};

use super::FormatError;
use crate::{HashAlg, KeyType, RsaScheme};

fn invalid(why: impl std::fmt::Display) -> FormatError {
    FormatError::Invalid(why.to_string())
}

/// The DER prefix of every Ed25519 SubjectPublicKeyInfo (RFC 8410 §4): the
/// 32-byte key follows it.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// Whether OpenSSH takes keys of this type.
#[must_use]
pub fn has_ssh_form(key_type: KeyType) -> bool {
    base_algorithm(key_type).is_ok()
}

/// The SSH signature algorithm of a key type with its own hash: `ssh-ed25519`,
/// `ecdsa-sha2-nistp256/384`, `rsa-sha2-256`.
fn base_algorithm(key_type: KeyType) -> Result<Algorithm, FormatError> {
    Ok(match key_type {
        KeyType::Ed25519 => Algorithm::Ed25519,
        KeyType::EcdsaP256 => Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256,
        },
        KeyType::EcdsaP384 => Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP384,
        },
        t if matches!(t.rsa(), Some((_, RsaScheme::Pkcs1v15))) => Algorithm::Rsa {
            hash: Some(ssh_key::HashAlg::Sha256),
        },
        t if t.rsa().is_some() => {
            return Err(invalid(format!(
                "an {} key has no OpenSSH form: OpenSSH signs with RSA PKCS#1 v1.5 only; use an rsa-pkcs1 key for SSH",
                t.as_str()
            )))
        }
        other => {
            return Err(invalid(format!(
                "an {} key has no OpenSSH form (OpenSSH takes ed25519, ecdsa-p256, ecdsa-p384 and rsa-pkcs1 keys)",
                other.as_str()
            )))
        }
    })
}

/// The SSH signature algorithm of a signature hsmd makes with `SignMessage`
/// over `message_hash` (`None`: the key type's own hash).
///
/// # Errors
/// [`FormatError::Invalid`] for a key type OpenSSH does not take, or a hash
/// SSH has no algorithm for with that key (only RSA keys choose: SHA-256 or
/// SHA-512).
pub fn algorithm(key_type: KeyType, message_hash: Option<HashAlg>) -> Result<Algorithm, FormatError> {
    match (base_algorithm(key_type)?, message_hash) {
        (Algorithm::Rsa { .. }, Some(HashAlg::Sha512)) => Ok(Algorithm::Rsa {
            hash: Some(ssh_key::HashAlg::Sha512),
        }),
        (Algorithm::Rsa { .. }, Some(HashAlg::Sha256)) | (_, None) => base_algorithm(key_type),
        (_, Some(other)) => Err(invalid(format!(
            "an SSH signature of an {} key is not over {}",
            key_type.as_str(),
            other.as_str()
        ))),
    }
}

/// The key's SSH public key, from the SubjectPublicKeyInfo hsmd answers
/// `KeyPublic` with.
///
/// # Errors
/// [`FormatError::Invalid`] for a key type OpenSSH does not take, or a
/// SubjectPublicKeyInfo that is not a key of that type.
pub fn key_data(key_type: KeyType, spki_der: &[u8]) -> Result<KeyData, FormatError> {
    use p256::pkcs8::DecodePublicKey as _;
    base_algorithm(key_type)?;
    let bad = |e: &dyn std::fmt::Display| invalid(format!("the {} public key does not parse: {e}", key_type.as_str()));
    Ok(match key_type {
        KeyType::Ed25519 => {
            let raw = spki_der
                .strip_prefix(&ED25519_SPKI_PREFIX[..])
                .filter(|k| k.len() == 32)
                .ok_or_else(|| bad(&"not an Ed25519 SubjectPublicKeyInfo"))?;
            KeyData::Ed25519(Ed25519PublicKey::try_from(raw).map_err(|e| bad(&e))?)
        }
        KeyType::EcdsaP256 => KeyData::Ecdsa(EcdsaPublicKey::from(
            p256::ecdsa::VerifyingKey::from_public_key_der(spki_der).map_err(|e| bad(&e))?,
        )),
        KeyType::EcdsaP384 => KeyData::Ecdsa(EcdsaPublicKey::from(
            p384::ecdsa::VerifyingKey::from_public_key_der(spki_der).map_err(|e| bad(&e))?,
        )),
        _ => {
            let key = rsa::RsaPublicKey::from_public_key_der(spki_der).map_err(|e| bad(&e))?;
            KeyData::Rsa(RsaPublicKey::try_from(&key).map_err(|e| bad(&e))?)
        }
    })
}

/// The key's `authorized_keys` line (`ALGORITHM BASE64 COMMENT`, no newline).
///
/// # Errors
/// As [`key_data`].
pub fn public_line(key_type: KeyType, spki_der: &[u8], comment: &str) -> Result<String, FormatError> {
    PublicKey::new(key_data(key_type, spki_der)?, comment)
        .to_openssh()
        .map_err(|e| invalid(format!("cannot write the OpenSSH public key: {e}")))
}

/// The comment hsmd gives a key's OpenSSH public key: `hsmd:NAME`.
#[must_use]
pub fn comment(name: &str) -> String {
    format!("hsmd:{name}")
}

/// Wraps a signature as hsmd encodes it (64 bytes for Ed25519, DER for
/// ECDSA, the modulus length for RSA) into SSH's signature (RFC 4253 §6.6:
/// the algorithm and the blob), for `message_hash` as given to
/// `SignMessage`.
///
/// # Errors
/// [`FormatError::Invalid`] as [`algorithm`], or for a malformed signature.
pub fn signature(key_type: KeyType, signature: &[u8], message_hash: Option<HashAlg>) -> Result<Signature, FormatError> {
    let alg = algorithm(key_type, message_hash)?;
    match key_type {
        KeyType::EcdsaP256 => Signature::try_from(
            p256::ecdsa::Signature::from_der(signature).map_err(|e| invalid(format!("the ECDSA signature: {e}")))?,
        ),
        KeyType::EcdsaP384 => Signature::try_from(
            p384::ecdsa::Signature::from_der(signature).map_err(|e| invalid(format!("the ECDSA signature: {e}")))?,
        ),
        _ => Signature::new(alg, signature.to_vec()),
    }
    .map_err(|e| invalid(format!("the signature: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ed25519_lines_follow_rfc_8709() {
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&[7u8; 32]);
        let line = public_line(KeyType::Ed25519, &spki, "hsmd:k").unwrap();
        assert!(line.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"), "{line}");
        assert!(line.ends_with(" hsmd:k"), "{line}");
        spki.pop();
        assert!(key_data(KeyType::Ed25519, &spki).is_err());
    }

    #[test]
    fn rsa_pss_and_symmetric_keys_have_no_openssh_form() {
        let e = key_data(KeyType::RsaPss2048, &[]).unwrap_err().to_string();
        assert!(e.contains("PKCS#1 v1.5 only"), "{e}");
        assert!(key_data(KeyType::Aes256Gcm, &[]).is_err());
        assert!(!has_ssh_form(KeyType::HmacSha256));
        assert!(has_ssh_form(KeyType::RsaPkcs1_3072));
    }

    #[test]
    fn only_rsa_keys_choose_their_hash() {
        assert_eq!(
            algorithm(KeyType::RsaPkcs1_2048, Some(HashAlg::Sha512))
                .unwrap()
                .as_str(),
            "rsa-sha2-512"
        );
        assert_eq!(
            algorithm(KeyType::RsaPkcs1_2048, None).unwrap().as_str(),
            "rsa-sha2-256"
        );
        assert!(algorithm(KeyType::EcdsaP256, Some(HashAlg::Sha512)).is_err());
        assert!(algorithm(KeyType::Ed25519, Some(HashAlg::Sha256)).is_err());
    }
}
