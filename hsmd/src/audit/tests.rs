//! The audit log's parts together, on real files with an in-memory keystore.

use crate::audit::EventType;
use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use super::{line::tests::event, *};

/// The keystore's part, in memory, with a switch that makes it fail.
#[derive(Default)]
struct Memory {
    anchors: Mutex<Anchors>,
    failing: AtomicBool,
}

impl AnchorStore for Memory {
    fn load(&self) -> Result<Anchors, String> {
        Ok(self.anchors.lock().unwrap().clone())
    }

    fn store(&self, head: &Head, start: &Start) -> Result<(), String> {
        if self.failing.load(Ordering::SeqCst) {
            return Err("database or disk is full".into());
        }
        *self.anchors.lock().unwrap() = Anchors {
            head: Some(head.clone()),
            start: Some(start.clone()),
        };
        Ok(())
    }
}

fn settings(dir: &Path, max_file_bytes: u64, keep_files: u32) -> Settings {
    Settings {
        path: dir.join("audit.log"),
        max_file_bytes,
        keep_files,
        buffer_events: 1000,
        flush_interval: Duration::from_millis(20),
    }
}

/// Writes `n` security events (each synced and anchored before it returns).
fn write(a: &Auditor, n: usize) {
    for _ in 0..n {
        a.record_sync(event(EventType::Sign)).unwrap();
    }
}

/// Writes `n` events, then waits out a rotation the last one made due: a
/// line is answered once synced, and the writer rotates just after, so a test
/// that lists, edits or counts the files must let that finish first.
fn write_settled(a: &Auditor, n: usize, max: u64) {
    write(a, n);
    wait_for("the writer to rotate its full file", || {
        fs::metadata(a.path()).is_ok_and(|m| m.len() <= max)
    });
}

fn open(dir: &Path, store: &Arc<Memory>, max: u64, keep: u32) -> Auditor {
    Auditor::open(settings(dir, max, keep), Arc::clone(store) as Arc<dyn AnchorStore>).unwrap()
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn all_lines(files: &[PathBuf]) -> Vec<(PathBuf, Vec<String>)> {
    files
        .iter()
        .map(|p| {
            (
                p.clone(),
                fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn a_rotating_chain_verifies_and_every_kind_of_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Memory::default());
    let a = open(dir.path(), &store, 1500, 50);
    write_settled(&a, 12, 1500);
    let ok = a.verify().unwrap();
    let files = a.files();
    assert!(files.len() > 2, "rotated by size: {files:?}");
    assert_eq!((ok.lines, ok.first_seq, ok.last_seq), (12, 1, 12));
    assert!(ok.recoveries.is_empty());
    let all = all_lines(&files);
    // The newest file with at least two lines (the current one may be empty).
    let target = all.iter().rposition(|(_, l)| l.len() >= 2).unwrap();
    let first_in_target = all[..target].iter().map(|(_, l)| l.len() as u64).sum::<u64>() + 1;
    let damage = |edit: &dyn Fn(&mut Vec<String>)| {
        let (path, lines) = &all[target];
        let mut changed = lines.clone();
        edit(&mut changed);
        let mut text = changed.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        fs::write(path, text).unwrap();
        let r = a.verify();
        fs::write(path, lines.join("\n") + "\n").unwrap();
        r.unwrap_err()
    };
    let e = damage(&|l| l[0] = l[0].replace("\"uid\":1000", "\"uid\":0"));
    assert_eq!(e.first().unwrap().seq, first_in_target, "{e}");
    assert!(e.to_string().contains("edited"), "{e}");
    let e = damage(&|l| {
        l.remove(0);
    });
    assert_eq!(e.first().unwrap().seq, first_in_target, "{e}");
    let e = damage(&|l| l.swap(0, 1));
    assert_eq!(e.first().unwrap().seq, first_in_target, "{e}");
    // The oldest file's first line: the front of the retained log.
    let (oldest, lines) = &all[0];
    fs::write(oldest, lines[1..].join("\n") + "\n").unwrap();
    let e = a.verify().unwrap_err();
    assert_eq!(e.first().unwrap().seq, 1, "{e}");
    assert!(e.to_string().contains("removed from its front"), "{e}");
    fs::write(oldest, lines.join("\n") + "\n").unwrap();
    assert!(a.verify().is_ok(), "restored");
}

#[test]
fn verify_goes_on_past_a_break_and_names_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Memory::default());
    let a = open(dir.path(), &store, 1 << 20, 5);
    write(&a, 10);
    let path = dir.path().join("audit.log");
    let lines: Vec<String> = fs::read_to_string(&path).unwrap().lines().map(str::to_owned).collect();
    let mut changed = lines.clone();
    changed[2] = changed[2].replace("\"uid\":1000", "\"uid\":1");
    changed.remove(7);
    fs::write(&path, changed.join("\n") + "\n").unwrap();
    let e = a.verify().unwrap_err();
    let seqs: Vec<u64> = e.breaks.iter().map(|b| b.seq).collect();
    assert_eq!(seqs, vec![3, 8], "{e}");
    assert!(e.to_string().contains("1 more break"), "{e}");
}

#[test]
fn rotation_past_keep_files_moves_the_recorded_start_and_the_chain_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Memory::default());
    let a = open(dir.path(), &store, 1500, 2);
    write_settled(&a, 20, 1500);
    let v = a.verify().unwrap();
    assert!(v.first_seq > 1, "old files were dropped: {v:?}");
    let start = store.anchors.lock().unwrap().start.clone().unwrap();
    assert_eq!(
        start.seq, v.first_seq,
        "the keystore records where the retained log begins"
    );
    // Lowering keep_files leaves no file behind to break the chain.
    drop(a);
    let a = open(dir.path(), &store, 1500, 1);
    write_settled(&a, 10, 1500);
    assert!(a.verify().is_ok());
    assert!(!dir.path().join("audit.log.2").exists());
}

#[test]
fn start_up_cuts_a_torn_tail_adopts_lines_past_the_head_and_names_a_cut_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Memory::default());
    let a = open(dir.path(), &store, 1 << 20, 5);
    write(&a, 5);
    drop(a);
    let path = dir.path().join("audit.log");
    let recorded = store.anchors.lock().unwrap().head.clone().unwrap();
    // Lines written after the keystore's head (a crash before it was
    // recorded): roll the keystore back two lines.
    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let third: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
    store.anchors.lock().unwrap().head = Some(Head {
        seq: 3,
        hash: third["hash"].as_str().unwrap().to_owned(),
    });
    // …and a torn write after them.
    fs::write(&path, format!("{text}{{\"id\":\"x\",\"se")).unwrap();
    let a = open(dir.path(), &store, 1 << 20, 5);
    let v = a.verify().unwrap();
    assert_eq!(v.recoveries.len(), 2, "{v:?}");
    assert!(v.recoveries[0].contains("cut 13 bytes after seq 5"), "{v:?}");
    assert!(v.recoveries[1].contains("adopted 2 lines (seq 4 to 5)"), "{v:?}");
    assert_eq!(v.last_seq, 7);
    wait_for("the anchors recorded", || {
        store.anchors.lock().unwrap().head.as_ref().is_some_and(|h| h.seq == 7)
    });
    assert!(recorded.seq < 7);
    drop(a);

    // A log cut short of the keystore's head is tampering, named at start
    // and by verify; the chain goes on from the keystore's record.
    let text = fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text.lines().take(4).collect();
    fs::write(&path, kept.join("\n") + "\n").unwrap();
    let a = open(dir.path(), &store, 1 << 20, 5);
    let e = a.verify().unwrap_err();
    assert_eq!(e.first().unwrap().seq, 5, "{e}");
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains(EventType::AuditTampered.as_str()), "{text}");
    assert!(text.contains("lines 5 to 7 were removed"), "{text}");
}

#[test]
fn a_keystore_that_cannot_record_the_head_suspends_audited_requests_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Memory::default());
    let a = open(dir.path(), &store, 1 << 20, 5);
    write(&a, 2);
    assert!(a.admit().is_ok());
    store.failing.store(true, Ordering::SeqCst);
    // The line is written and synced; recording its head fails.
    a.record_sync(event(EventType::Sign)).unwrap();
    wait_for("suspended", || a.admit().is_err());
    let refused = a.admit().unwrap_err();
    assert_eq!(refused.code, protocol::ErrorCode::AuditUnavailable);
    assert!(
        refused.message.contains("database or disk is full"),
        "{}",
        refused.message
    );
    assert!(!a.health().healthy);
    // What changes nothing is still counted while suspended.
    assert!(a
        .submit(event(EventType::RateLimited), Class::Operation, false)
        .is_none());
    store.failing.store(false, Ordering::SeqCst);
    wait_for("resumed", || a.admit().is_ok());
    wait_for("AUDIT_RESUMED written", || {
        fs::read_to_string(dir.path().join("audit.log"))
            .unwrap()
            .contains(EventType::AuditResumed.as_str())
    });
    let text = fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let resumed = text
        .lines()
        .find(|l| l.contains(EventType::AuditResumed.as_str()))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(resumed).unwrap();
    assert!(v["metadata"]["refused_requests"].as_u64().unwrap() >= 1, "{v}");
    assert!(a.verify().is_ok());
}

#[test]
fn a_full_queue_refuses_audited_requests_and_counts_what_it_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Memory::default());
    let mut s = settings(dir.path(), 1 << 20, 5);
    s.buffer_events = 4;
    let a = Auditor::open(s, Arc::clone(&store) as Arc<dyn AnchorStore>).unwrap();
    // Hold the writer back by holding its file state.
    let held = a.inner_file_lock_for_tests();
    for _ in 0..8 {
        a.submit(event(EventType::Sign), Class::Operation, true);
    }
    let refused = a.admit().unwrap_err();
    assert!(refused.message.contains("behind"), "{}", refused.message);
    assert!(a
        .submit(event(EventType::AuthFailure), Class::Security, false)
        .is_none());
    assert_eq!(a.dropped_total(), 1);
    drop(held);
    wait_for("caught up", || a.admit().is_ok());
    wait_for(EventType::AuditResumed.as_str(), || {
        fs::read_to_string(dir.path().join("audit.log"))
            .unwrap()
            .contains("\"dropped_events\":{\"AUTH_FAILURE\":1}")
    });
    assert!(a.verify().is_ok());
}

#[test]
fn a_write_cut_short_leaves_no_fragment_and_its_line_is_written_when_the_disk_takes_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Memory::default());
    let a = open(dir.path(), &store, 1 << 20, 5);
    write(&a, 3);
    let path = dir.path().join("audit.log");
    let before = fs::read(&path).unwrap();
    // The disk fills half-way through the next line.
    a.short_write_for_tests(100);
    let mut e = event(EventType::KeyCreated);
    e.resource = "key:made-while-full".into();
    let refused = a.record_sync(e).unwrap_err();
    assert_eq!(refused.code, protocol::ErrorCode::AuditUnavailable);
    assert!(
        refused.message.contains("no space left on device"),
        "{}",
        refused.message
    );
    assert!(
        a.admit().is_err(),
        "audited requests are refused while lines cannot be written"
    );
    // The writer tries again by itself, and fails the same way meanwhile.
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        fs::read(&path).unwrap() == before,
        "a fragment of the line stayed in the file"
    );
    // Space comes back: the line was held, not lost.
    a.short_write_for_tests(0);
    wait_for("resumed", || a.admit().is_ok());
    wait_for("the held line written", || {
        fs::read_to_string(&path)
            .unwrap()
            .contains(EventType::AuditResumed.as_str())
    });
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("key:made-while-full"), "{text}");
    assert!(text.ends_with('\n'));
    let v = a.verify().unwrap();
    assert_eq!(v.last_seq, 5, "{v:?}\n{text}");
}

#[test]
fn a_security_line_is_synced_before_its_answer_not_at_the_next_interval() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Memory::default());
    let mut s = settings(dir.path(), 1 << 20, 5);
    s.flush_interval = Duration::from_secs(3600);
    let a = Auditor::open(s, Arc::clone(&store) as Arc<dyn AnchorStore>).unwrap();
    let a = Arc::new(a);
    for _ in 0..3 {
        let (done, waited) = std::sync::mpsc::channel();
        let writer = Arc::clone(&a);
        std::thread::spawn(move || {
            let _ = done.send(writer.record_sync(event(EventType::KeyCreated)));
        });
        let synced = waited.recv_timeout(Duration::from_secs(2));
        assert!(
            matches!(synced, Ok(Ok(()))),
            "a security line was not synced within 2 s: {synced:?}"
        );
    }
    // …and anchored right after, without waiting for the interval either.
    wait_for("the keystore naming the last line", || {
        store.anchors.lock().unwrap().head.as_ref().map(|h| h.seq) == Some(3)
    });
}

#[test]
fn an_operation_line_written_by_its_request_is_synced_and_anchored_within_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Memory::default());
    let a = open(dir.path(), &store, 1 << 20, 5);
    // Let the writer go idle first, so nothing else would wake it.
    std::thread::sleep(Duration::from_millis(200));
    let ticket = a.submit(event(EventType::Sign), Class::Operation, true).unwrap();
    a.wait_blocking(ticket).unwrap();
    wait_for("the line anchored by the timer", || {
        store.anchors.lock().unwrap().head.as_ref().map(|h| h.seq) == Some(1)
    });
}
