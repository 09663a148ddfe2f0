//! Connection buffers that never leave a request's or an answer's bytes
//! behind in freed memory. Frames carry plaintext, data keys, passphrases and
//! PINs; a buffer that is merely cleared, or that the allocator moves when it
//! grows, leaves them in the heap for a core file or `/proc/PID/mem` to show.
//! Here every byte is zeroed once it has been used, and growing copies to a
//! new allocation and zeroes the old one before it is freed.

use zeroize::Zeroize as _;

/// Zeroes what `v` holds and empties it; an allocation larger than `keep`
/// bytes is given back (already zeroed) for one of `shrink_to`.
pub fn clear(v: &mut Vec<u8>, keep: usize, shrink_to: usize) {
    v.as_mut_slice().zeroize();
    v.clear();
    if v.capacity() > keep {
        *v = Vec::with_capacity(shrink_to);
    }
}

/// The allocation an idle connection keeps.
const KEEP: usize = 8 * 1024;
/// The most one read asks for.
const MAX_READ: usize = 256 * 1024;

/// Bytes read from a peer and not yet consumed: `data[start..]`.
#[derive(Debug, Default)]
pub struct InBuf {
    data: Vec<u8>,
    start: usize,
}

impl InBuf {
    /// An empty buffer with room for `capacity` bytes.
    #[must_use]
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            data: Vec::with_capacity(capacity),
            start: 0,
        }
    }

    /// The bytes not yet consumed.
    #[must_use]
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..]
    }

    /// How many bytes are not yet consumed.
    #[must_use]
    pub fn len(&self) -> usize {
        self.data.len() - self.start
    }

    /// Whether nothing is waiting.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Zeroes and drops the first `n` waiting bytes.
    pub fn consume(&mut self, n: usize) {
        let end = (self.start + n).min(self.data.len());
        self.data[self.start..end].zeroize();
        self.start = end;
        if self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
            // After a large frame, an idle connection goes back to a small
            // buffer (everything in the large one is zero by now).
            if self.data.capacity() > KEEP {
                self.data = Vec::with_capacity(KEEP);
            }
        }
    }

    /// Makes room for `want` more bytes after those waiting: moves them to the
    /// front (zeroing where they were) or into a larger allocation (zeroing
    /// the old one).
    pub fn make_room(&mut self, want: usize) {
        let len = self.len();
        if self.data.capacity() - self.data.len() >= want {
            return;
        }
        if self.start > 0 && self.data.capacity() >= len + want {
            self.data.copy_within(self.start.., 0);
            self.data[len..].zeroize();
            self.data.truncate(len);
            self.start = 0;
            return;
        }
        let mut bigger = Vec::with_capacity((len + want).max(self.data.capacity().saturating_mul(2)));
        bigger.extend_from_slice(&self.data[self.start..]);
        self.data.zeroize();
        self.data = bigger;
        self.start = 0;
    }

    /// The free space after the waiting bytes (at least what
    /// [`InBuf::make_room`] made), zero-filled, for a read to fill; then
    /// [`InBuf::filled_by`] says how much it did.
    pub fn spare(&mut self) -> &mut [u8] {
        let len = self.data.len();
        // One read takes at most this much: zero-filling is paid per read.
        let end = self.data.capacity().min(len + MAX_READ);
        self.data.resize(end, 0);
        &mut self.data[len..]
    }

    /// After [`InBuf::spare`]: keeps the first `n` bytes a read put there.
    pub fn filled_by(&mut self, spare_start: usize, n: usize) {
        self.data.truncate(spare_start + n);
    }

    /// Where [`InBuf::spare`] begins, to pass to [`InBuf::filled_by`].
    #[must_use]
    pub fn end(&self) -> usize {
        self.data.len()
    }

    /// Zeroes everything (the connection is done with it).
    pub fn wipe(&mut self) {
        self.data.zeroize();
        self.start = 0;
    }
}

impl Drop for InBuf {
    fn drop(&mut self) {
        self.wipe();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumed_bytes_are_zeroed_and_waiting_ones_survive_moves() {
        let mut b = InBuf::with_capacity(8);
        b.make_room(8);
        let at = b.end();
        b.spare()[..6].copy_from_slice(b"secret");
        b.filled_by(at, 6);
        b.consume(4);
        assert_eq!(b.filled(), b"et");
        assert_eq!(&b.data[..4], &[0; 4]);
        // Moved to the front: where they were is zeroed.
        b.make_room(5);
        assert_eq!(b.filled(), b"et");
        assert!(b.data.capacity() >= 7);
        // Grown past its allocation.
        b.make_room(100);
        assert_eq!(b.filled(), b"et");
        b.consume(2);
        assert!(b.is_empty());
    }

    #[test]
    fn clear_gives_back_a_large_allocation() {
        let mut v = Vec::with_capacity(1000);
        v.extend_from_slice(b"abc");
        clear(&mut v, 100, 16);
        assert!(v.is_empty() && v.capacity() <= 100);
    }
}
