//! A receive buffer that hands out whole frames. Shared by the blocking and async
//! clients; grows only to what a checked header allows.

use crate::frame::{self, FrameError, FrameStatus, HEADER_LEN};

const INITIAL: usize = 8 * 1024;

/// Bytes read from a stream and not yet consumed as frames.
#[derive(Debug)]
pub struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for RecvBuf {
    fn default() -> Self {
        Self {
            buf: vec![0; INITIAL],
            start: 0,
            end: 0,
        }
    }
}

impl RecvBuf {
    /// Whether any bytes of a started frame are buffered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Space to read into. Call [`RecvBuf::filled`] with the count read.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                // Only reached when a checked header said the frame needs more
                // room (see `next_frame`), or the header itself is incomplete.
                let grown = (self.buf.len() * 2).max(INITIAL);
                self.buf.resize(grown, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`RecvBuf::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Takes the next whole frame's body, if one is buffered.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] when the next header claims more than `max`.
    pub fn next_frame(&mut self, max: u32) -> Result<Option<&[u8]>, FrameError> {
        match frame::check(&self.buf[self.start..self.end], max)? {
            FrameStatus::Complete { body_len } => {
                let body = self.start + HEADER_LEN..self.start + HEADER_LEN + body_len;
                self.start = body.end;
                Ok(Some(&self.buf[body]))
            }
            FrameStatus::Incomplete { buffered_at_least } => {
                // Make room for the whole frame now that its size is checked.
                let free_needed = buffered_at_least - (self.end - self.start);
                if self.buf.len() - self.end < free_needed {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                    if self.buf.len() < buffered_at_least {
                        self.buf.resize(buffered_at_least, 0);
                    }
                }
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(r: &mut RecvBuf, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let spare = r.spare();
            let n = spare.len().min(bytes.len()).min(3); // trickle in small pieces
            spare[..n].copy_from_slice(&bytes[..n]);
            r.filled(n);
            bytes = &bytes[n..];
        }
    }

    #[test]
    fn frames_split_across_reads_come_out_whole_and_in_order() {
        let mut r = RecvBuf::default();
        let mut wire = Vec::new();
        for body in [&b"one"[..], b"", &[7u8; 20_000][..]] {
            wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
            wire.extend_from_slice(body);
        }
        let mut got = Vec::new();
        for chunk in wire.chunks(1000) {
            feed(&mut r, chunk);
            while let Some(body) = r.next_frame(1 << 20).unwrap() {
                got.push(body.to_vec());
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], b"one");
        assert!(got[1].is_empty());
        assert_eq!(got[2], vec![7u8; 20_000]);
        assert!(r.is_empty());
    }

    #[test]
    fn hostile_header_never_grows_the_buffer() {
        let mut r = RecvBuf::default();
        feed(&mut r, &u32::MAX.to_be_bytes());
        assert!(r.next_frame(1 << 20).is_err());
        assert!(r.buf.len() <= INITIAL);
    }
}
