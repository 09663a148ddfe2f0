//! `hsmctl key …`, `sign` and `verify`.
//!
//! Files are hashed here, in a stream, so any size fits in bounded memory; only
//! the digest goes to hsmd: SHA-512 for ed25519 (the signature is pure Ed25519
//! over the 64 digest bytes), SHA-256 for ecdsa-p256 and the RSA types, SHA-384
//! for ecdsa-p384 (standard ECDSA, RSA-PSS or PKCS#1 v1.5 over that hash, as
//! `openssl dgst -sha256 -verify` checks).

use std::{
    fs::File,
    io::{self, Read},
    path::Path,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use protocol::{Client, KeyInfo, KeyType};
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::failure::{Failure, Local};

/// Fetches one key's metadata.
pub fn info(client: &mut Client, name: &str) -> Result<KeyInfo, Failure> {
    Ok(client.key_info(name.to_owned())?)
}

/// Hashes a file (`-` is stdin) with the key type's digest.
pub fn digest_file(t: KeyType, input: &Path) -> Result<Vec<u8>, Failure> {
    let mut reader: Box<dyn Read> = if input == Path::new("-") {
        Box::new(io::stdin().lock())
    } else {
        Box::new(File::open(input).map_err(|e| Local::File.fail(format!("cannot open {}: {e}", input.display())))?)
    };
    let mut buf = vec![0u8; 256 * 1024];
    macro_rules! stream {
        ($h:ty) => {{
            let mut h = <$h>::new();
            loop {
                let n = reader
                    .read(&mut buf)
                    .map_err(|e| Local::File.fail(format!("cannot read {}: {e}", input.display())))?;
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

/// The key's `authorized_keys` line, from hsmd, for SSH signatures.
///
/// # Errors
/// The daemon's refusal, or a key type OpenSSH does not take.
pub fn openssh_public(client: &mut Client, name: &str) -> Result<String, Failure> {
    let public = client.key_public(name.to_owned())?;
    let line = format_public(public.key_type, &public.spki_der, "openssh", name).map_err(|e| Local::Input.fail(e))?;
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// `key public` output in the requested format.
///
/// # Errors
/// A format the key type has no form in (OpenSSH for RSA-PSS), or a public
/// key hsmd sent that does not parse.
pub fn format_public(t: KeyType, spki_der: &[u8], format: &str, name: &str) -> Result<Vec<u8>, String> {
    if format == "openssh" {
        return protocol::formats::openssh::public_line(t, spki_der, &protocol::formats::openssh::comment(name))
            .map(|line| format!("{line}\n").into_bytes())
            .map_err(|e| e.to_string());
    }
    Ok(match format {
        "der" => spki_der.to_vec(),
        "raw" if t.rsa().is_some() => {
            // PKCS#1 RSAPublicKey DER (RFC 8017 A.1.1), as `openssl rsa -RSAPublicKey_in` reads it.
            use rsa::{pkcs1::EncodeRsaPublicKey as _, pkcs8::DecodePublicKey as _};
            rsa::RsaPublicKey::from_public_key_der(spki_der)
                .ok()
                .and_then(|k| k.to_pkcs1_der().ok())
                .map(|d| d.as_bytes().to_vec())
                .ok_or_else(|| "hsmd sent an RSA public key that does not parse".to_owned())?
        }
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_pss_keys_have_no_openssh_form() {
        let e = format_public(KeyType::RsaPss2048, &[], "openssh", "k").unwrap_err();
        assert!(e.contains("rsa-pkcs1"), "{e}");
    }
}
