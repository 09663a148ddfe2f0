//! The container of a format-3 backup archive (`docs/backup.md`): a header,
//! then parts (the keystore, each file of the file store, each audit log
//! file) streamed one after the other, then an end record. It is read and
//! written in bounded memory (one 64 KiB chunk at a time), whatever the
//! archive's size.
//!
//! ```text
//! "HSMDBAK3" | u32 H | header (H bytes)
//! part*:  'P' | u8 kind | u16 N | name (N bytes) | u64 size | sealed chunks | digest (32)
//! end:    'E' | u32 parts | MAC (32) | SHA-256 of every byte before (32)
//! ```
//!
//! Each part is sealed in chunks with a key of its own (HKDF of the archive
//! key, the header's hash and the part's index), so a part opens only in its
//! own archive at its own place, and a chunk only at its own position, with
//! the last one marked. The end's MAC covers the count of parts and every
//! part's digest, so a part dropped from the end, or an archive cut after a
//! whole part, is refused with the secret. Without the secret, the digests
//! and the final checksum find damage and truncation, and name the part.

use std::io::{self, Read, Write};

use hkdf::Hkdf;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::aead::{Aes256Gcm, NONCE_LEN, TAG_LEN};

/// The archive's first eight bytes.
pub const MAGIC: &[u8; 8] = b"HSMDBAK3";
/// Plaintext bytes per sealed chunk.
pub const CHUNK: usize = 64 * 1024;
/// The largest header read.
pub const MAX_HEADER: usize = 1024 * 1024;
/// The longest part name.
pub const MAX_NAME: usize = 4096;
/// The most parts an archive may hold.
pub const MAX_PARTS: u32 = 10_000_000;

const PART_TAG: u8 = b'P';
const END_TAG: u8 = b'E';

/// What a part holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The keystore: a SQLite snapshot.
    Keystore,
    /// One file of the file store's directory (a token's header, metadata
    /// or segment, all as sealed as on disk).
    File,
    /// One audit log file.
    Audit,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Self::Keystore => 1,
            Self::File => 2,
            Self::Audit => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Keystore),
            2 => Some(Self::File),
            3 => Some(Self::Audit),
            _ => None,
        }
    }

    /// Its name in messages and in `docs/backup.md`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Keystore => "keystore",
            Self::File => "file",
            Self::Audit => "audit",
        }
    }
}

/// A part, as its record names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Its place, from 0.
    pub index: u32,
    /// What it holds.
    pub kind: Kind,
    /// Its name: a path relative to where it is restored.
    pub name: String,
    /// Its plaintext bytes.
    pub size: u64,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "part {} ({} {:?})", self.index, self.kind.as_str(), self.name)
    }
}

/// Where a reader puts the parts it opens.
pub trait Sink {
    /// A part begins: its record is read, none of its bytes yet. The record
    /// is not yet authenticated (that comes with the part's end).
    ///
    /// # Errors
    /// The part cannot be kept (the reader stops, naming it).
    fn begin(&mut self, part: &Part) -> io::Result<()> {
        let _ = part;
        Ok(())
    }

    /// The part's next plaintext bytes, in order.
    ///
    /// # Errors
    /// They cannot be kept.
    fn write(&mut self, bytes: &[u8]) -> io::Result<()>;
}

impl<F: FnMut(&[u8]) -> io::Result<()>> Sink for F {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self(bytes)
    }
}

/// What is wrong with an archive, or with writing one.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Not an archive of this format.
    #[error("it does not start with the HSMDBAK3 signature")]
    NotAnArchive,
    /// The header's length is past the limit.
    #[error("its header length {0} is over the limit of {MAX_HEADER} bytes")]
    HeaderTooLong(u64),
    /// The archive ends early.
    #[error("it is truncated: it ends inside {0}")]
    Truncated(String),
    /// A record that is neither a part nor the end.
    #[error("it is damaged where {at} or the end record begins: a record of unknown type {tag:#04x}")]
    UnknownRecord {
        /// The part that would begin there.
        at: String,
        /// The record's first byte.
        tag: u8,
    },
    /// A part record's fields are out of range.
    #[error("{0} has a malformed record: {1}")]
    BadRecord(String, String),
    /// A part's digest does not match its bytes.
    #[error("{0} is damaged: its digest does not match its bytes")]
    PartDamaged(String),
    /// A part's chunk does not open under the archive key.
    #[error("{0} does not open at chunk {1}: it was changed, or comes from another archive or place")]
    PartTampered(String, u64),
    /// The end record's count does not match the parts read.
    #[error("its end record counts {said} parts, and {read} were read")]
    CountMismatch {
        /// What the end record says.
        said: u32,
        /// The parts read.
        read: u32,
    },
    /// The end record's MAC does not match.
    #[error("its end record does not authenticate the parts read: parts were dropped, added or reordered")]
    EndTampered,
    /// The final checksum does not match.
    #[error("its final checksum does not match: the end record is damaged")]
    Checksum,
    /// Bytes after the end record.
    #[error("it has bytes after its end record")]
    TrailingBytes,
    /// A part's source gave more or fewer bytes than the part's size.
    #[error("{0} changed while it was read: {1}")]
    SourceChanged(String, String),
    /// Too many parts.
    #[error("it has more than {MAX_PARTS} parts")]
    TooManyParts,
    /// Reading or writing failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ArchiveError {
    let what = what.into();
    move |source| ArchiveError::Io { what, source }
}

/// The key an archive's parts are sealed with.
pub struct ArchiveKey(Zeroizing<[u8; 32]>);

impl ArchiveKey {
    /// Wraps derived key bytes.
    #[must_use]
    pub fn new(key: Zeroizing<[u8; 32]>) -> Self {
        Self(key)
    }

    fn derive(&self, header_hash: &[u8; 32], info: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        // Infallible: 32 bytes is far below HKDF-SHA-256's output limit.
        let _ = Hkdf::<Sha256>::new(Some(header_hash), self.0.as_ref()).expand(info, out.as_mut());
        out
    }

    fn part(&self, header_hash: &[u8; 32], index: u32) -> Aes256Gcm {
        let mut info = b"hsmd backup part v3\0".to_vec();
        info.extend_from_slice(&index.to_be_bytes());
        Aes256Gcm::new(&self.derive(header_hash, &info))
    }

    fn end_mac(&self, header_hash: &[u8; 32], digests: &[[u8; 32]]) -> Hmac<Sha256> {
        let key = self.derive(header_hash, b"hsmd backup end v3");
        // Infallible: HMAC takes a key of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_ref()).unwrap_or_else(|_| unreachable!());
        mac.update(b"hsmd backup end v3\0");
        mac.update(header_hash);
        mac.update(&u32::try_from(digests.len()).unwrap_or(u32::MAX).to_be_bytes());
        for d in digests {
            mac.update(d);
        }
        mac
    }
}

impl std::fmt::Debug for ArchiveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ArchiveKey(..)")
    }
}

/// The hash every part key and the end MAC are bound to.
fn header_hash(header: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"hsmd backup header v3\0");
    h.update(header);
    h.finalize().into()
}

fn chunk_nonce(i: u64, last: bool) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..8].copy_from_slice(&i.to_be_bytes());
    n[8] = u8::from(last);
    n
}

fn chunks_of(size: u64) -> u64 {
    size.div_ceil(CHUNK as u64).max(1)
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> Hashing<W> {
    fn put(&mut self, bytes: &[u8], what: &str) -> Result<(), ArchiveError> {
        self.hash.update(bytes);
        self.written += bytes.len() as u64;
        self.inner
            .write_all(bytes)
            .map_err(io_err(format!("cannot write {what}")))
    }
}

/// Writes an archive, part by part.
pub struct Writer<W: Write> {
    out: Hashing<W>,
    key: ArchiveKey,
    header_hash: [u8; 32],
    digests: Vec<[u8; 32]>,
    /// A chunk's plaintext, then its sealed form; wiped when dropped.
    buf: Zeroizing<Vec<u8>>,
}

impl<W: Write> std::fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("parts", &self.digests.len())
            .field("written", &self.out.written)
            .finish_non_exhaustive()
    }
}

impl<W: Write> Writer<W> {
    /// Starts an archive with `header` (JSON; its content is the caller's).
    ///
    /// # Errors
    /// [`ArchiveError::HeaderTooLong`], [`ArchiveError::Io`].
    pub fn new(out: W, header: &[u8], key: ArchiveKey) -> Result<Self, ArchiveError> {
        if header.len() > MAX_HEADER {
            return Err(ArchiveError::HeaderTooLong(header.len() as u64));
        }
        let mut out = Hashing {
            inner: out,
            hash: Sha256::new(),
            written: 0,
        };
        out.put(MAGIC, "the archive's header")?;
        out.put(&(header.len() as u32).to_be_bytes(), "the archive's header")?;
        out.put(header, "the archive's header")?;
        Ok(Self {
            out,
            key,
            header_hash: header_hash(header),
            digests: Vec::new(),
            buf: Zeroizing::new(Vec::with_capacity(CHUNK + TAG_LEN)),
        })
    }

    /// Adds a part of exactly `size` bytes read from `source`.
    ///
    /// # Errors
    /// [`ArchiveError::SourceChanged`] if `source` ends before `size` bytes
    /// or has more; [`ArchiveError::Io`]; [`ArchiveError::BadRecord`] for a
    /// name over [`MAX_NAME`]; [`ArchiveError::TooManyParts`].
    pub fn part(&mut self, kind: Kind, name: &str, size: u64, mut source: impl Read) -> Result<(), ArchiveError> {
        let index = u32::try_from(self.digests.len()).map_err(|_| ArchiveError::TooManyParts)?;
        if index >= MAX_PARTS {
            return Err(ArchiveError::TooManyParts);
        }
        let part = Part {
            index,
            kind,
            name: name.to_owned(),
            size,
        };
        if name.len() > MAX_NAME {
            return Err(ArchiveError::BadRecord(part.to_string(), "its name is too long".into()));
        }
        let record = record_bytes(kind, name, size);
        let mut digest = Sha256::new();
        digest.update(index.to_be_bytes());
        digest.update(&record);
        let what = part.to_string();
        self.out.put(&record, &what)?;
        let aead = self.key.part(&self.header_hash, index);
        let aad = chunk_aad(index, &record);
        let n = chunks_of(size);
        let mut left = size;
        for i in 0..n {
            let len = left.min(CHUNK as u64) as usize;
            self.buf.clear();
            self.buf.resize(len, 0);
            source.read_exact(&mut self.buf).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    ArchiveError::SourceChanged(what.clone(), format!("it ended before its {size} bytes"))
                } else {
                    ArchiveError::Io {
                        what: format!("cannot read {what}"),
                        source: e,
                    }
                }
            })?;
            left -= len as u64;
            aead.seal_in_place(&chunk_nonce(i, i + 1 == n), &aad, &mut self.buf)
                .map_err(|_| ArchiveError::BadRecord(what.clone(), "a chunk did not seal".into()))?;
            digest.update(&self.buf);
            self.out.put(&self.buf, &what)?;
        }
        let mut extra = [0u8; 1];
        match source.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => {
                return Err(ArchiveError::SourceChanged(
                    what,
                    format!("it has more than its {size} bytes"),
                ))
            }
            Err(e) => return Err(io_err(format!("cannot read {what}"))(e)),
        }
        let digest: [u8; 32] = digest.finalize().into();
        self.out.put(&digest, &what)?;
        self.digests.push(digest);
        Ok(())
    }

    /// Writes the end record; answers the output and the archive's bytes.
    ///
    /// # Errors
    /// [`ArchiveError::Io`].
    pub fn finish(mut self) -> Result<(W, u64), ArchiveError> {
        let mut end = vec![END_TAG];
        end.extend_from_slice(&(self.digests.len() as u32).to_be_bytes());
        end.extend_from_slice(
            &self
                .key
                .end_mac(&self.header_hash, &self.digests)
                .finalize()
                .into_bytes(),
        );
        self.out.put(&end, "the end record")?;
        let sum: [u8; 32] = self.out.hash.clone().finalize().into();
        self.out.put(&sum, "the end record")?;
        self.out.inner.flush().map_err(io_err("cannot write the end record"))?;
        Ok((self.out.inner, self.out.written))
    }

    /// The bytes written so far.
    #[must_use]
    pub fn written(&self) -> u64 {
        self.out.written
    }
}

fn record_bytes(kind: Kind, name: &str, size: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(12 + name.len());
    r.push(PART_TAG);
    r.push(kind.byte());
    r.extend_from_slice(&(name.len() as u16).to_be_bytes());
    r.extend_from_slice(name.as_bytes());
    r.extend_from_slice(&size.to_be_bytes());
    r
}

fn chunk_aad(index: u32, record: &[u8]) -> Vec<u8> {
    let mut aad = b"hsmd backup chunk v3\0".to_vec();
    aad.extend_from_slice(&index.to_be_bytes());
    aad.extend_from_slice(record);
    aad
}

/// A reader that hashes what it reads and counts it.
struct Counting<R> {
    inner: R,
    hash: Sha256,
    read: u64,
}

impl<R: Read> Counting<R> {
    /// Fills `buf`, or says the archive is truncated inside `what`.
    fn take(&mut self, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<(), ArchiveError> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ArchiveError::Truncated(what())
            } else {
                ArchiveError::Io {
                    what: format!("cannot read {}", what()),
                    source: e,
                }
            }
        })?;
        self.hash.update(&*buf);
        self.read += buf.len() as u64;
        Ok(())
    }
}

/// Reads an archive, part by part, checking each as it goes.
pub struct Reader<R: Read> {
    input: Counting<R>,
    header: Vec<u8>,
    header_hash: [u8; 32],
    key: Option<ArchiveKey>,
    digests: Vec<[u8; 32]>,
    done: bool,
}

impl<R: Read> std::fmt::Debug for Reader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("parts", &self.digests.len())
            .field("read", &self.input.read)
            .field("keyed", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

impl<R: Read> Reader<R> {
    /// Reads the signature and the header.
    ///
    /// # Errors
    /// [`ArchiveError::NotAnArchive`], [`ArchiveError::HeaderTooLong`],
    /// [`ArchiveError::Truncated`], [`ArchiveError::Io`].
    pub fn open(input: R) -> Result<Self, ArchiveError> {
        let mut input = Counting {
            inner: input,
            hash: Sha256::new(),
            read: 0,
        };
        let mut magic = [0u8; 8];
        input
            .take(&mut magic, &|| "its signature".into())
            .map_err(|e| match e {
                ArchiveError::Truncated(_) => ArchiveError::NotAnArchive,
                other => other,
            })?;
        if &magic != MAGIC {
            return Err(ArchiveError::NotAnArchive);
        }
        let mut len = [0u8; 4];
        input.take(&mut len, &|| "the header".into())?;
        let len = u64::from(u32::from_be_bytes(len));
        if len > MAX_HEADER as u64 {
            return Err(ArchiveError::HeaderTooLong(len));
        }
        let mut header = vec![0u8; len as usize];
        input.take(&mut header, &|| "the header".into())?;
        Ok(Self {
            header_hash: header_hash(&header),
            input,
            header,
            key: None,
            digests: Vec::new(),
            done: false,
        })
    }

    /// The archive's bytes read so far.
    #[must_use]
    pub fn bytes_read(&self) -> u64 {
        self.input.read
    }

    /// The header's bytes (JSON, as the writer gave them).
    #[must_use]
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// From here on, every chunk is opened with `key` (and the end record's
    /// MAC checked); without it, only digests and the checksum are.
    pub fn set_key(&mut self, key: ArchiveKey) {
        self.key = Some(key);
    }

    /// Reads the next part, giving its plaintext to `sink` chunk by chunk
    /// (only with a key; without one `sink` gets nothing but the part's
    /// beginning). `None` after the
    /// end record, which is then checked whole.
    ///
    /// A part's bytes reach `sink` before its digest is checked: a caller
    /// that keeps them must not trust them until the part (and, for the
    /// whole archive, the end) has been read without error.
    ///
    /// # Errors
    /// Any [`ArchiveError`] about the archive, naming the part; errors of
    /// `sink` as [`ArchiveError::Io`].
    pub fn next_part(&mut self, sink: &mut dyn Sink) -> Result<Option<Part>, ArchiveError> {
        if self.done {
            return Ok(None);
        }
        let index = u32::try_from(self.digests.len()).map_err(|_| ArchiveError::TooManyParts)?;
        let after = || match index {
            0 => "the header".to_owned(),
            i => format!("part {}", i - 1),
        };
        let mut tag = [0u8; 1];
        self.input.take(&mut tag, &|| format!("the record after {}", after()))?;
        match tag[0] {
            PART_TAG => {}
            END_TAG => {
                self.end()?;
                return Ok(None);
            }
            other => {
                return Err(ArchiveError::UnknownRecord {
                    at: format!("part {index}"),
                    tag: other,
                })
            }
        }
        if index >= MAX_PARTS {
            return Err(ArchiveError::TooManyParts);
        }
        let unnamed = format!("part {index}");
        let mut fixed = [0u8; 3];
        self.input.take(&mut fixed, &|| unnamed.clone())?;
        let kind = Kind::from_byte(fixed[0])
            .ok_or_else(|| ArchiveError::BadRecord(unnamed.clone(), format!("unknown kind {}", fixed[0])))?;
        let name_len = usize::from(u16::from_be_bytes([fixed[1], fixed[2]]));
        if name_len > MAX_NAME {
            return Err(ArchiveError::BadRecord(unnamed, "its name is too long".into()));
        }
        let mut name = vec![0u8; name_len];
        self.input.take(&mut name, &|| unnamed.clone())?;
        let name = String::from_utf8(name)
            .map_err(|_| ArchiveError::BadRecord(unnamed.clone(), "its name is not UTF-8".into()))?;
        let mut size = [0u8; 8];
        self.input.take(&mut size, &|| unnamed.clone())?;
        let part = Part {
            index,
            kind,
            name,
            size: u64::from_be_bytes(size),
        };
        let what = part.to_string();
        sink.begin(&part).map_err(io_err(format!("cannot keep {what}")))?;
        let record = record_bytes(kind, &part.name, part.size);
        let mut digest = Sha256::new();
        digest.update(index.to_be_bytes());
        digest.update(&record);
        let aead = self.key.as_ref().map(|k| k.part(&self.header_hash, index));
        let aad = chunk_aad(index, &record);
        let n = chunks_of(part.size);
        let mut left = part.size;
        let mut buf = Zeroizing::new(Vec::with_capacity(CHUNK + TAG_LEN));
        for i in 0..n {
            let len = left.min(CHUNK as u64) as usize;
            left -= len as u64;
            buf.clear();
            buf.resize(len + TAG_LEN, 0);
            self.input.take(&mut buf, &|| what.clone())?;
            digest.update(&buf[..]);
            if let Some(aead) = &aead {
                let plain = aead
                    .open_in_place(&chunk_nonce(i, i + 1 == n), &aad, &mut buf)
                    .map_err(|_| ArchiveError::PartTampered(what.clone(), i))?;
                sink.write(plain).map_err(io_err(format!("cannot keep {what}")))?;
            }
        }
        let mut said = [0u8; 32];
        self.input.take(&mut said, &|| what.clone())?;
        let digest: [u8; 32] = digest.finalize().into();
        if said != digest {
            return Err(ArchiveError::PartDamaged(what));
        }
        self.digests.push(digest);
        Ok(Some(part))
    }

    fn end(&mut self) -> Result<(), ArchiveError> {
        let mut body = [0u8; 4 + 32];
        self.input.take(&mut body, &|| "the end record".into())?;
        let expected: [u8; 32] = self.input.hash.clone().finalize().into();
        let mut sum = [0u8; 32];
        self.input.inner.read_exact(&mut sum).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ArchiveError::Truncated("the end record".into())
            } else {
                io_err("cannot read the end record")(e)
            }
        })?;
        if sum != expected {
            return Err(ArchiveError::Checksum);
        }
        let said = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let read = self.digests.len() as u32;
        if said != read {
            return Err(ArchiveError::CountMismatch { said, read });
        }
        if let Some(key) = &self.key {
            key.end_mac(&self.header_hash, &self.digests)
                .verify_slice(&body[4..])
                .map_err(|_| ArchiveError::EndTampered)?;
        }
        let mut extra = [0u8; 1];
        match self.input.inner.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => return Err(ArchiveError::TrailingBytes),
            Err(e) => return Err(io_err("cannot read past the end record")(e)),
        }
        self.done = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ArchiveKey {
        ArchiveKey::new(Zeroizing::new([3u8; 32]))
    }

    /// Three parts: one empty, one of a single short chunk, one of a full
    /// chunk and a short one.
    fn parts() -> Vec<(Kind, &'static str, Vec<u8>)> {
        vec![
            (Kind::Keystore, "keystore.sqlite", Vec::new()),
            (Kind::File, "files/t/header.json", b"{\"format\":1}".to_vec()),
            (
                Kind::Audit,
                "audit.log",
                (0..CHUNK + 100).map(|i| (i % 251) as u8).collect(),
            ),
        ]
    }

    fn archive() -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), b"{\"h\":1}", key()).unwrap();
        for (kind, name, bytes) in parts() {
            w.part(kind, name, bytes.len() as u64, &bytes[..]).unwrap();
        }
        let (out, n) = w.finish().unwrap();
        assert_eq!(n, out.len() as u64);
        out
    }

    /// Reads every part; with the key, their plaintexts.
    fn read(archive: &[u8], keyed: bool) -> Result<Vec<(Part, Vec<u8>)>, ArchiveError> {
        let mut r = Reader::open(archive)?;
        if keyed {
            r.set_key(key());
        }
        let mut out = Vec::new();
        loop {
            let mut bytes = Vec::new();
            let Some(part) = r.next_part(&mut |b: &[u8]| {
                bytes.extend_from_slice(b);
                Ok(())
            })?
            else {
                return Ok(out);
            };
            out.push((part, bytes));
        }
    }

    #[test]
    fn parts_come_back_as_written() {
        let a = archive();
        assert_eq!(Reader::open(&a[..]).unwrap().header(), b"{\"h\":1}");
        let read_back = read(&a, true).unwrap();
        let expected = parts();
        assert_eq!(read_back.len(), 3);
        for (i, ((part, bytes), (kind, name, want))) in read_back.iter().zip(&expected).enumerate() {
            assert_eq!(part.index as usize, i);
            assert_eq!(
                (part.kind, part.name.as_str(), part.size),
                (*kind, *name, want.len() as u64)
            );
            assert_eq!(bytes, want);
        }
        // Without the key: the same parts, no plaintext.
        let unkeyed = read(&a, false).unwrap();
        assert!(unkeyed.iter().all(|(_, b)| b.is_empty()));
        assert_eq!(unkeyed.len(), 3);
    }

    /// Where each part starts and ends in the archive.
    fn spans(a: &[u8]) -> Vec<std::ops::Range<usize>> {
        let mut at = 12 + 7;
        let mut out = Vec::new();
        for (_, name, bytes) in parts() {
            let sealed = chunks_of(bytes.len() as u64) as usize * TAG_LEN + bytes.len();
            let len = 12 + name.len() + sealed + 32;
            out.push(at..at + len);
            at += len;
        }
        assert_eq!(a[at], END_TAG);
        out
    }

    #[test]
    fn a_flipped_byte_anywhere_is_refused_and_names_its_part() {
        let a = archive();
        let spans = spans(&a);
        // Every byte but those well inside the long part's sealed chunks
        // (one in 509 of those: each read hashes the whole archive).
        let inner = spans[2].start + 40..spans[2].end - 64;
        let positions = (0..a.len()).filter(|at| !inner.contains(at) || at % 509 == 0);
        for keyed in [false, true] {
            for at in positions.clone() {
                let mut b = a.clone();
                b[at] ^= 0x10;
                let Err(e) = read(&b, keyed) else {
                    panic!("a flip at {at} (keyed: {keyed}) went unnoticed")
                };
                if let Some(part) = spans.iter().position(|s| s.contains(&at)) {
                    // A flip in a part's name or kind may be read as a record
                    // of another shape; it still names the part.
                    assert!(
                        e.to_string().contains(&format!("part {part}")),
                        "a flip at {at} in part {part} (keyed: {keyed}): {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_truncated_archive_is_refused_and_says_where_it_ends() {
        let a = archive();
        let spans = spans(&a);
        for keyed in [false, true] {
            for len in (0..a.len()).filter(|l| l % 61 == 0 || a.len() - l < 100 || *l < 200) {
                let Err(e) = read(&a[..len], keyed) else {
                    panic!("{len} of {} bytes accepted", a.len())
                };
                if let Some(part) = spans.iter().position(|s| s.start < len && len < s.end) {
                    assert!(
                        matches!(&e, ArchiveError::Truncated(w) if w.contains(&format!("part {part}"))),
                        "cut at {len}: {e}"
                    );
                }
            }
        }
        let Err(e) = read(&[a.as_slice(), b"x"].concat(), false) else {
            panic!("bytes after the end were accepted")
        };
        assert!(matches!(e, ArchiveError::TrailingBytes), "{e}");
    }

    #[test]
    fn parts_swapped_dropped_or_taken_from_another_archive_do_not_open() {
        let a = archive();
        let s = spans(&a);
        let end = &a[s[2].end..];
        // The end record rewritten as someone without the key could: count
        // and checksum right, MAC copied.
        let rebuild = |body: &[u8], count: u32| {
            let mut out = body.to_vec();
            out.push(END_TAG);
            out.extend_from_slice(&count.to_be_bytes());
            out.extend_from_slice(&end[5..37]);
            let sum: [u8; 32] = Sha256::digest(&out).into();
            out.extend_from_slice(&sum);
            out
        };
        // The last part dropped: the checksum and count agree, the MAC does not.
        let dropped = rebuild(&a[..s[2].start], 2);
        assert_eq!(
            read(&dropped, false).unwrap().len(),
            2,
            "without the key, only damage is found"
        );
        assert!(matches!(read(&dropped, true), Err(ArchiveError::EndTampered)));
        // Two parts swapped: the first one out of place does not open.
        let swapped = rebuild(&[&a[..s[1].start], &a[s[2].clone()], &a[s[1].clone()]].concat(), 3);
        let Err(e) = read(&swapped, true) else {
            panic!("swapped parts opened")
        };
        assert!(e.to_string().contains("part 1"), "{e}");
        // A part from another archive (another header) does not open.
        let mut w = Writer::new(Vec::new(), b"{\"h\":2}", key()).unwrap();
        let (kind, name, bytes) = &parts()[1];
        w.part(*kind, name, bytes.len() as u64, &bytes[..]).unwrap();
        let (other, _) = w.finish().unwrap();
        let theirs = &other[19..other.len() - 69];
        let spliced = rebuild(&[&a[..s[1].start], theirs, &a[s[2].clone()]].concat(), 3);
        assert!(matches!(read(&spliced, true), Err(ArchiveError::PartTampered(p, 0)) if p.contains("part 1")));
        // The wrong key opens nothing.
        let mut r = Reader::open(&a[..]).unwrap();
        r.set_key(ArchiveKey::new(Zeroizing::new([4u8; 32])));
        assert!(matches!(
            r.next_part(&mut |_: &[u8]| Ok(())),
            Err(ArchiveError::PartTampered(_, 0))
        ));
    }

    #[test]
    fn a_source_that_changes_size_is_an_error_not_a_short_part() {
        let mut w = Writer::new(Vec::new(), b"{}", key()).unwrap();
        let e = w.part(Kind::File, "f", 10, &[0u8; 9][..]).unwrap_err();
        assert!(matches!(e, ArchiveError::SourceChanged(..)), "{e}");
        let mut w = Writer::new(Vec::new(), b"{}", key()).unwrap();
        let e = w.part(Kind::File, "f", 10, &[0u8; 11][..]).unwrap_err();
        assert!(e.to_string().contains("more than its 10 bytes"), "{e}");
    }

    #[test]
    fn lengths_are_checked_before_anything_is_allocated() {
        let mut a = MAGIC.to_vec();
        a.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Reader::open(&a[..]), Err(ArchiveError::HeaderTooLong(_))));
        assert!(matches!(
            Reader::open(&b"HSMDBAK1xxxx"[..]),
            Err(ArchiveError::NotAnArchive)
        ));
        // A part claiming an exabyte ends as truncated, having read what
        // is there, chunk by chunk.
        let mut a = archive()[..19].to_vec();
        a.extend_from_slice(&record_bytes(Kind::File, "f", u64::MAX / 2));
        a.extend_from_slice(&[0u8; 100]);
        assert!(matches!(read(&a, false), Err(ArchiveError::Truncated(p)) if p.contains("part 0")));
    }
}
