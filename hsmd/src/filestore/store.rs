//! The file store's directories (`docs/filestore.md`): one per token, chunks
//! in segment files, written under a temporary name and renamed into place
//! when complete, so a crash leaves either nothing or a whole file.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufReader, Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Bytes of sealed chunks per segment file before the next one starts.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
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
        Ok((Self { root }, cleaned))
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
    pub fn create(&self, token: &str, header_bytes: &[u8]) -> Result<Writer, StoreError> {
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
            segment_bytes: 0,
            segments: 0,
            chunks: 0,
        })
    }

    /// Opens a stored file for reading.
    ///
    /// # Errors
    /// As [`FileStore::dir`]; [`StoreError::Damaged`] for missing parts.
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
            segment: None,
            next_segment: 0,
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
    /// As [`FileStore::dir`]; [`StoreError::Io`].
    pub fn delete(&self, token: &str) -> Result<(), StoreError> {
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
    segment_bytes: u64,
    segments: u32,
    chunks: u64,
}

impl Writer {
    /// Appends the next sealed chunk.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn append(&mut self, sealed: &[u8]) -> Result<(), StoreError> {
        let len = u32::try_from(sealed.len()).map_err(|_| StoreError::Damaged {
            token: self.token.clone(),
            why: "a sealed chunk over 4 GiB".into(),
        })?;
        if self.segment.is_none() || self.segment_bytes + 4 + u64::from(len) > SEGMENT_BYTES && self.segment_bytes > 0 {
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
            self.segment_bytes = 0;
        }
        let dir = self.dir.clone();
        if let Some(f) = self.segment.as_mut() {
            f.write_all(&len.to_be_bytes())
                .and_then(|()| f.write_all(sealed))
                .map_err(io(&dir))?;
        }
        self.segment_bytes += 4 + u64::from(len);
        self.chunks += 1;
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

    /// Gives up: removes what was written.
    pub fn abandon(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A stored file being read, chunk by chunk.
#[derive(Debug)]
pub struct Reader {
    dir: PathBuf,
    token: String,
    /// The header's exact bytes.
    pub header: Vec<u8>,
    /// What the store recorded.
    pub meta: Meta,
    segment: Option<BufReader<File>>,
    next_segment: u32,
}

impl Reader {
    /// The next sealed chunk, or `None` after the last segment ends.
    ///
    /// # Errors
    /// [`StoreError::Damaged`] for a length past the end of a segment.
    pub fn next_chunk(&mut self, max_len: usize) -> Result<Option<Vec<u8>>, StoreError> {
        loop {
            if self.segment.is_none() {
                if self.next_segment >= self.meta.segments {
                    return Ok(None);
                }
                let path = self.dir.join(segment_name(self.next_segment));
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_file() => {}
                    _ => {
                        return Err(StoreError::Damaged {
                            token: self.token.clone(),
                            why: format!("segment {} is missing", self.next_segment),
                        })
                    }
                }
                self.segment = Some(BufReader::with_capacity(1 << 20, File::open(&path).map_err(io(&path))?));
                self.next_segment += 1;
            }
            let Some(seg) = self.segment.as_mut() else { continue };
            let mut len = [0u8; 4];
            match seg.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    self.segment = None;
                    continue;
                }
                Err(e) => return Err(io(&self.dir)(e)),
            }
            let len = u32::from_be_bytes(len) as usize;
            if len > max_len {
                return Err(StoreError::Damaged {
                    token: self.token.clone(),
                    why: format!("a chunk of {len} bytes, more than the chunk size allows"),
                });
            }
            let mut buf = vec![0u8; len];
            seg.read_exact(&mut buf).map_err(|_| StoreError::Damaged {
                token: self.token.clone(),
                why: format!("segment {} ends inside a chunk", self.next_segment - 1),
            })?;
            return Ok(Some(buf));
        }
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
        let mut w = s.create(&t, b"{\"h\":1}").unwrap();
        for i in 0..5u8 {
            w.append(&[i; 100]).unwrap();
        }
        assert!(s.tokens().unwrap().is_empty(), "not visible before finish");
        let (chunks, segments) = w.counts();
        w.finish(&Meta {
            size: 500,
            chunks,
            segments,
            checksum: "x".into(),
            stored_unix: 1,
        })
        .unwrap();
        assert_eq!(s.tokens().unwrap(), vec![t.clone()]);
        let mut r = s.open_file(&t).unwrap();
        assert_eq!(r.header, b"{\"h\":1}");
        let mut n = 0;
        while let Some(c) = r.next_chunk(1000).unwrap() {
            assert_eq!(c, vec![n; 100]);
            n += 1;
        }
        assert_eq!(n, 5);

        // A store interrupted midway (as by a crash) is debris, removed at open.
        let w = s.create(&new_token().unwrap(), b"{}").unwrap();
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
