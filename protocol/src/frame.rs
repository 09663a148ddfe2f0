//! Framing: a 4-byte big-endian length followed by that many body bytes.
//!
//! The length is checked against the receiver's maximum *before* any buffer is
//! grown for the body, so a hostile prefix cannot make the receiver allocate.

use thiserror::Error;

/// Size of the length prefix in bytes.
pub const HEADER_LEN: usize = 4;

/// Default maximum body size (1 MiB) when neither side has configured another.
pub const DEFAULT_MAX_FRAME: u32 = 1024 * 1024;

/// The largest maximum any hsmd accepts in its configuration (16 MiB); also the
/// decoder's allocation ceiling.
pub const MAX_FRAME_CEILING: u32 = 16 * 1024 * 1024;

/// What [`check`] found at the front of a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameStatus {
    /// More bytes are needed; `buffered_at_least` is the total the buffer must
    /// hold before a frame can be taken (never more than header + maximum).
    Incomplete {
        /// Total bytes the buffer must hold for the next step.
        buffered_at_least: usize,
    },
    /// A whole frame is buffered: the body is `buf[HEADER_LEN..HEADER_LEN + body_len]`.
    Complete {
        /// Length of the body that follows the header.
        body_len: usize,
    },
}

/// A frame that cannot be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The length prefix claims more than the receiver's maximum.
    #[error("frame of {claimed} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The length the prefix claimed.
        claimed: u64,
        /// The receiver's maximum.
        max: u32,
    },
}

/// Looks at the front of `buf` and says whether a whole frame is there, without
/// consuming or allocating anything.
///
/// # Errors
/// [`FrameError::TooLarge`] as soon as the 4 header bytes claim more than `max`.
pub fn check(buf: &[u8], max: u32) -> Result<FrameStatus, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(FrameStatus::Incomplete {
            buffered_at_least: HEADER_LEN,
        });
    };
    let mut len = [0u8; HEADER_LEN];
    len.copy_from_slice(header);
    let claimed = u32::from_be_bytes(len);
    if claimed > max {
        return Err(FrameError::TooLarge {
            claimed: u64::from(claimed),
            max,
        });
    }
    let body_len = claimed as usize;
    if buf.len() < HEADER_LEN + body_len {
        Ok(FrameStatus::Incomplete {
            buffered_at_least: HEADER_LEN + body_len,
        })
    } else {
        Ok(FrameStatus::Complete { body_len })
    }
}

/// Writes the header for a body of `body_len` bytes into the first
/// [`HEADER_LEN`] bytes of `out`, which the caller reserved for it.
///
/// # Errors
/// [`FrameError::TooLarge`] if the body exceeds `max`.
pub fn write_header(out: &mut [u8; HEADER_LEN], body_len: usize, max: u32) -> Result<(), FrameError> {
    match u32::try_from(body_len) {
        Ok(len) if len <= max => {
            *out = len.to_be_bytes();
            Ok(())
        }
        _ => Err(FrameError::TooLarge {
            claimed: body_len as u64,
            max,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fewer_than_four_bytes_is_incomplete() {
        for n in 0..HEADER_LEN {
            let buf = vec![0u8; n];
            assert_eq!(
                check(&buf, 10),
                Ok(FrameStatus::Incomplete {
                    buffered_at_least: HEADER_LEN
                })
            );
        }
    }

    #[test]
    fn length_is_big_endian() {
        let buf = [0, 0, 1, 2, 9, 9];
        assert_eq!(
            check(&buf, u32::MAX),
            Ok(FrameStatus::Incomplete {
                buffered_at_least: 4 + 258
            })
        );
    }

    #[test]
    fn whole_frame_is_complete_and_trailing_bytes_are_left() {
        let buf = [0, 0, 0, 2, b'h', b'i', 0, 0];
        assert_eq!(check(&buf, 2), Ok(FrameStatus::Complete { body_len: 2 }));
    }

    #[test]
    fn empty_body_is_a_complete_frame() {
        assert_eq!(check(&[0, 0, 0, 0], 0), Ok(FrameStatus::Complete { body_len: 0 }));
    }

    #[test]
    fn oversize_claim_is_refused_from_the_header_alone() {
        let buf = [0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            check(&buf, DEFAULT_MAX_FRAME),
            Err(FrameError::TooLarge {
                claimed: u64::from(u32::MAX),
                max: DEFAULT_MAX_FRAME
            })
        );
        // One over the maximum is refused, the maximum itself is not.
        let over = (DEFAULT_MAX_FRAME + 1).to_be_bytes();
        assert!(check(&over, DEFAULT_MAX_FRAME).is_err());
        let at = DEFAULT_MAX_FRAME.to_be_bytes();
        assert!(check(&at, DEFAULT_MAX_FRAME).is_ok());
    }

    #[test]
    fn header_round_trips_and_refuses_oversize_bodies() {
        let mut h = [0u8; HEADER_LEN];
        write_header(&mut h, 300, 1000).unwrap();
        assert_eq!(h, [0, 0, 1, 44]);
        assert!(write_header(&mut h, 1001, 1000).is_err());
        assert!(write_header(&mut h, usize::MAX, u32::MAX).is_err());
    }
}
