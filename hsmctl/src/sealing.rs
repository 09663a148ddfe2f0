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
//! another `--aad` all fail to decrypt. With `--armor` the same bytes are
//! written in base64 between PEM-style lines (see `armor`).

use std::{
    fs::File,
    io::{self, BufReader, Read},
    path::Path,
};

use protocol::{Client, ClientError, Operation, Reply};

use crate::{
    armor,
    failure::{Failure, Local},
    output::Output,
};

/// Where a command writes its result: `-o` as given (`None`: standard
/// output), whether it may replace a file, whether to armor it.
#[derive(Debug, Clone, Copy)]
pub struct Dest<'a> {
    /// The `-o` path; `None` when it was not given.
    pub path: Option<&'a Path>,
    /// `--force`: replace an existing file.
    pub force: bool,
    /// `--armor`: base64 between PEM-style lines.
    pub armor: bool,
}

impl Dest<'_> {
    /// The path to compare with the input (`-` for standard output).
    fn shown(&self) -> &Path {
        self.path.unwrap_or(Path::new("-"))
    }

    /// Opens the output; binary unless armored.
    fn open(&self) -> Result<armor::Writer, Failure> {
        armor::Writer::new(Output::open(self.path, self.force, !self.armor)?, self.armor)
    }
}

/// What an encrypt, decrypt or rewrap did.
#[derive(Debug, serde::Serialize)]
pub struct Done {
    /// The key's name.
    pub key: String,
    /// The key version the input was sealed under (decrypt, rewrap) or the
    /// output is (encrypt).
    pub version: u32,
    /// The version the output is sealed under (rewrap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_version: Option<u32>,
    /// Plaintext bytes encrypted or decrypted.
    pub plaintext_bytes: u64,
    /// Chunks sealed or opened.
    pub chunks: u64,
}

const MAGIC: &[u8; 8] = b"HSMDENC1";
/// Plaintext per chunk: well under the default 1 MiB frame.
const CHUNK: u32 = 256 * 1024;
/// The most a MAC request may carry.
pub const MAC_MAX: usize = 768 * 1024;

fn local(msg: String) -> Failure {
    Local::File.fail(msg)
}

fn bad_input(msg: String) -> Failure {
    Local::Input.fail(msg)
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

/// An encrypted file to read (`-` is stdin), armored or not.
fn open_sealed(path: &Path) -> Result<Box<dyn Read>, Failure> {
    let buffered: Box<dyn io::BufRead> = if path == Path::new("-") {
        Box::new(io::stdin().lock())
    } else {
        Box::new(BufReader::new(
            File::open(path).map_err(|e| local(format!("cannot open {}: {e}", path.display())))?,
        ))
    };
    armor::reader(buffered).map_err(|e| bad_input(format!("cannot read {}: {e}", path.display())))
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

/// Encrypts `input` into `dest` in chunks.
pub fn encrypt(client: &mut Client, name: &str, input: &Path, dest: Dest<'_>, aad: &[u8]) -> Result<Done, Failure> {
    crate::output::not_the_input(input, dest.shown())?;
    let mut reader = open_input(input)?;
    let mut out = dest.open()?;
    let mut total = 0u64;
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
        total += len as u64;
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
    out.finish()?;
    Ok(Done {
        key: name.to_owned(),
        version: pinned.unwrap_or_default(),
        to_version: None,
        plaintext_bytes: total,
        chunks: index + 1,
    })
}

fn read_exact_or(reader: &mut dyn Read, buf: &mut [u8], what: &str) -> Result<(), Failure> {
    reader.read_exact(buf).map_err(|_| {
        bad_input(format!(
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

/// Reads and checks an encrypted file's header: the key's name (which must be
/// `name` if one was given), version and chunk size.
fn read_header(reader: &mut dyn Read, input: &Path, name: Option<&str>) -> Result<(String, u32, u32), Failure> {
    let mut magic = [0u8; 8];
    read_exact_or(&mut *reader, &mut magic, "header")?;
    if &magic != MAGIC {
        return Err(bad_input(format!("{} is not an hsmd encrypted file", input.display())));
    }
    let mut u16b = [0u8; 2];
    read_exact_or(&mut *reader, &mut u16b, "header")?;
    let mut stored_name = vec![0u8; u16::from_be_bytes(u16b) as usize];
    read_exact_or(&mut *reader, &mut stored_name, "header")?;
    let stored_name = String::from_utf8(stored_name)
        .map_err(|_| bad_input(format!("{}: the key name in its header is not UTF-8", input.display())))?;
    if let Some(name) = name.filter(|n| *n != stored_name) {
        return Err(bad_input(format!(
            "{} was encrypted with key {stored_name:?}, not {name:?}",
            input.display(),
        )));
    }
    let mut u32b = [0u8; 4];
    read_exact_or(&mut *reader, &mut u32b, "header")?;
    let version = u32::from_be_bytes(u32b);
    read_exact_or(&mut *reader, &mut u32b, "header")?;
    let chunk_size = u32::from_be_bytes(u32b);
    if chunk_size == 0 || chunk_size > 16 * 1024 * 1024 {
        return Err(bad_input(format!(
            "{} has an invalid chunk size {chunk_size}",
            input.display()
        )));
    }
    Ok((stored_name, version, chunk_size))
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
            _ => Err(bad_input(format!(
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
                return Err(bad_input(format!(
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
            return Err(bad_input(format!(
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
    bad_input(format!(
        "chunk {index} of {} does not decrypt: the file was altered, reordered or truncated, \
         the --aad differs, or it belongs to another key ({e})",
        input.display()
    ))
}

/// Decrypts what [`encrypt`] wrote (armored or not) with the key `name`, or
/// the one its header names; the output appears only if every chunk checks.
pub fn decrypt(
    client: &mut Client,
    name: Option<&str>,
    input: &Path,
    dest: Dest<'_>,
    aad: &[u8],
    allow_compromised: bool,
) -> Result<Done, Failure> {
    crate::output::not_the_input(input, dest.shown())?;
    let mut reader = open_sealed(input)?;
    let (name, version, chunk_size) = read_header(&mut *reader, input, name)?;
    let mut out = dest.open()?;
    let mut chunks = Chunks::new(&mut *reader, input, chunk_size);
    let (mut total, mut count) = (0u64, 0u64);
    while let Some((index, sealed, last)) = chunks.next()? {
        let plaintext = match client.call(Operation::Decrypt {
            name: name.clone(),
            version,
            sealed,
            aad: chunk_aad(&name, chunk_size, index, last, aad),
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
        total += plaintext.expose().len() as u64;
        count += 1;
    }
    out.finish()?;
    Ok(Done {
        key: name,
        version,
        to_version: None,
        plaintext_bytes: total,
        chunks: count,
    })
}

/// Re-seals every chunk of an encrypted file under the key's newest version
/// (the first chunk decides it; the rest follow it even across a rotation).
/// Returns the old and new versions.
pub fn rewrap(client: &mut Client, name: &str, input: &Path, dest: Dest<'_>, aad: &[u8]) -> Result<Done, Failure> {
    crate::output::not_the_input(input, dest.shown())?;
    let mut reader = open_sealed(input)?;
    let (_, version, chunk_size) = read_header(&mut *reader, input, Some(name))?;
    let mut out = dest.open()?;
    let mut count = 0u64;
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
        count += 1;
    }
    out.finish()?;
    Ok(Done {
        key: name.to_owned(),
        version,
        to_version: Some(to.unwrap_or(version)),
        plaintext_bytes: 0,
        chunks: count,
    })
}

/// Asks for a data key; writes it sealed (as a one-chunk encrypted file that
/// `hsmctl decrypt` opens) and, if asked, in plain (mode 0600). Returns the
/// version that sealed it.
pub fn datakey(
    client: &mut Client,
    name: &str,
    dest: Dest<'_>,
    plaintext_out: Option<&Path>,
    aad: &[u8],
) -> Result<u32, Failure> {
    if plaintext_out.is_some() && plaintext_out == dest.path {
        return Err(Local::Usage.fail("--plaintext-out must name another file than -o"));
    }
    // Both outputs are checked before hsmd makes a key, so a refusal costs nothing.
    let mut out = dest.open()?;
    let mut plain = plaintext_out.map(|p| Output::create(p, dest.force)).transpose()?;
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
    // The plain key goes to a new mode-0600 file that appears only when
    // complete (the output's temporary file is made mode 0600).
    if let (Some(plain), Some(key)) = (plain.as_mut(), plaintext) {
        plain.write(key.expose())?;
    }
    out.write(&header(name, version, CHUNK))?;
    out.write(&(sealed.len() as u32).to_be_bytes())?;
    out.write(&sealed)?;
    out.finish()?;
    if let Some(plain) = plain {
        plain.finish()?;
    }
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
        return Err(bad_input(format!(
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
