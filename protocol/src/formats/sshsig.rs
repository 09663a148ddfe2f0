//! SSH signatures (OpenSSH's `PROTOCOL.sshsig`), as `ssh-keygen -Y sign`
//! writes and `ssh-keygen -Y verify` and git (`gpg.format = ssh`) read them.
//!
//! A signature covers a *signed-data* blob, not the file: the namespace (what
//! the signature is for, e.g. `git` or `file`), the hash algorithm, and the
//! file's hash. hsmd signs that blob as a message (`SignMessage`): pure
//! Ed25519, ECDSA with the curve's hash (SHA-256 for nistp256, SHA-384 for
//! nistp384), RSA PKCS#1 v1.5 with SHA-256 (`rsa-sha2-256`). The envelope and
//! its armor are `ssh-key`'s.
//!
//! ```text
//! signed data = "SSHSIG" | string namespace | string reserved ("") | string hash_alg | string H(file)
//! ```

use ssh_key::{Algorithm, LineEnding, PublicKey, SshSig};

use super::FormatError;
use crate::KeyType;

/// The file hash written into new signatures (what `ssh-keygen -Y sign` uses).
pub const HASH: &str = "sha512";

fn invalid(why: impl std::fmt::Display) -> FormatError {
    FormatError::Invalid(why.to_string())
}

/// A file's hash, as one of the algorithms SSH signatures use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHash {
    /// `sha256` or `sha512`.
    pub algorithm: &'static str,
    /// The hash of the file.
    pub digest: Vec<u8>,
}

/// The blob an SSH signature covers: namespace, hash algorithm and the file's hash.
///
/// # Errors
/// [`FormatError::Invalid`] for an empty namespace.
pub fn signed_data(namespace: &str, hash: &FileHash) -> Result<Vec<u8>, FormatError> {
    if namespace.is_empty() {
        return Err(invalid("an SSH signature needs a namespace (-n), e.g. git or file"));
    }
    let mut out = b"SSHSIG".to_vec();
    for field in [namespace.as_bytes(), b"", hash.algorithm.as_bytes(), &hash.digest] {
        out.extend_from_slice(&u32::try_from(field.len()).map_err(invalid)?.to_be_bytes());
        out.extend_from_slice(field);
    }
    Ok(out)
}

/// Wraps hsmd's signature over [`signed_data`] into an armored SSH signature.
/// `public` is the key's `authorized_keys` line; `signature` is as hsmd
/// encodes it (64 bytes for Ed25519, DER for ECDSA, the modulus length for RSA);
/// `message_hash` is the hash `SignMessage` was asked for: `None` (the key
/// type's own), or SHA-512 for an RSA key's `rsa-sha2-512`.
///
/// # Errors
/// [`FormatError::Invalid`] for a key type SSH does not take, an unreadable
/// public key or a malformed signature.
pub fn armor(
    public: &str,
    key_type: KeyType,
    namespace: &str,
    hash: &FileHash,
    signature: &[u8],
    message_hash: Option<crate::HashAlg>,
) -> Result<String, FormatError> {
    let key = PublicKey::from_openssh(public.trim()).map_err(|e| invalid(format!("the public key: {e}")))?;
    let sig = super::openssh::signature(key_type, signature, message_hash)?;
    let hash_alg = match hash.algorithm {
        "sha256" => ssh_key::HashAlg::Sha256,
        _ => ssh_key::HashAlg::Sha512,
    };
    SshSig::new(key.key_data().clone(), namespace, hash_alg, sig)
        .and_then(|s| s.to_pem(LineEnding::LF))
        .map_err(|e| invalid(format!("cannot write the SSH signature: {e}")))
}

/// An SSH signature, read and checked against what the caller expects.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The hash of the file it names: the algorithm to hash the file with.
    pub hash_algorithm: &'static str,
    /// The signature as hsmd encodes it (DER for ECDSA).
    pub signature: Vec<u8>,
    /// The hash the signature is over, for `VerifyMessage`: `None` for the key
    /// type's own; SHA-512 for an `rsa-sha2-512` signature.
    pub message_hash: Option<crate::HashAlg>,
}

/// Reads an armored SSH signature made for `namespace` by the key whose
/// `authorized_keys` line is `public`.
///
/// # Errors
/// [`FormatError::NotThisFormat`] for anything else; [`FormatError::Invalid`]
/// when it names another key, another namespace, or a signature algorithm
/// hsmd's key does not make.
pub fn parse(text: &str, public: &str, key_type: KeyType, namespace: &str) -> Result<Parsed, FormatError> {
    let sig = SshSig::from_pem(text.trim()).map_err(|_| FormatError::NotThisFormat("an SSH signature"))?;
    let key = PublicKey::from_openssh(public.trim()).map_err(|e| invalid(format!("the public key: {e}")))?;
    if sig.public_key() != key.key_data() {
        return Err(invalid("the SSH signature was made by another key"));
    }
    if sig.namespace() != namespace {
        return Err(invalid(format!(
            "the SSH signature is for namespace {:?}, not {namespace:?}",
            sig.namespace()
        )));
    }
    let rsa_sha512 = Algorithm::Rsa {
        hash: Some(ssh_key::HashAlg::Sha512),
    };
    let message_hash =
        if matches!(key_type.rsa(), Some((_, crate::RsaScheme::Pkcs1v15))) && sig.algorithm() == rsa_sha512 {
            Some(crate::HashAlg::Sha512)
        } else if sig.algorithm() == super::openssh::algorithm(key_type, None)? {
            None
        } else {
            return Err(invalid(format!(
                "the SSH signature is {}, which an {} key in hsmd does not make",
                sig.algorithm(),
                key_type.as_str()
            )));
        };
    let signature = match key_type {
        KeyType::EcdsaP256 => p256::ecdsa::Signature::try_from(sig.signature())
            .map(|s| s.to_der().as_bytes().to_vec())
            .map_err(|e| invalid(format!("the ECDSA signature: {e}")))?,
        KeyType::EcdsaP384 => p384::ecdsa::Signature::try_from(sig.signature())
            .map(|s| s.to_der().as_bytes().to_vec())
            .map_err(|e| invalid(format!("the ECDSA signature: {e}")))?,
        _ => sig.signature_bytes().to_vec(),
    };
    let hash_algorithm = match sig.hash_alg() {
        ssh_key::HashAlg::Sha256 => "sha256",
        _ => "sha512",
    };
    Ok(Parsed {
        hash_algorithm,
        signature,
        message_hash,
    })
}

/// Hashes `data` with `algorithm` (`sha256` or `sha512`), for [`FileHash`].
#[must_use]
pub fn hash(algorithm: &str, data: &[u8]) -> FileHash {
    use sha2::Digest as _;
    if algorithm == "sha256" {
        FileHash {
            algorithm: "sha256",
            digest: sha2::Sha256::digest(data).to_vec(),
        }
    } else {
        FileHash {
            algorithm: "sha512",
            digest: sha2::Sha512::digest(data).to_vec(),
        }
    }
}
