//! Restoring a format-3 archive into this daemon's state, in three steps so
//! that no fault leaves a mix of old and new state:
//!
//! 1. **Stage.** Every part is read, opened and checked into staging
//!    directories (`.restore-<id>.d`) beside the keystore and beside the
//!    audit log; the keystore is checked as SQLite, and what of it cannot
//!    work here is listed. Nothing live is touched: a refusal, a failure or a
//!    kill leaves only the staging directories, which start-up removes.
//! 2. **Journal.** With the audit writer held, the staged keystore is given
//!    the anchors of the log that will be beside it, and a journal naming
//!    every move is made durable (`.restore-journal.json`).
//! 3. **Move.** Each live part is renamed aside (or removed, when there was
//!    nothing in it) and its staged copy renamed into its place. Each step
//!    can be run again after a crash and does nothing twice; the journal is
//!    removed last. A start-up that finds it finishes the moves before it
//!    opens anything ([`resume`]).

use std::{
    fs::{self, File},
    io::{self, Read, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use protocol::{ErrorCode, RestoreSummary, ServiceState, UnlockSecret, WireError};
use serde::{Deserialize, Serialize};

use super::{
    allowed, archive::Kind, archive::Part, archive::Sink, read_failed, tally, ArchiveKey, Header, Sources, VaultError,
    KEYSTORE,
};
use crate::keystore::Vault;

/// The journal's name in the state directory.
const JOURNAL: &str = ".restore-journal.json";
/// Staging directories are `.restore-<16 hex>.d`.
const STAGING_PREFIX: &str = ".restore-";
const STAGING_SUFFIX: &str = ".d";
/// Where the staged audit files are, in the audit log's staging directory.
const AUDIT_DIR: &str = "audit";

fn refused(code: ErrorCode, message: String) -> VaultError {
    VaultError::Wire(WireError::new(code, message))
}

fn io_failed<'a>(what: &str, path: &'a Path) -> impl FnOnce(io::Error) -> VaultError + 'a {
    let what = what.to_owned();
    move |e| VaultError::Invalid(format!("cannot {what} {}: {e} (nothing was changed)", path.display()))
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn is_staging(name: &str) -> bool {
    name.strip_prefix(STAGING_PREFIX)
        .and_then(|n| n.strip_suffix(STAGING_SUFFIX))
        .is_some_and(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn rename(from: &Path, to: &Path) -> io::Result<()> {
    step_done()?;
    fs::rename(from, to)
}

#[cfg(not(test))]
#[allow(clippy::unnecessary_wraps)]
fn step_done() -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Tests: moves allowed before the process "dies" (an error stops the journal).
    static MOVES_LEFT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

#[cfg(test)]
fn step_done() -> io::Result<()> {
    MOVES_LEFT.with(|m| match m.get() {
        Some(0) => Err(io::Error::other("killed")),
        Some(n) => {
            m.set(Some(n - 1));
            Ok(())
        }
        None => Ok(()),
    })
}

/// Staging directories, removed when dropped unless the restore finished
/// with them (then they are empty and removed too).
struct Staging {
    dirs: Vec<PathBuf>,
}

impl Drop for Staging {
    fn drop(&mut self) {
        for dir in &self.dirs {
            if let Err(e) = fs::remove_dir_all(dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a restore's staging directory; the next start removes it");
                }
            }
        }
    }
}

/// Puts each part read into its place in the staging directories.
struct Stager<'a> {
    header: &'a Header,
    state: &'a Path,
    audit: Option<&'a Path>,
    file: Option<File>,
    /// Directories made, in order (synced before the journal is written).
    dirs: Vec<PathBuf>,
    /// The same, to look up: a store of many files has as many directories.
    made: std::collections::HashSet<PathBuf>,
    audit_names: Vec<String>,
}

impl Stager<'_> {
    fn dir(&mut self, dir: &Path) -> io::Result<()> {
        if self.made.contains(dir) {
            return Ok(());
        }
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        self.made.insert(dir.to_owned());
        self.dirs.push(dir.to_owned());
        Ok(())
    }

    /// The part just read is whole on disk.
    fn finish(&mut self) -> io::Result<()> {
        match self.file.take() {
            Some(f) => f.sync_all(),
            None => Ok(()),
        }
    }
}

impl Sink for Stager<'_> {
    fn begin(&mut self, part: &Part) -> io::Result<()> {
        // The name decides a path: it is checked before anything is made.
        allowed(self.header, part).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let path = match part.kind {
            Kind::Keystore => self.state.join(KEYSTORE),
            Kind::File => self.state.join(&part.name),
            Kind::Audit => {
                let dir = self.audit.ok_or_else(|| io::Error::other("no audit log here"))?;
                self.audit_names.push(part.name[super::AUDIT.len()..].to_owned());
                dir.join(AUDIT_DIR).join(&part.name[super::AUDIT.len()..])
            }
        };
        if let Some(parent) = path.parent() {
            self.dir(parent)?;
        }
        self.file = Some(
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?,
        );
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.write_all(bytes),
            None => Err(io::Error::other("bytes outside a part")),
        }
    }
}

/// One thing a restore replaces: live files moved aside (or removed when
/// `None`), then staged files moved into place. Done once `staged` is gone.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    staged: PathBuf,
    aside: Vec<(PathBuf, Option<PathBuf>)>,
    place: Vec<(PathBuf, PathBuf)>,
}

/// Every move of a restore, durable before the first is made.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Journal {
    staging: Vec<PathBuf>,
    steps: Vec<Step>,
}

impl Journal {
    /// Makes every move not yet made. Run again after a crash, it makes
    /// only those: a live file is moved aside only while its aside name is
    /// free (names carry the restore's time), and a step whose staged copy
    /// is gone is skipped.
    fn apply(&self) -> io::Result<()> {
        for step in &self.steps {
            if !exists(&step.staged) {
                continue;
            }
            let mut dirs: Vec<&Path> = Vec::new();
            for (live, aside) in &step.aside {
                match aside {
                    Some(aside) if exists(live) && !exists(aside) => rename(live, aside)?,
                    Some(_) => {}
                    None => match fs::symlink_metadata(live) {
                        Ok(m) if m.is_dir() => {
                            step_done()?;
                            fs::remove_dir_all(live)?;
                        }
                        Ok(_) => {
                            step_done()?;
                            fs::remove_file(live)?;
                        }
                        Err(_) => {}
                    },
                }
                dirs.extend(live.parent());
            }
            for (from, to) in &step.place {
                if exists(from) {
                    rename(from, to)?;
                }
                dirs.extend(to.parent());
            }
            if exists(&step.staged) {
                step_done()?;
                fs::remove_dir(&step.staged)?;
            }
            dirs.dedup();
            for dir in dirs {
                sync_dir(dir)?;
            }
        }
        Ok(())
    }

    /// Writes the journal durably (a whole file or none).
    fn write(&self, state_dir: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let tmp = state_dir.join(format!("{JOURNAL}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, state_dir.join(JOURNAL))?;
        sync_dir(state_dir)
    }

    fn remove(state_dir: &Path) -> io::Result<()> {
        fs::remove_file(state_dir.join(JOURNAL))?;
        sync_dir(state_dir)
    }
}

/// What a restore asks for besides the archive.
#[derive(Debug)]
pub struct Asked<'a> {
    /// The archive's secret.
    pub secret: &'a UnlockSecret,
    /// Replace a keystore and stored files that are there.
    pub force: bool,
    /// Restore even though some slots or keys cannot work here.
    pub accept_unusable: bool,
}

/// Restores the archive read from `input` into `sources` (see the module's
/// documentation). The daemon is locked afterwards.
///
/// # Errors
/// Anything [`super::check`] refuses, named the same way, with nothing
/// changed; `already-initialized` without `force` when there is a keystore
/// or stored files; `failed-precondition` for an archive holding what this
/// hsmd has no place for, or slots and keys that cannot work here (listed)
/// without `accept_unusable`.
pub fn restore(sources: &Sources, uid: u32, input: impl Read, asked: &Asked<'_>) -> Result<RestoreSummary, VaultError> {
    let vault = &sources.vault;
    let (mut reader, header) = super::open(input)?;
    let files = match (&sources.files, header.contents.files) {
        (None, true) => {
            return Err(refused(
                ErrorCode::FailedPrecondition,
                "the archive holds stored files and this hsmd has no file store".into(),
            ))
        }
        (files, true) => files.as_ref(),
        (_, false) => None,
    };
    let audit = match (&sources.audit, header.contents.audit) {
        (None, true) => {
            return Err(refused(
                ErrorCode::FailedPrecondition,
                "the archive holds an audit log and this hsmd keeps none (audit.enabled = false); \
                 turn the audit log on to restore it"
                    .into(),
            ))
        }
        (audit, _) => audit.as_ref(),
    };
    let initialized = vault.custody().state() != ServiceState::Uninitialized;
    let stored = match files {
        Some(f) => f
            .store()
            .tokens()
            .map_err(|e| VaultError::Invalid(format!("cannot list the stored files: {e}")))?
            .len(),
        None => 0,
    };
    if (initialized || stored > 0) && !asked.force {
        let what = match (initialized, stored) {
            (true, 0) => "a keystore".to_owned(),
            (false, n) => format!("{n} stored files"),
            (true, n) => format!("a keystore and {n} stored files"),
        };
        return Err(refused(
            ErrorCode::AlreadyInitialized,
            format!(
                "hsmd already has {what}; restoring would replace them. Add --force to replace them \
                 (what is there now is kept aside, named *.before-restore-<time>)"
            ),
        ));
    }
    let (key, key_is_right) = vault.archive_key(uid, &header.protection, &header.manifest.store_id, asked.secret)?;
    reader.set_key(ArchiveKey::new(key));

    let state_dir = vault.state_dir();
    let id = {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|e| VaultError::Invalid(format!("no randomness: {e}")))?;
        hex::encode(b)
    };
    let staging_name = format!("{STAGING_PREFIX}{id}{STAGING_SUFFIX}");
    let stage = state_dir.join(&staging_name);
    let audit_path = audit.map(|a| a.path().to_owned());
    let audit_dir = audit_path
        .as_deref()
        .map(|p| p.parent().unwrap_or(Path::new("/")).to_owned());
    let audit_stage = audit_dir.as_ref().map(|d| d.join(&staging_name));
    let mut staging = Staging {
        dirs: vec![stage.clone()],
    };
    if let Some(a) = &audit_stage {
        if *a != stage {
            staging.dirs.push(a.clone());
        }
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&stage)
        .map_err(io_failed("create", &stage))?;
    let mut stager = Stager {
        header: &header,
        state: &stage,
        audit: audit_stage.as_deref().filter(|_| header.contents.audit),
        file: None,
        dirs: vec![stage.clone()],
        made: std::collections::HashSet::from([stage.clone()]),
        audit_names: Vec::new(),
    };
    if header.contents.files {
        stager
            .dir(&stage.join(super::FILES.trim_end_matches('/')))
            .map_err(io_failed("create", &stage))?;
    }
    if let Some(a) = stager.audit {
        stager.dir(&a.join(AUDIT_DIR)).map_err(io_failed("create", a))?;
    }
    let mut summary = header.summary();
    loop {
        let part = match reader.next_part(&mut stager) {
            Ok(Some(part)) => part,
            Ok(None) => break,
            Err(e) => return Err(read_failed(vault, uid, e, true, summary.parts == 0 && !key_is_right)),
        };
        stager.finish().map_err(io_failed("write", &stage))?;
        tally(&mut summary, &header, &part)?;
        if part.kind == Kind::Keystore {
            vault.check_payload(&stage.join(KEYSTORE), &header.manifest)?;
        }
    }
    if summary.parts == 0 {
        return Err(VaultError::Invalid(
            "not a usable hsmd backup: it holds no keystore".into(),
        ));
    }
    summary.archive_bytes = reader.bytes_read();
    summary.manifest.authenticated = true;
    vault.archive_opened(uid);
    for dir in stager.dirs.iter().rev() {
        sync_dir(dir).map_err(io_failed("sync", dir))?;
    }
    let audit_names = std::mem::take(&mut stager.audit_names);
    drop(stager);

    // What of it cannot work here, before anything live is touched.
    let (unusable, any_slot) = vault.unusable_here(&stage)?;
    if !any_slot {
        return Err(refused(
            ErrorCode::FailedPrecondition,
            format!(
                "none of the archive's unlock slots can open on this machine, so the restored keystore \
                 could never be unlocked here: {}. Nothing was changed",
                unusable.join("; ")
            ),
        ));
    }
    if !unusable.is_empty() && !asked.accept_unusable {
        return Err(refused(
            ErrorCode::FailedPrecondition,
            format!(
                "some of the archive cannot work on this machine: {}. Nothing was changed; add \
                 --accept-unusable to restore it anyway (they work again where the hardware is)",
                unusable.join("; ")
            ),
        ));
    }

    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = |live: &Path| {
        let mut name = live.as_os_str().to_owned();
        name.push(format!(".before-restore-{stamp}"));
        PathBuf::from(name)
    };
    let mut steps = Vec::new();
    if let (Some(audit_path), Some(audit_stage)) = (&audit_path, audit_stage.as_ref().filter(|_| header.contents.audit))
    {
        let live_dir = audit_path.parent().unwrap_or(Path::new("/"));
        let current = audit_names.last().cloned().unwrap_or_default();
        let live_name = audit_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut place = Vec::new();
        for name in &audit_names {
            let to = if *name == current {
                live_name.clone()
            } else {
                match name.strip_prefix(&format!("{current}.")) {
                    Some(n) if !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()) => {
                        format!("{live_name}.{n}")
                    }
                    _ => {
                        return Err(VaultError::Invalid(format!(
                            "not a usable hsmd backup: its audit file {name:?} is neither the current log \
                             ({current:?}) nor one rotated from it"
                        )))
                    }
                }
            };
            place.push((audit_stage.join(AUDIT_DIR).join(name), live_dir.join(to)));
        }
        // Every file of the log here is kept aside: audit lines are never lost.
        let live: Vec<PathBuf> = audit
            .map(|a| a.files())
            .unwrap_or_default()
            .into_iter()
            .filter(|p| exists(p))
            .collect();
        steps.push(Step {
            staged: audit_stage.join(AUDIT_DIR),
            aside: live.iter().map(|p| (p.clone(), Some(aside(p)))).collect(),
            place,
        });
    }
    if let Some(f) = files {
        let root = f.store().root().to_owned();
        steps.push(Step {
            staged: stage.join(super::FILES.trim_end_matches('/')),
            aside: vec![(root.clone(), (stored > 0).then(|| aside(&root)))],
            place: vec![(stage.join(super::FILES.trim_end_matches('/')), root)],
        });
    }
    let keystore = state_dir.join(KEYSTORE);
    let mut keystore_aside = Vec::new();
    for suffix in ["-wal", "-shm", ""] {
        let mut live = keystore.as_os_str().to_owned();
        live.push(suffix);
        let live = PathBuf::from(live);
        let kept = initialized.then(|| {
            let mut a = aside(&keystore).into_os_string();
            a.push(suffix);
            PathBuf::from(a)
        });
        keystore_aside.push((live, kept));
    }
    steps.push(Step {
        staged: stage.join(KEYSTORE),
        aside: keystore_aside,
        place: vec![(stage.join(KEYSTORE), keystore.clone())],
    });
    let journal = Journal {
        staging: staging.dirs.clone(),
        steps,
    };

    let anchors = header.audit.clone();
    let commit = |here: Option<(&crate::audit::Head, &crate::audit::Start)>| -> Result<(), VaultError> {
        // The log beside the restored keystore is the archive's, or this
        // hsmd's own when the archive holds none.
        let set = match (&anchors, here) {
            (Some(a), _) if header.contents.audit => Some((
                (a.head_seq, a.head_hash.clone()),
                (a.start_seq, a.start_prev_hash.clone()),
            )),
            (_, Some((h, s))) => Some(((h.seq, h.hash.clone()), (s.seq, s.prev_hash.clone()))),
            _ => None,
        };
        if let Some(((hs, hh), (ss, sh))) = set {
            Vault::set_staged_anchors(&stage, (hs, &hh), (ss, &sh))?;
        }
        journal
            .write(&state_dir)
            .map_err(io_failed("write the restore's journal in", &state_dir))?;
        let moved = vault.replaced_while(|| match files {
            Some(f) => f.store().replaced_while(|| journal.apply()),
            None => journal.apply(),
        })?;
        moved.map_err(|e| {
            tracing::error!(error = %e, "a restore could not finish its moves; hsmd finishes them at its next start");
            VaultError::Invalid(format!(
                "the restore could not finish ({e}); restart hsmd: it finishes the restore when it starts \
                 (its journal is {})",
                state_dir.join(JOURNAL).display()
            ))
        })?;
        Journal::remove(&state_dir).map_err(io_failed("remove the restore's journal in", &state_dir))
    };
    match audit {
        Some(a) => a
            .replaced_while(|head, start| commit(Some((head, start))))
            .map_err(|e| VaultError::Invalid(format!("the restored audit log cannot be opened: {e}")))??,
        None => commit(None)?,
    }
    drop(staging);
    let kept: Vec<String> = journal
        .steps
        .iter()
        .flat_map(|s| s.aside.iter())
        .filter_map(|(_, kept)| kept.as_deref().filter(|k| exists(k)))
        .map(|k| k.display().to_string())
        .collect();
    tracing::warn!(
        keys = summary.manifest.keys,
        files = summary.files,
        audit_files = summary.audit_files,
        kept = kept.len(),
        "hsmd's state restored from a backup; locked"
    );
    Ok(RestoreSummary {
        archive: summary,
        unusable,
        kept,
    })
}

/// Finishes a restore a stop interrupted after its journal was written, and
/// removes staging directories of restores interrupted before. Run at
/// start-up, before anything in `state_dir` or `audit_dir` is opened.
/// Answers what it finished, for the audit log.
///
/// # Errors
/// The journal cannot be read or its moves made: hsmd must not start on a
/// half-restored state (the message says what to do).
pub fn resume(state_dir: &Path, audit_dir: &Path) -> Result<Option<String>, String> {
    let path = state_dir.join(JOURNAL);
    let finished = match fs::read(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        Ok(bytes) => {
            let unfinished = |why: String| {
                format!(
                    "a restore was interrupted and cannot be finished: {why}. The state in {} is part old, \
                     part restored: move {} away and restore the backup again with --force",
                    state_dir.display(),
                    path.display()
                )
            };
            let journal: Journal =
                serde_json::from_slice(&bytes).map_err(|e| unfinished(format!("its journal does not read: {e}")))?;
            let inside = |p: &Path| {
                p.components().all(|c| c != std::path::Component::ParentDir)
                    && p.parent()
                        .is_some_and(|d| d.starts_with(state_dir) || d.starts_with(audit_dir))
            };
            let all_inside = journal.staging.iter().all(|p| inside(p))
                && journal.steps.iter().all(|s| {
                    inside(&s.staged)
                        && s.aside
                            .iter()
                            .all(|(l, a)| inside(l) && a.as_deref().is_none_or(inside))
                        && s.place.iter().all(|(f, t)| inside(f) && inside(t))
                });
            if !all_inside {
                return Err(unfinished(
                    "its journal names paths outside the state and audit directories".into(),
                ));
            }
            journal.apply().map_err(|e| unfinished(e.to_string()))?;
            Journal::remove(state_dir).map_err(|e| unfinished(e.to_string()))?;
            Some(format!(
                "a restore interrupted by a stop was finished at start-up ({} steps)",
                journal.steps.len()
            ))
        }
    };
    for dir in [state_dir, audit_dir] {
        let Ok(entries) = fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_staging(&name) {
                match fs::remove_dir_all(entry.path()) {
                    Ok(()) => {
                        tracing::info!(dir = %entry.path().display(), "removed what an interrupted restore staged")
                    }
                    Err(e) => return Err(format!("cannot remove {}: {e}", entry.path().display())),
                }
            }
        }
    }
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A state directory with a keystore (and its WAL), a file store and an
    /// audit log, and a restore staged beside it; the journal that restores it.
    fn staged(dir: &Path) -> Journal {
        put(&dir.join("keystore.sqlite"), "old keystore");
        put(&dir.join("keystore.sqlite-wal"), "old wal");
        put(&dir.join("files/old-token/meta.json"), "old file");
        put(&dir.join("audit.log"), "old log");
        put(&dir.join("audit.log.1"), "old log 1");
        let stage = dir.join(".restore-0123456789abcdef.d");
        put(&stage.join("keystore.sqlite"), "new keystore");
        put(&stage.join("files/new-token/meta.json"), "new file");
        put(&stage.join("audit/audit.log"), "new log");
        put(&stage.join("audit/audit.log.1"), "new log 1");
        let aside = |n: &str| Some(dir.join(format!("{n}.before-restore-7")));
        Journal {
            staging: vec![stage.clone()],
            steps: vec![
                Step {
                    staged: stage.join("audit"),
                    aside: vec![
                        (dir.join("audit.log.1"), aside("audit.log.1")),
                        (dir.join("audit.log"), aside("audit.log")),
                    ],
                    place: vec![
                        (stage.join("audit/audit.log.1"), dir.join("audit.log.1")),
                        (stage.join("audit/audit.log"), dir.join("audit.log")),
                    ],
                },
                Step {
                    staged: stage.join("files"),
                    aside: vec![(dir.join("files"), aside("files"))],
                    place: vec![(stage.join("files"), dir.join("files"))],
                },
                Step {
                    staged: stage.join("keystore.sqlite"),
                    aside: vec![
                        (dir.join("keystore.sqlite-wal"), aside("keystore.sqlite-wal")),
                        (dir.join("keystore.sqlite-shm"), aside("keystore.sqlite-shm")),
                        (dir.join("keystore.sqlite"), aside("keystore.sqlite")),
                    ],
                    place: vec![(stage.join("keystore.sqlite"), dir.join("keystore.sqlite"))],
                },
            ],
        }
    }

    fn restored(dir: &Path) {
        assert_eq!(read(&dir.join("keystore.sqlite")), "new keystore");
        assert!(
            !dir.join("keystore.sqlite-wal").exists(),
            "the old WAL beside the new keystore"
        );
        assert_eq!(read(&dir.join("keystore.sqlite.before-restore-7")), "old keystore");
        assert_eq!(read(&dir.join("keystore.sqlite-wal.before-restore-7")), "old wal");
        assert_eq!(read(&dir.join("files/new-token/meta.json")), "new file");
        assert!(!dir.join("files/old-token").exists());
        assert_eq!(
            read(&dir.join("files.before-restore-7/old-token/meta.json")),
            "old file"
        );
        assert_eq!(read(&dir.join("audit.log")), "new log");
        assert_eq!(read(&dir.join("audit.log.1")), "new log 1");
        assert_eq!(read(&dir.join("audit.log.before-restore-7")), "old log");
        assert_eq!(read(&dir.join("audit.log.1.before-restore-7")), "old log 1");
        assert!(!dir.join(JOURNAL).exists());
        assert!(!dir.join(".restore-0123456789abcdef.d").exists());
    }

    /// Killed after every number of moves, a restore finished by the next
    /// start ends exactly as one never interrupted: no file lost, none moved
    /// twice.
    #[test]
    fn a_restore_killed_after_any_move_is_finished_at_start_as_if_never_interrupted() {
        let mut killed = 0;
        for allowed in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let journal = staged(dir.path());
            journal.write(dir.path()).unwrap();
            MOVES_LEFT.with(|m| m.set(Some(allowed)));
            let first = journal.apply();
            MOVES_LEFT.with(|m| m.set(None));
            if first.is_err() {
                killed += 1;
            }
            let finished = resume(dir.path(), dir.path()).unwrap();
            assert!(finished.is_some(), "the journal was there");
            restored(dir.path());
            assert_eq!(resume(dir.path(), dir.path()).unwrap(), None);
        }
        assert!(killed >= 10, "the moves were cut short {killed} times");
    }

    #[test]
    fn a_restore_killed_before_its_journal_leaves_the_state_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let _ = staged(dir.path());
        assert_eq!(resume(dir.path(), dir.path()).unwrap(), None);
        assert_eq!(read(&dir.path().join("keystore.sqlite")), "old keystore");
        assert_eq!(read(&dir.path().join("audit.log")), "old log");
        assert!(dir.path().join("files/old-token").exists());
        assert!(
            !dir.path().join(".restore-0123456789abcdef.d").exists(),
            "staging removed"
        );
    }

    #[test]
    fn a_journal_that_names_paths_elsewhere_or_does_not_read_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = staged(dir.path());
        journal.steps[0].place[0].1 = PathBuf::from("/etc/passwd");
        journal.write(dir.path()).unwrap();
        let e = resume(dir.path(), dir.path()).unwrap_err();
        assert!(
            e.contains("outside the state and audit directories") && e.contains("--force"),
            "{e}"
        );
        assert_eq!(read(&dir.path().join("keystore.sqlite")), "old keystore");
        fs::write(dir.path().join(JOURNAL), b"{").unwrap();
        let e = resume(dir.path(), dir.path()).unwrap_err();
        assert!(e.contains("does not read"), "{e}");
    }
}
