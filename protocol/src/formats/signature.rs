//! Signature files: UTF-8 text, one `name: value` per line after a fixed
//! first line. Only the key, version and signature are read back; the type and
//! digest lines tell a reader what was signed.
//!
//! ```text
//! hsmd-signature v1
//! key: release
//! version: 2
//! type: ed25519
//! digest: sha512
//! signature: <base64 of the raw signature>
//! ```

use base64::{engine::general_purpose::STANDARD, Engine as _};

use super::FormatError;
use crate::KeyType;

/// The first line of a signature file.
pub const MAGIC: &str = "hsmd-signature v1";

/// The digest a key type's signatures cover (hsmd signs a digest the client
/// computed): SHA-512 for Ed25519, SHA-384 for ECDSA P-384, SHA-256 otherwise.
#[must_use]
pub fn digest_name(t: KeyType) -> &'static str {
    match t {
        KeyType::Ed25519 => "sha512",
        KeyType::EcdsaP384 => "sha384",
        _ => "sha256",
    }
}

/// A signature file's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureFile {
    /// The key's name.
    pub key: String,
    /// The key version that signed.
    pub version: u32,
    /// The raw signature (64 bytes for Ed25519, DER for ECDSA, the modulus
    /// length for RSA).
    pub signature: Vec<u8>,
}

/// The text of a signature file.
#[must_use]
pub fn write(key: &str, version: u32, t: KeyType, signature: &[u8]) -> String {
    format!(
        "{MAGIC}\nkey: {key}\nversion: {version}\ntype: {}\ndigest: {}\nsignature: {}\n",
        t.as_str(),
        digest_name(t),
        STANDARD.encode(signature)
    )
}

/// Reads a signature file's text.
///
/// # Errors
/// [`FormatError::NotThisFormat`] if the first line is not [`MAGIC`];
/// [`FormatError::Invalid`] if the key, version or signature line is missing
/// or malformed.
pub fn parse(text: &str) -> Result<SignatureFile, FormatError> {
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(FormatError::NotThisFormat(
            "an hsmd signature file (its first line is not \"hsmd-signature v1\"); use --format raw for bare signatures",
        ));
    }
    let (mut key, mut version, mut signature) = (None, None, None);
    for line in lines {
        match line.split_once(": ") {
            Some(("key", v)) => key = Some(v.to_owned()),
            Some(("version", v)) => version = v.parse().ok(),
            Some(("signature", v)) => signature = STANDARD.decode(v).ok(),
            _ => {}
        }
    }
    match (key, version, signature) {
        (Some(key), Some(version), Some(signature)) => Ok(SignatureFile {
            key,
            version,
            signature,
        }),
        _ => Err(FormatError::Invalid(
            "the signature file lacks a valid key, version or signature line".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_files_round_trip_and_foreign_text_is_refused() {
        let text = write("rel", 3, KeyType::Ed25519, &[1, 2, 3]);
        assert!(text.contains("digest: sha512"));
        assert_eq!(
            parse(&text).ok(),
            Some(SignatureFile {
                key: "rel".into(),
                version: 3,
                signature: vec![1, 2, 3]
            })
        );
        assert!(matches!(parse("hello"), Err(FormatError::NotThisFormat(_))));
        assert!(matches!(parse(MAGIC), Err(FormatError::Invalid(_))));
    }
}
