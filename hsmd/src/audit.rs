//! The audit log: JSON lines, one per operation or decision, each carrying the
//! hash of the line before it, so an edited, deleted, reordered or truncated
//! line is found by `hsmctl audit verify` and named by its sequence number.
//!
//! A line is the event's JSON object whose last member is `"hash"`: the hex
//! SHA-256 of every byte of the line before `,"hash":"` (so it covers the
//! event and its `prev_hash`). The sequence number and hash of the last line
//! written are also kept in the keystore, which finds a cut-off tail.
//!
//! Security events (denials, refused connections, unlock, lock, key lifecycle)
//! are written and synced before their response is sent; operation events are
//! buffered and written every `audit.flush_interval`, when the buffer fills,
//! and at shutdown. The file rotates by size; the chain continues across files.
//! Events never carry secrets, plaintext or key bytes: only names, versions,
//! error codes and messages (which hsmd never fills with secrets).

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// Who made a request, as audit lines name them.
#[derive(Debug, Clone)]
pub struct Who {
    /// Kernel-reported uid.
    pub uid: u32,
    /// User name, if any.
    pub user: Option<String>,
    /// Process id.
    pub pid: Option<u32>,
    /// Executable path.
    pub executable: Option<String>,
    /// The daemon's connection number.
    pub connection: u64,
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Done.
    Success,
    /// Refused or failed.
    Failure,
}

/// One event, before it has a place in the chain.
#[derive(Debug, Clone)]
pub struct Event {
    /// `SIGN`, `KEY_CREATED`, `ACCESS_DENIED`, …
    pub event_type: &'static str,
    /// Who.
    pub who: Arc<Who>,
    /// Backend, for key events.
    pub backend: Option<&'static str>,
    /// What it was about: `key:NAME`, `keystore`, `policy`, `connection`.
    pub resource: String,
    /// The operation or decision.
    pub action: &'static str,
    /// How it ended.
    pub result: Outcome,
    /// Small facts: versions, error codes and messages. Never secrets.
    pub metadata: Meta,
    /// 0 (routine) to 10 (alarming).
    pub risk_score: u8,
    /// When.
    pub time: SystemTime,
}

/// An event's metadata: a fixed set of small facts (a struct, not a map, so
/// recording an event on the hot path allocates little).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Meta {
    /// The key version used or made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// A check's verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid: Option<bool>,
    /// A key's state after the operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    /// The error code of a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    /// A stored file's token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The message of a failure or decision (hsmd's own text, never a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

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
    backend: Option<&'a str>,
    resource: &'a str,
    action: &'a str,
    result: Outcome,
    metadata: &'a Meta,
    risk_score: u8,
    prev_hash: &'a str,
}

const HASH_KEY: &str = ",\"hash\":\"";
/// The `prev_hash` of the very first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where the chain stands: the last line's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Sequence number of the last line (0 before any).
    pub seq: u64,
    /// Its hash (GENESIS before any).
    pub hash: String,
}

impl Default for Head {
    fn default() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

/// Settings, from `[audit]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The current file.
    pub path: PathBuf,
    /// Rotate when the file passes this size.
    pub max_file_bytes: u64,
    /// Rotated files kept (`audit.log.1` … `.N`).
    pub keep_files: u32,
    /// Buffered events that trigger a write.
    pub buffer_events: usize,
}

struct Writer {
    file: Option<File>,
    size: u64,
    head: Head,
}

/// The daemon's audit log.
pub struct Auditor {
    settings: Settings,
    run: String,
    buffer: Mutex<Vec<Event>>,
    writer: Mutex<Writer>,
    /// Stores the head durably (in the keystore).
    store_head: Box<dyn Fn(&Head) + Send + Sync>,
    /// Woken when the buffer is full.
    pub full: tokio::sync::Notify,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("path", &self.settings.path)
            .finish_non_exhaustive()
    }
}

/// What `verify` found.
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
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log broken at seq {seq}: {why}")]
pub struct Broken {
    /// The first sequence number that is not as it should be.
    pub seq: u64,
    /// What is wrong there.
    pub why: String,
}

fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A random prefix for this run's event ids: `<prefix>-<seq>` is unique
/// without a random draw per line.
fn run_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
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
fn render(event: &Event, seq: u64, prev: &str, run: &str, out: &mut Vec<u8>) -> String {
    let id = format!("{run}-{seq}");
    let line = Line {
        id: &id,
        seq,
        timestamp: rfc3339_millis(event.time),
        event_type: event.event_type,
        uid: event.who.uid,
        user: event.who.user.as_deref(),
        pid: event.who.pid,
        executable: event.who.executable.as_deref(),
        connection: event.who.connection,
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

/// Splits a line into the hashed part and the hash it claims.
fn split_line(line: &str) -> Option<(&str, &str)> {
    let at = line.rfind(HASH_KEY)?;
    let claimed = line[at + HASH_KEY.len()..].strip_suffix("\"}")?;
    Some((&line[..at], claimed))
}

impl Auditor {
    /// Opens (creating, mode 0600) the log and continues the chain from `head`
    /// (the keystore's record). A file that does not end there is reported, and
    /// the chain continues from the keystore's head, so `verify` names the break.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(
        settings: Settings,
        head: Option<Head>,
        store_head: Box<dyn Fn(&Head) + Send + Sync>,
    ) -> std::io::Result<Self> {
        let file_head = last_line_head(&settings.path);
        let head = match (head, file_head) {
            (Some(k), Some(f)) if k != f => {
                tracing::error!(
                    keystore_seq = k.seq,
                    file_seq = f.seq,
                    "the audit log does not end where the keystore says: it was cut off or edited; `hsmctl audit verify` names the line"
                );
                k
            }
            (Some(k), _) => k,
            (None, Some(f)) => f,
            (None, None) => Head::default(),
        };
        let file = open_append(&settings.path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            settings,
            run: run_id(),
            buffer: Mutex::new(Vec::new()),
            writer: Mutex::new(Writer {
                file: Some(file),
                size,
                head,
            }),
            store_head,
            full: tokio::sync::Notify::new(),
        })
    }

    /// Where the log is.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.settings.path
    }

    /// Buffered events not yet written.
    pub fn pending(&self) -> usize {
        self.buffer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Queues an operation event (written at the next flush).
    pub fn record(&self, event: Event) {
        let n = {
            let mut b = self.buffer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            b.push(event);
            b.len()
        };
        if n >= self.settings.buffer_events {
            self.full.notify_one();
        }
    }

    /// Writes a security event now, with everything buffered before it, and
    /// syncs the file. Blocking: call it off the reactor.
    pub fn record_now(&self, event: Event) {
        self.buffer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, path = %self.settings.path.display(), "cannot write the audit log");
        }
    }

    /// Writes every buffered event, syncs, rotates if the file is big, and
    /// stores the new head. Blocking.
    ///
    /// # Errors
    /// The file cannot be written; the events stay buffered then.
    pub fn flush(&self) -> std::io::Result<usize> {
        let mut w = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let events = std::mem::take(&mut *self.buffer.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if events.is_empty() {
            return Ok(0);
        }
        let mut text: Vec<u8> = Vec::with_capacity(events.len() * 400);
        let mut head = w.head.clone();
        for e in &events {
            let hash = render(e, head.seq + 1, &head.hash, &self.run, &mut text);
            head = Head {
                seq: head.seq + 1,
                hash,
            };
        }
        let written = match w.file.as_mut() {
            Some(f) => f.write_all(&text).and_then(|()| f.sync_data()),
            None => Err(std::io::Error::other("the audit file is not open")),
        };
        if let Err(e) = written {
            // Keep them for the next try, in order.
            let mut b = self.buffer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let later = std::mem::take(&mut *b);
            *b = events;
            b.extend(later);
            return Err(e);
        }
        w.size += text.len() as u64;
        w.head = head;
        (self.store_head)(&w.head);
        if w.size > self.settings.max_file_bytes {
            if let Err(e) = self.rotate(&mut w) {
                tracing::error!(error = %e, "cannot rotate the audit log; it keeps growing");
            }
        }
        Ok(events.len())
    }

    fn rotate(&self, w: &mut Writer) -> std::io::Result<()> {
        w.file = None;
        let path = &self.settings.path;
        let keep = self.settings.keep_files.max(1);
        let _ = fs::remove_file(rotated(path, keep));
        for i in (1..keep).rev() {
            let from = rotated(path, i);
            if from.exists() {
                fs::rename(&from, rotated(path, i + 1))?;
            }
        }
        fs::rename(path, rotated(path, 1))?;
        let f = open_append(path)?;
        w.file = Some(f);
        w.size = 0;
        tracing::info!(path = %path.display(), seq = w.head.seq, "audit log rotated");
        Ok(())
    }

    /// The head after writing everything buffered.
    ///
    /// # Errors
    /// As [`Auditor::flush`].
    pub fn flushed_head(&self) -> std::io::Result<Head> {
        self.flush()?;
        Ok(self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .head
            .clone())
    }

    /// Checks the chain through every file against `head`.
    ///
    /// # Errors
    /// [`Broken`] at the first line that is not as it should be.
    pub fn verify(&self, head: &Head) -> Result<Verified, Broken> {
        verify_files(&self.files(), head)
    }

    /// The log's files, oldest first.
    #[must_use]
    pub fn files(&self) -> Vec<PathBuf> {
        let path = &self.settings.path;
        let mut files: Vec<PathBuf> = (1..=self.settings.keep_files)
            .rev()
            .map(|i| rotated(path, i))
            .filter(|p| p.exists())
            .collect();
        files.push(path.clone());
        files
    }
}

fn rotated(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

/// The head the file itself ends with, if it has lines.
fn last_line_head(path: &Path) -> Option<Head> {
    let f = File::open(path).ok()?;
    let mut last = None;
    for line in BufReader::new(f).lines().map_while(Result::ok) {
        if !line.trim().is_empty() {
            last = Some(line);
        }
    }
    let line = last?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    Some(Head {
        seq: v["seq"].as_u64()?,
        hash: v["hash"].as_str()?.to_owned(),
    })
}

/// Checks files (oldest first) as one chain ending at `head`.
///
/// # Errors
/// [`Broken`] naming the first bad sequence number.
pub fn verify_files(files: &[PathBuf], head: &Head) -> Result<Verified, Broken> {
    let mut prev: Option<Head> = None;
    let mut first_seq = 0;
    let mut lines = 0u64;
    for path in files {
        let f = File::open(path).map_err(|e| Broken {
            seq: prev.as_ref().map_or(1, |p| p.seq + 1),
            why: format!("cannot read {}: {e}", path.display()),
        })?;
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let expected = prev.as_ref().map_or(1, |p| p.seq + 1);
            let at = |why: String| Broken {
                seq: expected,
                why: format!("{} line {}: {why}", path.display(), n + 1),
            };
            let line = line.map_err(|e| at(format!("unreadable: {e}")))?;
            let (body, claimed) = split_line(&line).ok_or_else(|| at("not an audit line (no hash)".into()))?;
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| at(format!("not valid JSON: {e}")))?;
            let seq = v["seq"].as_u64().ok_or_else(|| at("no seq".into()))?;
            let prev_hash = v["prev_hash"].as_str().ok_or_else(|| at("no prev_hash".into()))?;
            match &prev {
                Some(p) if seq != p.seq + 1 => {
                    return Err(at(format!(
                        "expected seq {}, found seq {seq}: a line was deleted or lines were reordered",
                        p.seq + 1
                    )))
                }
                Some(p) if prev_hash != p.hash => {
                    return Err(at(format!(
                        "seq {seq} does not follow the line before it (prev_hash differs)"
                    )))
                }
                None if seq == 1 && prev_hash != GENESIS => {
                    return Err(at("the first line does not start the chain".into()))
                }
                _ => {}
            }
            let actual = hex::encode(Sha256::digest(body.as_bytes()));
            if actual != claimed || v["hash"].as_str() != Some(claimed) {
                return Err(Broken {
                    seq,
                    why: format!(
                        "{} line {}: seq {seq} does not match its hash: the line was edited",
                        path.display(),
                        n + 1
                    ),
                });
            }
            if prev.is_none() {
                first_seq = seq;
            }
            prev = Some(Head {
                seq,
                hash: claimed.to_owned(),
            });
            lines += 1;
        }
    }
    let last = prev.unwrap_or_default();
    if last.seq < head.seq {
        return Err(Broken {
            seq: last.seq + 1,
            why: format!(
                "the log ends at seq {} but the keystore records seq {}: lines {}..={} were cut off",
                last.seq,
                head.seq,
                last.seq + 1,
                head.seq
            ),
        });
    }
    if last != *head {
        return Err(Broken {
            seq: head.seq.max(1),
            why: format!(
                "the log ends at seq {} with a hash the keystore does not record (keystore: seq {})",
                last.seq, head.seq
            ),
        });
    }
    Ok(Verified {
        lines,
        first_seq,
        last_seq: last.seq,
        files: files.to_vec(),
    })
}

/// Filters for `audit show`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only events at or after this time.
    pub since: Option<SystemTime>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this user (name or uid).
    pub user: Option<String>,
    /// Only events about this key.
    pub key: Option<String>,
    /// Only `success` or `failure`.
    pub result: Option<String>,
    /// At most this many (the newest).
    pub limit: usize,
}

/// The lines of `files` that pass `filter`, oldest first.
#[must_use]
pub fn show(files: &[PathBuf], filter: &Filter) -> Vec<String> {
    let since = filter
        .since
        .map(|t| t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO));
    let key = filter.key.as_ref().map(|k| format!("key:{k}"));
    let mut out = std::collections::VecDeque::new();
    for path in files {
        let Ok(f) = File::open(path) else { continue };
        for line in BufReader::new(f).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(since) = since {
                let t = v["timestamp"]
                    .as_str()
                    .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
                if t.is_none_or(|t| t < since) {
                    continue;
                }
            }
            if filter
                .event_type
                .as_deref()
                .is_some_and(|e| !v["event_type"].as_str().is_some_and(|x| x.eq_ignore_ascii_case(e)))
            {
                continue;
            }
            if let Some(u) = &filter.user {
                let uid_match = v["uid"].as_u64().is_some_and(|x| x.to_string() == *u);
                if !uid_match && v["user"].as_str() != Some(u.as_str()) {
                    continue;
                }
            }
            if key.as_deref().is_some_and(|k| v["resource"].as_str() != Some(k)) {
                continue;
            }
            if filter
                .result
                .as_deref()
                .is_some_and(|r| v["result"].as_str() != Some(r))
            {
                continue;
            }
            out.push_back(line);
            if out.len() > filter.limit.max(1) {
                out.pop_front();
            }
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(t: &'static str) -> Event {
        Event {
            event_type: t,
            who: Arc::new(Who {
                uid: 1000,
                user: Some("alice".into()),
                pid: Some(42),
                executable: Some("/usr/bin/hsmctl".into()),
                connection: 7,
            }),
            backend: Some("soft"),
            resource: "key:k".into(),
            action: "sign",
            result: Outcome::Success,
            metadata: Meta::default(),
            risk_score: 1,
            time: SystemTime::now(),
        }
    }

    fn log(dir: &Path, n: usize) -> (Auditor, Arc<Mutex<Head>>) {
        let stored = Arc::new(Mutex::new(Head::default()));
        let s2 = Arc::clone(&stored);
        let a = Auditor::open(
            Settings {
                path: dir.join("audit.log"),
                max_file_bytes: 1500,
                keep_files: 50,
                buffer_events: 1000,
            },
            None,
            Box::new(move |h| *s2.lock().unwrap() = h.clone()),
        )
        .unwrap();
        for _ in 0..n {
            a.record(event("SIGN"));
            a.flush().unwrap();
        }
        (a, stored)
    }

    #[test]
    fn a_rotating_chain_verifies_and_every_kind_of_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (a, stored) = log(dir.path(), 12);
        let head = stored.lock().unwrap().clone();
        assert_eq!(head.seq, 12);
        let files = a.files();
        assert!(files.len() > 1, "rotated by size");
        let ok = a.verify(&head).unwrap();
        assert_eq!((ok.lines, ok.first_seq, ok.last_seq), (12, 1, 12));
        // Every file's lines, in order, for tampering.
        let all: Vec<(PathBuf, Vec<String>)> = files
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    fs::read_to_string(p).unwrap().lines().map(str::to_owned).collect(),
                )
            })
            .collect();
        // The newest file with at least two lines (the current one may have just
        // been rotated and be empty).
        let target = all.iter().rposition(|(_, l)| l.len() >= 2).unwrap();
        let rewrite = |edit: &dyn Fn(&mut Vec<String>)| {
            let last = &all[target];
            let mut lines = last.1.clone();
            edit(&mut lines);
            let mut text = lines.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            fs::write(&last.0, text).unwrap();
            let r = verify_files(&files, &head);
            fs::write(&last.0, last.1.join("\n") + "\n").unwrap();
            r
        };
        let first_in_last = all[..target].iter().map(|(_, l)| l.len() as u64).sum::<u64>() + 1;
        assert_eq!(
            first_in_last + all[target].1.len() as u64 - 1,
            12,
            "the target file holds the newest lines"
        );
        let e = rewrite(&|l| l[0] = l[0].replace("\"uid\":1000", "\"uid\":0")).unwrap_err();
        assert_eq!(e.seq, first_in_last, "{e}");
        assert!(e.why.contains("edited"), "{e}");
        let e = rewrite(&|l| {
            l.remove(0);
        })
        .unwrap_err();
        assert_eq!(e.seq, first_in_last, "{e}");
        let e = rewrite(&|l| l.swap(0, 1)).unwrap_err();
        assert_eq!(e.seq, first_in_last, "{e}");
        let e = rewrite(&|l| l.truncate(l.len() - 1)).unwrap_err();
        assert_eq!(e.seq, 12, "{e}");
        assert!(e.why.contains("cut off"), "{e}");
        assert!(verify_files(&files, &head).is_ok(), "restored");
    }

    #[test]
    fn a_reopened_log_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (a, stored) = log(dir.path(), 3);
        drop(a);
        let head = stored.lock().unwrap().clone();
        let s2 = Arc::clone(&stored);
        let b = Auditor::open(
            Settings {
                path: dir.path().join("audit.log"),
                max_file_bytes: 1 << 20,
                keep_files: 50,
                buffer_events: 1000,
            },
            Some(head),
            Box::new(move |h| *s2.lock().unwrap() = h.clone()),
        )
        .unwrap();
        b.record_now(event("LOCK"));
        let head = stored.lock().unwrap().clone();
        assert_eq!(head.seq, 4);
        assert_eq!(b.verify(&head).unwrap().lines, 4);
    }
}
