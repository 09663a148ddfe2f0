//! The one place bincode is used. Everything else in hsmd and hsmctl goes through
//! these functions, so the encoding can be swapped without touching callers.
//!
//! Encoding (see `docs/protocol.md`): bincode 2 with fixed-width little-endian
//! integers, enum variants as `u32` indices, sequences and strings as a `u64`
//! length followed by their items, `Option` as a `u8` tag.

use bincode::config::{self, Configuration, Fixint, Limit, LittleEndian};
use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

use crate::frame::{self, FrameError, HEADER_LEN, MAX_FRAME_CEILING};

type WireConfig = Configuration<LittleEndian, Fixint, Limit<{ MAX_FRAME_CEILING as usize }>>;

const fn wire_config() -> WireConfig {
    config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ MAX_FRAME_CEILING as usize }>()
}

/// A body that could not be encoded or decoded.
#[derive(Debug, Error)]
pub enum CodecError {
    /// The value could not be serialized (for example a sequence without a length).
    #[error("cannot encode message: {0}")]
    Encode(#[source] bincode::error::EncodeError),
    /// The bytes are not a valid message of the expected type.
    #[error("malformed message body: {0}")]
    Decode(#[source] bincode::error::DecodeError),
    /// A valid message was followed by bytes that belong to no field.
    #[error("malformed message body: {trailing} trailing bytes after the message")]
    TrailingBytes {
        /// How many bytes were left over.
        trailing: usize,
    },
    /// The encoded message is larger than the frame limit.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Encodes `value` as a message body.
///
/// # Errors
/// [`CodecError::Encode`] if serde cannot serialize the value.
pub fn encode_body<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, wire_config()).map_err(CodecError::Encode)
}

/// Appends one whole frame (header and body) for `value` to `out`, encoding in
/// place so the body is never copied.
///
/// # Errors
/// [`CodecError::Frame`] if the body exceeds `max`; `out` is then left as it was.
pub fn encode_frame_into<T: Serialize>(value: &T, max: u32, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    crate::secret::reserve_wiped(out, HEADER_LEN);
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let result = bincode::serde::encode_into_std_write(value, &mut Wiping(&mut *out), wire_config())
        .map_err(CodecError::Encode)
        .and_then(|body_len| {
            let mut header = [0u8; HEADER_LEN];
            frame::write_header(&mut header, body_len, max)?;
            out[start..start + HEADER_LEN].copy_from_slice(&header);
            Ok(())
        });
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Appends to a buffer that may hold secrets (a passphrase, a plaintext):
/// growing it zeroes the allocation it leaves.
struct Wiping<'a>(&'a mut Vec<u8>);

impl std::io::Write for Wiping<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::secret::reserve_wiped(self.0, buf.len());
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Encodes `value` as one whole frame.
///
/// # Errors
/// As [`encode_frame_into`].
pub fn encode_frame<T: Serialize>(value: &T, max: u32) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_frame_into(value, max, &mut out)?;
    Ok(out)
}

/// Decodes a message body; every byte must belong to the message.
///
/// # Errors
/// [`CodecError::Decode`] for bytes that are not a `T`, and
/// [`CodecError::TrailingBytes`] for a `T` followed by anything.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(body, wire_config()).map_err(CodecError::Decode)?;
    if used != body.len() {
        return Err(CodecError::TrailingBytes {
            trailing: body.len() - used,
        });
    }
    Ok(value)
}

/// Reads the fixed prefix every request body starts with: the request id and the
/// index of the operation variant. The daemon uses it to answer a request it
/// cannot decode (an unknown operation from a newer client) under the right id.
#[must_use]
pub fn peek_request_header(body: &[u8]) -> Option<(u64, u32)> {
    let id = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let variant = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    Some((id, variant))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ClientHello, Operation, Request, UnlockSecret, OPERATION_VARIANTS};

    #[test]
    fn request_prefix_is_id_then_variant_index() {
        let req = Request {
            id: 0x0102_0304_0506_0708,
            op: Operation::Status,
        };
        let body = encode_body(&req).unwrap();
        assert_eq!(&body[..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(peek_request_header(&body), Some((0x0102_0304_0506_0708, 2)));
    }

    #[test]
    fn hello_layout_matches_the_spec() {
        // docs/protocol.md promises this exact layout for every protocol version.
        let req = Request {
            id: 1,
            op: Operation::Hello(ClientHello {
                protocol_version: 1,
                client: "ab".into(),
            }),
        };
        let body = encode_body(&req).unwrap();
        let mut expected = Vec::new();
        expected.extend_from_slice(&1u64.to_le_bytes()); // id
        expected.extend_from_slice(&0u32.to_le_bytes()); // Operation::Hello
        expected.extend_from_slice(&1u32.to_le_bytes()); // protocol_version
        expected.extend_from_slice(&2u64.to_le_bytes()); // client: length
        expected.extend_from_slice(b"ab");
        assert_eq!(body, expected);
    }

    #[test]
    fn example_frames_in_docs_protocol_md_are_exact() {
        let hello = Request {
            id: 1,
            op: Operation::Hello(ClientHello {
                protocol_version: 1,
                client: "ab".into(),
            }),
        };
        let frame = encode_frame(&hello, u32::MAX).unwrap();
        assert_eq!(
            frame,
            [
                0x00, 0x00, 0x00, 0x1a, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, b'a',
                b'b'
            ]
        );
        let status = encode_frame(
            &Request {
                id: 2,
                op: Operation::Status,
            },
            u32::MAX,
        )
        .unwrap();
        assert_eq!(status, [0, 0, 0, 0x0c, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]);
    }

    #[test]
    fn error_is_code_number_then_message() {
        use crate::{ErrorCode, Response, WireError};
        let r = Response {
            id: 5,
            result: Err(WireError::new(ErrorCode::PermissionDenied, "no")),
        };
        let body = encode_body(&r).unwrap();
        let mut expected = 5u64.to_le_bytes().to_vec();
        expected.extend_from_slice(&1u32.to_le_bytes()); // Result::Err
        expected.extend_from_slice(&7u32.to_le_bytes()); // PermissionDenied
        expected.extend_from_slice(&2u64.to_le_bytes());
        expected.extend_from_slice(b"no");
        assert_eq!(body, expected);
    }

    #[test]
    fn operation_variant_count_is_current() {
        // The daemon treats indices >= OPERATION_VARIANTS as "unknown request".
        let last = Request {
            id: 9,
            op: Operation::BackupRestoreArchive {
                secret: UnlockSecret::Tpm2,
                force: false,
                accept_unusable: false,
            },
        };
        let body = encode_body(&last).unwrap();
        assert_eq!(peek_request_header(&body), Some((9, OPERATION_VARIANTS - 1)));
    }

    #[test]
    fn forged_inner_length_is_refused_without_allocating() {
        // Hello whose client-name length claims 2^40 bytes.
        let mut body = Vec::new();
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let started = std::time::Instant::now();
        assert!(matches!(decode_body::<Request>(&body), Err(CodecError::Decode(_))));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut body = encode_body(&Request {
            id: 3,
            op: Operation::Status,
        })
        .unwrap();
        body.push(0);
        assert!(matches!(
            decode_body::<Request>(&body),
            Err(CodecError::TrailingBytes { trailing: 1 })
        ));
    }

    #[test]
    fn encode_frame_refuses_oversize_and_leaves_buffer_intact() {
        let mut out = vec![7u8];
        let big = Request {
            id: 1,
            op: Operation::Ping { payload: vec![0; 100] },
        };
        assert!(matches!(
            encode_frame_into(&big, 50, &mut out),
            Err(CodecError::Frame(FrameError::TooLarge { .. }))
        ));
        assert_eq!(out, vec![7u8]);
        encode_frame_into(&big, 1000, &mut out).unwrap();
        let body_len = u32::from_be_bytes(out[1..5].try_into().unwrap()) as usize;
        assert_eq!(out.len(), 1 + 4 + body_len);
        let back: Request = decode_body(&out[5..]).unwrap();
        assert_eq!(back, big);
    }
}
