//! The token file store's format (`docs/filestore.md`): a fresh data key per
//! file, chunks sealed with AES-256-GCM under STREAM nonces (a per-file random
//! prefix, the chunk counter and a last-chunk flag, as in Tink's streaming AEAD
//! and age), and the header's hash plus the chunk's position bound into every
//! chunk's associated data. A chunk that is flipped, reordered, duplicated,
//! dropped, cut off or moved from another file, and a header that is edited,
//! all fail to open, and the error names the chunk.

use aes_gcm::{
    aead::{AeadInPlace, KeyInit},
    Aes256Gcm, Nonce,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// Format version.
pub const FORMAT: u32 = 1;
/// Bytes of random nonce prefix per file.
pub const PREFIX_LEN: usize = 7;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Smallest and largest chunk sizes accepted.
pub const MIN_CHUNK: u32 = 4 * 1024;
/// See [`MIN_CHUNK`].
pub const MAX_CHUNK: u32 = 8 * 1024 * 1024;

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
    #[error("the retrieved data does not match its recorded SHA-256 checksum")]
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
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&h.chunk_size) {
            return Err(FormatError::Header(format!("chunk size {} out of range", h.chunk_size)));
        }
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

/// Seals and opens the chunks of one file under its data key. The one place
/// the daemon's bulk AEAD is chosen.
pub struct ChunkCipher {
    aead: Aes256Gcm,
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
            aead: Aes256Gcm::new(data_key.into()),
            prefix: header.prefix()?,
            header_hash: header_hash(header_bytes),
        })
    }

    /// Seals chunk `index` in place (appending the tag).
    ///
    /// # Errors
    /// [`FormatError::Header`] for an impossible index.
    pub fn seal(&self, index: u64, last: bool, total_size: u64, buf: &mut Vec<u8>) -> Result<(), FormatError> {
        let n = nonce(&self.prefix, index, last)?;
        let aad = chunk_aad(&self.header_hash, index, last, total_size);
        self.aead
            .encrypt_in_place(Nonce::from_slice(&n), &aad, buf)
            .map_err(|_| FormatError::Header("a chunk is too large to seal".into()))
    }

    /// Opens chunk `index` of `total` in place (removing the tag).
    ///
    /// # Errors
    /// [`FormatError::Chunk`] naming the chunk.
    pub fn open(&self, index: u64, total: u64, total_size: u64, buf: &mut Vec<u8>) -> Result<(), FormatError> {
        let last = index + 1 == total;
        let n = nonce(&self.prefix, index, last)?;
        let aad = chunk_aad(&self.header_hash, index, last, total_size);
        self.aead
            .decrypt_in_place(Nonce::from_slice(&n), &aad, buf)
            .map_err(|_| FormatError::Chunk { index, total })
    }
}

/// How many chunks a file of `size` bytes has (an empty file has one, empty).
#[must_use]
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size)).max(1)
}

/// The file checksum: SHA-256 over the SHA-256 of each chunk's plaintext, in
/// order, so chunks can be hashed in parallel and one stream never limits the
/// pipeline.
#[derive(Debug, Default, Clone)]
pub struct Checksum {
    list: Sha256,
}

impl Checksum {
    /// Adds chunk hashes in order.
    pub fn push(&mut self, chunk_hash: &[u8; 32]) {
        self.list.update(chunk_hash);
    }

    /// The checksum, hex.
    #[must_use]
    pub fn finish(self) -> String {
        hex::encode(self.list.finalize())
    }
}

/// One chunk's hash, for [`Checksum::push`].
#[must_use]
pub fn chunk_hash(plaintext: &[u8]) -> [u8; 32] {
    Sha256::digest(plaintext).into()
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
            c.seal(i, i + 1 == total, data.len() as u64, &mut buf).unwrap();
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
            c.open(i, total, size, &mut buf)?;
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

    #[test]
    fn the_checksum_is_a_hash_of_chunk_hashes_in_order() {
        let mut a = Checksum::default();
        a.push(&chunk_hash(b"one"));
        a.push(&chunk_hash(b"two"));
        let mut b = Checksum::default();
        b.push(&chunk_hash(b"two"));
        b.push(&chunk_hash(b"one"));
        assert_ne!(a.clone().finish(), b.finish());
        let mut direct = Sha256::new();
        direct.update(chunk_hash(b"one"));
        direct.update(chunk_hash(b"two"));
        assert_eq!(a.finish(), hex::encode(direct.finalize()));
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
