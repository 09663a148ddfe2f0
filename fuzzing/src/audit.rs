//! The audit log as start-up reads it back (recovery) and as `audit verify`
//! checks it, over a valid log damaged in the ways the input says.
//!
//! A hash chain is out of reach of random bytes, so the log is written once
//! by hsmd's own writer, and each input edits it. One kind of edit is what a
//! crash leaves: part (or all) of a line written after the last one the
//! keystore anchored. That must never be reported as tampering; every other
//! edit may be reported, but must not panic or hang.

use std::{
    fs,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use arbitrary::{Arbitrary, Unstructured};
use hsmd::audit::{AnchorStore, Anchors, Auditor, Event, EventType, Head, Meta, Outcome, Settings, Start};

/// Anchors in memory: the keystore's part of the chain.
#[derive(Default)]
struct Memory(Mutex<Anchors>);

impl AnchorStore for Memory {
    fn load(&self) -> Result<Anchors, String> {
        Ok(self.0.lock().map_err(|e| e.to_string())?.clone())
    }

    fn store(&self, head: &Head, start: &Start) -> Result<(), String> {
        *self.0.lock().map_err(|e| e.to_string())? = Anchors {
            head: Some(head.clone()),
            start: Some(start.clone()),
        };
        Ok(())
    }
}

/// The valid log every input edits.
struct Base {
    /// The anchored lines, each with its newline.
    lines: Vec<Vec<u8>>,
    /// A line written after the anchored head (what a crash may cut short).
    unanchored: Vec<u8>,
    anchors: Anchors,
}

fn settings(dir: &Path) -> Settings {
    Settings {
        path: dir.join("audit.log"),
        max_file_bytes: 1 << 30,
        keep_files: 2,
        buffer_events: 64,
        flush_interval: Duration::from_millis(1),
    }
}

fn event(i: usize) -> Event {
    Event::by_daemon(
        if i.is_multiple_of(2) {
            EventType::Sign
        } else {
            EventType::Decrypt
        },
        format!("key:k{i}"),
        "sign",
        if i.is_multiple_of(3) {
            Outcome::Failure
        } else {
            Outcome::Success
        },
        1,
        Meta::default(),
    )
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let memory = Arc::new(Memory::default());
        let auditor = Auditor::open(settings(dir.path()), memory.clone()).expect("open the audit log");
        for i in 0..8 {
            auditor.record_sync(event(i)).expect("write an event");
        }
        let anchors = memory.load().expect("anchors");
        auditor.record_sync(event(8)).expect("write an event");
        auditor.close();
        let text = fs::read(dir.path().join("audit.log")).expect("read the log");
        let mut lines: Vec<Vec<u8>> = text.split_inclusive(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
        let unanchored = lines.pop().expect("a last line");
        Base {
            lines,
            unanchored,
            anchors,
        }
    })
}

/// One edit of the log.
#[derive(Debug, Arbitrary)]
enum Edit {
    /// Flip bits of one byte.
    Flip { at: u16, bits: u8 },
    /// Remove a line.
    Drop { line: u8 },
    /// Repeat a line.
    Duplicate { line: u8 },
    /// Swap two lines.
    Swap { a: u8, b: u8 },
    /// Insert bytes.
    Insert { at: u16, bytes: Vec<u8> },
    /// Cut the log short.
    Truncate { at: u16 },
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// How much of the unanchored line a crash left (0: none).
    crash_tail: u16,
    edits: Vec<Edit>,
}

/// A directory for one input's log: in memory where there is a tmpfs, since
/// start-up syncs what it repairs and a disk's sync would cap the target at
/// a few hundred inputs a second.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

/// Writes the edited log, opens it as start-up does, and verifies it.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let base = base();
    let mut lines = base.lines.clone();
    let pick = |i: u8, n: usize| usize::from(i) % n.max(1);
    let mut text_edits = Vec::new();
    for edit in &input.edits {
        match edit {
            Edit::Drop { line } if !lines.is_empty() => {
                lines.remove(pick(*line, lines.len()));
            }
            Edit::Duplicate { line } if !lines.is_empty() => {
                let i = pick(*line, lines.len());
                lines.insert(i, lines[i].clone());
            }
            Edit::Swap { a, b } if !lines.is_empty() => {
                let (a, b) = (pick(*a, lines.len()), pick(*b, lines.len()));
                lines.swap(a, b);
            }
            Edit::Flip { .. } | Edit::Insert { .. } | Edit::Truncate { .. } => text_edits.push(edit),
            _ => {}
        }
    }
    let mut text = lines.concat();
    for edit in text_edits {
        match edit {
            Edit::Flip { at, bits } if !text.is_empty() => {
                let at = usize::from(*at) % text.len();
                text[at] ^= bits;
            }
            Edit::Insert { at, bytes } => {
                let at = usize::from(*at) % (text.len() + 1);
                text.splice(at..at, bytes.iter().copied());
            }
            Edit::Truncate { at } => text.truncate(usize::from(*at) % (text.len() + 1)),
            _ => {}
        }
    }
    let unchanged = text == base.lines.concat();
    let tail = usize::from(input.crash_tail) % (base.unanchored.len() + 1);
    text.extend_from_slice(&base.unanchored[..tail]);

    let dir = scratch();
    fs::write(dir.path().join("audit.log"), &text).expect("write the log");
    let memory = Arc::new(Memory(Mutex::new(base.anchors.clone())));
    let opened = Auditor::open(settings(dir.path()), memory);
    let Ok(auditor) = opened else {
        assert!(
            !unchanged,
            "start-up refused a log a crash left: {opened:?}",
            opened = opened.err()
        );
        return;
    };
    let verified = auditor.verify();
    auditor.close();
    if unchanged {
        let verified = verified.unwrap_or_else(|b| panic!("a crash's leftover was reported as tampering: {b:?}"));
        assert!(
            verified.last_seq >= base.lines.len() as u64,
            "anchored lines went missing"
        );
    }
}
