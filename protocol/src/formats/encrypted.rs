//! Encrypted files (`hsmctl encrypt`): a header, then the plaintext in chunks,
//! each sealed by hsmd with AES-256-GCM under the key the header names. All
//! integers big-endian:
//!
//! ```text
//! "HSMDENC1" | u16 name length | key name | u32 key version | u32 chunk size
//! then chunks, each: u32 length | 12-byte nonce ‖ ciphertext ‖ 16-byte tag
//! ```
//!
//! Chunk `i` (from 0) is sealed with the associated data
//! `"hsmd-enc-v1\0" | u16 name length | name | u32 chunk size | u64 i | u8 last | user aad`,
//! where `last` is 1 for the final chunk only (an empty file is one empty
//! final chunk). Reordered, duplicated, dropped or truncated chunks, another
//! header or another associated data all fail to decrypt.

use std::io::Read;

use super::FormatError;

/// The first bytes of an encrypted file.
pub const MAGIC: &[u8; 8] = b"HSMDENC1";
/// The plaintext per chunk hsmctl writes: well under the default 1 MiB frame.
pub const CHUNK: u32 = 256 * 1024;
/// The largest chunk size a reader accepts.
pub const MAX_CHUNK: u32 = 16 * 1024 * 1024;
/// Bytes a sealed chunk adds to its plaintext (nonce and tag).
pub const OVERHEAD: usize = 28;

/// An encrypted file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The key's name.
    pub key: String,
    /// The key version every chunk is sealed under.
    pub version: u32,
    /// Plaintext bytes per chunk (the last may hold fewer).
    pub chunk_size: u32,
}

impl Header {
    /// The header's bytes.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(self.key.len() as u16).to_be_bytes());
        out.extend_from_slice(self.key.as_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out
    }

    /// Reads a header from the start of `reader`.
    ///
    /// # Errors
    /// [`FormatError::NotThisFormat`] without the magic bytes;
    /// [`FormatError::Truncated`] if it ends inside the header;
    /// [`FormatError::Invalid`] for a key name that is not UTF-8 or a chunk
    /// size of 0 or above [`MAX_CHUNK`].
    pub fn read_from(reader: &mut dyn Read) -> Result<Self, FormatError> {
        let mut magic = [0u8; 8];
        read_exact(reader, &mut magic)?;
        if &magic != MAGIC {
            return Err(FormatError::NotThisFormat("an hsmd encrypted file"));
        }
        let mut u16b = [0u8; 2];
        read_exact(reader, &mut u16b)?;
        let mut key = vec![0u8; usize::from(u16::from_be_bytes(u16b))];
        read_exact(reader, &mut key)?;
        let key = String::from_utf8(key)
            .map_err(|_| FormatError::Invalid("the key name in its header is not UTF-8".to_owned()))?;
        let mut u32b = [0u8; 4];
        read_exact(reader, &mut u32b)?;
        let version = u32::from_be_bytes(u32b);
        read_exact(reader, &mut u32b)?;
        let chunk_size = u32::from_be_bytes(u32b);
        if chunk_size == 0 || chunk_size > MAX_CHUNK {
            return Err(FormatError::Invalid(format!(
                "it has an invalid chunk size {chunk_size}"
            )));
        }
        Ok(Self {
            key,
            version,
            chunk_size,
        })
    }
}

fn read_exact(reader: &mut dyn Read, buf: &mut [u8]) -> Result<(), FormatError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FormatError::Truncated("it ends inside its header".to_owned()),
        _ => FormatError::Io(e),
    })
}

/// The associated data chunk `index` of a file for `key` is sealed with.
#[must_use]
pub fn chunk_aad(key: &str, chunk_size: u32, index: u64, last: bool, user: &[u8]) -> Vec<u8> {
    let mut aad = b"hsmd-enc-v1\0".to_vec();
    aad.extend_from_slice(&(key.len() as u16).to_be_bytes());
    aad.extend_from_slice(key.as_bytes());
    aad.extend_from_slice(&chunk_size.to_be_bytes());
    aad.extend_from_slice(&index.to_be_bytes());
    aad.push(u8::from(last));
    aad.extend_from_slice(user);
    aad
}

/// A sealed chunk as it is written: its length, then the bytes.
#[must_use]
pub fn chunk_bytes(sealed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + sealed.len());
    out.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
    out.extend_from_slice(sealed);
    out
}

/// Reads the sealed chunks after a header one at a time, knowing which is
/// the last (one chunk of look-ahead: its length).
pub struct Chunks<'a> {
    reader: &'a mut dyn Read,
    max_sealed: usize,
    pending: Option<usize>,
    index: u64,
    started: bool,
}

impl std::fmt::Debug for Chunks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunks")
            .field("index", &self.index)
            .field("max_sealed", &self.max_sealed)
            .finish_non_exhaustive()
    }
}

impl<'a> Chunks<'a> {
    /// Chunks of a file with `header`, from `reader` (just past the header).
    pub fn new(reader: &'a mut dyn Read, header: &Header) -> Self {
        Self {
            reader,
            max_sealed: header.chunk_size as usize + OVERHEAD,
            pending: None,
            index: 0,
            started: false,
        }
    }

    fn read_len(&mut self) -> Result<Option<usize>, FormatError> {
        let mut b = [0u8; 4];
        let mut n = 0;
        while n < 4 {
            match self.reader.read(&mut b[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FormatError::Io(e)),
            }
        }
        match n {
            0 => Ok(None),
            4 => Ok(Some(u32::from_be_bytes(b) as usize)),
            _ => Err(FormatError::Truncated("it ends inside a chunk length".to_owned())),
        }
    }

    /// The next chunk: its index, sealed bytes, and whether it is the last;
    /// `None` after the last.
    ///
    /// # Errors
    /// [`FormatError::Truncated`] if the file ends inside a chunk or has none;
    /// [`FormatError::Invalid`] for a chunk length the header does not allow.
    pub fn next_chunk(&mut self) -> Result<Option<(u64, Vec<u8>, bool)>, FormatError> {
        if !self.started {
            self.started = true;
            self.pending = self.read_len()?;
            if self.pending.is_none() {
                return Err(FormatError::Truncated("it has no chunks".to_owned()));
            }
        }
        let Some(len) = self.pending else {
            return Ok(None);
        };
        let index = self.index;
        if len < OVERHEAD || len > self.max_sealed {
            return Err(FormatError::Invalid(format!(
                "chunk {index} has an invalid length {len}"
            )));
        }
        let mut sealed = vec![0u8; len];
        self.reader.read_exact(&mut sealed).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => FormatError::Truncated(format!("it ends inside chunk {index}")),
            _ => FormatError::Io(e),
        })?;
        self.pending = self.read_len()?;
        self.index += 1;
        Ok(Some((index, sealed, self.pending.is_none())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_aad_separates_index_last_flag_and_user_data() {
        let base = chunk_aad("k", 16, 0, false, b"");
        assert_ne!(base, chunk_aad("k", 16, 1, false, b""));
        assert_ne!(base, chunk_aad("k", 16, 0, true, b""));
        assert_ne!(base, chunk_aad("k", 16, 0, false, b"x"));
        assert_ne!(base, chunk_aad("k2", 16, 0, false, b""));
        assert_ne!(base, chunk_aad("k", 32, 0, false, b""));
    }

    #[test]
    fn headers_and_chunks_read_back_and_damage_is_named() {
        let header = Header {
            key: "box".into(),
            version: 3,
            chunk_size: 64,
        };
        let mut file = header.to_bytes();
        file.extend(chunk_bytes(&[7u8; 40]));
        file.extend(chunk_bytes(&[8u8; 30]));
        let mut reader = &file[..];
        assert_eq!(Header::read_from(&mut reader).ok(), Some(header.clone()));
        let mut chunks = Chunks::new(&mut reader, &header);
        assert_eq!(chunks.next_chunk().ok().flatten().map(|c| (c.0, c.2)), Some((0, false)));
        assert_eq!(chunks.next_chunk().ok().flatten().map(|c| (c.0, c.2)), Some((1, true)));
        assert!(matches!(chunks.next_chunk(), Ok(None)));

        let cut = &file[..file.len() - 5];
        let mut reader = cut;
        let _ = Header::read_from(&mut reader);
        let mut chunks = Chunks::new(&mut reader, &header);
        let _ = chunks.next_chunk();
        assert!(matches!(chunks.next_chunk(), Err(FormatError::Truncated(_))));
        assert!(matches!(
            Header::read_from(&mut &b"NOTHSMD1"[..]),
            Err(FormatError::NotThisFormat(_))
        ));
        assert!(matches!(
            Header::read_from(&mut &file[..10]),
            Err(FormatError::Truncated(_))
        ));
    }
}
