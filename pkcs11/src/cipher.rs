//! `CKM_AES_GCM` through hsmd's `Encrypt` and `DecryptAnyVersion`.
//!
//! hsmd seals with a 12-byte nonce it draws itself and a 128-bit tag, and
//! never takes a nonce from a caller: a repeated AES-GCM nonce under one key
//! gives away the authentication key and the XOR of the plaintexts. So this
//! module encrypts only through the PKCS#11 3.0 message interface
//! (`C_EncryptMessage` with `CKG_GENERATE_RANDOM` or `CKG_GENERATE`), where
//! the token writes the IV it chose into the caller's parameters; single-part
//! `C_EncryptInit`, whose IV is the caller's, is refused and says so.
//! Decryption takes the caller's IV either way (`C_Decrypt*` with
//! `CK_GCM_PARAMS`, `C_DecryptMessage` with `CK_GCM_MESSAGE_PARAMS`). A
//! PKCS#11 ciphertext does not name the key version that made it, so hsmd
//! tries the versions the key still decrypts with, newest first.

use std::sync::Arc;

use cryptoki_sys::*;
use protocol::KeyType;

use crate::{
    error::{Error, Result},
    mechanism::{Mechanism, Params},
    objects::{Class, Object},
};

/// The IV length hsmd seals with, in bytes.
pub const IV_LEN: usize = 12;
/// The tag length hsmd seals with, in bytes.
pub const TAG_LEN: usize = 16;
/// The most ciphertext a multi-part decryption collects before it asks
/// hsmd: the protocol's largest frame (hsmd's own limit may be lower, and
/// then it is the daemon that refuses).
pub const MAX_INPUT: usize = protocol::frame::MAX_FRAME_CEILING as usize;

/// `CK_GCM_PARAMS`, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcmParams {
    /// `pIv`.
    pub iv: Vec<u8>,
    /// `pAAD`.
    pub aad: Vec<u8>,
    /// `ulTagBits`.
    pub tag_bits: CK_ULONG,
}

/// The generator and lengths of a `CK_GCM_MESSAGE_PARAMS` (its IV and tag
/// pointers stay with the C interface, which reads or fills them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageParams {
    /// `ulIvLen`.
    pub iv_len: CK_ULONG,
    /// `ulIvFixedBits`.
    pub iv_fixed_bits: CK_ULONG,
    /// `ivGenerator`.
    pub generator: CK_GENERATOR_FUNCTION,
    /// `ulTagBits`.
    pub tag_bits: CK_ULONG,
}

/// Which way a message operation goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `C_MessageEncryptInit`.
    Encrypt,
    /// `C_MessageDecryptInit`.
    Decrypt,
}

fn param_invalid(why: impl Into<String>) -> Error {
    Error::call(CKR_MECHANISM_PARAM_INVALID, why)
}

fn check_lengths(iv_len: usize, tag_bits: CK_ULONG) -> Result<()> {
    if iv_len != IV_LEN || tag_bits != (TAG_LEN * 8) as CK_ULONG {
        return Err(param_invalid(format!(
            "hsmd's AES-GCM takes a {IV_LEN}-byte IV and a {}-bit tag, not {iv_len} bytes and {tag_bits} bits",
            TAG_LEN * 8
        )));
    }
    Ok(())
}

/// Checks that `key` is an AES key object allowed to go `direction`.
fn check_key(key: &Object, direction: Direction) -> Result<()> {
    if key.key_type != KeyType::Aes256Gcm || key.class != Class::Secret {
        return Err(Error::call(
            CKR_KEY_TYPE_INCONSISTENT,
            format!(
                "CKM_AES_GCM needs an AES key; {:?} is an {} key",
                key.name,
                key.key_type.as_str()
            ),
        ));
    }
    let (attr, verb) = match direction {
        Direction::Encrypt => (CKA_ENCRYPT, "encrypt"),
        Direction::Decrypt => (CKA_DECRYPT, "decrypt"),
    };
    if !key.flag(attr) {
        return Err(Error::call(
            CKR_KEY_FUNCTION_NOT_PERMITTED,
            format!("key {:?} may not {verb} (its usages or state)", key.name),
        ));
    }
    Ok(())
}

/// `C_EncryptInit`: never started, with the reason.
///
/// # Errors
/// Always: `CKR_MECHANISM_PARAM_INVALID` for `CKM_AES_GCM` (use the message
/// interface), `CKR_MECHANISM_INVALID` for any other mechanism.
pub fn refuse_single_part_encrypt(mech: &Mechanism) -> Error {
    if mech.kind == CKM_AES_GCM {
        param_invalid(
            "hsmd draws every AES-GCM IV itself and takes none from the caller: encrypt with \
             C_MessageEncryptInit and C_EncryptMessage (CK_GCM_MESSAGE_PARAMS, ivGenerator \
             CKG_GENERATE_RANDOM), which return the IV and tag",
        )
    } else {
        Error::call(
            CKR_MECHANISM_INVALID,
            format!("mechanism {:#x} is not one hsmd encrypts with", mech.kind),
        )
    }
}

/// An AES-GCM decryption between `C_DecryptInit` and its end: the IV and
/// associated data it was given, and the ciphertext so far.
#[derive(Debug)]
pub struct DecryptOp {
    /// The key object.
    pub key: Arc<Object>,
    iv: Vec<u8>,
    aad: Vec<u8>,
    input: Vec<u8>,
}

impl DecryptOp {
    /// `C_DecryptInit`.
    ///
    /// # Errors
    /// `CKR_MECHANISM_INVALID` for a mechanism other than `CKM_AES_GCM`;
    /// `CKR_MECHANISM_PARAM_INVALID` without `CK_GCM_PARAMS` of a 12-byte IV
    /// and a 128-bit tag; the key's refusals.
    pub fn new(mech: &Mechanism, key: Arc<Object>) -> Result<Self> {
        if mech.kind != CKM_AES_GCM {
            return Err(Error::call(
                CKR_MECHANISM_INVALID,
                format!("mechanism {:#x} is not one hsmd decrypts with", mech.kind),
            ));
        }
        let Params::Gcm(p) = &mech.params else {
            return Err(param_invalid("CKM_AES_GCM needs its CK_GCM_PARAMS"));
        };
        check_lengths(p.iv.len(), p.tag_bits)?;
        check_key(&key, Direction::Decrypt)?;
        Ok(Self {
            key,
            iv: p.iv.clone(),
            aad: p.aad.clone(),
            input: Vec::new(),
        })
    }

    /// `C_DecryptUpdate`: collects the next part (the whole ciphertext must
    /// be authenticated before any plaintext is released).
    ///
    /// # Errors
    /// `CKR_ENCRYPTED_DATA_LEN_RANGE` past [`MAX_INPUT`].
    pub fn update(&mut self, data: &[u8]) -> Result<()> {
        if self.input.len() + data.len() > MAX_INPUT {
            return Err(Error::call(
                CKR_ENCRYPTED_DATA_LEN_RANGE,
                format!("a ciphertext through hsmd is at most {MAX_INPUT} bytes"),
            ));
        }
        self.input.extend_from_slice(data);
        Ok(())
    }

    /// The plaintext's length once `tail` is added.
    ///
    /// # Errors
    /// `CKR_ENCRYPTED_DATA_LEN_RANGE` for less than a tag.
    pub fn plaintext_len(&self, tail: &[u8]) -> Result<usize> {
        (self.input.len() + tail.len()).checked_sub(TAG_LEN).ok_or_else(|| {
            Error::call(
                CKR_ENCRYPTED_DATA_LEN_RANGE,
                "an AES-GCM ciphertext ends with a 16-byte tag",
            )
        })
    }

    /// What hsmd opens, `tail` added: IV, ciphertext and tag, and the
    /// associated data.
    ///
    /// # Errors
    /// As [`DecryptOp::plaintext_len`].
    pub fn sealed(&self, tail: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        self.plaintext_len(tail)?;
        let mut sealed = Vec::with_capacity(IV_LEN + self.input.len() + tail.len());
        sealed.extend_from_slice(&self.iv);
        sealed.extend_from_slice(&self.input);
        sealed.extend_from_slice(tail);
        Ok((sealed, self.aad.clone()))
    }
}

/// A message operation between `C_Message{En,De}cryptInit` and its final.
#[derive(Debug)]
pub struct MessageOp {
    /// The key object.
    pub key: Arc<Object>,
}

impl MessageOp {
    /// `C_MessageEncryptInit` or `C_MessageDecryptInit`.
    ///
    /// # Errors
    /// `CKR_MECHANISM_INVALID` for a mechanism other than `CKM_AES_GCM`; the
    /// key's refusals.
    pub fn new(mech: &Mechanism, key: Arc<Object>, direction: Direction) -> Result<Self> {
        if mech.kind != CKM_AES_GCM {
            return Err(Error::call(
                CKR_MECHANISM_INVALID,
                format!("mechanism {:#x} is not one hsmd encrypts messages with", mech.kind),
            ));
        }
        check_key(&key, direction)?;
        Ok(Self { key })
    }
}

/// The error for message parameters that are not a `CK_GCM_MESSAGE_PARAMS`
/// with IV and tag buffers.
#[must_use]
pub fn refuse_message_params() -> Error {
    param_invalid("each message takes a CK_GCM_MESSAGE_PARAMS with its IV and tag buffers")
}

/// Checks one message's parameters.
///
/// # Errors
/// `CKR_MECHANISM_PARAM_INVALID` for other lengths, a fixed IV part, or (to
/// encrypt) a generator other than random: hsmd draws the whole IV.
pub fn check_message(p: &MessageParams, direction: Direction) -> Result<()> {
    check_lengths(p.iv_len as usize, p.tag_bits)?;
    if direction == Direction::Encrypt
        && (p.iv_fixed_bits != 0 || !matches!(p.generator, CKG_GENERATE_RANDOM | CKG_GENERATE))
    {
        return Err(param_invalid(
            "hsmd draws the whole AES-GCM IV at random: give ivGenerator CKG_GENERATE_RANDOM \
             and ulIvFixedBits 0",
        ));
    }
    Ok(())
}

/// Splits hsmd's sealed bytes (IV, ciphertext, tag) into the three.
///
/// # Errors
/// `CKR_DEVICE_ERROR` for an answer shorter than an IV and a tag.
pub fn split_sealed(sealed: &[u8]) -> Result<(&[u8], &[u8], &[u8])> {
    if sealed.len() < IV_LEN + TAG_LEN {
        return Err(Error::call(
            CKR_DEVICE_ERROR,
            "hsmd sent a sealed value shorter than an IV and a tag",
        ));
    }
    let (iv, rest) = sealed.split_at(IV_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    Ok((iv, ciphertext, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encryption_takes_no_iv_from_the_caller() {
        let p = |generator, fixed| MessageParams {
            iv_len: 12,
            iv_fixed_bits: fixed,
            generator,
            tag_bits: 128,
        };
        assert!(check_message(&p(CKG_GENERATE_RANDOM, 0), Direction::Encrypt).is_ok());
        for refused in [
            p(CKG_NO_GENERATE, 0),
            p(CKG_GENERATE_COUNTER, 0),
            p(CKG_GENERATE_RANDOM, 32),
        ] {
            assert_eq!(
                check_message(&refused, Direction::Encrypt).unwrap_err().rv(),
                CKR_MECHANISM_PARAM_INVALID
            );
        }
        // To decrypt, the IV is the caller's to give.
        assert!(check_message(&p(CKG_NO_GENERATE, 0), Direction::Decrypt).is_ok());
        let short_tag = MessageParams {
            tag_bits: 96,
            ..p(CKG_GENERATE_RANDOM, 0)
        };
        assert!(check_message(&short_tag, Direction::Decrypt).is_err());
        let single = Mechanism {
            kind: CKM_AES_GCM,
            params: Params::None,
        };
        assert_eq!(refuse_single_part_encrypt(&single).rv(), CKR_MECHANISM_PARAM_INVALID);
    }

    #[test]
    fn sealed_values_split_into_iv_ciphertext_and_tag() {
        let sealed: Vec<u8> = (0..40).collect();
        let (iv, ct, tag) = split_sealed(&sealed).unwrap();
        assert_eq!((iv.len(), ct.len(), tag.len()), (12, 12, 16));
        assert_eq!((iv[0], ct[0], tag[0]), (0, 12, 24));
        assert!(split_sealed(&sealed[..27]).is_err());
    }
}
