//! Start-up: reads the log back and decides where the chain goes on.
//!
//! A line is either wholly in the log or not at all. An unfinished last line
//! (no newline: a write that never completed), and lines after the last audit
//! line that are not audit lines (what a power cut can leave), are cut off.
//! Lines past the keystore's head that continue its chain were written and
//! synced before the process died, and are adopted. Both are recorded in an
//! `AUDIT_RECOVERED` line. A log that ends before the keystore's head, or past
//! it but not continuing it, was tampered with: that is recorded in an
//! `AUDIT_TAMPERED` line, the chain goes on from the keystore's head, and
//! `verify` names the break.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufReader, Read as _, Seek as _, SeekFrom},
    path::Path,
};

use sha2::{Digest as _, Sha256};

use super::{
    line::{self, Entry, Parsed, Piece},
    Anchors, Event, Head, Meta, Settings, Start,
};

/// Where the chain goes on from, and what start-up found.
#[derive(Debug)]
pub(super) struct Recovered {
    /// The last line in the chain.
    pub head: Head,
    /// Where the retained log begins.
    pub start: Start,
    /// The current file's length after any cut.
    pub size: u64,
    /// Lines to write first (`AUDIT_RECOVERED`, `AUDIT_TAMPERED`).
    pub events: Vec<Event>,
    /// Whether the anchors differ from the keystore's and must be recorded.
    pub store_anchors: bool,
}

/// What one pass over a file found.
#[derive(Debug, Default)]
struct Scan {
    len: u64,
    /// The end of the last line that is an audit line (intact or not).
    good_end: u64,
    first: Option<Entry>,
    last: Option<Entry>,
    /// The keystore's head, or the line after it, is in this file…
    found_head: bool,
    /// …and every line after it continues the chain, intact, with nothing
    /// else in between.
    chain_ok: bool,
}

fn scan(path: &Path, head: Option<&Head>) -> io::Result<Scan> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(e) => return Err(e),
    };
    let mut r = BufReader::with_capacity(256 * 1024, file);
    let mut buf = Vec::new();
    let mut s = Scan::default();
    let mut prev: Option<Entry> = None;
    let mut junk_since_prev = false;
    loop {
        let (bytes, len) = match line::read_line(&mut r, &mut buf)? {
            Piece::End => break,
            Piece::Partial { len } => {
                s.len += len;
                break;
            }
            Piece::Whole { bytes, len } => (bytes, len),
        };
        s.len += len;
        let parsed = bytes.as_deref().map_or(Parsed::Garbage("too long".into()), line::parse);
        let Parsed::Line(e) = parsed else {
            junk_since_prev = true;
            continue;
        };
        s.good_end = s.len;
        if let Some(h) = head {
            if !s.found_head {
                if e.seq == h.seq && e.hash == h.hash && e.intact {
                    s.found_head = true;
                    s.chain_ok = true;
                } else if e.seq == h.seq + 1 && e.prev_hash == h.hash {
                    s.found_head = true;
                    s.chain_ok = e.intact;
                }
            } else if s.chain_ok {
                let follows = prev
                    .as_ref()
                    .is_some_and(|p| e.seq == p.seq + 1 && e.prev_hash == p.hash);
                s.chain_ok = follows && e.intact && !junk_since_prev;
            }
        }
        junk_since_prev = false;
        if s.first.is_none() {
            s.first = Some(e.clone());
        }
        prev = Some(e.clone());
        s.last = Some(e);
    }
    Ok(s)
}

/// Cuts `path` back to `keep` bytes, returning the SHA-256 of what was cut;
/// the cut is synced.
fn cut(path: &Path, keep: u64) -> io::Result<String> {
    let mut f = OpenOptions::new().read(true).write(true).open(path)?;
    f.seek(SeekFrom::Start(keep))?;
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
    }
    f.set_len(keep)?;
    f.sync_all()?;
    Ok(hex::encode(hasher.finalize()))
}

fn head_of(e: &Entry) -> Head {
    Head {
        seq: e.seq,
        hash: e.hash.clone(),
    }
}

/// Reads the log back against the keystore's `anchors`, repairs what a crash
/// left (see the module's documentation) and says where the chain goes on.
///
/// # Errors
/// A file cannot be read, or a torn tail cannot be cut.
pub(super) fn recover(settings: &Settings, anchors: &Anchors) -> io::Result<Recovered> {
    let recorded = anchors.head.clone();
    let current = scan(&settings.path, recorded.as_ref())?;
    let mut events = Vec::new();
    let mut size = current.len;
    if current.good_end < current.len {
        let bytes = current.len - current.good_end;
        let sha = cut(&settings.path, current.good_end)?;
        size = current.good_end;
        let after = current.last.as_ref().map_or(0, |e| e.seq);
        tracing::warn!(
            bytes,
            after_seq = after,
            sha256 = %sha,
            "the audit log ended in an unfinished line, left by a write that did not complete; cut it off"
        );
        let mut meta = Meta::message(format!(
            "cut {bytes} bytes after seq {after} that were not a whole audit line (a write that did not \
             complete before hsmd stopped); SHA-256 {sha}"
        ));
        let x = meta.extra();
        x.cut_bytes = Some(bytes);
        x.cut_sha256 = Some(sha);
        x.cut_after_seq = Some(after);
        events.push(Event::audit_recovered(meta));
    }
    // The last line: in the current file, or (right after a rotation) in the
    // newest rotated file that has one.
    let last = match &current.last {
        Some(l) => Some(l.clone()),
        None => {
            let mut found = None;
            for i in 1..=settings.keep_files.max(1) {
                let p = settings.rotated(i);
                if p.exists() {
                    if let Some(l) = scan(&p, None)?.last {
                        found = Some(l);
                        break;
                    }
                }
            }
            found
        }
    };
    let head = match (&recorded, &last) {
        (None, None) => Head::default(),
        // A keystore that never recorded a head (the log was off, or it is
        // new): the file's own end is all there is to go by.
        (None, Some(l)) => head_of(l),
        (Some(h), Some(l)) if l.seq == h.seq && l.hash == h.hash => h.clone(),
        (Some(h), Some(l)) if l.seq > h.seq && current.found_head && current.chain_ok && l.intact => {
            let n = l.seq - h.seq;
            tracing::warn!(
                from = h.seq + 1,
                to = l.seq,
                "adopted audit lines written after the keystore last recorded the log's head"
            );
            let mut meta = Meta::message(format!(
                "adopted {n} line{} (seq {} to {}) written to the log after the keystore last recorded its \
                 head (seq {}) and before hsmd stopped",
                if n == 1 { "" } else { "s" },
                h.seq + 1,
                l.seq,
                h.seq
            ));
            let x = meta.extra();
            x.adopted_from_seq = Some(h.seq + 1);
            x.adopted_to_seq = Some(l.seq);
            events.push(Event::audit_recovered(meta));
            head_of(l)
        }
        (Some(h), l) if h.seq == 0 && l.is_none() => h.clone(),
        (Some(h), l) => {
            let why = match l {
                None => format!(
                    "the audit log holds no lines, but the keystore records that it ends at seq {}: its files \
                     were deleted",
                    h.seq
                ),
                Some(l) if l.seq < h.seq => format!(
                    "the audit log ends at seq {}, but the keystore records that it ends at seq {}: lines {} to {} \
                     were removed",
                    l.seq,
                    h.seq,
                    l.seq + 1,
                    h.seq
                ),
                Some(l) if l.seq == h.seq => format!(
                    "the audit log's last line, seq {}, is not the line the keystore records: it was edited or replaced",
                    l.seq
                ),
                Some(l) => format!(
                    "the audit log runs on to seq {} past the keystore's record (seq {}), but those lines do not \
                     continue its chain: they were added or edited",
                    l.seq, h.seq
                ),
            };
            tracing::error!("{why}; `hsmctl audit verify` names the break");
            events.push(Event::audit_tampered(format!(
                "found at start: {why}; the chain goes on from the keystore's record"
            )));
            h.clone()
        }
    };
    let (start, store_anchors) = match &anchors.start {
        Some(s) => (s.clone(), recorded.as_ref() != Some(&head)),
        None => {
            // First start with a keystore that does not record where the log
            // begins: take the oldest line there is.
            let start = settings.files().iter().find_map(|p| line::first_line(p));
            let start = start.unwrap_or_else(|| Start {
                seq: head.seq + 1,
                prev_hash: head.hash.clone(),
            });
            (start, true)
        }
    };
    Ok(Recovered {
        head,
        start,
        size,
        events,
        store_anchors,
    })
}
