//! Checking the chain: every line intact, each following the one before, the
//! retained log beginning where the keystore says and ending at the head.
//!
//! The check reads a snapshot: the files as they were at one moment (opened,
//! with their lengths, under the writer's lock, which is then released), so a
//! busy daemon's writes and rotations neither block nor confuse it. It goes on
//! past a break, so tampering after an earlier break is still named.

use std::{
    fs::File,
    io::{BufReader, Read as _},
    path::PathBuf,
};

use super::{
    line::{self, Parsed, Piece},
    Head, Start, GENESIS,
};

/// Breaks named in full; more are counted.
const MAX_BREAKS: usize = 16;

/// What `verify` found when the chain is whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Lines checked.
    pub lines: u64,
    /// First sequence number present.
    pub first_seq: u64,
    /// Last sequence number present.
    pub last_seq: u64,
    /// Files read, oldest first.
    pub files: Vec<PathBuf>,
    /// What start-up repaired: one entry per `AUDIT_RECOVERED` line.
    pub recoveries: Vec<String>,
}

/// One place where the chain is not as it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The first sequence number that is not as it should be.
    pub seq: u64,
    /// What is wrong there.
    pub why: String,
}

/// Where the chain breaks: the first break, then any others.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Broken {
    /// Each break, in log order (at most 16).
    pub breaks: Vec<Break>,
    /// Breaks after those.
    pub more: u64,
}

impl Broken {
    /// The first break.
    #[must_use]
    pub fn first(&self) -> Option<&Break> {
        self.breaks.first()
    }
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(first) = self.breaks.first() else {
            return f.write_str("audit log broken");
        };
        write!(f, "audit log broken at seq {}: {}", first.seq, first.why)?;
        let others = self.breaks.len() as u64 - 1 + self.more;
        if others > 0 {
            write!(f, "; {others} more break{}:", if others == 1 { "" } else { "s" })?;
            for b in &self.breaks[1..] {
                write!(f, " at seq {}: {};", b.seq, b.why)?;
            }
            if self.more > 0 {
                write!(f, " and {} more", self.more)?;
            }
        }
        Ok(())
    }
}

/// The files as they were at one moment.
#[derive(Debug)]
pub(super) struct Snapshot {
    /// Each file, oldest first, open, with the length to read of it.
    pub files: Vec<(PathBuf, File, u64)>,
    /// The chain's last line written.
    pub head: Head,
    /// Where the retained log begins, as the keystore records it.
    pub start: Start,
}

#[derive(Default)]
struct Checker {
    breaks: Vec<Break>,
    more: u64,
}

impl Checker {
    fn broke(&mut self, seq: u64, why: String) {
        if self.breaks.len() < MAX_BREAKS {
            self.breaks.push(Break { seq, why });
        } else {
            self.more += 1;
        }
    }
}

/// Checks `snapshot` as one chain (see the module's documentation).
///
/// # Errors
/// [`Broken`], naming each break by sequence number.
pub(super) fn check(snapshot: Snapshot) -> Result<Verified, Broken> {
    let Snapshot { files, head, start } = snapshot;
    let mut c = Checker::default();
    let mut prev: Option<Head> = None;
    let mut first_seq = 0;
    let mut lines = 0u64;
    let mut recoveries = Vec::new();
    let mut buf = Vec::new();
    let names: Vec<PathBuf> = files.iter().map(|(p, _, _)| p.clone()).collect();
    for (path, file, len) in files {
        let mut r = BufReader::with_capacity(256 * 1024, file.take(len));
        let mut n = 0u64;
        loop {
            let piece = match line::read_line(&mut r, &mut buf) {
                Ok(p) => p,
                Err(e) => {
                    c.broke(
                        prev.as_ref().map_or(start.seq, |p| p.seq + 1),
                        format!("{} cannot be read: {e}", path.display()),
                    );
                    break;
                }
            };
            n += 1;
            let expected = prev.as_ref().map_or(start.seq, |p| p.seq + 1);
            let at = |why: String| format!("{} line {n}: {why}", path.display());
            let bytes = match piece {
                Piece::End => break,
                Piece::Partial { len } => {
                    c.broke(expected, at(format!("an unfinished line of {len} bytes (no newline)")));
                    break;
                }
                Piece::Whole { bytes: None, len } => {
                    c.broke(expected, at(format!("not an audit line: {len} bytes long")));
                    continue;
                }
                Piece::Whole { bytes: Some(b), .. } => b,
            };
            let e = match line::parse(&bytes) {
                Parsed::Garbage(why) => {
                    c.broke(expected, at(why));
                    continue;
                }
                Parsed::Line(e) => e,
            };
            match &prev {
                None => {
                    first_seq = e.seq;
                    if e.seq > start.seq {
                        c.broke(
                            start.seq,
                            at(format!(
                                "the log begins at seq {}, but the keystore records that the retained log begins \
                                 at seq {}: lines {} to {} were removed from its front (a rotated file, the first \
                                 lines of one, or the whole log was deleted)",
                                e.seq,
                                start.seq,
                                start.seq,
                                e.seq - 1
                            )),
                        );
                    } else if e.seq == 1 && e.prev_hash != GENESIS {
                        c.broke(e.seq, at("the first line does not start the chain".into()));
                    }
                }
                Some(p) if e.seq != p.seq + 1 => c.broke(
                    p.seq + 1,
                    at(if e.seq > p.seq + 1 {
                        format!(
                            "expected seq {}, found seq {}: lines {} to {} are missing (deleted lines or a \
                             deleted rotated file)",
                            p.seq + 1,
                            e.seq,
                            p.seq + 1,
                            e.seq - 1
                        )
                    } else {
                        format!(
                            "expected seq {}, found seq {}: a line was deleted or lines were reordered or repeated",
                            p.seq + 1,
                            e.seq
                        )
                    }),
                ),
                Some(p) if e.prev_hash != p.hash => c.broke(
                    e.seq,
                    at(format!(
                        "seq {} does not follow the line before it (prev_hash differs)",
                        e.seq
                    )),
                ),
                Some(_) => {}
            }
            if e.seq == start.seq && e.prev_hash != start.prev_hash {
                c.broke(
                    e.seq,
                    at(format!(
                        "seq {} is not the line the keystore records as the start of the retained log",
                        e.seq
                    )),
                );
            }
            if !e.intact {
                c.broke(
                    e.seq,
                    at(format!("seq {} does not match its hash: the line was edited", e.seq)),
                );
            }
            if e.event_type.as_deref() == Some("AUDIT_RECOVERED") {
                let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["metadata"]["message"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                recoveries.push(format!("seq {}: {message}", e.seq));
            }
            prev = Some(Head {
                seq: e.seq,
                hash: e.hash,
            });
            lines += 1;
        }
    }
    let last = prev.unwrap_or_default();
    if last.seq < head.seq {
        let from = (last.seq + 1).max(start.seq);
        c.broke(
            from,
            format!(
                "the log ends at seq {} but hsmd has written up to seq {}: lines {from} to {} were cut off",
                last.seq, head.seq, head.seq
            ),
        );
    } else if last != head {
        c.broke(
            head.seq.max(1),
            format!(
                "the log ends at seq {} with a hash that is not the one hsmd wrote there (seq {})",
                last.seq, head.seq
            ),
        );
    }
    if c.breaks.is_empty() {
        Ok(Verified {
            lines,
            first_seq,
            last_seq: last.seq,
            files: names,
            recoveries,
        })
    } else {
        Err(Broken {
            breaks: c.breaks,
            more: c.more,
        })
    }
}
