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

/// An SSH wire string: u32 big-endian length, then the bytes.
fn ssh_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// An SSH `mpint` (RFC 4251 §5) of a non-negative big-endian integer.
fn ssh_mpint(out: &mut Vec<u8>, bytes: &[u8]) {
    let trimmed = &bytes[bytes.iter().take_while(|b| **b == 0).count()..];
    if trimmed.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v = vec![0];
        v.extend_from_slice(trimmed);
        ssh_string(out, &v);
    } else {
        ssh_string(out, trimmed);
    }
}

/// The public key as one `authorized_keys` line (RFC 4253 §6.6, RFC 5656 §3.1,
/// RFC 8709 §4); `None` for key types OpenSSH does not take. `raw` is the
/// subjectPublicKey: the Ed25519 key, the SEC1 point, or for RSA the key's
/// SubjectPublicKeyInfo (whose modulus and exponent the line carries).
fn openssh_line(t: KeyType, raw: &[u8], comment: &str) -> Option<String> {
    let mut blob = Vec::new();
    let algorithm = match t {
        // OpenSSH's RSA signatures (rsa-sha2-256) are PKCS#1 v1.5: only those
        // keys can serve it; it has no PSS.
        KeyType::RsaPkcs1_2048 | KeyType::RsaPkcs1_3072 | KeyType::RsaPkcs1_4096 => {
            use rsa::{pkcs8::DecodePublicKey as _, traits::PublicKeyParts as _};
            let key = rsa::RsaPublicKey::from_public_key_der(raw).ok()?;
            ssh_string(&mut blob, b"ssh-rsa");
            ssh_mpint(&mut blob, &key.e().to_bytes_be());
            ssh_mpint(&mut blob, &key.n().to_bytes_be());
            "ssh-rsa"
        }
        KeyType::Ed25519 => {
            ssh_string(&mut blob, b"ssh-ed25519");
            ssh_string(&mut blob, raw);
            "ssh-ed25519"
        }
        KeyType::EcdsaP256 | KeyType::EcdsaP384 => {
            let (alg, curve) = if t == KeyType::EcdsaP256 {
                ("ecdsa-sha2-nistp256", "nistp256")
            } else {
                ("ecdsa-sha2-nistp384", "nistp384")
            };
            ssh_string(&mut blob, alg.as_bytes());
            ssh_string(&mut blob, curve.as_bytes());
            ssh_string(&mut blob, raw);
            alg
        }
        _ => return None,
    };
    Some(format!("{algorithm} {} {comment}\n", STANDARD.encode(blob)))
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
        let source = if t.rsa().is_some() {
            spki_der.to_vec()
        } else {
            format_public(t, spki_der, "raw", name)?
        };
        return match openssh_line(t, &source, &format!("hsmd:{name}")) {
            Some(line) => Ok(line.into_bytes()),
            None if t.rsa().is_some() => Err(format!(
                "an {} key has no OpenSSH form: OpenSSH signs with RSA PKCS#1 v1.5 only; use an rsa-pkcs1 key for SSH",
                t.as_str()
            )),
            None => Err(format!("an {} key has no OpenSSH form", t.as_str())),
        };
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
    fn openssh_lines_follow_rfc_8709_for_ed25519() {
        let line = openssh_line(KeyType::Ed25519, &[0u8; 32], "hsmd:k").unwrap();
        // "ssh-ed25519" (11) and the 32-byte key, each length-prefixed: 51 bytes.
        let b64 = line.split(' ').nth(1).unwrap();
        let blob = STANDARD.decode(b64).unwrap();
        assert_eq!(blob.len(), 4 + 11 + 4 + 32);
        assert_eq!(&blob[4..15], b"ssh-ed25519");
        assert!(line.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"), "{line}");
        assert!(openssh_line(KeyType::Aes256Gcm, &[], "x").is_none());
    }

    #[test]
    fn ssh_mpints_follow_rfc_4251() {
        // RFC 4251 §5's examples: 0x80 needs a leading zero, leading zeros go.
        let mut out = Vec::new();
        ssh_mpint(&mut out, &[0x80]);
        assert_eq!(out, [0, 0, 0, 2, 0, 0x80]);
        out.clear();
        ssh_mpint(&mut out, &[0, 0, 0x09, 0xa3, 0x78, 0xf9, 0xb2, 0xe3, 0x32, 0xa7]);
        assert_eq!(out, [0, 0, 0, 8, 0x09, 0xa3, 0x78, 0xf9, 0xb2, 0xe3, 0x32, 0xa7]);
        out.clear();
        ssh_mpint(&mut out, &[0, 0]);
        assert_eq!(out, [0, 0, 0, 0], "zero is the empty string");
    }

    #[test]
    fn rsa_pss_keys_have_no_openssh_form() {
        let e = format_public(KeyType::RsaPss2048, &[], "openssh", "k").unwrap_err();
        assert!(e.contains("rsa-pkcs1"), "{e}");
    }
}
