//! The file store benchmark (`hsmd-bench --suite files`): a file on tmpfs
//! stored and retrieved through `hsmctl`, each beside its reference measured in
//! the same run: `dd bs=1M` copying the same file within the same filesystem
//! for a store, `age -d` of the same data to /dev/null and the in-process
//! AES-256-GCM rate on the same cores for a retrieve, and a raw Unix socket
//! carrying the same bytes (the ceiling of any design that streams file bytes
//! through the socket, as `--via frames` does).

use std::{
    fs,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{bin, Daemon};

/// What to measure.
#[derive(Debug, Clone)]
pub struct FileBench {
    /// File size in MiB.
    pub mib: usize,
    /// Chunk size argument for hsmctl (e.g. "64KiB").
    pub chunk: String,
    /// Rounds; the median is printed.
    pub rounds: usize,
    /// `[files] workers` (0: one per core).
    pub workers: u32,
    /// Where the file and the daemon's state live (tmpfs).
    pub dir: PathBuf,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn timed(mut cmd: Command) -> Result<Duration> {
    let start = Instant::now();
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn chunk_bytes(chunk: &str) -> Result<usize> {
    let lower = chunk.to_ascii_lowercase();
    let (n, m) = if let Some(n) = lower.strip_suffix("mib") {
        (n, 1 << 20)
    } else if let Some(n) = lower.strip_suffix("kib") {
        (n, 1 << 10)
    } else {
        (lower.as_str(), 1)
    };
    Ok(n.trim().parse::<usize>().context("--chunk like 64KiB")? * m)
}

/// AES-256-GCM opening `total` bytes of `chunk`-byte chunks on `threads`
/// threads, in memory (the cipher alone, then with the BLAKE3 of each chunk
/// that hsmd also computes).
fn in_process(total: u64, chunk: usize, threads: usize, with_hash: bool) -> Duration {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let per_thread = total / threads as u64 / chunk as u64;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let Ok(unbound) = UnboundKey::new(&AES_256_GCM, &[t as u8; 32]) else {
                    return;
                };
                let key = LessSafeKey::new(unbound);
                let mut sealed = vec![7u8; chunk];
                let Ok(tag) =
                    key.seal_in_place_separate_tag(Nonce::assume_unique_for_key([1; 12]), Aad::empty(), &mut sealed)
                else {
                    return;
                };
                sealed.extend_from_slice(tag.as_ref());
                let mut buf = sealed.clone();
                for i in 0..per_thread {
                    buf.copy_from_slice(&sealed);
                    let opened = key.open_in_place(Nonce::assume_unique_for_key([1; 12]), Aad::empty(), &mut buf);
                    if let (true, Ok(plain)) = (with_hash, opened) {
                        let mut h = blake3::Hasher::new();
                        h.update(plain);
                        std::hint::black_box((i, h.finalize()));
                    }
                }
            });
        }
    });
    // The copy back of the sealed chunk above stands in for the read every
    // real decryption starts with.
    start.elapsed()
}

/// `total` bytes through a Unix socket pair in `chunk`-byte writes.
fn raw_socket(total: u64, chunk: usize) -> Result<Duration> {
    let (mut a, mut b) = UnixStream::pair()?;
    let start = Instant::now();
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; chunk];
        let mut got = 0u64;
        loop {
            match b.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n as u64,
            }
        }
    });
    let buf = vec![3u8; chunk];
    let mut sent = 0u64;
    while sent < total {
        a.write_all(&buf)?;
        sent += chunk as u64;
    }
    drop(a);
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    if got != sent {
        bail!("socket carried {got} of {sent} bytes");
    }
    Ok(start.elapsed())
}

fn hsmctl(d: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(bin("hsmctl"));
    c.arg("--socket").arg(&d.socket).args(args);
    c
}

fn stored_token(d: &Daemon, input: &Path, chunk: &str, via: &str) -> Result<(Duration, String)> {
    let start = Instant::now();
    let out = hsmctl(
        d,
        &[
            "file",
            "store",
            &input.display().to_string(),
            "--chunk-size",
            chunk,
            "--via",
            via,
            "--quiet",
        ],
    )
    .output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("file store failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("Token: "))
        .context("no token printed")?
        .trim()
        .to_owned();
    Ok((took, token))
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// A tool missing (`dd`, `age`), a failing command, disk space.
pub fn run(b: &FileBench) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let workers = if b.workers == 0 { cores } else { b.workers as usize };
    let chunk = chunk_bytes(&b.chunk)?;
    let bytes = (b.mib as u64) << 20;
    let work = tempfile::Builder::new().prefix("hsmd-file-bench-").tempdir_in(&b.dir)?;
    let input = work.path().join("input.bin");
    {
        let mut f = fs::File::create(&input)?;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..b.mib {
            getrandom::fill(&mut block).map_err(|e| anyhow::anyhow!("random: {e}"))?;
            f.write_all(&block)?;
        }
    }
    let key = work.path().join("age.key");
    let keygen = Command::new("age-keygen")
        .arg("-o")
        .arg(&key)
        .stderr(Stdio::piped())
        .output();
    let age_ok = matches!(keygen, Ok(ref o) if o.status.success());
    let sealed_age = work.path().join("input.age");
    if age_ok {
        let recipient = fs::read_to_string(&key)?
            .lines()
            .find_map(|l| l.strip_prefix("# public key: "))
            .context("age-keygen printed no public key")?
            .trim()
            .to_owned();
        let status = Command::new("age")
            .args(["-r", &recipient, "-o"])
            .arg(&sealed_age)
            .arg(&input)
            .status()?;
        if !status.success() {
            bail!("age -e failed");
        }
    }
    let d = Daemon::builder()
        .dev()
        .base_dir(work.path())
        .extra(&format!("[files]\nworkers = {}\n", b.workers))
        .start();
    let created = hsmctl(&d, &["key", "create", "files", "--type", "aes256-gcm"]).output()?;
    if !created.status.success() {
        bail!("key create failed: {}", String::from_utf8_lossy(&created.stderr));
    }

    let mut rows: Vec<(&str, &str, Vec<Duration>)> = vec![
        ("store", "hsmctl file store (descriptor passed)", Vec::new()),
        ("store", "hsmctl file store --via frames", Vec::new()),
        ("store", "dd bs=1M, same filesystem", Vec::new()),
        ("retrieve", "hsmctl file retrieve -o - (descriptor)", Vec::new()),
        ("retrieve", "hsmctl file retrieve --via frames", Vec::new()),
        ("retrieve", "age -d to /dev/null", Vec::new()),
        ("in-proc", "AES-256-GCM open", Vec::new()),
        ("in-proc", "AES-256-GCM open + BLAKE3", Vec::new()),
        ("socket", "raw Unix socket, chunk-sized writes", Vec::new()),
    ];
    let dd = || -> Result<Duration> {
        let copy = work.path().join("dd.out");
        let mut dd = Command::new("dd");
        dd.arg(format!("if={}", input.display()))
            .arg(format!("of={}", copy.display()))
            .args(["bs=1M", "status=none"]);
        let t = timed(dd)?;
        fs::remove_file(&copy)?;
        Ok(t)
    };
    let delete = |token: &str| hsmctl(&d, &["file", "delete", token]).output().map(drop);
    // Fresh pages cost far more the first time this VM's memory is touched
    // than when freed pages are reused, so a warm-up pass touches as many
    // pages as a round writes, and each store or copy is removed at once,
    // for the next writer to reuse. The file read back is stored once.
    let (_, keep) = stored_token(&d, &input, &b.chunk, "fd")?;
    dd()?;
    let (_, t) = stored_token(&d, &input, &b.chunk, "fd")?;
    delete(&t)?;
    for round in 0..b.rounds {
        // dd and the store alternate in going first.
        if round % 2 == 0 {
            rows[2].2.push(dd()?);
        }
        let (t, token) = stored_token(&d, &input, &b.chunk, "fd")?;
        rows[0].2.push(t);
        delete(&token)?;
        if round % 2 == 1 {
            rows[2].2.push(dd()?);
        }
        // Chunks over the frame limit (1 MiB and up) cannot travel in frames.
        let frames = match stored_token(&d, &input, &b.chunk, "frames") {
            Ok((t, token)) => {
                rows[1].2.push(t);
                delete(&token)?;
                true
            }
            Err(_) if chunk >= 1 << 20 => false,
            Err(e) => return Err(e),
        };
        rows[3]
            .2
            .push(timed(hsmctl(&d, &["file", "retrieve", &keep, "-o", "-", "--quiet"]))?);
        if frames {
            let frames_out = hsmctl(
                &d,
                &["file", "retrieve", &keep, "-o", "-", "--via", "frames", "--quiet"],
            );
            rows[4].2.push(timed(frames_out)?);
        }
        if age_ok {
            let mut age = Command::new("age");
            age.args(["-d", "-i"])
                .arg(&key)
                .args(["-o", "/dev/null"])
                .arg(&sealed_age);
            rows[5].2.push(timed(age)?);
        }
        rows[6].2.push(in_process(bytes, chunk, workers, false));
        rows[7].2.push(in_process(bytes, chunk, workers, true));
        rows[8].2.push(raw_socket(bytes, chunk)?);
    }
    println!(
        "\nhsmd file store benchmark: {} MiB of random data on {} (tmpfs), chunks of {}, {workers} worker{} \
         on {cores} cores, median of {} round{}",
        b.mib,
        b.dir.display(),
        b.chunk,
        if workers == 1 { "" } else { "s" },
        b.rounds,
        if b.rounds == 1 { "" } else { "s" }
    );
    println!("{:<9} {:<42} {:>9} {:>9}", "", "", "seconds", "MB/s");
    let mut rate = Vec::new();
    for (kind, what, times) in &rows {
        if times.is_empty() {
            println!("{kind:<9} {what:<42} {:>9} {:>9}", "-", "(not run)");
            rate.push(0.0);
            continue;
        }
        let t = median(times.clone());
        let r = mbps(bytes, t);
        rate.push(r);
        println!("{kind:<9} {what:<42} {:>9.3} {:>9.0}", t.as_secs_f64(), r);
    }
    let pct = |a: f64, b: f64| if b > 0.0 { a / b * 100.0 } else { 0.0 };
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let store_dd = pct(rate[0], rate[2]);
    println!(
        "store (descriptor) is {store_dd:.0}% of dd; frames store is {:.0}% of the descriptor store",
        pct(rate[1], rate[0])
    );
    let x_age = if rate[5] > 0.0 { rate[3] / rate[5] } else { 0.0 };
    let of_aead = pct(rate[3], rate[6]);
    println!(
        "retrieve (descriptor) is {x_age:.2}x age -d, {of_aead:.0}% of in-process AES-256-GCM \
         ({:.0}% of AES-GCM + BLAKE3); frames retrieve is {:.0}% of the descriptor retrieve",
        pct(rate[3], rate[7]),
        pct(rate[4], rate[3])
    );
    println!(
        "targets: store >= 90% of dd: {} ({store_dd:.0}%); retrieve >= 2x age: {} ({x_age:.2}x); \
         retrieve >= 70% of in-process AEAD: {} ({of_aead:.0}%)",
        verdict(store_dd >= 90.0),
        if rate[5] > 0.0 {
            verdict(x_age >= 2.0)
        } else {
            "not measured (age missing)"
        },
        verdict(of_aead >= 70.0)
    );
    Ok(())
}
