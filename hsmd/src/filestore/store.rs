//! The file store's directories (`docs/filestore.md`): one per token, chunks
//! in segment files, written under a temporary name and renamed into place
//! when complete, so a crash leaves either nothing or a whole file.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use super::format::{self, FormatError};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Segment files hold at most this many bytes of chunk records.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes a chunk record adds to the sealed chunk: its `u32_be` length.
pub const RECORD_PREFIX: usize = 4;

/// A full chunk's record: length prefix, ciphertext, tag.
#[must_use]
pub fn record_len(chunk_size: u32) -> u64 {
    RECORD_PREFIX as u64 + u64::from(chunk_size) + format::TAG_LEN as u64
}

/// Records per segment: as many full ones as fit in [`SEGMENT_BYTES`] (at
/// least one). Fixed by the chunk size alone, so chunk `i` is record
/// `i % per` of segment `i / per` and can be read without reading the others.
#[must_use]
pub fn chunks_per_segment(chunk_size: u32) -> u64 {
    (SEGMENT_BYTES / record_len(chunk_size)).max(1)
}
const HEADER: &str = "header.json";
const META: &str = "meta.json";
const INCOMING: &str = ".incoming-";

/// A file store failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Not a token hsmd makes.
    #[error("{0:?} is not a file token (a UUID such as 0f8fad5b-d9cb-469f-a165-70867728950e)")]
    BadToken(String),
    /// No such token.
    #[error("there is no stored file {0}; `hsmctl file list` shows them")]
    NotFound(String),
    /// Something in the store is not what hsmd wrote.
    #[error("stored file {token}: {why}")]
    Damaged {
        /// The token.
        token: String,
        /// What is wrong.
        why: String,
    },
    /// The disk failed.
    #[error("file store {}: {source}", path.display())]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `meta.json` records, written last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Plaintext bytes.
    pub size: u64,
    /// Chunks.
    pub chunks: u64,
    /// Segment files.
    pub segments: u32,
    /// The plaintext checksum (see `format::Checksum`).
    pub checksum: String,
    /// When the store finished.
    pub stored_unix: u64,
}

/// Whether `token` has the shape of a token hsmd makes: a canonical lowercase
/// UUID. Checked before any path is built from it, so `..`, `/`, and anything
/// else that could reach outside the store never does.
#[must_use]
pub fn valid_token(token: &str) -> bool {
    token.len() == 36
        && token.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
}

/// A new random token.
///
/// # Errors
/// The random source failed.
pub fn new_token() -> Result<String, std::io::Error> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
    // A version-4 UUID.
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// The store's root, `state_dir/files`.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
    /// Held shared by each delete and exclusively by a backup's copy: a
    /// delete overwrites a file's segments in place, which a copy reading
    /// them through its open descriptors would take as the file's bytes.
    copying: std::sync::Arc<std::sync::RwLock<()>>,
}

/// What a backup copies of the file store: see [`FileStore::backup_copy`].
#[derive(Debug)]
pub struct Copy<'a> {
    /// Every stored file's files: `token/name`, open, and their lengths.
    pub files: Vec<(String, File, u64)>,
    /// Tokens in the copy.
    pub tokens: u32,
    _no_deletes: std::sync::RwLockWriteGuard<'a, ()>,
}

impl FileStore {
    /// Opens (creating, 0700) the store under `state_dir` and removes what
    /// stores interrupted by a crash left behind; returns how many.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn open(state_dir: &Path) -> Result<(Self, usize), StoreError> {
        let root = state_dir.join("files");
        if !root.exists() {
            fs::DirBuilder::new().mode(0o700).create(&root).map_err(io(&root))?;
        }
        let mut cleaned = 0;
        for entry in fs::read_dir(&root).map_err(io(&root))? {
            let entry = entry.map_err(io(&root))?;
            if entry.file_name().to_string_lossy().starts_with(INCOMING) {
                fs::remove_dir_all(entry.path()).map_err(io(&entry.path()))?;
                cleaned += 1;
            }
        }
        Ok((
            Self {
                root,
                copying: std::sync::Arc::default(),
            },
            cleaned,
        ))
    }

    /// The directory of a stored file, after checking the token's shape and
    /// that the entry is a real directory (not a symlink planted in the store).
    ///
    /// # Errors
    /// [`StoreError::BadToken`], [`StoreError::NotFound`], [`StoreError::Damaged`].
    fn dir(&self, token: &str) -> Result<PathBuf, StoreError> {
        if !valid_token(token) {
            return Err(StoreError::BadToken(token.to_owned()));
        }
        let dir = self.root.join(token);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(dir),
            Ok(_) => Err(StoreError::Damaged {
                token: token.to_owned(),
                why: "its entry in the store is not a directory (a symlink?); refusing to follow it".into(),
            }),
            Err(_) => Err(StoreError::NotFound(token.to_owned())),
        }
    }

    /// Starts writing a file: a private temporary directory holding the header.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn create(&self, token: &str, header_bytes: &[u8], chunk_size: u32) -> Result<Writer, StoreError> {
        if !valid_token(token) {
            return Err(StoreError::BadToken(token.to_owned()));
        }
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        let dir = self.root.join(format!("{INCOMING}{}", hex::encode(r)));
        fs::DirBuilder::new().mode(0o700).create(&dir).map_err(io(&dir))?;
        write_new(&dir.join(HEADER), header_bytes)?;
        Ok(Writer {
            root: self.root.clone(),
            dir,
            token: token.to_owned(),
            segment: None,
            per_segment: chunks_per_segment(chunk_size),
            in_segment: 0,
            segments: 0,
            chunks: 0,
        })
    }

    /// Opens a stored file for reading.
    ///
    /// # Errors
    /// As `FileStore::dir`; [`StoreError::Damaged`] for missing parts.
    pub fn open_file(&self, token: &str) -> Result<Reader, StoreError> {
        let dir = self.dir(token)?;
        let damaged = |why: String| StoreError::Damaged {
            token: token.to_owned(),
            why,
        };
        let header = read_regular(&dir.join(HEADER)).map_err(|e| damaged(format!("header: {e}")))?;
        let meta: Meta =
            serde_json::from_slice(&read_regular(&dir.join(META)).map_err(|e| damaged(format!("meta: {e}")))?)
                .map_err(|e| damaged(format!("meta.json: {e}")))?;
        Ok(Reader {
            dir,
            token: token.to_owned(),
            header,
            meta,
        })
    }

    /// Tokens of every stored file.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn tokens(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io(&self.root))? {
            let entry = entry.map_err(io(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if valid_token(&name) {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Overwrites every segment with zeros, syncs, then removes the file's
    /// directory. The token is gone first (renamed aside), so a crash midway
    /// leaves debris that the next start removes, never a half-wiped file.
    ///
    /// # Errors
    /// As `FileStore::dir`; [`StoreError::Io`].
    pub fn delete(&self, token: &str) -> Result<(), StoreError> {
        let _not_copied = self.copying.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = self.dir(token)?;
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        let aside = self.root.join(format!("{INCOMING}{}", hex::encode(r)));
        fs::rename(&dir, &aside).map_err(io(&dir))?;
        sync_dir(&self.root)?;
        for entry in fs::read_dir(&aside).map_err(io(&aside))? {
            let path = entry.map_err(io(&aside))?.path();
            wipe(&path)?;
        }
        fs::remove_dir_all(&aside).map_err(io(&aside))?;
        sync_dir(&self.root)
    }
}

impl FileStore {
    /// Every stored file's files, opened, with their lengths, for a backup
    /// to copy; deletes wait until the copy is dropped. A stored file's files
    /// never change once it is in place, so the copy is of the store as it
    /// was when this was called (stores finished later are not in it).
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn backup_copy(&self) -> Result<Copy<'_>, StoreError> {
        let guard = self.copying.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut files = Vec::new();
        let tokens = self.tokens()?;
        for token in &tokens {
            let dir = self.dir(token)?;
            let mut names = Vec::new();
            for entry in fs::read_dir(&dir).map_err(io(&dir))? {
                let entry = entry.map_err(io(&dir))?;
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            for name in names {
                let path = dir.join(&name);
                let file = File::open(&path).map_err(io(&path))?;
                let meta = file.metadata().map_err(io(&path))?;
                if !meta.is_file() {
                    return Err(StoreError::Damaged {
                        token: token.clone(),
                        why: format!("{name} in its directory is not a regular file"),
                    });
                }
                files.push((format!("{token}/{name}"), file, meta.len()));
            }
        }
        Ok(Copy {
            files,
            tokens: u32::try_from(tokens.len()).unwrap_or(u32::MAX),
            _no_deletes: guard,
        })
    }
}

impl FileStore {
    /// The store's directory (`state_dir/files`).
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Runs `change` (a restore putting another directory in the store's
    /// place) with deletes held back, as a backup's copy holds them.
    pub fn replaced_while<T>(&self, change: impl FnOnce() -> T) -> T {
        let _no_deletes = self.copying.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        change()
    }
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io(path))
}

/// Reads a file that must be a regular file (not a symlink).
fn read_regular(path: &Path) -> Result<Vec<u8>, String> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => fs::read(path).map_err(|e| e.to_string()),
        Ok(_) => Err("not a regular file".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn wipe(path: &Path) -> Result<(), StoreError> {
    let len = fs::symlink_metadata(path).map_err(io(path))?.len();
    let mut f = OpenOptions::new().write(true).open(path).map_err(io(path))?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n]).map_err(io(path))?;
        left -= n as u64;
    }
    f.sync_all().map_err(io(path))
}

fn segment_name(i: u32) -> String {
    format!("seg-{i:06}")
}

/// A file being stored.
#[derive(Debug)]
pub struct Writer {
    root: PathBuf,
    dir: PathBuf,
    token: String,
    segment: Option<File>,
    per_segment: u64,
    in_segment: u64,
    segments: u32,
    chunks: u64,
}

impl Writer {
    /// Appends the next chunk's record: `u32_be(len) ‖ sealed chunk`, in one
    /// write.
    ///
    /// # Errors
    /// [`StoreError::Damaged`] for a record whose prefix is not its length;
    /// [`StoreError::Io`].
    pub fn append_record(&mut self, record: &[u8]) -> Result<(), StoreError> {
        self.append_records(record, &[record.len()])
    }

    /// Appends consecutive records lying end to end in `bytes` (of the
    /// lengths `records`), each segment's share in one write.
    ///
    /// # Errors
    /// As [`Writer::append_record`].
    pub fn append_records(&mut self, bytes: &[u8], records: &[usize]) -> Result<(), StoreError> {
        let mut at = 0;
        let mut i = 0;
        while i < records.len() {
            if self.segment.is_none() || self.in_segment == self.per_segment {
                self.next_segment()?;
            }
            let room = usize::try_from(self.per_segment - self.in_segment).unwrap_or(usize::MAX);
            let take = room.min(records.len() - i);
            let start = at;
            for &len in &records[i..i + take] {
                let record = bytes.get(at..at + len).ok_or_else(|| StoreError::Damaged {
                    token: self.token.clone(),
                    why: "a batch shorter than its records".into(),
                })?;
                self.check_record(record)?;
                at += len;
            }
            let dir = self.dir.clone();
            if let Some(f) = self.segment.as_mut() {
                f.write_all(&bytes[start..at]).map_err(io(&dir))?;
            }
            self.in_segment += take as u64;
            self.chunks += take as u64;
            i += take;
        }
        Ok(())
    }

    fn check_record(&self, record: &[u8]) -> Result<(), StoreError> {
        let consistent = record.len() >= RECORD_PREFIX
            && record[..RECORD_PREFIX]
                == u32::try_from(record.len() - RECORD_PREFIX)
                    .unwrap_or(u32::MAX)
                    .to_be_bytes();
        if consistent {
            Ok(())
        } else {
            Err(StoreError::Damaged {
                token: self.token.clone(),
                why: "a chunk record whose length prefix is wrong".into(),
            })
        }
    }

    fn next_segment(&mut self) -> Result<(), StoreError> {
        self.finish_segment()?;
        let path = self.dir.join(segment_name(self.segments));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        self.segment = Some(f);
        self.segments += 1;
        self.in_segment = 0;
        Ok(())
    }

    fn finish_segment(&mut self) -> Result<(), StoreError> {
        if let Some(f) = self.segment.take() {
            f.sync_all().map_err(io(&self.dir))?;
        }
        Ok(())
    }

    /// Writes `meta.json`, syncs everything and renames the directory to the
    /// token: from here on the file exists.
    ///
    /// # Errors
    /// [`StoreError::Io`]; the temporary directory is removed then.
    pub fn finish(mut self, meta: &Meta) -> Result<(), StoreError> {
        let result = (|| {
            self.finish_segment()?;
            if meta.chunks != self.chunks || meta.segments != self.segments {
                return Err(StoreError::Damaged {
                    token: self.token.clone(),
                    why: format!("{} chunks written, {} recorded", self.chunks, meta.chunks),
                });
            }
            let json = serde_json::to_vec(meta).map_err(|e| StoreError::Damaged {
                token: self.token.clone(),
                why: e.to_string(),
            })?;
            write_new(&self.dir.join(META), &json)?;
            sync_dir(&self.dir)?;
            let target = self.root.join(&self.token);
            fs::rename(&self.dir, &target).map_err(io(&target))?;
            sync_dir(&self.root)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&self.dir);
        }
        result
    }

    /// How many chunks and segments so far.
    #[must_use]
    pub fn counts(&self) -> (u64, u32) {
        (self.chunks, self.segments)
    }
}

impl Drop for Writer {
    /// A store that never reached [`Writer::finish`] leaves nothing behind
    /// (a crash leaves debris, removed at the next start).
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A stored file's header and metadata.
#[derive(Debug)]
pub struct Reader {
    dir: PathBuf,
    token: String,
    /// The header's exact bytes.
    pub header: Vec<u8>,
    /// What the store recorded.
    pub meta: Meta,
}

/// Why a chunk could not be read: the file's content is wrong (named in the
/// format's terms), or the store is.
#[derive(Debug, Error)]
pub enum ReadError {
    /// Missing, extra or mis-sized chunks.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The store's files.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Reader {
    /// Opens the segments to read chunks at their positions, after checking
    /// that the metadata agrees with the layout the size implies.
    ///
    /// # Errors
    /// [`StoreError::Damaged`] for metadata that disagrees; a missing segment
    /// is [`FormatError::Truncated`] at its first chunk.
    pub fn chunks(&self, chunk_size: u32) -> Result<Chunks, ReadError> {
        let total = format::chunk_count(self.meta.size, chunk_size);
        let per_segment = chunks_per_segment(chunk_size);
        let segments = total.div_ceil(per_segment);
        if self.meta.chunks != total || u64::from(self.meta.segments) != segments {
            return Err(StoreError::Damaged {
                token: self.token.clone(),
                why: format!(
                    "meta.json records {} chunks in {} segments, but {} bytes make {total} chunks in {segments}",
                    self.meta.chunks, self.meta.segments, self.meta.size
                ),
            }
            .into());
        }
        // Segments are opened as they are read (one at a time per reader),
        // never all at once: a 100 GiB file has 1,600 of them, more than a
        // default descriptor limit. Here they are only looked for.
        for s in 0..self.meta.segments {
            if !fs::symlink_metadata(self.dir.join(segment_name(s))).is_ok_and(|m| m.is_file()) {
                let first = u64::from(s) * per_segment;
                return Err(FormatError::Truncated {
                    last_present: i64::try_from(first).unwrap_or(i64::MAX) - 1,
                    total,
                }
                .into());
            }
        }
        Ok(Chunks {
            dir: self.dir.clone(),
            token: self.token.clone(),
            segments: self.meta.segments,
            chunk_size,
            size: self.meta.size,
            total,
            per_segment,
        })
    }
}

/// A stored file's segments, for reading chunk records by position from any
/// number of threads at once, each with its own [`Cursor`].
#[derive(Debug)]
pub struct Chunks {
    dir: PathBuf,
    token: String,
    segments: u32,
    chunk_size: u32,
    size: u64,
    total: u64,
    per_segment: u64,
}

/// The one segment a reader has open.
#[derive(Debug, Default)]
pub struct Cursor(Option<(u64, File)>);

impl Chunks {
    fn open_segment(&self, segment: u64) -> Result<File, ReadError> {
        let missing = || self.truncated(segment * self.per_segment);
        let name = u32::try_from(segment).map_err(|_| missing())?;
        if name >= self.segments {
            return Err(missing().into());
        }
        let path = self.dir.join(segment_name(name));
        match OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
        {
            Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => Ok(f),
            Ok(_) => Err(missing().into()),
            // Gone, or replaced by a symlink (O_NOFOLLOW refuses it with ELOOP).
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) =>
            {
                Err(missing().into())
            }
            Err(e) => Err(io(&path)(e).into()),
        }
    }

    /// How many chunks the file has.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The plaintext size.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of sealed chunk (ciphertext and tag) chunk `index` must have.
    #[must_use]
    pub fn sealed_len(&self, index: u64) -> usize {
        let cs = u64::from(self.chunk_size);
        let plain = if index + 1 == self.total {
            self.size - index * cs
        } else {
            cs
        };
        // At most a chunk size plus a tag: fits any usize hsmd runs on.
        usize::try_from(plain).unwrap_or(usize::MAX) + format::TAG_LEN
    }

    /// Reads chunk `index`'s record into `buf` (which must hold at least
    /// [`RECORD_PREFIX`] + [`Chunks::sealed_len`] bytes); the sealed chunk is
    /// then `buf[RECORD_PREFIX..RECORD_PREFIX + sealed_len]`.
    ///
    /// # Errors
    /// [`FormatError::Truncated`] where the segment ends early;
    /// [`FormatError::Chunk`] for a record of the wrong length.
    pub fn read_record(&self, index: u64, buf: &mut [u8], cursor: &mut Cursor) -> Result<usize, ReadError> {
        let sealed = self.sealed_len(index);
        let record = RECORD_PREFIX + sealed;
        let Some(buf) = buf.get_mut(..record) else {
            return Err(StoreError::Damaged {
                token: self.token.clone(),
                why: "a read buffer smaller than a chunk".into(),
            }
            .into());
        };
        let segment = index / self.per_segment;
        let offset = (index % self.per_segment) * record_len(self.chunk_size);
        if cursor.0.as_ref().is_none_or(|(s, _)| *s != segment) {
            cursor.0 = Some((segment, self.open_segment(segment)?));
        }
        let Some((_, file)) = cursor.0.as_ref() else {
            return Err(self.truncated(index).into());
        };
        match file.read_exact_at(buf, offset) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(self.truncated(index).into()),
            Err(e) => return Err(io(&self.dir)(e).into()),
        }
        if buf[..RECORD_PREFIX] != u32::try_from(sealed).unwrap_or(u32::MAX).to_be_bytes() {
            return Err(FormatError::Chunk {
                index,
                total: self.total,
            }
            .into());
        }
        Ok(sealed)
    }

    fn truncated(&self, index: u64) -> FormatError {
        FormatError::Truncated {
            last_present: i64::try_from(index).unwrap_or(i64::MAX) - 1,
            total: self.total,
        }
    }

    /// Checks that nothing follows the last chunk: no segment is longer than
    /// its chunks and no segment follows the last.
    ///
    /// # Errors
    /// [`FormatError::Extra`]; [`StoreError::Io`].
    pub fn check_end(&self) -> Result<(), ReadError> {
        let extra = FormatError::Extra {
            index: self.total,
            total: self.total,
        };
        let full = record_len(self.chunk_size);
        for s in 0..self.segments {
            let first = u64::from(s) * self.per_segment;
            let last = (first + self.per_segment).min(self.total) - 1;
            let expected = (last - first) * full + (RECORD_PREFIX + self.sealed_len(last)) as u64;
            let path = self.dir.join(segment_name(s));
            let len = match fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() => m.len(),
                _ => return Err(self.truncated(first).into()),
            };
            if len != expected {
                return Err(if len > expected { extra } else { self.truncated(last) }.into());
            }
        }
        if fs::symlink_metadata(self.dir.join(segment_name(self.segments))).is_ok() {
            return Err(extra.into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_uuids_and_nothing_else_reaches_the_disk() {
        let t = new_token().unwrap();
        assert!(valid_token(&t), "{t}");
        for bad in [
            "../../etc/passwd",
            "",
            "0f8fad5b-d9cb-469f-a165-70867728950",
            "0F8FAD5B-D9CB-469F-A165-70867728950E",
            "0f8fad5b/d9cb-469f-a165-70867728950e",
            "0f8fad5b-d9cb-469f-a165-70867728950e/..",
        ] {
            assert!(!valid_token(bad), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = FileStore::open(dir.path()).unwrap();
        assert!(matches!(s.open_file("../state"), Err(StoreError::BadToken(_))));
        assert!(matches!(s.delete("../state"), Err(StoreError::BadToken(_))));
    }

    #[test]
    fn a_finished_file_reads_back_and_an_unfinished_one_never_appears() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = FileStore::open(dir.path()).unwrap();
        let t = new_token().unwrap();
        let mut w = s.create(&t, b"{\"h\":1}", 4096).unwrap();
        for i in 0..5u8 {
            let mut record = 4112u32.to_be_bytes().to_vec();
            record.extend_from_slice(&[i; 4112]);
            w.append_record(&record).unwrap();
        }
        assert!(
            w.append_record(&[0, 0, 0, 9, 1]).is_err(),
            "a prefix that lies is refused"
        );
        assert!(s.tokens().unwrap().is_empty(), "not visible before finish");
        let (chunks, segments) = w.counts();
        w.finish(&Meta {
            size: 5 * 4096,
            chunks,
            segments,
            checksum: "x".into(),
            stored_unix: 1,
        })
        .unwrap();
        assert_eq!(s.tokens().unwrap(), vec![t.clone()]);
        let r = s.open_file(&t).unwrap();
        assert_eq!(r.header, b"{\"h\":1}");
        let chunks = r.chunks(4096).unwrap();
        let mut buf = vec![0u8; 4 + 4112];
        let mut cursor = Cursor::default();
        for i in (0..5u8).rev() {
            assert_eq!(chunks.read_record(u64::from(i), &mut buf, &mut cursor).unwrap(), 4112);
            assert_eq!(&buf[4..], &[i; 4112][..]);
        }
        assert!(matches!(
            chunks.read_record(5, &mut buf, &mut cursor),
            Err(ReadError::Format(FormatError::Truncated { last_present: 4, .. }))
        ));
        chunks.check_end().unwrap();
        assert!(
            r.chunks(8192).is_err(),
            "metadata that disagrees with the layout is refused"
        );

        // A store dropped midway leaves nothing; one interrupted by a crash
        // is debris, removed at open.
        drop(s.create(&new_token().unwrap(), b"{}", 4096).unwrap());
        let w = s.create(&new_token().unwrap(), b"{}", 4096).unwrap();
        std::mem::forget(w);
        let (s, cleaned) = FileStore::open(dir.path()).unwrap();
        assert_eq!(cleaned, 1);
        assert_eq!(s.tokens().unwrap(), vec![t.clone()]);

        s.delete(&t).unwrap();
        assert!(s.tokens().unwrap().is_empty());
        assert!(matches!(s.open_file(&t), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn a_symlink_planted_in_the_store_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = FileStore::open(dir.path()).unwrap();
        let t = new_token().unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("files").join(&t)).unwrap();
        assert!(matches!(s.open_file(&t), Err(StoreError::Damaged { .. })));
        assert!(matches!(s.delete(&t), Err(StoreError::Damaged { .. })));
        assert!(Path::new("/etc/passwd").exists(), "nothing outside was touched");
    }
}
