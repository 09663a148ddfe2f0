//! `hsmctl key …`, `sign` and `verify`.
//!
//! Files are hashed here, in a stream, so any size fits in bounded memory; only
//! the digest goes to hsmd: SHA-512 for ed25519 (the signature is pure Ed25519
//! over the 64 digest bytes), SHA-256 for ecdsa-p256 and SHA-384 for ecdsa-p384
//! (standard ECDSA over that hash, as `openssl dgst -sha256 -verify` checks).

use std::{
    fs::File,
    io::{self, Read, Write},
    path::Path,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use protocol::{Client, KeyInfo, KeyType, Operation, Reply};
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::Failure;

/// The first line of hsmctl's signature files.
const SIG_MAGIC: &str = "hsmd-signature v1";

fn unexpected(expected: &'static str, got: &Reply) -> Failure {
    Failure::Client(protocol::ClientError::UnexpectedReply {
        expected,
        got: got.name(),
    })
}

/// Fetches one key's metadata.
pub fn info(client: &mut Client, name: &str) -> Result<KeyInfo, Failure> {
    match client.call(Operation::KeyInfo { name: name.to_owned() })? {
        Reply::Key(k) => Ok(k),
        other => Err(unexpected("key-info", &other)),
    }
}

/// The digest algorithm a key type's signatures cover.
fn digest_name(t: KeyType) -> &'static str {
    match t {
        KeyType::Ed25519 => "sha512",
        KeyType::EcdsaP384 => "sha384",
        _ => "sha256",
    }
}

/// Hashes a file (`-` is stdin) with the key type's digest.
pub fn digest_file(t: KeyType, input: &Path) -> Result<Vec<u8>, Failure> {
    let mut reader: Box<dyn Read> = if input == Path::new("-") {
        Box::new(io::stdin().lock())
    } else {
        Box::new(File::open(input).map_err(|e| Failure::Local(format!("cannot open {}: {e}", input.display())))?)
    };
    let mut buf = vec![0u8; 256 * 1024];
    macro_rules! stream {
        ($h:ty) => {{
            let mut h = <$h>::new();
            loop {
                let n = reader
                    .read(&mut buf)
                    .map_err(|e| Failure::Local(format!("cannot read {}: {e}", input.display())))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            h.finalize().to_vec()
        }};
    }
    Ok(match t {
        KeyType::Ed25519 => stream!(Sha512),
        KeyType::EcdsaP384 => stream!(Sha384),
        _ => stream!(Sha256),
    })
}

/// Writes bytes to a file (`-` is stdout).
pub fn write_output(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let result = if path == Path::new("-") {
        let mut out = io::stdout().lock();
        out.write_all(bytes).and_then(|()| out.flush())
    } else {
        std::fs::write(path, bytes)
    };
    result.map_err(|e| Failure::Local(format!("cannot write {}: {e}", path.display())))
}

/// The text of a signature file.
#[must_use]
pub fn signature_file(name: &str, version: u32, t: KeyType, signature: &[u8]) -> String {
    format!(
        "{SIG_MAGIC}\nkey: {name}\nversion: {version}\ntype: {}\ndigest: {}\nsignature: {}\n",
        t.as_str(),
        digest_name(t),
        STANDARD.encode(signature)
    )
}

/// A parsed signature file: key name, version and signature bytes.
pub fn parse_signature_file(text: &str) -> Result<(String, u32, Vec<u8>), String> {
    let mut lines = text.lines();
    if lines.next() != Some(SIG_MAGIC) {
        return Err(format!(
            "not an hsmd signature file (first line is not {SIG_MAGIC:?}); use --format raw for bare signatures"
        ));
    }
    let (mut name, mut version, mut sig) = (None, None, None);
    for line in lines {
        match line.split_once(": ") {
            Some(("key", v)) => name = Some(v.to_owned()),
            Some(("version", v)) => version = v.parse().ok(),
            Some(("signature", v)) => sig = STANDARD.decode(v).ok(),
            _ => {}
        }
    }
    match (name, version, sig) {
        (Some(n), Some(v), Some(s)) => Ok((n, v, s)),
        _ => Err("the signature file lacks a valid key, version or signature line".to_owned()),
    }
}

/// `key public` output in the requested format.
pub fn format_public(t: KeyType, spki_der: &[u8], format: &str) -> Vec<u8> {
    match format {
        "der" => spki_der.to_vec(),
        "raw" => {
            // The key bytes end the SubjectPublicKeyInfo: the 32-byte Ed25519 key,
            // or the uncompressed SEC1 point (65 / 97 bytes).
            let n = match t {
                KeyType::Ed25519 => 32,
                KeyType::EcdsaP384 => 97,
                _ => 65,
            };
            spki_der[spki_der.len().saturating_sub(n)..].to_vec()
        }
        _ => {
            let b64 = STANDARD.encode(spki_der);
            let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
            for chunk in b64.as_bytes().chunks(64) {
                pem.push_str(&String::from_utf8_lossy(chunk));
                pem.push('\n');
            }
            pem.push_str("-----END PUBLIC KEY-----\n");
            pem.into_bytes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_files_round_trip_and_foreign_text_is_refused() {
        let text = signature_file("ci-release", 3, KeyType::EcdsaP256, &[1, 2, 3]);
        assert!(text.contains("digest: sha256"));
        assert_eq!(
            parse_signature_file(&text).unwrap(),
            ("ci-release".into(), 3, vec![1, 2, 3])
        );
        assert!(parse_signature_file("hello").unwrap_err().contains("--format raw"));
        assert!(parse_signature_file("hsmd-signature v1\nkey: a\n").is_err());
    }
}
