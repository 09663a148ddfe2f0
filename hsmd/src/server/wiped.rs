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

/// Bytes read from a peer and not yet consumed: `data[start..end]`.
///
/// `data` is initialized to its whole length and is zero outside
/// `start..end`: a read goes straight into the zeroed space after `end`, with
/// no fill before each read, and consuming zeroes what was read.
#[derive(Debug, Default)]
pub struct InBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl InBuf {
    /// An empty buffer with room for `capacity` bytes.
    #[must_use]
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            data: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    /// The bytes not yet consumed.
    #[must_use]
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// How many bytes are not yet consumed.
    #[must_use]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether nothing is waiting.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Zeroes and drops the first `n` waiting bytes.
    pub fn consume(&mut self, n: usize) {
        let to = (self.start + n).min(self.end);
        self.data[self.start..to].zeroize();
        self.start = to;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // After a large frame, an idle connection goes back to a small
            // buffer (everything in the large one is zero by now).
            if self.data.len() > KEEP {
                self.data = vec![0; KEEP];
            }
        }
    }

    /// Makes room for `want` more bytes after those waiting: moves them to the
    /// front (zeroing where they were) or into a larger allocation (zeroing
    /// the old one).
    pub fn make_room(&mut self, want: usize) {
        let len = self.len();
        if self.data.len() - self.end >= want {
            return;
        }
        if self.start > 0 && self.data.len() >= len + want {
            self.data.copy_within(self.start..self.end, 0);
            self.data[len..self.end].zeroize();
            self.start = 0;
            self.end = len;
            return;
        }
        let mut bigger = vec![0; (len + want).max(self.data.len().saturating_mul(2))];
        bigger[..len].copy_from_slice(self.filled());
        self.data.zeroize();
        self.data = bigger;
        self.start = 0;
        self.end = len;
    }

    /// The free space after the waiting bytes (at least what
    /// [`InBuf::make_room`] made), all zero, for a read to fill; then
    /// [`InBuf::filled_by`] says how much it did.
    pub fn spare(&mut self) -> &mut [u8] {
        // One read takes at most this much.
        let stop = self.data.len().min(self.end + MAX_READ);
        &mut self.data[self.end..stop]
    }

    /// After [`InBuf::spare`]: keeps the first `n` bytes a read put there
    /// (the rest of the spare space was left as it was: zero).
    pub fn filled_by(&mut self, spare_start: usize, n: usize) {
        debug_assert_eq!(spare_start, self.end, "filled_by follows spare");
        self.end = (spare_start + n).min(self.data.len());
    }

    /// Where [`InBuf::spare`] begins, to pass to [`InBuf::filled_by`].
    #[must_use]
    pub fn end(&self) -> usize {
        self.end
    }

    /// Zeroes everything (the connection is done with it).
    pub fn wipe(&mut self) {
        self.data.zeroize();
        self.start = 0;
        self.end = 0;
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

    /// Everything outside the waiting bytes is zero.
    fn zero_outside(b: &InBuf) {
        assert!(b.data[..b.start].iter().all(|&x| x == 0), "{:?}", b.data);
        assert!(b.data[b.end..].iter().all(|&x| x == 0), "{:?}", b.data);
    }

    /// What a read does: writes `bytes` into the spare space.
    fn read(b: &mut InBuf, bytes: &[u8]) {
        b.make_room(bytes.len());
        let at = b.end();
        b.spare()[..bytes.len()].copy_from_slice(bytes);
        b.filled_by(at, bytes.len());
    }

    #[test]
    fn consumed_bytes_are_zeroed_and_waiting_ones_survive_moves() {
        let mut b = InBuf::with_capacity(8);
        read(&mut b, b"secret");
        b.consume(4);
        assert_eq!(b.filled(), b"et");
        assert_eq!(&b.data[..4], &[0; 4]);
        zero_outside(&b);
        // Moved to the front: where they were is zeroed.
        b.make_room(5);
        assert_eq!(b.filled(), b"et");
        assert!(b.data.len() >= 7);
        zero_outside(&b);
        // Grown past its allocation.
        b.make_room(100);
        assert_eq!(b.filled(), b"et");
        zero_outside(&b);
        b.consume(2);
        assert!(b.is_empty());
        zero_outside(&b);
    }

    #[test]
    fn the_space_a_read_is_given_is_zero_whatever_came_before() {
        let mut b = InBuf::with_capacity(16);
        for round in 0..50u8 {
            // Frames of every length, read in pieces and consumed in others.
            let frame: Vec<u8> = (0..(round % 13 + 1)).map(|i| round ^ i | 1).collect();
            read(&mut b, &frame[..frame.len() / 2]);
            assert!(b.spare().iter().all(|&x| x == 0), "round {round}");
            read(&mut b, &frame[frame.len() / 2..]);
            assert!(b.spare().iter().all(|&x| x == 0), "round {round}");
            zero_outside(&b);
            let take = b.len() - usize::from(round % 3 == 0 && b.len() > 1);
            b.consume(take);
            zero_outside(&b);
        }
        // A read that filled less than it was given leaves the rest zero.
        let at = b.end();
        let spare = b.spare();
        spare[0] = 7;
        b.filled_by(at, 1);
        zero_outside(&b);
        b.wipe();
        assert!(b.data.iter().all(|&x| x == 0) && b.is_empty());
    }

    #[test]
    fn clear_gives_back_a_large_allocation() {
        let mut v = Vec::with_capacity(1000);
        v.extend_from_slice(b"abc");
        clear(&mut v, 100, 16);
        assert!(v.is_empty() && v.capacity() <= 100);
    }
}
