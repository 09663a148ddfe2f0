//! The mechanisms the module offers, and how each signing one becomes one hsmd
//! request: a digest for `Sign` (or `Verify`), or a whole message for
//! `SignMessage` (or `VerifyMessage`).
//!
//! hash-and-sign mechanisms are hashed here, part by part, so data of any size
//! costs one request; hsmd signs the digest with the key. The exceptions are
//! pure EdDSA, which signs the message itself, and RSA PKCS#1 v1.5 over
//! SHA-384/512, which hsmd's `Sign` (SHA-256 digests for RSA) cannot take:
//! both send the message (at most [`protocol::MAX_SIGN_MESSAGE`] bytes).

use cryptoki_sys::*;
use protocol::{HashAlg, KeyType, RsaScheme};
use sha2::Digest as _;

use crate::{
    error::{Error, Result},
    objects::{rsa_scheme, signature_len, Object},
};

/// The DER DigestInfo prefix of a SHA-256 digest (RFC 8017 §9.2 note 1).
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20,
];

/// The most bytes a single-part mechanism (a caller's own digest) takes.
const MAX_RAW_INPUT: usize = 1024;

/// The PSS parameters hsmd's RSA-PSS keys sign with: SHA-256, MGF1-SHA-256,
/// a 32-byte salt. A key type binds them, so no other is accepted.
const PSS_PARAMS: (CK_MECHANISM_TYPE, CK_RSA_PKCS_MGF_TYPE, CK_ULONG) = (CKM_SHA256, CKG_MGF1_SHA256, 32);

/// The mechanisms `C_GetMechanismList` names, with their `CK_MECHANISM_INFO`.
pub const MECHANISMS: &[(CK_MECHANISM_TYPE, CK_ULONG, CK_ULONG, CK_FLAGS)] = &[
    (CKM_ECDSA, 256, 384, CKF_SIGN | CKF_VERIFY | EC_FLAGS),
    (CKM_ECDSA_SHA256, 256, 384, CKF_SIGN | CKF_VERIFY | EC_FLAGS),
    (CKM_ECDSA_SHA384, 256, 384, CKF_SIGN | CKF_VERIFY | EC_FLAGS),
    (CKM_ECDSA_SHA512, 256, 384, CKF_SIGN | CKF_VERIFY | EC_FLAGS),
    (CKM_EDDSA, 255, 255, CKF_SIGN | CKF_VERIFY | EC_FLAGS),
    (CKM_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA256_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA384_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA512_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_RSA_PKCS_PSS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA256_RSA_PKCS_PSS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_EC_KEY_PAIR_GEN, 256, 384, CKF_GENERATE_KEY_PAIR | EC_FLAGS),
    (CKM_EC_EDWARDS_KEY_PAIR_GEN, 255, 255, CKF_GENERATE_KEY_PAIR | EC_FLAGS),
    (CKM_RSA_PKCS_KEY_PAIR_GEN, 2048, 4096, CKF_GENERATE_KEY_PAIR),
    // Key sizes in bytes for AES. No CKF_ENCRYPT: hsmd draws every IV, so it
    // encrypts through the message interface only (see `cipher`).
    (
        CKM_AES_GCM,
        32,
        32,
        CKF_DECRYPT | CKF_MESSAGE_ENCRYPT | CKF_MESSAGE_DECRYPT,
    ),
    (CKM_AES_KEY_GEN, 32, 32, CKF_GENERATE),
];

const EC_FLAGS: CK_FLAGS = CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;

/// A mechanism as the caller passed it, its parameters read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mechanism {
    /// `CKM_*`.
    pub kind: CK_MECHANISM_TYPE,
    /// What the parameter said.
    pub params: Params,
}

/// The parameters of the mechanisms that take some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Params {
    /// No parameter.
    None,
    /// `CK_RSA_PKCS_PSS_PARAMS`: hash, MGF, salt length.
    Pss(CK_MECHANISM_TYPE, CK_RSA_PKCS_MGF_TYPE, CK_ULONG),
    /// `CK_EDDSA_PARAMS`: whether prehashed (Ed25519ph), and the context's length.
    Eddsa {
        /// `phFlag`.
        prehash: bool,
        /// `ulContextDataLen`.
        context_len: CK_ULONG,
    },
    /// `CK_GCM_PARAMS`.
    Gcm(crate::cipher::GcmParams),
    /// A parameter this module does not read for this mechanism.
    Other,
}

/// The data collected so far, by what the mechanism does with it.
#[derive(Debug)]
enum Input {
    /// The caller's own digest (single-part mechanisms).
    Raw(Raw, Vec<u8>),
    /// A message hsmd signs whole, over its own hash of it.
    Message(Vec<u8>, Option<HashAlg>),
    /// Hashed here as it arrives.
    Sha256(sha2::Sha256),
    /// Hashed here as it arrives.
    Sha384(sha2::Sha384),
    /// Hashed here as it arrives.
    Sha512(sha2::Sha512),
}

/// The mechanisms that take the caller's digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Raw {
    /// `CKM_ECDSA`.
    Ecdsa,
    /// `CKM_RSA_PKCS` over a DigestInfo.
    RsaPkcs,
    /// `CKM_RSA_PKCS_PSS` over a SHA-256 digest.
    RsaPss,
}

/// What to ask hsmd for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `Sign` over this digest.
    Digest(Vec<u8>),
    /// `SignMessage` over this message with this hash.
    Message(Vec<u8>, Option<HashAlg>),
}

/// A signing or verifying operation between `C_SignInit` (`C_VerifyInit`)
/// and its end.
#[derive(Debug)]
pub struct SignOp {
    /// The key object.
    pub key: std::sync::Arc<Object>,
    input: Input,
}

fn wrong_key(mech: CK_MECHANISM_TYPE, key: &Object) -> Error {
    Error::call(
        CKR_KEY_TYPE_INCONSISTENT,
        format!(
            "mechanism {mech:#x} cannot be used with key {:?}, an {} key",
            key.name,
            key.key_type.as_str()
        ),
    )
}

impl SignOp {
    /// Starts signing with `key`.
    ///
    /// # Errors
    /// `CKR_MECHANISM_INVALID` for a mechanism not offered,
    /// `CKR_KEY_TYPE_INCONSISTENT` for one the key's type does not sign with,
    /// `CKR_MECHANISM_PARAM_INVALID` for parameters hsmd's key cannot honour.
    pub fn new(mech: &Mechanism, key: std::sync::Arc<Object>) -> Result<Self> {
        let ecdsa = matches!(key.key_type, KeyType::EcdsaP256 | KeyType::EcdsaP384);
        let scheme = rsa_scheme(key.key_type);
        let pkcs1 = scheme == Some(RsaScheme::Pkcs1v15);
        let pss = scheme == Some(RsaScheme::Pss);
        let input = match mech.kind {
            CKM_ECDSA if ecdsa => Input::Raw(Raw::Ecdsa, Vec::new()),
            CKM_ECDSA_SHA256 if ecdsa => Input::Sha256(sha2::Sha256::new()),
            CKM_ECDSA_SHA384 if ecdsa => Input::Sha384(sha2::Sha384::new()),
            CKM_ECDSA_SHA512 if ecdsa => Input::Sha512(sha2::Sha512::new()),
            CKM_EDDSA if key.key_type == KeyType::Ed25519 => Input::Message(Vec::new(), None),
            CKM_RSA_PKCS if pkcs1 => Input::Raw(Raw::RsaPkcs, Vec::new()),
            CKM_SHA256_RSA_PKCS if pkcs1 => Input::Sha256(sha2::Sha256::new()),
            CKM_SHA384_RSA_PKCS if pkcs1 => Input::Message(Vec::new(), Some(HashAlg::Sha384)),
            CKM_SHA512_RSA_PKCS if pkcs1 => Input::Message(Vec::new(), Some(HashAlg::Sha512)),
            CKM_RSA_PKCS_PSS if pss => Input::Raw(Raw::RsaPss, Vec::new()),
            CKM_SHA256_RSA_PKCS_PSS if pss => Input::Sha256(sha2::Sha256::new()),
            other
                if MECHANISMS
                    .iter()
                    .any(|m| m.0 == other && m.3 & (CKF_SIGN | CKF_VERIFY) != 0) =>
            {
                return Err(wrong_key(other, &key))
            }
            other => {
                return Err(Error::call(
                    CKR_MECHANISM_INVALID,
                    format!("mechanism {other:#x} is not one hsmd signs with"),
                ))
            }
        };
        let is_pss = matches!(mech.kind, CKM_RSA_PKCS_PSS | CKM_SHA256_RSA_PKCS_PSS);
        match &mech.params {
            Params::Pss(h, m, s) if is_pss && (*h, *m, *s) == PSS_PARAMS => {}
            _ if is_pss => {
                return Err(Error::call(
                    CKR_MECHANISM_PARAM_INVALID,
                    format!(
                        "key {:?} signs RSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt only",
                        key.name
                    ),
                ))
            }
            Params::Eddsa {
                prehash: false,
                context_len: 0,
            }
            | Params::None => {}
            Params::Eddsa { .. } if mech.kind == CKM_EDDSA => {
                return Err(Error::call(
                    CKR_MECHANISM_PARAM_INVALID,
                    "hsmd signs pure Ed25519 only: no prehash (Ed25519ph) and no context (Ed25519ctx)",
                ))
            }
            _ => {
                return Err(Error::call(
                    CKR_MECHANISM_PARAM_INVALID,
                    format!("mechanism {:#x} takes no parameter", mech.kind),
                ))
            }
        }
        Ok(Self { key, input })
    }

    /// The signature's length.
    #[must_use]
    pub fn signature_len(&self) -> usize {
        signature_len(self.key.key_type)
    }

    /// Takes the next part of the data.
    ///
    /// # Errors
    /// `CKR_DATA_LEN_RANGE` when a message hsmd must see whole grows past what
    /// it signs, or a digest past any digest's length.
    pub fn update(&mut self, data: &[u8]) -> Result<()> {
        match &mut self.input {
            Input::Sha256(h) => h.update(data),
            Input::Sha384(h) => h.update(data),
            Input::Sha512(h) => h.update(data),
            Input::Raw(_, buf) => extend(buf, data, MAX_RAW_INPUT)?,
            Input::Message(buf, _) => extend(buf, data, protocol::MAX_SIGN_MESSAGE)?,
        }
        Ok(())
    }

    /// What to ask hsmd for, the data all given.
    ///
    /// # Errors
    /// `CKR_DATA_INVALID` or `CKR_DATA_LEN_RANGE` for a caller's digest hsmd's
    /// key cannot sign.
    pub fn request(self) -> Result<Request> {
        let key_type = self.key.key_type;
        let hashed = |digest: Vec<u8>| match key_type {
            KeyType::EcdsaP256 | KeyType::EcdsaP384 => Request::Digest(fit_to_curve(&digest, key_type)),
            _ => Request::Digest(digest),
        };
        Ok(match self.input {
            Input::Sha256(h) => hashed(h.finalize().to_vec()),
            Input::Sha384(h) => hashed(h.finalize().to_vec()),
            Input::Sha512(h) => hashed(h.finalize().to_vec()),
            Input::Message(message, hash) => Request::Message(message, hash),
            Input::Raw(Raw::Ecdsa, digest) => Request::Digest(fit_to_curve(&digest, key_type)),
            Input::Raw(Raw::RsaPkcs, info) => match info.strip_prefix(&SHA256_DIGEST_INFO[..]) {
                Some(digest) if digest.len() == 32 => Request::Digest(digest.to_vec()),
                _ => {
                    return Err(Error::call(
                        CKR_DATA_INVALID,
                        "CKM_RSA_PKCS through hsmd signs a SHA-256 DigestInfo only (51 bytes); use \
                         CKM_SHA384_RSA_PKCS or CKM_SHA512_RSA_PKCS for other hashes",
                    ))
                }
            },
            Input::Raw(Raw::RsaPss, digest) if digest.len() == 32 => Request::Digest(digest),
            Input::Raw(Raw::RsaPss, digest) => {
                return Err(Error::call(
                    CKR_DATA_LEN_RANGE,
                    format!(
                        "CKM_RSA_PKCS_PSS signs a 32-byte SHA-256 digest, not {} bytes",
                        digest.len()
                    ),
                ))
            }
        })
    }
}

/// A PKCS#11 signature in hsmd's encoding (the reverse of [`encode`]).
///
/// # Errors
/// `CKR_SIGNATURE_LEN_RANGE` for a signature of the wrong length;
/// `CKR_SIGNATURE_INVALID` for ECDSA halves out of range.
pub fn decode(key_type: KeyType, signature: &[u8]) -> Result<Vec<u8>> {
    if signature.len() != signature_len(key_type) {
        return Err(Error::call(
            CKR_SIGNATURE_LEN_RANGE,
            format!(
                "an {} signature is {} bytes, not {}",
                key_type.as_str(),
                signature_len(key_type),
                signature.len()
            ),
        ));
    }
    let invalid = || Error::call(CKR_SIGNATURE_INVALID, "r or s is out of range");
    Ok(match key_type {
        KeyType::EcdsaP256 => p256::ecdsa::Signature::from_slice(signature)
            .map_err(|_| invalid())?
            .to_der()
            .as_bytes()
            .to_vec(),
        KeyType::EcdsaP384 => p384::ecdsa::Signature::from_slice(signature)
            .map_err(|_| invalid())?
            .to_der()
            .as_bytes()
            .to_vec(),
        _ => signature.to_vec(),
    })
}

/// hsmd's signature in PKCS#11's encoding: ECDSA as `r || s` (hsmd answers
/// DER), the others as they are.
///
/// # Errors
/// `CKR_DEVICE_ERROR` for a signature of the wrong form.
pub fn encode(key_type: KeyType, signature: &[u8]) -> Result<Vec<u8>> {
    let bad = || Error::call(CKR_DEVICE_ERROR, "hsmd's signature is not of the key's form");
    let out = match key_type {
        KeyType::EcdsaP256 => p256::ecdsa::Signature::from_der(signature)
            .map_err(|_| bad())?
            .to_bytes()
            .to_vec(),
        KeyType::EcdsaP384 => p384::ecdsa::Signature::from_der(signature)
            .map_err(|_| bad())?
            .to_bytes()
            .to_vec(),
        _ => signature.to_vec(),
    };
    if out.len() != signature_len(key_type) {
        return Err(bad());
    }
    Ok(out)
}

fn extend(buf: &mut Vec<u8>, data: &[u8], max: usize) -> Result<()> {
    if buf.len() + data.len() > max {
        return Err(Error::call(
            CKR_DATA_LEN_RANGE,
            format!("hsmd signs at most {max} bytes with this mechanism"),
        ));
    }
    buf.extend_from_slice(data);
    Ok(())
}

/// An ECDSA digest as the curve's order takes it (FIPS 186-5 §6.4.1): the
/// leftmost bytes of a longer hash, a shorter one zero-extended on the left.
/// Both give the same integer ECDSA signs, so hsmd's fixed-length `Sign`
/// serves any hash.
fn fit_to_curve(hash: &[u8], key_type: KeyType) -> Vec<u8> {
    let n = if key_type == KeyType::EcdsaP384 { 48 } else { 32 };
    if hash.len() >= n {
        hash[..n].to_vec()
    } else {
        let mut out = vec![0; n - hash.len()];
        out.extend_from_slice(hash);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_fit_the_curve_as_ecdsa_truncates() {
        let h: Vec<u8> = (1..=64).collect();
        assert_eq!(fit_to_curve(&h, KeyType::EcdsaP256), h[..32]);
        assert_eq!(fit_to_curve(&h, KeyType::EcdsaP384), h[..48]);
        let short = fit_to_curve(&[9; 20], KeyType::EcdsaP256);
        assert_eq!(&short[..12], &[0; 12]);
        assert_eq!(&short[12..], &[9; 20]);
    }
}
