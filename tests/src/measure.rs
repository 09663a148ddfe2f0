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
    let warmup = Duration::from_secs_f64((secs * 0.2).min(0.5));
    let run = Duration::from_secs_f64(secs);
    let barrier = Arc::new(Barrier::new(clients));
    let mut handles = Vec::new();
    for _ in 0..clients {
        let mut rt = connect()?;
        let barrier = Arc::clone(&barrier);
        handles.push(thread::spawn(move || -> Result<Vec<u32>> {
            barrier.wait();
            let start = Instant::now();
            while start.elapsed() < warmup {
                rt()?;
            }
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
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??);
    }
    Ok(figures(all, per_call, secs))
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
    }
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
