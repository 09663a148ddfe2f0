//! Running benchmark clients: several threads, each on its own connection,
//! timed per call after a warm-up; the rate and latency percentiles of a run.

use std::{
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;

/// Figures of one measured run.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    /// Operations per second, all clients together.
    pub per_sec: f64,
    /// Median latency of one call, µs.
    pub p50_us: f64,
    /// 99th percentile latency of one call, µs.
    pub p99_us: f64,
    /// 99.9th percentile latency of one call, µs.
    pub p999_us: f64,
    /// The slowest call, µs.
    pub max_us: f64,
    /// CPU time the server process spent per operation while the clients were
    /// timed, µs, when a server was named ([`measure_served`]). Steadier than
    /// the rate on a machine whose share of its host's CPU varies.
    pub server_cpu_us: Option<f64>,
}

impl Figures {
    /// The latency column every table prints: `p50/p99/p99.9/max` in µs.
    #[must_use]
    pub fn latencies(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            short(self.p50_us),
            short(self.p99_us),
            short(self.p999_us),
            short(self.max_us)
        )
    }

    /// How many times the median the 99th percentile is.
    #[must_use]
    pub fn tail(&self) -> f64 {
        self.p99_us / self.p50_us.max(f64::MIN_POSITIVE)
    }
}

/// The header of [`Figures::latencies`]' column.
pub const LATENCIES: &str = "p50/p99/p99.9/max µs";

/// Microseconds to three significant figures at most, for narrow columns.
fn short(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

/// Runs `clients` threads, each calling `round_trip` on its own connection for
/// `secs` after a warm-up, and returns the aggregate rate and latency percentiles.
pub fn measure<C, F>(clients: usize, secs: f64, connect: C) -> Result<Figures>
where
    C: Fn() -> Result<F>,
    F: FnMut() -> Result<()> + Send + 'static,
{
    measure_batched(clients, secs, 1, connect)
}

/// As [`measure`], where each call of `round_trip` completes `per_call`
/// operations; the rate counts operations, the latencies are per call.
pub fn measure_batched<C, F>(clients: usize, secs: f64, per_call: usize, connect: C) -> Result<Figures>
where
    C: Fn() -> Result<F>,
    F: FnMut() -> Result<()> + Send + 'static,
{
    measure_served(clients, secs, per_call, &[], connect)
}

/// CPU time process `pid` has used, all its threads together (those that
/// ended too), in ns: `utime + stime` of `/proc/PID/stat`, in clock ticks.
fn process_cpu_ns(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| anyhow::anyhow!("cannot read the CPU times of process {pid} (has it ended?): {e}"))?;
    // The command name, in parentheses, may hold spaces: count fields from
    // after its closing one (field 3, the state, comes first).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let field = |n: usize| rest.split_whitespace().nth(n - 3).and_then(|f| f.parse::<u64>().ok());
    let (Some(utime), Some(stime)) = (field(14), field(15)) else {
        anyhow::bail!("cannot read the CPU times in /proc/{pid}/stat");
    };
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
        .unwrap_or(100);
    Ok((utime + stime) * 1_000_000_000 / tick)
}

/// CPU time the processes `pids` have used together, in ns.
fn servers_cpu_ns(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&pid| process_cpu_ns(pid)).sum()
}

/// As [`measure_batched`], and the CPU time the processes `servers` spent
/// together per operation while the clients were timed
/// ([`Figures::server_cpu_us`]): a daemon and its helper, say. A server may
/// be this process, when the operations are done in it; with none, no CPU
/// is measured.
pub fn measure_served<C, F>(clients: usize, secs: f64, per_call: usize, servers: &[u32], connect: C) -> Result<Figures>
where
    C: Fn() -> Result<F>,
    F: FnMut() -> Result<()> + Send + 'static,
{
    let warmup = Duration::from_secs_f64((secs * 0.2).min(0.5));
    let run = Duration::from_secs_f64(secs);
    let barrier = Arc::new(Barrier::new(clients));
    // Everyone starts the timed part together, so that the server's CPU read
    // at that moment counts the timed operations only.
    let timed = Arc::new(Barrier::new(clients + 1));
    let mut handles = Vec::new();
    for _ in 0..clients {
        let mut rt = connect()?;
        let barrier = Arc::clone(&barrier);
        let timed = Arc::clone(&timed);
        handles.push(thread::spawn(move || -> Result<Vec<u32>> {
            barrier.wait();
            let start = Instant::now();
            let warm = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
                while start.elapsed() < warmup {
                    rt()?;
                }
                Ok(())
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("client thread panicked while warming up")));
            // Reached even after a failure, so that no thread waits forever.
            timed.wait();
            warm?;
            let mut lat = Vec::with_capacity(1 << 20);
            let start = Instant::now();
            loop {
                let t = Instant::now();
                rt()?;
                let now = Instant::now();
                lat.push(u32::try_from((now - t).as_nanos()).unwrap_or(u32::MAX));
                if now - start >= run {
                    break;
                }
            }
            Ok(lat)
        }));
    }
    timed.wait();
    let cpu_before = servers_cpu_ns(servers)?;
    let mut all = Vec::new();
    let mut failed = None;
    for h in handles {
        match h.join().map_err(|_| anyhow::anyhow!("client thread panicked")) {
            Ok(Ok(lat)) => all.extend(lat),
            Ok(Err(e)) | Err(e) => failed = Some(e),
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let mut result = figures(all, per_call, secs);
    if !servers.is_empty() {
        let used = servers_cpu_ns(servers)?.saturating_sub(cpu_before);
        let ops = result.per_sec * secs;
        if ops > 0.0 {
            result.server_cpu_us = Some(used as f64 / 1000.0 / ops);
        }
    }
    Ok(result)
}

/// The figures of latencies (ns) measured over `secs`, each call doing
/// `per_call` operations.
#[must_use]
pub fn figures(mut all: Vec<u32>, per_call: usize, secs: f64) -> Figures {
    if all.is_empty() {
        return Figures {
            per_sec: 0.0,
            p50_us: 0.0,
            p99_us: 0.0,
            p999_us: 0.0,
            max_us: 0.0,
            server_cpu_us: None,
        };
    }
    all.sort_unstable();
    let pct = |p: f64| f64::from(all[((all.len() - 1) as f64 * p) as usize]) / 1000.0;
    Figures {
        per_sec: (all.len() * per_call) as f64 / secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        max_us: pct(1.0),
        server_cpu_us: None,
    }
}

/// The median over runs of [`Figures::server_cpu_us`], as `µs/µs` text for
/// two sets of runs side by side (`-` where a run measured none).
#[must_use]
pub fn cpu_pair(a: &[Figures], b: &[Figures]) -> String {
    let med = |runs: &[Figures]| {
        let mut v: Vec<f64> = runs.iter().filter_map(|f| f.server_cpu_us).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2)
            .map_or_else(|| "-".to_owned(), |us| format!("{us:.2}"))
    };
    format!("{}/{}", med(a), med(b))
}

/// The run with the median rate.
#[must_use]
pub fn median(mut v: Vec<Figures>) -> Figures {
    v.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    v[v.len() / 2]
}

/// One Ed25519 signature (of 64 bytes) in this process, per call.
pub fn in_process_ed25519() -> Box<dyn FnMut() -> Result<()> + Send> {
    use ed25519_dalek::Signer as _;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("random");
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let digest = [7u8; 64];
    Box::new(move || {
        std::hint::black_box(key.sign(&digest));
        Ok(())
    })
}

/// One ECDSA-P256 signature (of a SHA-256 digest) in this process, per call:
/// AWS-LC, as hsmd's soft backend signs.
pub fn in_process_p256() -> Box<dyn FnMut() -> Result<()> + Send> {
    use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).expect("generate");
    let digest = aws_lc_rs::digest::Digest::import_less_safe(&[7u8; 32], &aws_lc_rs::digest::SHA256).expect("digest");
    Box::new(move || {
        let sig = key.sign_digest(&digest).map_err(|e| anyhow::anyhow!("{e}"))?;
        std::hint::black_box(sig.as_ref());
        Ok(())
    })
}
