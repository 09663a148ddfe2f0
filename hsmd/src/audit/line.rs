//! One audit line: how an event is written, and how a written line is read
//! back and checked.
//!
//! A line is the event's JSON object whose last member is `"hash"`: the hex
//! SHA-256 of every byte of the line before `,"hash":"` (so it covers the
//! event and its `prev_hash`), then `"}` and a newline.

use std::{
    borrow::Cow,
    io::{self, BufRead},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Event, Meta, Outcome};

/// The `prev_hash` of the very first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_KEY: &str = ",\"hash\":\"";

/// The longest line hsmd reads back. Its own lines are well under a kilobyte;
/// anything longer is not one of them, and is not held in (locked) memory.
pub(super) const MAX_LINE: usize = 64 * 1024;

/// The line as written, field order fixed.
#[derive(Serialize)]
struct Line<'a> {
    id: &'a str,
    seq: u64,
    timestamp: String,
    event_type: &'a str,
    uid: u32,
    user: Option<&'a str>,
    pid: Option<u32>,
    executable: Option<&'a str>,
    connection: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ssh_host_key: Option<&'a str>,
    backend: Option<&'a str>,
    resource: &'a str,
    action: &'a str,
    result: Outcome,
    metadata: &'a Meta,
    risk_score: u8,
    prev_hash: &'a str,
}

fn hex32(bytes: &[u8]) -> String {
    let mut out = [0u8; 64];
    match hex::encode_to_slice(bytes, &mut out) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => hex::encode(bytes),
    }
}

/// Serializes `event` as line `seq` after `prev`, appending it (with its
/// newline) to `out`; returns its hash.
pub(super) fn render(event: &Event, seq: u64, prev: &str, run: &str, out: &mut Vec<u8>) -> String {
    let id = format!("{run}-{seq}");
    let line = Line {
        id: &id,
        seq,
        timestamp: humantime::format_rfc3339_millis(event.time).to_string(),
        event_type: event.event_type.as_str(),
        uid: event.who.uid,
        user: event.who.user.as_deref(),
        pid: event.who.pid,
        executable: event.who.executable.as_deref(),
        connection: event.who.connection,
        ssh_host_key: event.who.ssh_host_key.as_deref(),
        backend: event.backend,
        resource: &event.resource,
        action: event.action,
        result: event.result,
        metadata: &event.metadata,
        risk_score: event.risk_score,
        prev_hash: prev,
    };
    let start = out.len();
    // Serializing plain structs into memory cannot fail; if it did, the line
    // would still be a valid (empty) object in the chain.
    if serde_json::to_writer(&mut *out, &line).is_err() {
        out.truncate(start);
        out.extend_from_slice(b"{}");
    }
    out.pop(); // the closing brace
    let hash = hex32(&Sha256::digest(&out[start..]));
    out.extend_from_slice(HASH_KEY.as_bytes());
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\"}\n");
    hash
}

/// The fields of a line that the chain is made of.
#[derive(Deserialize)]
struct ChainFields<'a> {
    seq: u64,
    #[serde(borrow)]
    prev_hash: Cow<'a, str>,
    #[serde(borrow)]
    hash: Cow<'a, str>,
    #[serde(borrow, default)]
    event_type: Option<Cow<'a, str>>,
}

/// A line read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Parsed {
    /// Not an audit line at all: not JSON, or without the chain's fields.
    Garbage(String),
    /// An audit line: its place in the chain, and whether its bytes still
    /// hash to what it claims.
    Line(Entry),
}

/// The chain facts of one audit line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub seq: u64,
    pub prev_hash: String,
    /// The hash the line claims.
    pub hash: String,
    /// Whether the line's bytes hash to `hash`: false means it was edited.
    pub intact: bool,
    pub event_type: Option<String>,
}

/// Reads one line (without its newline).
pub(super) fn parse(line: &[u8]) -> Parsed {
    let Ok(text) = std::str::from_utf8(line) else {
        return Parsed::Garbage("not UTF-8 text".into());
    };
    let fields: ChainFields<'_> = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => return Parsed::Garbage(format!("not an audit line: {e}")),
    };
    let intact = text
        .rfind(HASH_KEY)
        .and_then(|at| {
            let claimed = text[at + HASH_KEY.len()..].strip_suffix("\"}")?;
            Some(claimed == fields.hash && hex32(&Sha256::digest(&text.as_bytes()[..at])) == claimed)
        })
        .unwrap_or(false);
    Parsed::Line(Entry {
        seq: fields.seq,
        prev_hash: fields.prev_hash.into_owned(),
        hash: fields.hash.into_owned(),
        intact,
        event_type: fields.event_type.map(Cow::into_owned),
    })
}

/// One piece of a file, as [`read_line`] finds it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Piece {
    /// A whole line (newline included in `len`); `bytes` holds it without the
    /// newline, or is `None` if it was longer than [`MAX_LINE`].
    Whole { bytes: Option<Vec<u8>>, len: u64 },
    /// Bytes after the last newline: a line never finished.
    Partial { len: u64 },
    /// The end.
    End,
}

/// Reads the next line of `r` into `buf`, holding at most [`MAX_LINE`] bytes of
/// it in memory, so a file that is not an audit log (one huge line) costs no
/// more than that.
///
/// # Errors
/// Reading failed.
pub(super) fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Piece> {
    buf.clear();
    let mut len = 0u64;
    let mut too_long = false;
    loop {
        let available = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if len == 0 { Piece::End } else { Piece::Partial { len } });
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let n = chunk.len();
        len += n as u64;
        if !too_long {
            let keep = if done { &chunk[..n - 1] } else { chunk };
            if buf.len() + keep.len() > MAX_LINE {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(keep);
            }
        }
        r.consume(n);
        if done {
            return Ok(Piece::Whole {
                bytes: (!too_long).then(|| std::mem::take(buf)),
                len,
            });
        }
    }
}

/// The first audit line of a file, as the start of the chain: its sequence
/// number and the hash it follows.
pub(super) fn first_line(path: &std::path::Path) -> Option<super::Start> {
    let mut r = io::BufReader::new(std::fs::File::open(path).ok()?);
    let mut buf = Vec::new();
    loop {
        match read_line(&mut r, &mut buf).ok()? {
            Piece::Whole { bytes: Some(b), .. } => {
                if let Parsed::Line(e) = parse(&b) {
                    return Some(super::Start {
                        seq: e.seq,
                        prev_hash: e.prev_hash,
                    });
                }
            }
            Piece::Whole { bytes: None, .. } => {}
            Piece::Partial { .. } | Piece::End => return None,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::audit::Who;

    pub(crate) fn event(t: crate::audit::EventType) -> Event {
        Event {
            event_type: t,
            who: Arc::new(Who {
                uid: 1000,
                user: Some("alice".into()),
                pid: Some(42),
                executable: Some("/usr/bin/hsmctl".into()),
                connection: 7,
                ssh_host_key: None,
            }),
            backend: Some("soft"),
            resource: "key:k".into(),
            action: "sign",
            result: Outcome::Success,
            metadata: Meta::default(),
            risk_score: 1,
            time: std::time::SystemTime::now(),
        }
    }

    #[test]
    fn a_rendered_line_parses_back_and_an_edit_is_seen() {
        let mut out = Vec::new();
        let hash = render(&event(crate::audit::EventType::Sign), 5, GENESIS, "run", &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let line = &out[..out.len() - 1];
        let Parsed::Line(e) = parse(line) else {
            panic!("not parsed")
        };
        assert_eq!(
            (e.seq, e.prev_hash.as_str(), e.hash.as_str(), e.intact),
            (5, GENESIS, hash.as_str(), true)
        );
        assert_eq!(e.event_type.as_deref(), Some("SIGN"));
        let edited = String::from_utf8_lossy(line).replace("\"uid\":1000", "\"uid\":0");
        let Parsed::Line(e) = parse(edited.as_bytes()) else {
            panic!("not parsed")
        };
        assert!(!e.intact);
        assert!(matches!(parse(b"{\"seq\":1"), Parsed::Garbage(_)));
        assert!(matches!(parse(b"\0\0\0"), Parsed::Garbage(_)));
    }

    #[test]
    fn lines_are_read_whole_partial_or_too_long_without_holding_them() {
        let mut text = b"one\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        text.extend_from_slice(b"\ntail");
        let mut r = io::BufReader::with_capacity(1024, &text[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line(&mut r, &mut buf).unwrap(),
            Piece::Whole {
                bytes: Some(b"one".to_vec()),
                len: 4
            }
        );
        assert_eq!(
            read_line(&mut r, &mut buf).unwrap(),
            Piece::Whole {
                bytes: None,
                len: MAX_LINE as u64 + 11
            }
        );
        assert!(buf.capacity() <= 2 * MAX_LINE);
        assert_eq!(read_line(&mut r, &mut buf).unwrap(), Piece::Partial { len: 4 });
        assert_eq!(read_line(&mut r, &mut buf).unwrap(), Piece::End);
    }
}
