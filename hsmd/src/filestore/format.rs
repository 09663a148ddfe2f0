//! The token file store's format (`docs/filestore.md`): a fresh data key per
//! file, chunks sealed with AES-256-GCM under STREAM nonces (a per-file random
//! prefix, the chunk counter and a last-chunk flag, as in Tink's streaming AEAD
//! and age), and the header's hash plus the chunk's position bound into every
//! chunk's associated data. A chunk that is flipped, reordered, duplicated,
//! dropped, cut off or moved from another file, and a header that is edited,
//! all fail to open, and the error names the chunk.

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt as _, Mode};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// Format version.
pub const FORMAT: u32 = 1;
/// Bytes of random nonce prefix per file.
pub const PREFIX_LEN: usize = 7;
/// AES-GCM tag length.
pub const TAG_LEN: usize = crate::aead::TAG_LEN;
/// Smallest and largest chunk sizes accepted (powers of two in between, so a
/// chunk is a whole BLAKE3 subtree: see [`Checksum`]).
pub const MIN_CHUNK: u32 = 4 * 1024;
/// See [`MIN_CHUNK`].
pub const MAX_CHUNK: u32 = crate::config::MAX_FILE_CHUNK;

/// What is wrong with a stored file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// A chunk failed authentication.
    #[error(
        "chunk {index} of {total} does not authenticate: it was altered, reordered, duplicated, \
         or moved from another file"
    )]
    Chunk {
        /// Its index, from 0.
        index: u64,
        /// How many the header expects.
        total: u64,
    },
    /// Chunks are missing at the end.
    #[error("the file ends after chunk {last_present} of {total}: chunks were dropped or cut off")]
    Truncated {
        /// The last chunk present (or -1 as none).
        last_present: i64,
        /// How many the header expects.
        total: u64,
    },
    /// More chunks than the header says.
    #[error("chunk {index} is beyond the {total} chunks the header names: a chunk was added or duplicated")]
    Extra {
        /// The extra chunk's index.
        index: u64,
        /// How many the header expects.
        total: u64,
    },
    /// The header does not parse or fails its checks.
    #[error("the header is invalid: {0}")]
    Header(String),
    /// The plaintext does not match the checksum recorded at store time.
    #[error("the retrieved data does not match its recorded BLAKE3 checksum")]
    Checksum,
}

/// The header, fixed before the first chunk is sealed. Its exact stored bytes
/// are hashed into every chunk's associated data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// [`FORMAT`].
    pub format: u32,
    /// The file's token (a UUID).
    pub token: String,
    /// The original file name (no directories).
    pub name: String,
    /// Plaintext bytes per chunk (the last may be shorter).
    pub chunk_size: u32,
    /// The key that wraps the data key.
    pub key: String,
    /// Its version.
    pub key_version: u32,
    /// The data key sealed by that key version (hex), with associated data
    /// [`data_key_aad`].
    pub wrapped_data_key: String,
    /// The random nonce prefix (hex, [`PREFIX_LEN`] bytes).
    pub nonce_prefix: String,
    /// Who stored it.
    pub owner_uid: u32,
    /// When.
    pub created_unix: u64,
}

impl Header {
    /// The stored form.
    ///
    /// # Errors
    /// Never in practice (plain strings and numbers).
    pub fn to_bytes(&self) -> Result<Vec<u8>, FormatError> {
        serde_json::to_vec(self).map_err(|e| FormatError::Header(e.to_string()))
    }

    /// Parses and checks stored header bytes.
    ///
    /// # Errors
    /// [`FormatError::Header`] naming the problem.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let h: Self = serde_json::from_slice(bytes).map_err(|e| FormatError::Header(e.to_string()))?;
        if h.format != FORMAT {
            return Err(FormatError::Header(format!(
                "format {} (this hsmd reads {FORMAT})",
                h.format
            )));
        }
        check_chunk_size(h.chunk_size).map_err(FormatError::Header)?;
        h.prefix()?;
        Ok(h)
    }

    /// The nonce prefix.
    ///
    /// # Errors
    /// [`FormatError::Header`] if it is not [`PREFIX_LEN`] hex bytes.
    pub fn prefix(&self) -> Result<[u8; PREFIX_LEN], FormatError> {
        hex::decode(&self.nonce_prefix)
            .ok()
            .and_then(|b| <[u8; PREFIX_LEN]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| FormatError::Header("the nonce prefix is not 7 hex bytes".into()))
    }
}

/// Checks a chunk size: a power of two from [`MIN_CHUNK`] to [`MAX_CHUNK`].
///
/// # Errors
/// What is wrong with it, for the caller's message.
pub fn check_chunk_size(chunk_size: u32) -> Result<(), String> {
    if (MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) && chunk_size.is_power_of_two() {
        Ok(())
    } else {
        Err(format!(
            "a chunk is a power of two from {} KiB to {} MiB bytes (4KiB, 64KiB, 1MiB, ...); {chunk_size} is not",
            MIN_CHUNK / 1024,
            MAX_CHUNK >> 20
        ))
    }
}

/// Associated data of the sealed data key: binds it to its file.
#[must_use]
pub fn data_key_aad(token: &str) -> Vec<u8> {
    let mut aad = b"hsmd file data key v1\0".to_vec();
    aad.extend_from_slice(token.as_bytes());
    aad
}

/// What every chunk of a file binds: the hash of its exact header bytes.
#[must_use]
pub fn header_hash(header_bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"hsmd file v1\0");
    h.update(header_bytes);
    h.finalize().into()
}

/// STREAM nonce: prefix ‖ u32 counter (big-endian) ‖ last flag.
///
/// # Errors
/// [`FormatError::Header`] past 2^32 chunks (far beyond any file the chunk
/// limits allow).
pub fn nonce(prefix: &[u8; PREFIX_LEN], index: u64, last: bool) -> Result<[u8; 12], FormatError> {
    let counter = u32::try_from(index).map_err(|_| FormatError::Header("more than 2^32 chunks".into()))?;
    let mut n = [0u8; 12];
    n[..PREFIX_LEN].copy_from_slice(prefix);
    n[PREFIX_LEN..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    Ok(n)
}

/// A chunk's associated data: the header hash, its index, the last flag, and
/// for the last chunk the file's total size (so a file cut at a chunk boundary
/// or extended fails even if its last remaining chunk were flagged last).
#[must_use]
pub fn chunk_aad(header_hash: &[u8; 32], index: u64, last: bool, total_size: u64) -> [u8; 49] {
    let mut aad = [0u8; 49];
    aad[..32].copy_from_slice(header_hash);
    aad[32..40].copy_from_slice(&index.to_be_bytes());
    aad[40] = u8::from(last);
    if last {
        aad[41..49].copy_from_slice(&total_size.to_be_bytes());
    }
    aad
}

/// Seals and opens the chunks of one file under its data key (with the
/// daemon's one AES-256-GCM, [`crate::aead`]). Shared by the workers of a
/// transfer: it holds no per-chunk state.
pub struct ChunkCipher {
    aead: crate::aead::Aes256Gcm,
    prefix: [u8; PREFIX_LEN],
    header_hash: [u8; 32],
}

impl std::fmt::Debug for ChunkCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCipher").finish_non_exhaustive()
    }
}

impl ChunkCipher {
    /// For a file whose header bytes are `header_bytes`.
    ///
    /// # Errors
    /// [`FormatError::Header`].
    pub fn new(data_key: &[u8; 32], header: &Header, header_bytes: &[u8]) -> Result<Self, FormatError> {
        Ok(Self {
            aead: crate::aead::Aes256Gcm::new(data_key),
            prefix: header.prefix()?,
            header_hash: header_hash(header_bytes),
        })
    }

    /// Seals chunk `index` in place and returns its tag.
    ///
    /// # Errors
    /// [`FormatError::Header`] for an impossible index.
    pub fn seal_detached(
        &self,
        index: u64,
        last: bool,
        total_size: u64,
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], FormatError> {
        let n = nonce(&self.prefix, index, last)?;
        let aad = chunk_aad(&self.header_hash, index, last, total_size);
        self.aead
            .seal_detached(&n, &aad, buf)
            .map_err(|_| FormatError::Header("a chunk is too large to seal".into()))
    }

    /// Opens chunk `index` of `total` (ciphertext ‖ tag) in place; returns the
    /// plaintext's length, at the front of `buf`.
    ///
    /// # Errors
    /// [`FormatError::Chunk`] naming the chunk.
    pub fn open_in_place(&self, index: u64, total: u64, total_size: u64, buf: &mut [u8]) -> Result<usize, FormatError> {
        let last = index + 1 == total;
        let n = nonce(&self.prefix, index, last)?;
        let aad = chunk_aad(&self.header_hash, index, last, total_size);
        self.aead
            .open_in_place(&n, &aad, buf)
            .map(|p| p.len())
            .map_err(|_| FormatError::Chunk { index, total })
    }
}

/// How many chunks a file of `size` bytes has (an empty file has one, empty).
#[must_use]
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size)).max(1)
}

/// One chunk's part of the file checksum, computed on its own (by any worker,
/// in any order) and given to [`Checksum::push`] in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkHash {
    /// The BLAKE3 chaining value of a chunk of a file of several chunks: the
    /// non-root hash of the subtree the chunk is in the file's BLAKE3 tree.
    Subtree(ChainingValue),
    /// The BLAKE3 hash of a file of one chunk: the chunk is the whole tree.
    Whole([u8; 32]),
}

/// Hashes chunk `index` of a file cut in chunks of `chunk_size` bytes; `only`
/// says it is the file's one chunk. `chunk_size` must have passed
/// [`check_chunk_size`] and `plaintext` be at most that long (and not empty
/// unless `only`), as the store and the reader ensure.
#[must_use]
pub fn chunk_hash(index: u64, chunk_size: u32, only: bool, plaintext: &[u8]) -> ChunkHash {
    if only {
        return ChunkHash::Whole(*blake3::hash(plaintext).as_bytes());
    }
    // A power-of-two chunk size of at least 4 KiB at a multiple of itself is a
    // whole BLAKE3 subtree (1 KiB leaves), which is what the offset rules of
    // the hazmat API ask for.
    ChunkHash::Subtree(
        blake3::Hasher::new()
            .set_input_offset(index * u64::from(chunk_size))
            .update(plaintext)
            .finalize_non_root(),
    )
}

/// The file checksum: the BLAKE3 hash of the whole plaintext, exactly what
/// `b3sum` prints for the original file, assembled from per-chunk subtree
/// hashes ([`chunk_hash`]) so that chunks are hashed in parallel and no single
/// hash stream limits the pipeline. Pushed in order, it keeps one chaining
/// value per level of the tree (about 20 for a 10 GiB file), as BLAKE3's own
/// incremental hasher does.
#[derive(Debug, Default, Clone)]
pub struct Checksum {
    stack: Vec<ChainingValue>,
    /// The newest chunk: merged only once another follows, because the last
    /// one is merged differently (into the root).
    pending: Option<ChunkHash>,
    merged: u64,
}

impl Checksum {
    /// Adds the next chunk's hash.
    pub fn push(&mut self, hash: ChunkHash) {
        if let Some(ChunkHash::Subtree(cv)) = self.pending.take() {
            self.merged += 1;
            let mut cv = cv;
            // Each trailing zero bit of the count closes a complete subtree.
            let mut count = self.merged;
            while count & 1 == 0 {
                let Some(left) = self.stack.pop() else { break };
                cv = merge_subtrees_non_root(&left, &cv, Mode::Hash);
                count >>= 1;
            }
            self.stack.push(cv);
        }
        self.pending = Some(hash);
    }

    /// The checksum (hex), or `None` if the chunks pushed do not make a file
    /// (none at all, a lone chunk hashed as part of a larger file, or a
    /// whole-file hash after other chunks).
    #[must_use]
    pub fn finish(mut self) -> Option<String> {
        let root = match self.pending.take()? {
            ChunkHash::Whole(h) if self.stack.is_empty() => h,
            ChunkHash::Subtree(mut cv) if !self.stack.is_empty() => loop {
                let left = self.stack.pop()?;
                if self.stack.is_empty() {
                    break *merge_subtrees_root(&left, &cv, Mode::Hash).as_bytes();
                }
                cv = merge_subtrees_non_root(&left, &cv, Mode::Hash);
            },
            _ => return None,
        };
        Some(hex::encode(root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(token: &str) -> Header {
        Header {
            format: FORMAT,
            token: token.into(),
            name: "report.pdf".into(),
            chunk_size: MIN_CHUNK,
            key: "files".into(),
            key_version: 1,
            wrapped_data_key: "00".into(),
            nonce_prefix: hex::encode([9u8; PREFIX_LEN]),
            owner_uid: 1000,
            created_unix: 1,
        }
    }

    /// Seals `data` as a file; returns its header bytes and sealed chunks.
    fn store(key: &[u8; 32], token: &str, data: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let h = header(token);
        let hb = h.to_bytes().unwrap();
        let c = ChunkCipher::new(key, &h, &hb).unwrap();
        let total = chunk_count(data.len() as u64, h.chunk_size);
        let mut chunks = Vec::new();
        for i in 0..total {
            let start = (i * u64::from(h.chunk_size)) as usize;
            let end = (start + h.chunk_size as usize).min(data.len());
            let mut buf = data[start..end].to_vec();
            let tag = c.seal_detached(i, i + 1 == total, data.len() as u64, &mut buf).unwrap();
            buf.extend_from_slice(&tag);
            chunks.push(buf);
        }
        (hb, chunks)
    }

    fn retrieve(key: &[u8; 32], hb: &[u8], chunks: &[Vec<u8>], size: u64) -> Result<Vec<u8>, FormatError> {
        let h = Header::parse(hb)?;
        let c = ChunkCipher::new(key, &h, hb)?;
        let total = chunk_count(size, h.chunk_size);
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let i = i as u64;
            if i >= total {
                return Err(FormatError::Extra { index: i, total });
            }
            let mut buf = chunk.clone();
            let len = c.open_in_place(i, total, size, &mut buf)?;
            buf.truncate(len);
            out.extend_from_slice(&buf);
        }
        if (chunks.len() as u64) < total {
            return Err(FormatError::Truncated {
                last_present: chunks.len() as i64 - 1,
                total,
            });
        }
        Ok(out)
    }

    #[test]
    fn round_trips_at_the_chunk_boundaries() {
        let key = [3u8; 32];
        for size in [0usize, 1, 4096, 4097, 3 * 4096, 20_000] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let (hb, chunks) = store(&key, "t", &data);
            assert_eq!(chunks.len() as u64, chunk_count(size as u64, MIN_CHUNK));
            assert_eq!(retrieve(&key, &hb, &chunks, size as u64).unwrap(), data, "size {size}");
        }
    }

    #[test]
    fn every_kind_of_tampering_names_the_chunk() {
        let key = [3u8; 32];
        let data = vec![5u8; 4 * 4096 + 10];
        let size = data.len() as u64;
        let (hb, chunks) = store(&key, "t1", &data);
        let bad = |chunks: &[Vec<u8>], hb: &[u8]| retrieve(&key, hb, chunks, size).unwrap_err();

        let mut flipped = chunks.clone();
        flipped[2][100] ^= 1;
        assert_eq!(bad(&flipped, &hb), FormatError::Chunk { index: 2, total: 5 });

        let mut swapped = chunks.clone();
        swapped.swap(1, 2);
        assert_eq!(bad(&swapped, &hb), FormatError::Chunk { index: 1, total: 5 });

        let dropped = &chunks[..4];
        assert_eq!(
            bad(dropped, &hb),
            FormatError::Truncated {
                last_present: 3,
                total: 5
            }
        );

        let mut duplicated = chunks.clone();
        duplicated.insert(2, chunks[1].clone());
        assert_eq!(bad(&duplicated, &hb), FormatError::Chunk { index: 2, total: 5 });

        // The same data under the same key in another file.
        let (_, other) = store(&key, "t2", &data);
        let mut moved = chunks.clone();
        moved[3] = other[3].clone();
        assert_eq!(bad(&moved, &hb), FormatError::Chunk { index: 3, total: 5 });

        let edited = String::from_utf8(hb.clone())
            .unwrap()
            .replace("report.pdf", "invoice.pdf");
        assert_eq!(
            bad(&chunks, edited.as_bytes()),
            FormatError::Chunk { index: 0, total: 5 }
        );

        // A shorter file claimed: the chunk flagged last is not where it should be.
        assert!(matches!(
            retrieve(&key, &hb, &chunks[..4], 4 * 4096),
            Err(FormatError::Chunk { index: 3, .. })
        ));
    }

    #[test]
    fn nonces_differ_by_counter_and_last_flag() {
        let p = [1u8; PREFIX_LEN];
        assert_ne!(nonce(&p, 0, false).unwrap(), nonce(&p, 1, false).unwrap());
        assert_ne!(nonce(&p, 0, false).unwrap(), nonce(&p, 0, true).unwrap());
        assert!(nonce(&p, 1 << 32, false).is_err());
    }

    fn checksum_of(data: &[u8], chunk_size: u32) -> Option<String> {
        let n = chunk_count(data.len() as u64, chunk_size);
        let mut c = Checksum::default();
        for i in 0..n {
            let start = (i * u64::from(chunk_size)) as usize;
            let end = (start + chunk_size as usize).min(data.len());
            c.push(chunk_hash(i, chunk_size, n == 1, &data[start..end]));
        }
        c.finish()
    }

    /// The hazmat API's own advice: check the assembled tree against
    /// `blake3::hash` over many shapes (1, 2, 3, 4, 5, 7, 8, 9, 16, 17 chunks,
    /// short and full last chunks, every allowed small chunk size).
    #[test]
    fn the_checksum_is_the_blake3_hash_of_the_whole_file() {
        let data: Vec<u8> = (0..(17 * 16384 + 3)).map(|i: usize| (i * 31 % 253) as u8).collect();
        for chunk_size in [4096u32, 8192, 16384] {
            let cs = chunk_size as usize;
            let mut sizes = vec![0usize, 1, 1023, 1024, 1025, cs - 1, cs, cs + 1];
            for chunks in [2usize, 3, 4, 5, 7, 8, 9, 16, 17] {
                sizes.extend([
                    chunks * cs - 1,
                    chunks * cs,
                    (chunks - 1) * cs + 1,
                    (chunks - 1) * cs + 1024,
                ]);
            }
            for size in sizes {
                let size = size.min(data.len());
                assert_eq!(
                    checksum_of(&data[..size], chunk_size).as_deref(),
                    Some(blake3::hash(&data[..size]).to_hex().as_str()),
                    "size {size}, chunk {chunk_size}"
                );
            }
        }
    }

    #[test]
    fn a_checksum_of_chunks_out_of_order_or_mislabelled_is_refused_or_differs() {
        let data = vec![9u8; 3 * 4096];
        let mut swapped = Checksum::default();
        swapped.push(chunk_hash(1, 4096, false, &data[4096..8192]));
        swapped.push(chunk_hash(0, 4096, false, &data[..4096]));
        swapped.push(chunk_hash(2, 4096, false, &data[8192..]));
        // Equal chunks at other offsets hash differently, so even identical
        // content in another order does not collide.
        assert_ne!(swapped.finish(), checksum_of(&data, 4096));
        let mut lone = Checksum::default();
        lone.push(chunk_hash(0, 4096, false, &data[..10]));
        assert_eq!(lone.finish(), None);
        assert_eq!(Checksum::default().finish(), None);
        assert!(check_chunk_size(4096).is_ok() && check_chunk_size(1 << 23).is_ok());
        for bad in [0, 1024, 4095, 5000, 65_537, 1 << 24] {
            assert!(check_chunk_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn headers_are_checked() {
        let mut h = header("t");
        h.format = 2;
        assert!(Header::parse(&h.to_bytes().unwrap()).is_err());
        let mut h = header("t");
        h.nonce_prefix = "zz".into();
        assert!(Header::parse(&h.to_bytes().unwrap()).is_err());
        assert!(Header::parse(b"{\"format\":1,\"extra\":true}").is_err());
    }
}
