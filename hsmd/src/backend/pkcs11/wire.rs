//! What hsmd and its PKCS#11 helper say to each other over their socketpair:
//! length-prefixed bincode frames (the client protocol's framing and codec),
//! each request carrying an id so that several run at once, one per session.

use std::io::{Read, Write};

use protocol::KeyType;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Largest frame either side accepts: a key operation's data is bounded by
/// the client protocol's frame limit, which is at most 16 MiB.
pub const MAX_FRAME: u32 = protocol::frame::MAX_FRAME_CEILING + 4096;

/// Which token to use and how to log in; the helper's first message.
#[derive(Serialize, Deserialize)]
pub struct Open {
    /// The module to load.
    pub module: std::path::PathBuf,
    /// The token's label, if chosen by label.
    pub token_label: Option<String>,
    /// The token's serial number, if chosen by serial.
    pub token_serial: Option<String>,
    /// The user PIN.
    pub pin: Zeroizing<String>,
    /// Sessions to open (one per worker thread), at most the token's limit.
    pub sessions: u32,
}

impl std::fmt::Debug for Open {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Open")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("token_serial", &self.token_serial)
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

/// A request after `Open`.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Generate a key (pair) with this CKA_ID and CKA_LABEL.
    Generate {
        /// Type.
        key_type: KeyType,
        /// CKA_ID.
        id: Vec<u8>,
        /// CKA_LABEL.
        label: String,
    },
    /// Sign a digest with the private key of CKA_ID `id`.
    Sign {
        /// Type (which mechanism).
        key_type: KeyType,
        /// CKA_ID.
        id: Vec<u8>,
        /// What the client sent.
        digest: Vec<u8>,
    },
    /// AES-GCM encrypt with the secret key of CKA_ID `id`.
    Encrypt {
        /// CKA_ID.
        id: Vec<u8>,
        /// 12 bytes, chosen by hsmd.
        iv: Vec<u8>,
        /// Data.
        plaintext: Zeroizing<Vec<u8>>,
        /// Associated data.
        aad: Vec<u8>,
    },
    /// AES-GCM decrypt.
    Decrypt {
        /// CKA_ID.
        id: Vec<u8>,
        /// The nonce.
        iv: Vec<u8>,
        /// Ciphertext ‖ tag.
        ciphertext: Vec<u8>,
        /// Associated data.
        aad: Vec<u8>,
    },
    /// Remove every object with CKA_ID `id`.
    Destroy {
        /// CKA_ID.
        id: Vec<u8>,
    },
    /// The token's state now.
    Health,
}

/// What the helper found when it opened the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenSummary {
    /// CKA label of the token.
    pub label: String,
    /// Serial number.
    pub serial: String,
    /// Manufacturer.
    pub manufacturer: String,
    /// Model.
    pub model: String,
    /// The key types its mechanisms allow.
    pub key_types: Vec<KeyType>,
    /// Sessions open.
    pub sessions: u32,
}

/// A successful answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// To `Open` and `Health`.
    Token(TokenSummary),
    /// To `Generate`: the public key (SubjectPublicKeyInfo DER) of a pair.
    Generated {
        /// `None` for secret keys.
        public: Option<Vec<u8>>,
    },
    /// To `Sign`: DER for ECDSA, 64 bytes for Ed25519.
    Signature(Vec<u8>),
    /// To `Encrypt`: ciphertext ‖ tag.
    Sealed(Vec<u8>),
    /// To `Decrypt`: the plaintext, or `None` if it does not authenticate.
    Plain(Option<Zeroizing<Vec<u8>>>),
    /// To `Destroy`: how many objects went.
    Destroyed(u32),
}

/// Why a request failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Failure {
    /// The token or module cannot be used now (removed, not initialized, PIN).
    Unavailable(String),
    /// The token refused or failed the operation.
    Failed(String),
    /// The token cannot do this (no such mechanism).
    Unsupported(String),
    /// The token refused the PIN: trying again would count against its
    /// retry limit, so hsmd stops until it is restarted.
    PinRefused(String),
}

/// A frame from the helper.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// Its outcome.
    pub result: Result<Reply, Failure>,
}

/// A frame to the helper (after `Open`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// Chosen by hsmd; echoed in the response.
    pub id: u64,
    /// What to do.
    pub request: Request,
}

/// Writes one frame.
///
/// # Errors
/// The value does not encode within [`MAX_FRAME`], or the write fails.
pub fn write_frame<T: Serialize>(out: &mut impl Write, value: &T) -> std::io::Result<()> {
    // Frames carry plaintext and PINs: the buffer is wiped after the write.
    let mut frame = Zeroizing::new(Vec::new());
    protocol::codec::encode_frame_into(value, MAX_FRAME, &mut frame).map_err(std::io::Error::other)?;
    out.write_all(&frame)
}

/// Reads one frame; `Ok(None)` at a clean end of stream. The length is
/// checked before anything is allocated for it.
///
/// # Errors
/// A short read, an oversize length, or a body that does not decode.
pub fn read_frame<T: serde::de::DeserializeOwned>(input: &mut impl Read) -> std::io::Result<Option<T>> {
    let mut header = [0u8; 4];
    match input.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(header);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is over the limit of {MAX_FRAME}"),
        ));
    }
    let mut body = Zeroizing::new(vec![0u8; len as usize]);
    input.read_exact(&mut body)?;
    protocol::codec::decode_body(&body)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_an_oversize_length_is_refused_before_allocation() {
        let mut buf = Vec::new();
        write_frame(
            &mut buf,
            &Envelope {
                id: 7,
                request: Request::Destroy { id: vec![1, 2] },
            },
        )
        .unwrap();
        let got: Envelope = read_frame(&mut buf.as_slice()).unwrap().unwrap();
        assert_eq!(got.id, 7);
        assert!(matches!(got.request, Request::Destroy { id } if id == [1, 2]));
        assert!(read_frame::<Envelope>(&mut [].as_slice()).unwrap().is_none());
        let huge = u32::MAX.to_be_bytes();
        let e = read_frame::<Envelope>(&mut huge.as_slice()).unwrap_err();
        assert!(e.to_string().contains("over the limit"), "{e}");
        let mut short = 10u32.to_be_bytes().to_vec();
        short.extend_from_slice(b"abc");
        assert!(read_frame::<Envelope>(&mut short.as_slice()).is_err());
    }
}
