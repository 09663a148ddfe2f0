//! Transfers: byte strings larger than one frame (backup archives) moved in
//! pieces. A transfer belongs to the uid that started it, expires when left
//! idle, and uploads grow as bytes arrive: a claimed size is checked against
//! the limit but never allocated up front.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use protocol::{ErrorCode, WireError};
use zeroize::Zeroizing;

/// Transfers open at once, daemon-wide.
const MAX_TRANSFERS: usize = 4;
/// A transfer nobody touched for this long is dropped.
const IDLE: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Transfer {
    uid: u32,
    data: Zeroizing<Vec<u8>>,
    /// For uploads: the size announced; for downloads: the data's length.
    size: u64,
    upload: bool,
    touched: Instant,
}

/// Open transfers, by random id.
#[derive(Debug, Default)]
pub struct Transfers {
    open: Mutex<HashMap<u64, Transfer>>,
}

fn invalid(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::InvalidArgument, msg)
}

fn unknown(id: u64) -> WireError {
    WireError::new(
        ErrorCode::NotFound,
        format!("there is no transfer {id} of yours (transfers expire after 10 minutes idle)"),
    )
}

impl Transfers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Transfer>> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.retain(|_, t| t.touched.elapsed() < IDLE);
        open
    }

    fn insert(&self, t: Transfer) -> Result<u64, WireError> {
        let mut open = self.lock();
        if open.len() >= MAX_TRANSFERS {
            return Err(WireError::new(
                ErrorCode::RateLimited,
                format!("{MAX_TRANSFERS} transfers are open already; finish or wait for one"),
            ));
        }
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|_| WireError::new(ErrorCode::Internal, "the random source failed"))?;
        let id = u64::from_le_bytes(id) | 1;
        open.insert(id, t);
        Ok(id)
    }

    /// Holds `data` for `uid` to read; returns the transfer's id.
    ///
    /// # Errors
    /// `RateLimited` when too many transfers are open.
    pub fn offer(&self, uid: u32, data: Vec<u8>) -> Result<u64, WireError> {
        self.insert(Transfer {
            uid,
            size: data.len() as u64,
            data: Zeroizing::new(data),
            upload: false,
            touched: Instant::now(),
        })
    }

    /// Reads up to `len` bytes at `offset`; the transfer ends once its last
    /// byte was read.
    ///
    /// # Errors
    /// `NotFound` for another uid's or an unknown transfer, `InvalidArgument`
    /// for an offset past the end.
    pub fn read(&self, uid: u32, id: u64, offset: u64, len: u32, max: usize) -> Result<Vec<u8>, WireError> {
        let mut open = self.lock();
        let t = open
            .get_mut(&id)
            .filter(|t| t.uid == uid && !t.upload)
            .ok_or_else(|| unknown(id))?;
        if offset > t.size {
            return Err(invalid(format!("offset {offset} is past the end ({})", t.size)));
        }
        t.touched = Instant::now();
        let start = usize::try_from(offset).map_err(|_| invalid("offset out of range"))?;
        let end = start.saturating_add((len as usize).min(max)).min(t.data.len());
        let bytes = t.data[start..end].to_vec();
        if end == t.data.len() {
            open.remove(&id);
        }
        Ok(bytes)
    }

    /// Starts an upload of `size` bytes (at most `limit`).
    ///
    /// # Errors
    /// `InvalidArgument` for a size over the limit; `RateLimited`.
    pub fn begin(&self, uid: u32, size: u64, limit: u64) -> Result<u64, WireError> {
        if size == 0 || size > limit {
            return Err(invalid(format!(
                "an upload is 1 to {limit} bytes; this one claims {size}"
            )));
        }
        self.insert(Transfer {
            uid,
            data: Zeroizing::new(Vec::new()),
            size,
            upload: true,
            touched: Instant::now(),
        })
    }

    /// Appends bytes at `offset`, which must be what was received so far.
    ///
    /// # Errors
    /// `InvalidArgument` for a gap, an overlap or bytes past the size.
    pub fn write(&self, uid: u32, id: u64, offset: u64, bytes: &[u8]) -> Result<u64, WireError> {
        let mut open = self.lock();
        let t = open
            .get_mut(&id)
            .filter(|t| t.uid == uid && t.upload)
            .ok_or_else(|| unknown(id))?;
        let have = t.data.len() as u64;
        if offset != have {
            return Err(invalid(format!("expected bytes at offset {have}, got offset {offset}")));
        }
        if have + bytes.len() as u64 > t.size {
            return Err(invalid(format!("bytes past the announced size of {}", t.size)));
        }
        t.data.extend_from_slice(bytes);
        t.touched = Instant::now();
        Ok(t.data.len() as u64)
    }

    /// Takes a completed upload.
    ///
    /// # Errors
    /// `NotFound`, or `FailedPrecondition` while bytes are missing (the
    /// upload stays open then).
    pub fn take(&self, uid: u32, id: u64) -> Result<Zeroizing<Vec<u8>>, WireError> {
        let mut open = self.lock();
        let t = open
            .get(&id)
            .filter(|t| t.uid == uid && t.upload)
            .ok_or_else(|| unknown(id))?;
        if (t.data.len() as u64) < t.size {
            return Err(WireError::new(
                ErrorCode::FailedPrecondition,
                format!("upload {id} has {} of {} bytes", t.data.len(), t.size),
            ));
        }
        Ok(open.remove(&id).map(|t| t.data).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_sequential_bounded_and_owned() {
        let t = Transfers::default();
        assert!(t.begin(1, 1 << 40, 1 << 20).is_err(), "claimed size over the limit");
        let id = t.begin(1, 5, 100).unwrap();
        assert!(t.write(2, id, 0, b"ab").is_err(), "another uid");
        assert_eq!(t.write(1, id, 0, b"ab").unwrap(), 2);
        assert!(t.write(1, id, 0, b"ab").is_err(), "overlap");
        assert!(t.write(1, id, 3, b"c").is_err(), "gap");
        assert!(t.write(1, id, 2, b"cdef").is_err(), "past the size");
        assert!(t.take(1, id).is_err(), "incomplete");
        t.write(1, id, 2, b"cde").unwrap();
        assert_eq!(&t.take(1, id).unwrap()[..], b"abcde");
        assert!(t.take(1, id).is_err(), "taken once");
    }

    #[test]
    fn downloads_end_when_read_to_the_end() {
        let t = Transfers::default();
        let id = t.offer(7, b"0123456789".to_vec()).unwrap();
        assert!(t.read(8, id, 0, 4, 100).is_err());
        assert_eq!(t.read(7, id, 0, 4, 100).unwrap(), b"0123");
        assert_eq!(t.read(7, id, 4, 100, 3).unwrap(), b"456", "bounded by the frame");
        assert_eq!(t.read(7, id, 7, 100, 100).unwrap(), b"789");
        assert!(t.read(7, id, 0, 1, 100).is_err(), "gone after the last byte");
    }

    #[test]
    fn at_most_a_few_transfers_are_open() {
        let t = Transfers::default();
        for _ in 0..MAX_TRANSFERS {
            t.offer(1, vec![1]).unwrap();
        }
        assert_eq!(t.offer(1, vec![1]).unwrap_err().code, ErrorCode::RateLimited);
    }
}
