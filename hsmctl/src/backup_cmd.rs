//! `hsmctl backup create | verify | restore`: archives move in pieces over the
//! socket (transfers), so their size is not bound by the frame limit.

use std::{
    fs,
    path::{Path, PathBuf},
};

use clap::Subcommand;
use protocol::{
    ArchiveSummary, BackupContents, BackupManifest, BackupProtection, Client, Operation, Reply, UnlockSecret,
};
use serde_json::json;
use sha2::Digest as _;

use crate::{
    failure::{unexpected, Failure, Local},
    print_json,
    progress::Progress,
    secrets,
};

/// The largest archive hsmctl uploads (the daemon's limit too).
const MAX_ARCHIVE: u64 = 256 * 1024 * 1024;

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Write one consistent, encrypted archive of hsmd's state: the keystore,
    /// the stored files and the audit log (hsmd must be unlocked)
    #[command(
        after_help = "By default the archive is encrypted under a key derived from the master key:\n\
        restoring it needs a secret of one of its unlock slots (a passphrase or key file).\n\
        With --passphrase it is encrypted under a backup passphrase (Argon2id) instead.\n\
        Stored files go in as they are on disk (sealed); no plaintext is ever in an archive.\n\n\
        Examples:\n  hsmctl backup create /srv/backup/hsmd-$(date +%F).hsmdbak\n  \
        hsmctl backup create keys-only.hsmdbak --include keystore\n  \
        hsmctl backup create offsite.hsmdbak --passphrase-file /run/secrets/backup-pass"
    )]
    Create {
        /// The archive to write (appears under its name only when complete; - for standard output)
        file: PathBuf,
        /// What the archive holds besides the keystore: files, audit, or keystore
        /// alone [default: files and the audit log, as hsmd has them]
        #[arg(long, value_enum, value_delimiter = ',', value_name = "PARTS")]
        include: Vec<Include>,
        /// No progress bar
        #[arg(long, short)]
        quiet: bool,
        /// Archive format: 3 (the whole state), or 2 (the keystore alone, as
        /// hsmd before 3 reads it)
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=3), conflicts_with = "include")]
        format: u32,
        /// Replace the archive if it exists
        #[arg(long)]
        force: bool,
        /// Protect with a backup passphrase asked twice without echo
        #[arg(long, conflicts_with = "passphrase_file")]
        passphrase: bool,
        /// Protect with a backup passphrase read from this file (- for stdin)
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Check an archive: checksum and structure; with a secret also that it
    /// decrypts and holds a sound keystore matching its manifest
    #[command(after_help = "Examples:\n  hsmctl backup verify b.hsmdbak\n  \
        hsmctl backup verify b.hsmdbak --keyfile /etc/hsmd/unlock.key")]
    Verify {
        /// The archive
        file: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
        /// No progress bar
        #[arg(long, short)]
        quiet: bool,
    },
    /// Restore an archive into this daemon (empty, or with --force): keys,
    /// stored files under their tokens, and the audit log, which goes on from
    /// where the archive's ends. hsmd is locked afterwards and unlocks with
    /// the archive's slots
    #[command(
        after_help = "Everything is read and checked before anything is replaced: a damaged archive,\n\
        a wrong secret, or unlock slots and keys that cannot work on this machine (a TPM2 slot\n\
        with no TPM, a key on a pkcs11 token not configured here) leave hsmd as it was.\n\n\
        Example:\n  hsmctl backup restore b.hsmdbak --keyfile /etc/hsmd/unlock.key"
    )]
    Restore {
        /// The archive
        file: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
        /// Replace an existing keystore and stored files (each kept aside as
        /// NAME.before-restore-<time>)
        #[arg(long)]
        force: bool,
        /// Restore even though some unlock slots or keys of the archive cannot
        /// work on this machine (they are listed)
        #[arg(long)]
        accept_unusable: bool,
        /// No progress bar
        #[arg(long, short)]
        quiet: bool,
    },
}

/// What `backup create --include` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Include {
    /// The keystore (always in)
    Keystore,
    /// The stored files, sealed as on disk
    Files,
    /// The audit log, with its chain's anchors
    Audit,
}

/// The secret that opens an archive: the backup passphrase, or for a
/// master-key archive a passphrase or key file of one of its slots.
#[derive(Debug, clap::Args)]
pub struct SecretArgs {
    /// Read the passphrase from this file (- for stdin)
    #[arg(long, value_name = "FILE", conflicts_with = "keyfile")]
    passphrase_file: Option<PathBuf>,
    /// A key file of one of the archive's slots (master-key archives)
    #[arg(long, value_name = "FILE")]
    keyfile: Option<PathBuf>,
    /// Ask for the passphrase on the terminal
    #[arg(long, conflicts_with_all = ["keyfile", "passphrase_file"])]
    passphrase: bool,
}

impl SecretArgs {
    fn given(&self) -> bool {
        self.passphrase || self.passphrase_file.is_some() || self.keyfile.is_some()
    }

    fn read(&self, prompt: &str) -> Result<UnlockSecret, Failure> {
        Ok(match &self.keyfile {
            Some(path) => UnlockSecret::Keyfile(secrets::read_keyfile(path).map_err(|e| Local::Secret.fail(e))?),
            None => UnlockSecret::Passphrase(
                secrets::passphrase(self.passphrase_file.as_deref(), prompt).map_err(|e| Local::Secret.fail(e))?,
            ),
        })
    }
}

fn local(msg: String) -> Failure {
    Local::File.fail(msg)
}

fn read_archive(path: &Path) -> Result<Vec<u8>, Failure> {
    let size = fs::metadata(path)
        .map_err(|e| local(format!("cannot read {}: {e}", path.display())))?
        .len();
    if size > MAX_ARCHIVE {
        return Err(Local::Input.fail(format!(
            "{} is {size} bytes, more than the {MAX_ARCHIVE}-byte limit of an archive",
            path.display()
        )));
    }
    fs::read(path).map_err(|e| local(format!("cannot read {}: {e}", path.display())))
}

fn chunk_len(client: &Client) -> usize {
    (client.server().max_frame_bytes as usize)
        .saturating_sub(4096)
        .max(1024)
}

fn upload(client: &mut Client, archive: &[u8]) -> Result<u64, Failure> {
    let transfer = client.transfer_begin(archive.len() as u64)?;
    let mut offset = 0u64;
    for piece in archive.chunks(chunk_len(client)) {
        offset = client.transfer_write(transfer, offset, piece.to_vec())?;
    }
    Ok(transfer)
}

fn print_manifest(json: bool, what: &str, m: &BackupManifest, extra: serde_json::Value) {
    if json {
        let mut v = serde_json::to_value(m).unwrap_or_default();
        if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
            obj.extend(more.clone());
        }
        print_json(&v);
        return;
    }
    println!("{what}");
    println!("  keystore:   {} (schema {})", m.store_id, m.schema_version);
    println!(
        "  contents:   {} keys, {} key versions, {} unlock slots",
        m.keys, m.key_versions, m.slots
    );
    println!(
        "  made:       {} by hsmd {}",
        crate::key_cmd::time(m.created_unix),
        m.hsmd_version
    );
    println!("  protection: {}", m.protection);
    println!("  keystore:   {} bytes, sha256 {}", m.payload_bytes, m.payload_sha256);
}

/// The signature a format-2 (and 1) archive starts with.
const MAGIC_2: &[u8; 8] = b"HSMDBAK1";
/// The signature a format-3 archive starts with.
const MAGIC_3: &[u8; 8] = b"HSMDBAK3";

/// An archive file, and what its first bytes say.
struct ArchiveFile {
    file: fs::File,
    size: u64,
    /// 2 for `HSMDBAK1`, 3 for `HSMDBAK3`.
    format: u32,
    /// `master-key` or `passphrase`, as its header says.
    protection: Option<String>,
}

fn open_archive(path: &Path) -> Result<ArchiveFile, Failure> {
    use std::io::{Read as _, Seek as _};
    let cannot = |e: std::io::Error| local(format!("cannot read {}: {e}", path.display()));
    let mut file = fs::File::open(path).map_err(cannot)?;
    let size = file.metadata().map_err(cannot)?.len();
    let mut head = Vec::new();
    (&mut file).take(12).read_to_end(&mut head).map_err(cannot)?;
    let format = match head.get(..8) {
        Some(m) if m == MAGIC_3 => 3,
        Some(m) if m == MAGIC_2 => 2,
        _ => {
            return Err(Local::Input.fail(format!(
                "{} is not an hsmd backup: it starts with neither the HSMDBAK1 nor the HSMDBAK3 signature",
                path.display()
            )))
        }
    };
    // The header only says which secret to ask for; hsmd checks everything.
    let len = head
        .get(8..12)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_be_bytes)
        .min(1 << 20);
    let mut header = Vec::new();
    (&mut file)
        .take(u64::from(len))
        .read_to_end(&mut header)
        .map_err(cannot)?;
    let protection = serde_json::from_slice::<serde_json::Value>(&header)
        .ok()
        .and_then(|h| h["manifest"]["protection"].as_str().map(str::to_owned));
    file.rewind().map_err(cannot)?;
    Ok(ArchiveFile {
        file,
        size,
        format,
        protection,
    })
}

fn prompt_for(protection: Option<&str>) -> &'static str {
    match protection {
        Some("passphrase") => "Backup passphrase: ",
        _ => "Passphrase of one of the backup's slots: ",
    }
}

fn print_summary(json: bool, what: &str, s: &ArchiveSummary, extra: serde_json::Value) {
    if json {
        let mut v = serde_json::to_value(s).unwrap_or_default();
        if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
            obj.extend(more.clone());
        }
        print_json(&v);
        return;
    }
    let m = &s.manifest;
    println!("{what}");
    println!("  keystore:   {} (schema {})", m.store_id, m.schema_version);
    println!(
        "  contents:   {} keys, {} key versions, {} unlock slots",
        m.keys, m.key_versions, m.slots
    );
    if s.contents.files {
        println!(
            "  files:      {} stored files, {} bytes (sealed)",
            s.files, s.file_bytes
        );
    }
    if s.contents.audit {
        println!("  audit log:  {} files, {} bytes", s.audit_files, s.audit_bytes);
    }
    println!(
        "  made:       {} by hsmd {}",
        crate::key_cmd::time(m.created_unix),
        m.hsmd_version
    );
    println!("  protection: {}", m.protection);
    println!(
        "  archive:    format {}, {} parts, {} bytes",
        m.format, s.parts, s.archive_bytes
    );
}

/// What `--include` asks for; by default all that hsmd keeps.
fn contents(client: &mut Client, include: &[Include]) -> Result<BackupContents, Failure> {
    if include.is_empty() {
        let status = client.status()?;
        return Ok(BackupContents {
            files: true,
            audit: status.audit.enabled,
        });
    }
    Ok(BackupContents {
        files: include.contains(&Include::Files),
        audit: include.contains(&Include::Audit),
    })
}

/// `call_with_fd` for a backup operation, with a bar following the file.
fn call_following(
    client: &mut Client,
    op: Operation,
    file: &fs::File,
    bar: &Progress,
) -> Result<Reply, protocol::ClientError> {
    use std::os::fd::AsFd as _;
    bar.follow(file, 0, || client.call_with_fd(op, file.as_fd()))
}

fn create_3(
    cli: &crate::Cli,
    file: &Path,
    force: bool,
    include: &[Include],
    quiet: bool,
    protection: BackupProtection,
) -> Result<(), Failure> {
    if cli.json && crate::output::is_stdout(Some(file)) {
        return Err(
            Local::Usage.fail("with --json, standard output carries the JSON summary; write the archive to a file")
        );
    }
    let mut out = crate::output::Output::create(file, force)?;
    let mut client = crate::connect(cli)?;
    let contents = contents(&mut client, include)?;
    let bar = Progress::new("writing the backup", None, quiet);
    let op = Operation::BackupWrite { protection, contents };
    // hsmd writes into a pipe that hsmctl copies to the file, not into the
    // file itself: if hsmctl dies, hsmd's next write fails and the backup
    // stops, instead of finishing a whole archive under the temporary name.
    let (mut from_hsmd, into) = std::io::pipe().map_err(|e| local(format!("cannot make a pipe: {e}")))?;
    let (reply, copied) = std::thread::scope(|s| {
        let caller = s.spawn(move || {
            use std::os::fd::AsFd as _;
            let reply = client.call_with_fd(op, into.as_fd());
            // hsmd's copy of the write end is closed with its answer; this
            // one now, so the copy below sees the end.
            drop(into);
            reply
        });
        let copied = (|| -> Result<(), Failure> {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = std::io::Read::read(&mut from_hsmd, &mut buf)
                    .map_err(|e| local(format!("cannot read the archive from hsmd: {e}")))?;
                if n == 0 {
                    return Ok(());
                }
                out.write(&buf[..n])?;
                bar.add(n as u64);
            }
        })();
        // A failed copy closes the read end: hsmd's next write fails and it answers.
        drop(from_hsmd);
        (caller.join(), copied)
    });
    let reply = reply.unwrap_or_else(|_| Err(protocol::ClientError::Closed));
    let summary = match (reply, copied) {
        (Ok(Reply::BackupWritten(s)), Ok(())) => s,
        (Ok(Reply::BackupWritten(_)), Err(e)) | (Err(_), Err(e)) => {
            // The unfinished archive is removed when `out` drops.
            bar.clear();
            return Err(e);
        }
        (Ok(other), _) => {
            bar.clear();
            return Err(unexpected("backup-write", &other));
        }
        (Err(e), Ok(())) => {
            bar.clear();
            return Err(e.into());
        }
    };
    out.finish()?;
    bar.finish();
    print_summary(
        cli.json,
        &format!("backup written to {} ({} bytes)", file.display(), summary.archive_bytes),
        &summary,
        json!({ "file": file }),
    );
    Ok(())
}

/// Runs a backup command; connects only once any secret has been read.
pub fn run(cli: &crate::Cli, cmd: &BackupCommand) -> Result<(), Failure> {
    match cmd {
        BackupCommand::Create {
            file,
            include,
            quiet,
            format,
            force,
            passphrase,
            passphrase_file,
        } => {
            let protection = if *passphrase || passphrase_file.is_some() {
                BackupProtection::Passphrase(
                    secrets::new_passphrase(passphrase_file.as_deref()).map_err(|e| Local::Secret.fail(e))?,
                )
            } else {
                BackupProtection::MasterKey
            };
            if *format == 3 {
                return create_3(cli, file, *force, include, *quiet, protection);
            }
            if cli.json && crate::output::is_stdout(Some(file)) {
                return Err(Local::Usage
                    .fail("with --json, standard output carries the JSON summary; write the archive to a file"));
            }
            // Checked before hsmd builds the archive, so a refusal costs nothing.
            let mut out = crate::output::Output::create(file, *force)?;
            let mut client = crate::connect(cli)?;
            let protocol::calls::BackupReady {
                transfer,
                size,
                manifest,
            } = client.backup_create(protection)?;
            let mut archive = Vec::new();
            while (archive.len() as u64) < size {
                let want = u32::try_from(chunk_len(&client)).unwrap_or(u32::MAX);
                let bytes = client.transfer_read(transfer, archive.len() as u64, want)?;
                if bytes.is_empty() {
                    // Short of the size hsmd announced: asking again would never end.
                    return Err(unexpected("transfer-read", &protocol::Reply::TransferData { bytes }));
                }
                archive.extend_from_slice(&bytes);
            }
            let (body, sum) = archive.split_at(archive.len().saturating_sub(32));
            if sha2::Sha256::digest(body).as_slice() != sum {
                return Err(Local::Internal.fail("the archive arrived damaged (checksum mismatch); nothing written"));
            }
            out.write(&archive)?;
            out.finish()?;
            print_manifest(
                cli.json,
                &format!("backup written to {} ({size} bytes)", file.display()),
                &manifest,
                json!({ "file": file, "size": size }),
            );
        }
        BackupCommand::Verify { file, secret, quiet } => {
            let a = open_archive(file)?;
            let secret = if secret.given() {
                Some(secret.read(prompt_for(a.protection.as_deref()))?)
            } else {
                None
            };
            let mut client = crate::connect(cli)?;
            if a.format == 2 {
                let archive = read_archive(file)?;
                let transfer = upload(&mut client, &archive)?;
                let m = client.backup_verify(transfer, secret)?;
                let what = if m.authenticated {
                    format!("{}: checksum, encryption and keystore all check", file.display())
                } else {
                    format!(
                        "{}: checksum and structure check (give --keyfile, --passphrase-file or \
                         --passphrase to decrypt and check the keystore too)",
                        file.display()
                    )
                };
                print_manifest(cli.json, &what, &m, json!({ "file": file }));
                return Ok(());
            }
            let bar = Progress::new("checking the backup", Some(a.size), *quiet);
            let reply = call_following(&mut client, Operation::BackupCheck { secret }, &a.file, &bar);
            bar.clear();
            let s = match reply? {
                Reply::BackupChecked(s) => s,
                other => return Err(unexpected("backup-check", &other)),
            };
            let what = if s.manifest.authenticated {
                format!(
                    "{}: every part's digest and seal, the whole archive's MAC and checksum, and the keystore inside all check",
                    file.display()
                )
            } else {
                format!(
                    "{}: every part's digest and the whole archive's checksum check (give --keyfile, \
                     --passphrase-file or --passphrase to open every part and check the keystore too)",
                    file.display()
                )
            };
            print_summary(cli.json, &what, &s, json!({ "file": file }));
        }
        BackupCommand::Restore {
            file,
            secret,
            force,
            accept_unusable,
            quiet,
        } => {
            let a = open_archive(file)?;
            let secret = secret.read(prompt_for(a.protection.as_deref()))?;
            let mut client = crate::connect(cli)?;
            if a.format == 2 {
                if *accept_unusable {
                    return Err(Local::Usage.fail(
                        "--accept-unusable is for format-3 archives; a format-2 archive holds the keystore alone",
                    ));
                }
                let archive = read_archive(file)?;
                let transfer = upload(&mut client, &archive)?;
                let m = client.backup_restore(transfer, secret, *force)?;
                print_manifest(
                    cli.json,
                    &format!(
                        "restored from {}; hsmd is locked: unlock it with one of the backup's slots",
                        file.display()
                    ),
                    &m,
                    json!({ "file": file, "state": "locked" }),
                );
                return Ok(());
            }
            let bar = Progress::new("restoring", Some(a.size), *quiet);
            let op = Operation::BackupRestoreArchive {
                secret,
                force: *force,
                accept_unusable: *accept_unusable,
            };
            let reply = call_following(&mut client, op, &a.file, &bar);
            bar.clear();
            let r = match reply? {
                Reply::BackupRestoredArchive(r) => r,
                other => return Err(unexpected("backup-restore-archive", &other)),
            };
            print_summary(
                cli.json,
                &format!(
                    "restored from {}; hsmd is locked: unlock it with one of the backup's slots",
                    file.display()
                ),
                &r.archive,
                json!({ "file": file, "state": "locked", "unusable": r.unusable, "kept": r.kept }),
            );
            if !cli.json {
                for u in &r.unusable {
                    println!("  not usable here: {u}");
                }
                for k in &r.kept {
                    println!("  kept aside:      {k}");
                }
            }
        }
    }
    Ok(())
}
