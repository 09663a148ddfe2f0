//! ASCII armor for encrypted files (`hsmctl encrypt --armor`): the binary
//! file in base64, 64 characters a line, between PEM-style lines, so it can be
//! pasted into mail, a terminal or a YAML file. `decrypt` and `rewrap` read
//! either form, telling them apart by the first line.
//!
//! ```text
//! -----BEGIN HSMD ENCRYPTED FILE-----
//! SFNNREVOQzEA...
//! -----END HSMD ENCRYPTED FILE-----
//! ```

use std::io::{self, BufRead, Read};

use base64::{engine::general_purpose::STANDARD, Engine as _};

use crate::{failure::Failure, output::Output};

/// The first line of an armored encrypted file.
pub(crate) const BEGIN: &str = "-----BEGIN HSMD ENCRYPTED FILE-----";
/// The last line of an armored encrypted file.
pub(crate) const END: &str = "-----END HSMD ENCRYPTED FILE-----";
/// Binary bytes per armored line (64 base64 characters).
const LINE: usize = 48;

/// An output written as it is, or armored.
pub(crate) enum Writer {
    Plain(Output),
    Armored { out: Output, pending: Vec<u8> },
}

impl Writer {
    /// Writes to `out`, armored if `armor`.
    pub(crate) fn new(mut out: Output, armor: bool) -> Result<Self, Failure> {
        if !armor {
            return Ok(Self::Plain(out));
        }
        out.write(BEGIN.as_bytes())?;
        out.write(b"\n")?;
        Ok(Self::Armored {
            out,
            pending: Vec::with_capacity(LINE * 2),
        })
    }

    /// Writes bytes (whole lines of armor as they fill).
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        match self {
            Self::Plain(out) => out.write(bytes),
            Self::Armored { out, pending } => {
                pending.extend_from_slice(bytes);
                let whole = pending.len() / LINE * LINE;
                let mut text = String::with_capacity(whole / 3 * 4 + whole / LINE);
                for line in pending[..whole].chunks(LINE) {
                    STANDARD.encode_string(line, &mut text);
                    text.push('\n');
                }
                pending.drain(..whole);
                out.write(text.as_bytes())
            }
        }
    }

    /// Ends the armor and makes the output appear.
    pub(crate) fn finish(self) -> Result<(), Failure> {
        match self {
            Self::Plain(out) => out.finish(),
            Self::Armored { mut out, pending } => {
                let mut text = String::new();
                if !pending.is_empty() {
                    STANDARD.encode_string(&pending, &mut text);
                    text.push('\n');
                }
                text.push_str(END);
                text.push('\n');
                out.write(text.as_bytes())?;
                out.finish()
            }
        }
    }
}

/// Reads `inner` as it is, or, when its first line is [`BEGIN`], the bytes
/// its armor holds.
pub(crate) fn reader<'a>(mut inner: Box<dyn BufRead + 'a>) -> io::Result<Box<dyn Read + 'a>> {
    let head = inner.fill_buf()?;
    if head.starts_with(BEGIN.as_bytes()) {
        let mut first = String::new();
        inner.read_line(&mut first)?;
        if first.trim_end() != BEGIN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the armor's first line is malformed",
            ));
        }
        return Ok(Box::new(Dearmor {
            inner,
            line: Vec::new(),
            pos: 0,
            ended: false,
        }));
    }
    Ok(Box::new(inner))
}

/// Decodes armor a line at a time: never more than one line in memory.
struct Dearmor<'a> {
    inner: Box<dyn BufRead + 'a>,
    line: Vec<u8>,
    pos: usize,
    ended: bool,
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("the armor is malformed: {what}"))
}

impl Read for Dearmor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.line.len() {
            if self.ended {
                return Ok(0);
            }
            let mut text = String::new();
            // A line is at most 64 characters; a longer one is refused
            // before it is decoded (or held whole).
            let n = (&mut self.inner).take(130).read_line(&mut text)?;
            if n == 0 {
                return Err(malformed(&format!("it ends without its {END} line")));
            }
            let text = text.trim_end_matches(['\n', '\r']);
            if text == END {
                self.ended = true;
                let mut rest = [0u8; 1];
                while self.inner.read(&mut rest)? == 1 {
                    if !rest[0].is_ascii_whitespace() {
                        return Err(malformed("there is text after its end line"));
                    }
                }
                continue;
            }
            if text.len() > 64 {
                return Err(malformed("a line is longer than 64 characters"));
            }
            self.line = STANDARD
                .decode(text)
                .map_err(|e| malformed(&format!("a line is not base64 ({e})")))?;
            self.pos = 0;
        }
        let n = buf.len().min(self.line.len() - self.pos);
        buf[..n].copy_from_slice(&self.line[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dearmor(text: &str) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        reader(Box::new(io::Cursor::new(text.as_bytes().to_vec())))?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn armor_round_trips_and_plain_input_passes_through() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut w = Writer::new(Output::create(&path, false).unwrap(), true).unwrap();
        for piece in data.chunks(7) {
            w.write(piece).unwrap();
        }
        w.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(BEGIN) && text.trim_end().ends_with(END), "{text}");
        assert!(text.lines().all(|l| l.len() <= 64 || l == BEGIN));
        assert_eq!(dearmor(&text).unwrap(), data);
        assert_eq!(dearmor("HSMDENC1 binary").unwrap(), b"HSMDENC1 binary");
    }

    #[test]
    fn broken_armor_is_an_error_not_short_data() {
        assert!(dearmor(&format!("{BEGIN}\nAAAA\n")).is_err(), "no end line");
        assert!(dearmor(&format!("{BEGIN}\n!!!!\n{END}\n")).is_err(), "not base64");
        assert!(
            dearmor(&format!("{BEGIN}\n{}\n{END}\n", "A".repeat(200))).is_err(),
            "long line"
        );
        assert!(
            dearmor(&format!("{BEGIN}\nAAAA\n{END}\nmore\n")).is_err(),
            "trailing text"
        );
        assert_eq!(dearmor(&format!("{BEGIN}\nAAAA\n{END}\n")).unwrap(), vec![0, 0, 0]);
    }
}
