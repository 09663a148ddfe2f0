//! `hsmctl encrypt` / `decrypt` (files of any size, in chunks) and `mac` /
//! `mac-verify`.
//!
//! Encrypted file format (all integers big-endian):
//!
//! ```text
//! "HSMDENC1" | u16 name length | key name | u32 key version | u32 chunk size
//! then chunks, each: u32 length | 12-byte nonce ‖ ciphertext ‖ 16-byte tag
//! ```
//!
//! Chunk `i` (from 0) is sealed by hsmd with the associated data
//! `"hsmd-enc-v1\0" | u16 name length | name | u32 chunk size | u64 i | u8 last | user aad`,
//! where `last` is 1 for the final chunk only (an empty file is one empty final
//! chunk). Reordered, duplicated, dropped or truncated chunks, another header or
//! another `--aad` all fail to decrypt.

use std::{
    fs::File,
    io::{self, BufReader, Read},
    path::Path,
};

use protocol::{Client, ClientError, Operation, Reply};

use crate::{output::Output, Failure};

const MAGIC: &[u8; 8] = b"HSMDENC1";
/// Plaintext per chunk: well under the default 1 MiB frame.
const CHUNK: u32 = 256 * 1024;
/// The most a MAC request may carry.
pub const MAC_MAX: usize = 768 * 1024;

fn local(msg: String) -> Failure {
    Failure::Local(msg)
}

fn chunk_aad(name: &str, chunk_size: u32, index: u64, last: bool, user: &[u8]) -> Vec<u8> {
    let mut aad = b"hsmd-enc-v1\0".to_vec();
    aad.extend_from_slice(&(name.len() as u16).to_be_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad.extend_from_slice(&chunk_size.to_be_bytes());
    aad.extend_from_slice(&index.to_be_bytes());
    aad.push(u8::from(last));
    aad.extend_from_slice(user);
    aad
}

pub(crate) fn open_input(path: &Path) -> Result<Box<dyn Read>, Failure> {
    Ok(if path == Path::new("-") {
        Box::new(io::stdin().lock())
    } else {
        Box::new(BufReader::new(
            File::open(path).map_err(|e| local(format!("cannot open {}: {e}", path.display())))?,
        ))
    })
}

/// Reads up to `buf.len()` bytes, stopping early only at end of input.
pub(crate) fn fill(reader: &mut dyn Read, buf: &mut [u8]) -> Result<usize, io::Error> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Encrypts `input` into `output` in chunks.
pub fn encrypt(client: &mut Client, name: &str, input: &Path, output: &Path, aad: &[u8]) -> Result<(), Failure> {
    crate::output::not_the_input(input, output)?;
    let mut reader = open_input(input)?;
    let mut out = Output::create(output)?;
    let mut current = vec![0u8; CHUNK as usize];
    let mut next = vec![0u8; CHUNK as usize];
    let read_err = |e: io::Error| local(format!("cannot read {}: {e}", input.display()));
    let mut len = fill(&mut *reader, &mut current).map_err(read_err)?;
    let mut index = 0u64;
    let mut wrote_header = false;
    let mut pinned = None;
    loop {
        // Look one chunk ahead to know whether this one is the last.
        let next_len = if len == CHUNK as usize {
            fill(&mut *reader, &mut next).map_err(read_err)?
        } else {
            0
        };
        let last = next_len == 0;
        let (version, sealed) = match client.call(Operation::Encrypt {
            name: name.to_owned(),
            // Every chunk under the version the header names, even if the key
            // is rotated while this runs.
            version: pinned,
            plaintext: protocol::SecretBytes::new(current[..len].to_vec()),
            aad: chunk_aad(name, CHUNK, index, last, aad),
        })? {
            Reply::Encrypted { version, sealed } => (version, sealed),
            other => {
                return Err(ClientError::UnexpectedReply {
                    expected: "encrypt",
                    got: other.name(),
                }
                .into())
            }
        };
        if !wrote_header {
            out.write(&header(name, version, CHUNK))?;
            wrote_header = true;
            pinned = Some(version);
        }
        out.write(&(sealed.len() as u32).to_be_bytes())?;
        out.write(&sealed)?;
        if last {
            break;
        }
        std::mem::swap(&mut current, &mut next);
        len = next_len;
        index += 1;
    }
    out.finish()
}

fn read_exact_or(reader: &mut dyn Read, buf: &mut [u8], what: &str) -> Result<(), Failure> {
    reader.read_exact(buf).map_err(|_| {
        local(format!(
            "not an hsmd encrypted file, or truncated: cannot read its {what}"
        ))
    })
}

fn header(name: &str, version: u32, chunk_size: u32) -> Vec<u8> {
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&(name.len() as u16).to_be_bytes());
    header.extend_from_slice(name.as_bytes());
    header.extend_from_slice(&version.to_be_bytes());
    header.extend_from_slice(&chunk_size.to_be_bytes());
    header
}

/// Reads and checks an encrypted file's header: the key version and chunk size.
fn read_header(reader: &mut dyn Read, input: &Path, name: &str) -> Result<(u32, u32), Failure> {
    let mut magic = [0u8; 8];
    read_exact_or(&mut *reader, &mut magic, "header")?;
    if &magic != MAGIC {
        return Err(local(format!("{} is not an hsmd encrypted file", input.display())));
    }
    let mut u16b = [0u8; 2];
    read_exact_or(&mut *reader, &mut u16b, "header")?;
    let mut stored_name = vec![0u8; u16::from_be_bytes(u16b) as usize];
    read_exact_or(&mut *reader, &mut stored_name, "header")?;
    if stored_name != name.as_bytes() {
        return Err(local(format!(
            "{} was encrypted with key {:?}, not {name:?}",
            input.display(),
            String::from_utf8_lossy(&stored_name)
        )));
    }
    let mut u32b = [0u8; 4];
    read_exact_or(&mut *reader, &mut u32b, "header")?;
    let version = u32::from_be_bytes(u32b);
    read_exact_or(&mut *reader, &mut u32b, "header")?;
    let chunk_size = u32::from_be_bytes(u32b);
    if chunk_size == 0 || chunk_size > 16 * 1024 * 1024 {
        return Err(local(format!(
            "{} has an invalid chunk size {chunk_size}",
            input.display()
        )));
    }
    Ok((version, chunk_size))
}

/// Reads an encrypted file's chunks one at a time, knowing which is last.
struct Chunks<'a> {
    reader: &'a mut dyn Read,
    input: &'a Path,
    max_sealed: usize,
    pending: Option<usize>,
    index: u64,
    started: bool,
}

impl<'a> Chunks<'a> {
    fn new(reader: &'a mut dyn Read, input: &'a Path, chunk_size: u32) -> Self {
        Self {
            reader,
            input,
            max_sealed: chunk_size as usize + 28,
            pending: None,
            index: 0,
            started: false,
        }
    }

    fn read_len(&mut self) -> Result<Option<usize>, Failure> {
        let mut b = [0u8; 4];
        match fill(self.reader, &mut b).map_err(|e| local(format!("cannot read {}: {e}", self.input.display())))? {
            0 => Ok(None),
            4 => Ok(Some(u32::from_be_bytes(b) as usize)),
            _ => Err(local(format!(
                "{} is truncated inside a chunk length",
                self.input.display()
            ))),
        }
    }

    /// The next chunk: its index, sealed bytes, and whether it is the last.
    fn next(&mut self) -> Result<Option<(u64, Vec<u8>, bool)>, Failure> {
        if !self.started {
            self.started = true;
            self.pending = self.read_len()?;
            if self.pending.is_none() {
                return Err(local(format!(
                    "{} has no chunks: it is truncated",
                    self.input.display()
                )));
            }
        }
        let Some(len) = self.pending else {
            return Ok(None);
        };
        let index = self.index;
        if len < 28 || len > self.max_sealed {
            return Err(local(format!(
                "{}: chunk {index} has an invalid length {len}",
                self.input.display()
            )));
        }
        let mut sealed = vec![0u8; len];
        read_exact_or(self.reader, &mut sealed, &format!("chunk {index}"))?;
        self.pending = self.read_len()?;
        self.index += 1;
        Ok(Some((index, sealed, self.pending.is_none())))
    }
}

fn chunk_failed(index: u64, input: &Path, e: &ClientError) -> Failure {
    local(format!(
        "chunk {index} of {} does not decrypt: the file was altered, reordered or truncated, \
         the --aad differs, or it belongs to another key ({e})",
        input.display()
    ))
}

/// Decrypts what [`encrypt`] wrote; the output appears only if every chunk checks.
pub fn decrypt(
    client: &mut Client,
    name: &str,
    input: &Path,
    output: &Path,
    aad: &[u8],
    allow_compromised: bool,
) -> Result<(), Failure> {
    crate::output::not_the_input(input, output)?;
    let mut reader = open_input(input)?;
    let (version, chunk_size) = read_header(&mut *reader, input, name)?;
    let mut out = Output::create(output)?;
    let mut chunks = Chunks::new(&mut *reader, input, chunk_size);
    while let Some((index, sealed, last)) = chunks.next()? {
        let plaintext = match client.call(Operation::Decrypt {
            name: name.to_owned(),
            version,
            sealed,
            aad: chunk_aad(name, chunk_size, index, last, aad),
            allow_compromised,
        }) {
            Ok(Reply::Decrypted { plaintext }) => plaintext,
            Ok(other) => {
                return Err(ClientError::UnexpectedReply {
                    expected: "decrypt",
                    got: other.name(),
                }
                .into())
            }
            Err(e) if e.code() == Some(protocol::ErrorCode::DecryptFailed) => {
                return Err(chunk_failed(index, input, &e));
            }
            Err(e) => return Err(e.into()),
        };
        out.write(plaintext.expose())?;
    }
    out.finish()
}

/// Re-seals every chunk of an encrypted file under the key's newest version
/// (the first chunk decides it; the rest follow it even across a rotation).
/// Returns the old and new versions.
pub fn rewrap(client: &mut Client, name: &str, input: &Path, output: &Path, aad: &[u8]) -> Result<(u32, u32), Failure> {
    crate::output::not_the_input(input, output)?;
    let mut reader = open_input(input)?;
    let (version, chunk_size) = read_header(&mut *reader, input, name)?;
    let mut out = Output::create(output)?;
    let mut chunks = Chunks::new(&mut *reader, input, chunk_size);
    let mut to = None;
    while let Some((index, sealed, last)) = chunks.next()? {
        let (new_version, resealed) = match client.call(Operation::Rewrap {
            name: name.to_owned(),
            version,
            sealed,
            aad: chunk_aad(name, chunk_size, index, last, aad),
            to_version: to,
        }) {
            Ok(Reply::Encrypted { version, sealed }) => (version, sealed),
            Ok(other) => {
                return Err(ClientError::UnexpectedReply {
                    expected: "rewrap",
                    got: other.name(),
                }
                .into())
            }
            Err(e) if e.code() == Some(protocol::ErrorCode::DecryptFailed) => {
                return Err(chunk_failed(index, input, &e));
            }
            Err(e) => return Err(e.into()),
        };
        if to.is_none() {
            out.write(&header(name, new_version, chunk_size))?;
            to = Some(new_version);
        }
        out.write(&(resealed.len() as u32).to_be_bytes())?;
        out.write(&resealed)?;
    }
    out.finish()?;
    Ok((version, to.unwrap_or(version)))
}

/// Asks for a data key; writes it sealed (as a one-chunk encrypted file that
/// `hsmctl decrypt` opens) and, if asked, in plain (mode 0600). Returns the
/// version that sealed it.
pub fn datakey(
    client: &mut Client,
    name: &str,
    output: &Path,
    plaintext_out: Option<&Path>,
    aad: &[u8],
) -> Result<u32, Failure> {
    let (version, sealed, plaintext) = match client.call(Operation::DataKey {
        name: name.to_owned(),
        aad: chunk_aad(name, CHUNK, 0, true, aad),
        plaintext: plaintext_out.is_some(),
    })? {
        Reply::DataKey {
            version,
            sealed,
            plaintext,
        } => (version, sealed, plaintext),
        other => {
            return Err(ClientError::UnexpectedReply {
                expected: "datakey",
                got: other.name(),
            }
            .into())
        }
    };
    if let (Some(path), Some(key)) = (plaintext_out, plaintext) {
        crate::secrets::write_secret_file(path, key.expose()).map_err(local)?;
    }
    let mut out = Output::create(output)?;
    out.write(&header(name, version, CHUNK))?;
    out.write(&(sealed.len() as u32).to_be_bytes())?;
    out.write(&sealed)?;
    out.finish()?;
    Ok(version)
}

/// The text of a MAC tag file.
#[must_use]
pub fn tag_file(name: &str, version: u32, tag: &[u8]) -> String {
    format!(
        "hsmd-mac v1\nkey: {name}\nversion: {version}\ntag: {}\n",
        hex::encode(tag)
    )
}

/// Parses [`tag_file`]'s text: key, version, tag.
pub fn parse_tag_file(text: &str) -> Result<(String, u32, Vec<u8>), String> {
    let mut lines = text.lines();
    if lines.next() != Some("hsmd-mac v1") {
        return Err("not an hsmd MAC file (first line is not \"hsmd-mac v1\")".to_owned());
    }
    let (mut name, mut version, mut tag) = (None, None, None);
    for line in lines {
        match line.split_once(": ") {
            Some(("key", v)) => name = Some(v.to_owned()),
            Some(("version", v)) => version = v.parse().ok(),
            Some(("tag", v)) => tag = hex::decode(v).ok(),
            _ => {}
        }
    }
    match (name, version, tag) {
        (Some(n), Some(v), Some(t)) => Ok((n, v, t)),
        _ => Err("the MAC file lacks a valid key, version or tag line".to_owned()),
    }
}

/// Reads data for a MAC, refusing more than one request can carry.
pub fn read_mac_input(input: &Path) -> Result<Vec<u8>, Failure> {
    let mut data = Vec::new();
    open_input(input)?
        .take(MAC_MAX as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| local(format!("cannot read {}: {e}", input.display())))?;
    if data.len() > MAC_MAX {
        return Err(local(format!(
            "{} is larger than {MAC_MAX} bytes, the most one MAC request carries; \
             for large files use a signing key (hsmctl sign streams any size)",
            input.display()
        )));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_aad_separates_index_last_flag_and_user_data() {
        let a = chunk_aad("k", CHUNK, 0, false, b"");
        assert_ne!(a, chunk_aad("k", CHUNK, 1, false, b""));
        assert_ne!(a, chunk_aad("k", CHUNK, 0, true, b""));
        assert_ne!(a, chunk_aad("k", CHUNK, 0, false, b"x"));
        assert_ne!(a, chunk_aad("j", CHUNK, 0, false, b""));
    }

    #[test]
    fn tag_files_round_trip() {
        let t = tag_file("m", 2, &[0xab; 32]);
        assert_eq!(parse_tag_file(&t).unwrap(), ("m".into(), 2, vec![0xab; 32]));
        assert!(parse_tag_file("nope").is_err());
    }
}
