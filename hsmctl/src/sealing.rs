//! `hsmctl encrypt` / `decrypt` (files of any size, in chunks) and `mac` /
//! `mac-verify`.
//!
//! The encrypted file format (header, chunks, associated data) is
//! `protocol::formats::encrypted`; the spec is docs/formats.md. With `--armor`
//! the same bytes are written in base64 between PEM-style lines (see `armor`).

use std::{
    fs::File,
    io::{self, BufReader, Read},
    path::Path,
};

use protocol::{Client, ClientError};

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

use protocol::formats::{
    encrypted::{chunk_aad, chunk_bytes, Chunks, Header, CHUNK},
    FormatError,
};

/// The most a MAC request may carry.
pub const MAC_MAX: usize = 768 * 1024;

fn local(msg: String) -> Failure {
    Local::File.fail(msg)
}

fn bad_input(msg: String) -> Failure {
    Local::Input.fail(msg)
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
        // Every chunk under the version the header names, even if the key is
        // rotated while this runs.
        let protocol::calls::Sealed { version, sealed } = client.encrypt(
            name.to_owned(),
            pinned,
            protocol::SecretBytes::new(current[..len].to_vec()),
            chunk_aad(name, CHUNK, index, last, aad),
        )?;
        if !wrote_header {
            out.write(&header_bytes(name, version, CHUNK))?;
            wrote_header = true;
            pinned = Some(version);
        }
        out.write(&chunk_bytes(&sealed))?;
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

/// The header of a file sealed under `name`'s `version`.
fn header_bytes(name: &str, version: u32, chunk_size: u32) -> Vec<u8> {
    Header {
        key: name.to_owned(),
        version,
        chunk_size,
    }
    .to_bytes()
}

/// A damaged or foreign encrypted file, named by the path it came from.
fn format_failure(input: &Path, e: FormatError) -> Failure {
    match e {
        FormatError::Io(e) => local(format!("cannot read {}: {e}", input.display())),
        other => bad_input(format!("{}: {other}", input.display())),
    }
}

/// Reads and checks an encrypted file's header; its key must be `name` if one
/// was given.
fn read_header(reader: &mut dyn Read, input: &Path, name: Option<&str>) -> Result<Header, Failure> {
    let header = Header::read_from(reader).map_err(|e| format_failure(input, e))?;
    if let Some(name) = name.filter(|n| *n != header.key) {
        return Err(bad_input(format!(
            "{} was encrypted with key {:?}, not {name:?}",
            input.display(),
            header.key
        )));
    }
    Ok(header)
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
    let header = read_header(&mut *reader, input, name)?;
    let (name, version, chunk_size) = (header.key.clone(), header.version, header.chunk_size);
    let mut out = dest.open()?;
    let mut chunks = Chunks::new(&mut *reader, &header);
    let (mut total, mut count) = (0u64, 0u64);
    while let Some((index, sealed, last)) = chunks.next_chunk().map_err(|e| format_failure(input, e))? {
        let aad = chunk_aad(&name, chunk_size, index, last, aad);
        let plaintext = match client.decrypt(name.clone(), version, sealed, aad, allow_compromised) {
            Ok(plaintext) => plaintext,
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
    let header = read_header(&mut *reader, input, Some(name))?;
    let (version, chunk_size) = (header.version, header.chunk_size);
    let mut out = dest.open()?;
    let mut count = 0u64;
    let mut chunks = Chunks::new(&mut *reader, &header);
    let mut to = None;
    while let Some((index, sealed, last)) = chunks.next_chunk().map_err(|e| format_failure(input, e))? {
        let aad = chunk_aad(name, chunk_size, index, last, aad);
        let (new_version, resealed) = match client.rewrap(name.to_owned(), version, sealed, aad, to) {
            Ok(s) => (s.version, s.sealed),
            Err(e) if e.code() == Some(protocol::ErrorCode::DecryptFailed) => {
                return Err(chunk_failed(index, input, &e));
            }
            Err(e) => return Err(e.into()),
        };
        if to.is_none() {
            out.write(&header_bytes(name, new_version, chunk_size))?;
            to = Some(new_version);
        }
        out.write(&chunk_bytes(&resealed))?;
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
    let protocol::calls::DataKey {
        version,
        sealed,
        plaintext,
    } = client.datakey(
        name.to_owned(),
        chunk_aad(name, CHUNK, 0, true, aad),
        plaintext_out.is_some(),
    )?;
    // The plain key goes to a new mode-0600 file that appears only when
    // complete (the output's temporary file is made mode 0600).
    if let (Some(plain), Some(key)) = (plain.as_mut(), plaintext) {
        plain.write(key.expose())?;
    }
    out.write(&header_bytes(name, version, CHUNK))?;
    out.write(&chunk_bytes(&sealed))?;
    out.finish()?;
    if let Some(plain) = plain {
        plain.finish()?;
    }
    Ok(version)
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
