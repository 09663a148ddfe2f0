//! `hsmctl backup create | verify | restore`: archives move in pieces over the
//! socket (transfers), so their size is not bound by the frame limit.

use std::{
    fs,
    path::{Path, PathBuf},
};

use clap::Subcommand;
use protocol::{BackupManifest, BackupProtection, Client, UnlockSecret};
use serde_json::json;
use sha2::Digest as _;

use crate::{
    failure::{unexpected, Failure, Local},
    print_json, secrets,
};

/// The largest archive hsmctl uploads (the daemon's limit too).
const MAX_ARCHIVE: u64 = 256 * 1024 * 1024;

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Write one consistent, encrypted archive of the keystore (hsmd must be unlocked)
    #[command(
        after_help = "By default the archive is encrypted under a key derived from the master key:\n\
        restoring it needs a secret of one of its unlock slots (a passphrase or key file).\n\
        With --passphrase it is encrypted under a backup passphrase (Argon2id) instead.\n\n\
        Examples:\n  hsmctl backup create /srv/backup/hsmd-$(date +%F).hsmdbak\n  \
        hsmctl backup create offsite.hsmdbak --passphrase-file /run/secrets/backup-pass"
    )]
    Create {
        /// The archive to write (appears only when complete)
        file: PathBuf,
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
    },
    /// Restore an archive into this daemon (empty, or with --force); hsmd is
    /// locked afterwards and unlocks with the archive's slots
    #[command(after_help = "Example:\n  hsmctl backup restore b.hsmdbak --keyfile /etc/hsmd/unlock.key")]
    Restore {
        /// The archive
        file: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
        /// Replace an existing keystore (kept aside as keystore.sqlite.before-restore-<time>)
        #[arg(long)]
        force: bool,
    },
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

/// The protection an archive names in its header (read here only to ask for
/// the right secret; hsmd checks everything).
fn protection_of(archive: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(archive.get(8..12)?.try_into().ok()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(archive.get(12..12usize.checked_add(len)?)?).ok()?;
    header["manifest"]["protection"].as_str().map(str::to_owned)
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

/// Runs a backup command; connects only once any secret has been read.
pub fn run(cli: &crate::Cli, cmd: &BackupCommand) -> Result<(), Failure> {
    match cmd {
        BackupCommand::Create {
            file,
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
        BackupCommand::Verify { file, secret } => {
            let archive = read_archive(file)?;
            let secret = if secret.given() {
                let prompt = match protection_of(&archive).as_deref() {
                    Some("passphrase") => "Backup passphrase: ",
                    _ => "Passphrase of one of the backup's slots: ",
                };
                Some(secret.read(prompt)?)
            } else {
                None
            };
            let mut client = crate::connect(cli)?;
            let transfer = upload(&mut client, &archive)?;
            let m = client.backup_verify(transfer, secret)?;
            {
                {
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
                }
            }
        }
        BackupCommand::Restore { file, secret, force } => {
            let archive = read_archive(file)?;
            let prompt = match protection_of(&archive).as_deref() {
                Some("passphrase") => "Backup passphrase: ",
                _ => "Passphrase of one of the backup's slots: ",
            };
            let secret = secret.read(prompt)?;
            let mut client = crate::connect(cli)?;
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
        }
    }
    Ok(())
}
