//! The whole-state backup benchmark (`hsmd-bench --suite backup`): a file
//! store of `--file-mib` MiB in `--files` files written to an archive with
//! `BackupWrite` and read back with `BackupCheck` (without and with the
//! secret), then restored with `BackupRestoreArchive` into a fresh daemon on
//! another state directory and every file retrieved from it and compared;
//! each beside `tar` of the same file store on the same filesystem in the
//! same run, and hsmd's resident memory sampled every 20 ms during each.

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use protocol::{BackupContents, BackupProtection, Operation, Reply, SecretBytes, UnlockSecret};
use sha2::Digest as _;

use crate::{bin, Daemon};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BackupBench {
    /// The file store's size in MiB.
    pub mib: usize,
    /// Files it is made of.
    pub files: usize,
    /// Where the state and the archive live.
    pub dir: PathBuf,
}

/// Highest resident set of `pid` (KiB) while `f` runs, sampled.
fn peak_rss_during<T>(pid: u32, f: impl FnOnce() -> Result<T>) -> Result<(T, u64, Duration)> {
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    peak = peak.max(kib);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().map_err(|_| anyhow::anyhow!("the sampler panicked"))?;
    Ok((out?, peak, took))
}

fn rss_kib(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn check(d: &Daemon, archive: &Path, secret: Option<UnlockSecret>) -> Result<u64> {
    let file = fs::File::open(archive)?;
    match d
        .client()
        .call_with_fd(Operation::BackupCheck { secret }, file.as_fd())?
    {
        Reply::BackupChecked(s) => Ok(s.archive_bytes),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// Any step that fails.
pub fn run(b: &BackupBench) -> Result<()> {
    if b.files == 0 || b.mib == 0 {
        bail!("--file-mib and --files must be positive");
    }
    let work = tempfile::Builder::new()
        .prefix("hsmd-backup-bench-")
        .tempdir_in(&b.dir)?;
    let d = Daemon::builder().dev().base_dir(work.path()).start();
    let hsmctl = |d: &Daemon, args: &[&str]| -> Result<String> {
        let out = Command::new(bin("hsmctl"))
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("hsmctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    hsmctl(&d, &["key", "create", "files", "--type", "aes256-gcm"])?;
    let mut stored: Vec<(String, [u8; 32])> = Vec::new();
    let each = (b.mib << 20) / b.files;
    let input = work.path().join("input.bin");
    let mut block = vec![0u8; each];
    for i in 0..b.files {
        getrandom::fill(&mut block).map_err(|e| anyhow::anyhow!("random: {e}"))?;
        fs::write(&input, &block)?;
        let out = hsmctl(
            &d,
            &[
                "--json",
                "file",
                "store",
                input.to_str().context("path")?,
                "--key",
                "files",
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let token = v["token"].as_str().context("a token")?.to_owned();
        stored.push((token, sha2::Sha256::digest(&block).into()));
        if i % 16 == 15 {
            eprintln!("stored {} of {} files", i + 1, b.files);
        }
    }
    fs::remove_file(&input)?;
    drop(block);
    let state = d.dir().join("state");
    let keyfile = state.join("dev.key");
    let secret = || -> Result<UnlockSecret> { Ok(UnlockSecret::Keyfile(SecretBytes::new(fs::read(&keyfile)?))) };
    let pid = d.pid();
    let idle = rss_kib(pid).unwrap_or(0);
    let archive = work.path().join("state.hsmdbak");

    let (written, write_peak, write_t) = peak_rss_during(pid, || {
        let out = fs::File::create(&archive)?;
        let op = Operation::BackupWrite {
            protection: BackupProtection::MasterKey,
            contents: BackupContents {
                files: true,
                audit: true,
            },
        };
        match d.client().call_with_fd(op, out.as_fd())? {
            Reply::BackupWritten(s) => Ok(s),
            other => bail!("unexpected answer {other:?}"),
        }
    })?;
    let (_, check_peak, check_t) = peak_rss_during(pid, || check(&d, &archive, None))?;
    let (_, keyed_peak, keyed_t) = peak_rss_during(pid, || check(&d, &archive, Some(secret()?)))?;
    let tarball = work.path().join("files.tar");
    let tar_start = Instant::now();
    let tar = Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("-C")
        .arg(&state)
        .arg("files")
        .status()?;
    let tar_t = tar_start.elapsed();
    if !tar.success() {
        bail!("tar failed");
    }
    let tar_bytes = fs::metadata(&tarball)?.len();
    let read_start = Instant::now();
    let sum = Command::new("sha256sum").arg(&archive).stdout(Stdio::null()).status()?;
    let read_t = read_start.elapsed();
    if !sum.success() {
        bail!("sha256sum failed");
    }

    // Restored into a fresh daemon on another state directory.
    let other_base = work.path().join("restored");
    fs::create_dir(&other_base)?;
    let other = Daemon::builder().base_dir(&other_base).start();
    let other_idle = rss_kib(other.pid()).unwrap_or(0);
    let (restored, restore_peak, restore_t) = peak_rss_during(other.pid(), || {
        let input = fs::File::open(&archive)?;
        let op = Operation::BackupRestoreArchive {
            secret: secret()?,
            force: false,
            accept_unusable: false,
        };
        match other.client().call_with_fd(op, input.as_fd())? {
            Reply::BackupRestoredArchive(r) => Ok(r),
            other => bail!("unexpected answer {other:?}"),
        }
    })?;
    if restored.archive.files as usize != stored.len() {
        bail!("{} files restored of {}", restored.archive.files, stored.len());
    }
    let key = keyfile.to_str().context("path")?;
    hsmctl(&other, &["unlock", "--keyfile", key])?;
    let back = work.path().join("back.bin");
    let (_, retrieve_peak, retrieve_t) = peak_rss_during(other.pid(), || {
        for (token, sum) in &stored {
            hsmctl(
                &other,
                &[
                    "file",
                    "retrieve",
                    token,
                    "-o",
                    back.to_str().context("path")?,
                    "--force",
                ],
            )?;
            let got: [u8; 32] = sha2::Sha256::digest(fs::read(&back)?).into();
            if got != *sum {
                bail!("{token} came back different");
            }
        }
        Ok(())
    })?;
    fs::remove_file(&back)?;
    let untar_dir = work.path().join("untar");
    fs::create_dir(&untar_dir)?;
    let untar_start = Instant::now();
    let untar = Command::new("tar")
        .arg("-xf")
        .arg(&tarball)
        .arg("-C")
        .arg(&untar_dir)
        .status()?;
    let untar_t = untar_start.elapsed();
    if !untar.success() {
        bail!("tar -x failed");
    }

    let bytes = written.archive_bytes;
    println!(
        "whole-state backup: {} files, {} MiB of file store ({} bytes sealed on disk), {} audit files; archive {} bytes, {} parts",
        written.files,
        b.mib,
        written.file_bytes,
        written.audit_files,
        bytes,
        written.parts
    );
    println!("hsmd resident before: {} MiB", idle / 1024);
    println!("| step | seconds | MB/s | hsmd peak RSS (MiB) |");
    println!("| --- | ---: | ---: | ---: |");
    let row = |what: &str, t: Duration, n: u64, peak: Option<u64>| {
        println!(
            "| {what} | {:.2} | {:.0} | {} |",
            t.as_secs_f64(),
            mbps(n, t),
            peak.map_or_else(|| "—".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
        );
    };
    row("BackupWrite (keys, files, audit)", write_t, bytes, Some(write_peak));
    row("tar -cf of the file store, same filesystem", tar_t, tar_bytes, None);
    row("BackupCheck, no secret", check_t, bytes, Some(check_peak));
    row("BackupCheck, with the key file", keyed_t, bytes, Some(keyed_peak));
    row("sha256sum of the archive", read_t, bytes, None);
    row(
        "BackupRestoreArchive into a fresh daemon (staged, checked, moved in)",
        restore_t,
        bytes,
        Some(restore_peak),
    );
    row("tar -xf of the file store, same filesystem", untar_t, tar_bytes, None);
    row(
        &format!(
            "every file retrieved from the restored daemon, SHA-256 equal ({} files)",
            stored.len()
        ),
        retrieve_t,
        (b.mib as u64) << 20,
        Some(retrieve_peak),
    );
    println!("restored daemon resident before: {} MiB", other_idle / 1024);
    Ok(())
}
