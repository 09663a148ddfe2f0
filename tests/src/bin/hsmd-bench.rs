//! Benchmark: `ping` round trips through hsmd, beside a raw Unix-socket echo of
//! the same frame size measured in the same run.
//!
//! ```text
//! cargo run --release -p hsmd-tests --bin hsmd-bench              # both suites
//! cargo run --release -p hsmd-tests --bin hsmd-bench -- --suite keys
//! cargo run --release -p hsmd-tests --bin hsmd-bench -- --quick   # a smoke run
//! ```
//!
//! Suite `files` (not part of `all`): `hsmctl file store | retrieve` of a
//! 1 GiB file on tmpfs (`--file-mib`, `--chunk`, `--workers`, `--dir`) beside
//! dd, age, in-process AES-256-GCM and a raw socket (see `file_bench`).
//!
//! Suite `backends` (not part of `all`): the same signatures through hsmd with
//! keys in each backend (`soft`, `pkcs11` on a SoftHSM2 token), with the same
//! clients, beside the token driven directly through cryptoki in this process
//! (one session per thread) and the software signature in this process;
//! ECDSA P-256 with the key in a TPM (`tpm`, swtpm on loopback); and RSA-PSS
//! 2048 with keys in the token and the TPM, beside the token directly and
//! `openssl speed rsa2048` (hsmd has no software RSA to compare with).
//!
//! Suite `agent` (not part of `all`): Ed25519 and ECDSA-P256 signatures
//! through hsmd's SSH agent socket beside OpenSSH's ssh-agent holding keys of
//! the same types, driven by the same agent-protocol client (see
//! `agent_bench`).
//!
//! Suite `pkcs11` (not part of `all`): ECDSA P-256 and Ed25519 signatures
//! through hsmd's PKCS#11 module beside SoftHSM2's module, both driven
//! through cryptoki in this process (see `pkcs11_bench`).
//!
//! Suite `soak` (not part of `all`, needs root): the fault-injection soak of
//! `--minutes M` (default 20; `--fault-every S`, default 8), mixed load from
//! four uids while hsmd is killed, its disk filled, its PKCS#11 helper killed,
//! its TPM stopped and its policy broken; prints the summary table and exits
//! non-zero when anything acknowledged was lost or answered wrongly (see
//! `hsmd_tests::soak`).
//!
//! Suite `ping`: round trips beside a raw echo. Suite `keys`: Ed25519 and
//! ECDSA-P256 signatures and AES-256-GCM encryptions of 4 KiB through hsmd,
//! beside the same operation done in this process with the same crates, with as
//! many threads as clients, on the same cores.
//!
//! `--depth N` makes each hsmd client keep N requests in flight (sent in one
//! write with `Client::send_many`, then N responses read); `--batch N` makes
//! each request an `Operation::Batch` of N operations. The rate counts
//! operations; the latency columns are per round of depth × batch operations.
//!
//! The raw echo server is this binary re-executed with `--echo-server PATH`: a
//! tokio current-thread reactor (the same I/O model hsmd uses) that reads each
//! length-prefixed frame and writes it back without decoding it. Both servers are
//! separate processes; clients are threads of this process, one connection each,
//! one request outstanding at a time.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use hsmd_tests::{
    measure::{
        cpu_pair, in_process_ed25519, in_process_p256, measure, measure_batched, measure_served, median, Figures,
        LATENCIES,
    },
    Daemon,
};
use protocol::{
    codec,
    frame::{self, FrameStatus, HEADER_LEN},
    Client, ClientOptions, Operation, Request,
};

#[derive(Debug, Clone)]
struct Args {
    seconds: f64,
    rounds: usize,
    clients: Vec<usize>,
    payload: usize,
    suite: String,
    reactor_threads: u32,
    depth: usize,
    batch: usize,
    file_mib: usize,
    files: usize,
    chunk: String,
    workers: u32,
    dir: String,
    minutes: f64,
    fault_every: f64,
}

fn parse_args() -> Result<Option<Args>> {
    let mut args = Args {
        seconds: 3.0,
        rounds: 3,
        clients: vec![1, 2, 8],
        payload: 16,
        suite: "all".to_owned(),
        reactor_threads: 1,
        depth: 1,
        batch: 1,
        file_mib: 1024,
        files: 64,
        chunk: "64KiB".to_owned(),
        workers: 0,
        // tmpfs where there is one; the system temp directory otherwise.
        dir: if Path::new("/dev/shm").is_dir() {
            "/dev/shm".to_owned()
        } else {
            std::env::temp_dir().display().to_string()
        },
        minutes: 20.0,
        fault_every: 8.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--echo-server" => {
                let path = it.next().context("--echo-server PATH")?;
                echo_server(Path::new(&path))?;
                return Ok(None);
            }
            "--quick" => {
                args.seconds = 0.3;
                args.rounds = 1;
                args.file_mib = 64;
            }
            "--file-mib" => args.file_mib = it.next().context("--file-mib N")?.parse()?,
            "--files" => args.files = it.next().context("--files N")?.parse()?,
            "--chunk" => args.chunk = it.next().context("--chunk 64KiB")?,
            "--workers" => args.workers = it.next().context("--workers N")?.parse()?,
            "--dir" => args.dir = it.next().context("--dir PATH (tmpfs)")?,
            "--minutes" => args.minutes = it.next().context("--minutes M")?.parse()?,
            "--fault-every" => args.fault_every = it.next().context("--fault-every SECONDS")?.parse()?,
            "--seconds" => args.seconds = it.next().context("--seconds N")?.parse()?,
            "--rounds" => args.rounds = it.next().context("--rounds N")?.parse()?,
            "--payload" => args.payload = it.next().context("--payload BYTES")?.parse()?,
            "--depth" => args.depth = it.next().context("--depth N")?.parse()?,
            "--batch" => args.batch = it.next().context("--batch N")?.parse()?,
            "--reactor-threads" => args.reactor_threads = it.next().context("--reactor-threads N")?.parse()?,
            "--suite" => {
                args.suite = it
                    .next()
                    .context("--suite ping|keys|security|files|backup|backends|agent|pkcs11|soak|all")?;
                if !matches!(
                    args.suite.as_str(),
                    "ping"
                        | "keys"
                        | "security"
                        | "files"
                        | "backup"
                        | "backends"
                        | "agent"
                        | "pkcs11"
                        | "soak"
                        | "all"
                ) {
                    bail!("--suite is ping, keys, security, files, backup, backends, agent, pkcs11, soak or all");
                }
            }
            "--clients" => {
                args.clients = it
                    .next()
                    .context("--clients 1,2,8")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
            }
            "-h" | "--help" => {
                println!("hsmd-bench [--quick] [--suite ping|keys|security|files|backup|backends|agent|pkcs11|soak|all] [--seconds S] [--rounds N] [--clients 1,2,8] [--payload BYTES] [--reactor-threads N] [--depth N] [--batch N] [--file-mib N] [--files N] [--chunk 64KiB] [--workers N] [--dir /dev/shm] [--minutes M] [--fault-every S]");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}; try --help"),
        }
    }
    if args.rounds == 0 || args.clients.is_empty() || args.seconds <= 0.0 || args.depth == 0 || args.batch == 0 {
        bail!("--rounds, --clients, --depth, --batch and --seconds must be positive");
    }
    if !(args.minutes > 0.0 && args.fault_every >= 1.0) {
        bail!("--minutes must be positive and --fault-every at least 1 (second)");
    }
    if args.batch > protocol::MAX_BATCH_ITEMS {
        bail!("--batch is at most {}", protocol::MAX_BATCH_ITEMS);
    }
    Ok(Some(args))
}

fn main() -> Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    match args.suite.as_str() {
        "ping" => ping_suite(&args),
        "keys" => key_suite(&args),
        "security" => security_suite(&args),
        "backends" => backend_suite(&args),
        "agent" => hsmd_tests::agent_bench::run(&hsmd_tests::agent_bench::AgentBench {
            seconds: args.seconds,
            rounds: args.rounds,
            clients: args.clients.clone(),
            reactor_threads: args.reactor_threads,
        }),
        "pkcs11" => hsmd_tests::pkcs11_bench::run(&hsmd_tests::pkcs11_bench::Pkcs11Bench {
            seconds: args.seconds,
            rounds: args.rounds,
            clients: args.clients.clone(),
            reactor_threads: args.reactor_threads,
        }),
        "files" => hsmd_tests::file_bench::run(&hsmd_tests::file_bench::FileBench {
            mib: args.file_mib,
            chunk: args.chunk.clone(),
            rounds: args.rounds,
            workers: args.workers,
            dir: args.dir.clone().into(),
        }),
        "backup" => hsmd_tests::backup_bench::run(&hsmd_tests::backup_bench::BackupBench {
            mib: args.file_mib,
            files: args.files,
            dir: args.dir.clone().into(),
        }),
        "soak" => soak_suite(&args),
        _ => {
            ping_suite(&args)?;
            key_suite(&args)
        }
    }
}

fn soak_suite(args: &Args) -> Result<()> {
    let summary = hsmd_tests::soak::run(&hsmd_tests::soak::Options {
        duration: Duration::from_secs_f64(args.minutes * 60.0),
        fault_every: Duration::from_secs_f64(args.fault_every),
        ..hsmd_tests::soak::Options::default()
    });
    println!("{summary}");
    if !summary.passed() {
        bail!("the soak found acknowledged writes lost, wrong answers, false tamper reports, unrecovered faults, panics or RSS over its bound (above)");
    }
    Ok(())
}

/// Ed25519 signing with the policy, rate limits (set high) and the audit log
/// on, beside the same daemon with all three off, in the same run.
fn security_suite(args: &Args) -> Result<()> {
    let uid = nix::unistd::getuid().as_raw();
    let policy = format!(
        "[roles.bench]\npermissions = [ {{ resource = \"keys\", action = \"*\", keys = \"bench-*\" }} ]\n\n\
         [[bind]]\nusers = [\"{uid}\"]\nroles = [\"bench\"]\n"
    );
    let base = || {
        Daemon::builder()
            .dev()
            .limit("max_connections", "64")
            .limit("reactor_threads", &args.reactor_threads.to_string())
    };
    let off = base().extra("[audit]\nenabled = false\n").start();
    let on = {
        let prepared = base()
            .extra("[policy]\npath = \"$DIR/policy.toml\"\n[rate_limit]\nper_second = 10000000\nburst = 10000000\n")
            .prepare();
        std::fs::write(prepared.dir.path().join("policy.toml"), &policy)?;
        prepared.start()
    };
    for d in [&off, &on] {
        d.client().call(Operation::KeyCreate {
            name: "bench-ed25519".into(),
            key_type: protocol::KeyType::Ed25519,
            usages: Vec::new(),
            options: protocol::KeyOptions::default(),
        })?;
    }
    println!(
        "\nhsmd security-overhead benchmark: ed25519 sign, {} s per run, median of {} round{}, requests in flight per client: {}, operations per request: {}",
        args.seconds,
        args.rounds,
        if args.rounds == 1 { "" } else { "s" },
        args.depth,
        args.batch
    );
    println!("off: no policy file, no rate limit, audit.enabled = false");
    println!("on:  policy (a role on bench-*), rate_limit 10,000,000/s per uid, audit log on (defaults)");
    println!(
        "{:>7} | {:>14} {:>22} | {:>14} {:>22} | {:>8}",
        "clients", "off/s", LATENCIES, "on/s", LATENCIES, "on/off"
    );
    let mut at_8 = None;
    for &clients in &args.clients {
        let (mut off_runs, mut on_runs) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            for (d, runs) in [(&off, &mut off_runs), (&on, &mut on_runs)] {
                let socket = d.socket.clone();
                let (depth, batch) = (args.depth, args.batch);
                runs.push(measure_batched(clients, args.seconds, depth * batch, move || {
                    let mut c = Client::connect_with(&socket, &ClientOptions::default())?;
                    let item = protocol::BatchItem::Sign(protocol::SignArgs {
                        name: "bench-ed25519".into(),
                        digest: vec![7; 64],
                    });
                    let request = if batch == 1 {
                        Operation::from(item)
                    } else {
                        Operation::Batch {
                            items: vec![item; batch],
                        }
                    };
                    Ok(move || -> Result<()> {
                        c.send_many(std::iter::repeat_n(&request, depth).cloned())?;
                        for _ in 0..depth {
                            match c.recv()?.result {
                                Ok(protocol::Reply::Batch(r)) => {
                                    if let Some(Err(e)) = r.into_iter().find(Result::is_err) {
                                        bail!("daemon refused a batch item: {e}");
                                    }
                                }
                                Ok(_) => {}
                                Err(e) => bail!("daemon refused: {e}"),
                            }
                        }
                        Ok(())
                    })
                })?);
            }
        }
        let (f, n) = (median(off_runs), median(on_runs));
        let ratio = n.per_sec / f.per_sec * 100.0;
        println!(
            "{clients:>7} | {:>14.0} {:>22} | {:>14.0} {:>22} | {:>7.1}%",
            f.per_sec,
            f.latencies(),
            n.per_sec,
            n.latencies(),
            ratio
        );
        if clients == 8 {
            at_8 = Some(ratio);
        }
    }
    let lines = std::fs::read_to_string(on.dir().join("state/audit.log")).map_or(0, |t| t.lines().count());
    println!("audit lines written by the \"on\" daemon so far: {lines}");
    if let Some(ratio) = at_8 {
        println!(
            "target: with policy, rate limits and audit on, within 15% of off at 8 clients: {} ({ratio:.1}%)",
            if ratio >= 85.0 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

fn ping_suite(args: &Args) -> Result<()> {
    let daemon = Daemon::builder()
        .limit("max_connections", "64")
        .limit("reactor_threads", &args.reactor_threads.to_string())
        .start();
    let payload = vec![0x5au8; args.payload];
    let frame = codec::encode_frame(
        &Request {
            id: 1,
            op: Operation::Ping {
                payload: payload.clone(),
            },
        },
        u32::MAX,
    )?;
    let echo_dir = tempfile::tempdir()?;
    let echo_path = echo_dir.path().join("echo.sock");
    let mut echo = start_echo(&echo_path)?;

    println!(
        "hsmd ping benchmark: payload {} B (request frame {} B), {} s per run, median of {} round{}, {} cores",
        args.payload,
        frame.len(),
        args.seconds,
        args.rounds,
        if args.rounds == 1 { "" } else { "s" },
        thread::available_parallelism().map_or(0, std::num::NonZero::get),
    );
    println!("hsmd binary: {}", hsmd_tests::bin("hsmd").display());
    println!(
        "{:>7} | {:>14} {:>22} | {:>14} {:>22} | {:>8} | {:>9} | {:>15}",
        "clients", "raw echo rt/s", LATENCIES, "hsmd ping rt/s", LATENCIES, "hsmd/raw", "p99 h/raw", "CPU µs/rt e/h"
    );
    let mut verdict = None;
    for &clients in &args.clients {
        let mut raw_runs = Vec::new();
        let mut hsmd_runs = Vec::new();
        for _ in 0..args.rounds {
            let frame = frame.clone();
            let path = echo_path.clone();
            raw_runs.push(measure_served(clients, args.seconds, 1, &[echo.id()], move || {
                let mut s = UnixStream::connect(&path)?;
                let frame = frame.clone();
                let mut back = vec![0u8; frame.len()];
                Ok(move || -> Result<()> {
                    s.write_all(&frame)?;
                    s.read_exact(&mut back)?;
                    Ok(())
                })
            })?);
            let socket = daemon.socket.clone();
            let payload = payload.clone();
            hsmd_runs.push(measure_served(clients, args.seconds, 1, &[daemon.pid()], move || {
                let mut c = Client::connect_with(&socket, &ClientOptions::default())?;
                let payload = payload.clone();
                Ok(move || -> Result<()> {
                    c.ping(payload.clone())?;
                    Ok(())
                })
            })?);
        }
        // The server CPU per round trip: what decides the rate once the
        // server is the bottleneck.
        let cpu = cpu_pair(&raw_runs, &hsmd_runs);
        let (raw, hsmd) = (median(raw_runs), median(hsmd_runs));
        let ratio = hsmd.per_sec / raw.per_sec * 100.0;
        let tail = hsmd.p99_us / raw.p99_us;
        println!(
            "{clients:>7} | {:>14.0} {:>22} | {:>14.0} {:>22} | {:>7.1}% | {:>8.1}x | {:>15}",
            raw.per_sec,
            raw.latencies(),
            hsmd.per_sec,
            hsmd.latencies(),
            ratio,
            tail,
            cpu
        );
        if clients == 8 {
            verdict = Some((ratio, tail));
        }
    }
    if let Some((ratio, tail)) = verdict {
        println!(
            "target: at 8 clients hsmd >= 85% of the raw echo's round trips/s: {} ({ratio:.1}%)",
            if ratio >= 85.0 { "met" } else { "NOT met" }
        );
        println!(
            "target: at 8 clients hsmd's p99 <= 3x the raw echo's p99: {} ({tail:.1}x)",
            if tail <= 3.0 { "met" } else { "NOT met" }
        );
    }
    let _ = echo.kill();
    let _ = echo.wait();
    Ok(())
}

/// One operation measured both ways.
struct KeyOp {
    label: &'static str,
    request: Operation,
    item: protocol::BatchItem,
    in_process: fn() -> Box<dyn FnMut() -> Result<()> + Send>,
}

fn in_process_aes() -> Box<dyn FnMut() -> Result<()> + Send> {
    use aes_gcm::{aead::Aead as _, KeyInit as _};
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).expect("random");
    let cipher = aes_gcm::Aes256Gcm::new(&key.into());
    let plaintext = vec![0x5a; 4096];
    Box::new(move || {
        // As hsmd does: a fresh random nonce per message.
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("{e}"))?;
        let ct = cipher
            .encrypt(aes_gcm::Nonce::from_slice(&nonce), plaintext.as_slice())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        std::hint::black_box(ct);
        Ok(())
    })
}

fn key_suite(args: &Args) -> Result<()> {
    // --dev: initialized and unlocked.
    let daemon = Daemon::builder()
        .dev()
        .limit("max_connections", "64")
        .limit("reactor_threads", &args.reactor_threads.to_string())
        .start();
    let mut admin = daemon.client();
    for (name, key_type) in [
        ("bench-ed25519", protocol::KeyType::Ed25519),
        ("bench-p256", protocol::KeyType::EcdsaP256),
        ("bench-aes", protocol::KeyType::Aes256Gcm),
    ] {
        admin.call(Operation::KeyCreate {
            name: name.into(),
            key_type,
            usages: Vec::new(),
            options: protocol::KeyOptions::default(),
        })?;
    }
    let ops = [
        KeyOp {
            label: "ed25519 sign",
            request: Operation::Sign(protocol::SignArgs {
                name: "bench-ed25519".into(),
                digest: vec![7; 64],
            }),
            item: protocol::BatchItem::Sign(protocol::SignArgs {
                name: "bench-ed25519".into(),
                digest: vec![7; 64],
            }),
            in_process: in_process_ed25519,
        },
        KeyOp {
            label: "ecdsa-p256 sign",
            request: Operation::Sign(protocol::SignArgs {
                name: "bench-p256".into(),
                digest: vec![7; 32],
            }),
            item: protocol::BatchItem::Sign(protocol::SignArgs {
                name: "bench-p256".into(),
                digest: vec![7; 32],
            }),
            in_process: in_process_p256,
        },
        KeyOp {
            label: "aes256-gcm encrypt 4 KiB",
            request: Operation::Encrypt(protocol::EncryptArgs {
                name: "bench-aes".into(),
                version: None,
                plaintext: protocol::SecretBytes::new(vec![0x5a; 4096]),
                aad: Vec::new(),
            }),
            item: protocol::BatchItem::Encrypt(protocol::EncryptArgs {
                name: "bench-aes".into(),
                version: None,
                plaintext: protocol::SecretBytes::new(vec![0x5a; 4096]),
                aad: Vec::new(),
            }),
            in_process: in_process_aes,
        },
    ];
    println!(
        "\nhsmd key-operation benchmark: {} s per run, median of {} round{}, {} cores, hsmd reactor threads: {}, requests in flight per client: {}, operations per request: {}",
        args.seconds,
        args.rounds,
        if args.rounds == 1 { "" } else { "s" },
        thread::available_parallelism().map_or(0, std::num::NonZero::get),
        args.reactor_threads,
        args.depth,
        args.batch,
    );
    let mut ed_at_8 = None;
    let mut ed_p99_at_1 = None;
    for op in &ops {
        println!("{}:", op.label);
        println!(
            "{:>7} | {:>14} {:>22} | {:>14} {:>22} | {:>8} | {:>7} | {:>15}",
            "clients", "in-process/s", LATENCIES, "hsmd/s", LATENCIES, "hsmd/in", "p99/p50", "CPU µs/op i/h"
        );
        for &clients in &args.clients {
            let mut local = Vec::new();
            let mut remote = Vec::new();
            for _ in 0..args.rounds {
                let make = op.in_process;
                local.push(measure_served(
                    clients,
                    args.seconds,
                    1,
                    &[std::process::id()],
                    move || Ok(make()),
                )?);
                let socket = daemon.socket.clone();
                let (depth, batch) = (args.depth, args.batch);
                let request = if batch == 1 {
                    op.request.clone()
                } else {
                    Operation::Batch {
                        items: vec![op.item.clone(); batch],
                    }
                };
                remote.push(measure_served(
                    clients,
                    args.seconds,
                    depth * batch,
                    &[daemon.pid()],
                    move || {
                        let mut c = Client::connect_with(&socket, &ClientOptions::default())?;
                        let request = request.clone();
                        Ok(move || -> Result<()> {
                            if depth == 1 {
                                if let protocol::Reply::Batch(results) = c.call(request.clone())? {
                                    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                                        bail!("daemon refused a batch item: {e}");
                                    }
                                }
                                return Ok(());
                            }
                            c.send_many(std::iter::repeat_n(&request, depth).cloned())?;
                            for _ in 0..depth {
                                if let Err(e) = c.recv()?.result {
                                    bail!("daemon refused: {e}");
                                }
                            }
                            Ok(())
                        })
                    },
                )?);
            }
            let cpu = cpu_pair(&local, &remote);
            let (l, r) = (median(local), median(remote));
            let ratio = r.per_sec / l.per_sec * 100.0;
            println!(
                "{clients:>7} | {:>14.0} {:>22} | {:>14.0} {:>22} | {:>7.1}% | {:>6.1}x | {:>15}",
                l.per_sec,
                l.latencies(),
                r.per_sec,
                r.latencies(),
                ratio,
                r.tail(),
                cpu
            );
            if op.label.starts_with("ed25519") {
                if clients == 8 {
                    ed_at_8 = Some((r.per_sec, ratio, r.tail()));
                }
                if clients == 1 {
                    ed_p99_at_1 = Some(r.p99_us);
                }
            }
        }
    }
    if let Some((rate, ratio, tail)) = ed_at_8 {
        println!(
            "target: ed25519 over the socket at 8 clients >= 85% of in-process: {} ({ratio:.1}%)",
            if ratio >= 85.0 { "met" } else { "NOT met" }
        );
        println!(
            "target: ed25519 at 8 clients, p99 per round <= 5x its p50: {} ({tail:.1}x)",
            if tail <= 5.0 { "met" } else { "NOT met" }
        );
        println!(
            "target: ed25519 over the socket at 8 clients >= 40000/s: {} ({rate:.0}/s)",
            if rate >= 40_000.0 { "met" } else { "NOT met" }
        );
    }
    fairness(args, &daemon)?;
    if args.depth * args.batch > 1 {
        println!(
            "target: ed25519 p99 at 1 client < 200 µs: not judged here (latencies are per round of {} operations; run with --depth 1 --batch 1)",
            args.depth * args.batch
        );
    } else if let Some(p99) = ed_p99_at_1 {
        println!(
            "target: ed25519 p99 at 1 client < 200 µs: {} ({p99:.1} µs)",
            if p99 < 200.0 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

/// Clients that keep the daemon busy: each keeps this many Ed25519
/// signatures in flight.
const LOAD_DEPTH: usize = 64;

/// The fairness row: one client signing one Ed25519 digest at a time, alone
/// on the daemon, then beside 7 clients each keeping [`LOAD_DEPTH`]
/// signatures in flight; its latencies both ways.
fn fairness(args: &Args, daemon: &Daemon) -> Result<()> {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    };
    let sign = Operation::Sign(protocol::SignArgs {
        name: "bench-ed25519".into(),
        digest: vec![7; 64],
    });
    let lone = |socket: std::path::PathBuf, sign: Operation| {
        measure(1, args.seconds, move || {
            let mut c = Client::connect_with(&socket, &ClientOptions::default())?;
            let sign = sign.clone();
            Ok(move || -> Result<()> {
                c.call(sign.clone())?;
                Ok(())
            })
        })
    };
    let (mut idle_runs, mut loaded_runs, mut load_rates) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        idle_runs.push(lone(daemon.socket.clone(), sign.clone())?);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut load = Vec::new();
        for _ in 0..7 {
            let mut c = Client::connect_with(&daemon.socket, &ClientOptions::default())?;
            let (stop, done, sign) = (Arc::clone(&stop), Arc::clone(&done), sign.clone());
            load.push(thread::spawn(move || -> Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    c.send_many(std::iter::repeat_n(&sign, LOAD_DEPTH).cloned())?;
                    for _ in 0..LOAD_DEPTH {
                        if let Err(e) = c.recv()?.result {
                            bail!("daemon refused: {e}");
                        }
                    }
                    done.fetch_add(LOAD_DEPTH as u64, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        thread::sleep(Duration::from_millis(300));
        let before = done.load(Ordering::Relaxed);
        let started = Instant::now();
        loaded_runs.push(lone(daemon.socket.clone(), sign.clone())?);
        load_rates.push((done.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64());
        stop.store(true, Ordering::Relaxed);
        for t in load {
            t.join().map_err(|_| anyhow::anyhow!("a load client panicked"))??;
        }
    }
    let (idle, loaded) = (median(idle_runs), median(loaded_runs));
    load_rates.sort_by(f64::total_cmp);
    let load_rate = load_rates[load_rates.len() / 2];
    let ratio = loaded.p99_us / idle.p99_us.max(f64::MIN_POSITIVE);
    println!(
        "fairness (ed25519 sign): 1 client, one request at a time, alone and beside 7 clients keeping {LOAD_DEPTH} in flight each"
    );
    println!(
        "{:>22} | {:>12} {:>22} | {:>14} | {:>13}",
        "", "lone rt/s", LATENCIES, "load signs/s", "p99 vs idle"
    );
    println!(
        "{:>22} | {:>12.0} {:>22} | {:>14} | {:>13}",
        "idle daemon",
        idle.per_sec,
        idle.latencies(),
        "-",
        "1.0x"
    );
    println!(
        "{:>22} | {:>12.0} {:>22} | {:>14.0} | {:>12.1}x",
        "beside 7 busy clients",
        loaded.per_sec,
        loaded.latencies(),
        load_rate,
        ratio
    );
    println!(
        "target: the lone client's p99 beside the load <= 5x its idle p99: {} ({ratio:.1}x)",
        if ratio <= 5.0 { "met" } else { "NOT met" }
    );
    Ok(())
}

fn start_echo(path: &Path) -> Result<Child> {
    let child = Command::new(std::env::current_exe()?)
        .arg("--echo-server")
        .arg(path)
        .stdin(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(path).is_err() {
        if Instant::now() > deadline {
            bail!("echo server did not start");
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

/// The baseline: frames echoed back as they are, on a current-thread reactor.
fn echo_server(path: &Path) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(path)?;
        loop {
            let (mut s, _) = listener.accept().await?;
            tokio::spawn(async move {
                let mut buf = bytes::BytesMut::with_capacity(8192);
                loop {
                    match frame::check(&buf, frame::MAX_FRAME_CEILING) {
                        Ok(FrameStatus::Complete { body_len }) => {
                            let f = buf.split_to(HEADER_LEN + body_len);
                            if s.write_all(&f).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        Ok(FrameStatus::Incomplete { .. }) => {}
                        Err(_) => return,
                    }
                    match s.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            });
        }
    })
}

/// The signature kinds the backend suite measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sig {
    Ed25519,
    P256,
    RsaPss2048,
}

impl Sig {
    fn digest_len(self) -> usize {
        if self == Self::Ed25519 {
            64
        } else {
            32
        }
    }
}

/// `openssl speed` RSA-2048 signatures per second on `cores` processes: the
/// independent software baseline for the RSA row (hsmd itself holds no RSA
/// private key in software).
fn openssl_rsa2048(cores: usize, secs: f64) -> Result<f64> {
    let out = std::process::Command::new("openssl")
        .args([
            "speed",
            "-seconds",
            &format!("{}", secs.ceil().max(1.0) as u64),
            "-multi",
            &cores.to_string(),
            "rsa2048",
        ])
        .output()
        .context("run openssl speed (Debian package openssl)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The summary line: "rsa 2048 bits 0.000501s 0.000015s 1996.0 66666.7" (sign/s, verify/s).
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("rsa 2048 bits") || l.starts_with("rsa  2048 bits"))
        .context("openssl speed printed no rsa 2048 line")?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    fields
        .get(fields.len().saturating_sub(2))
        .and_then(|f| f.parse().ok())
        .context("openssl speed's sign/s field")
}

/// Signs through cryptoki in this process: `clients` threads, each with its
/// own session on the token, using the private key labelled `label`.
fn direct_pkcs11(hsm: &hsmd_tests::SoftHsm, label: &str, kind: Sig, clients: usize, secs: f64) -> Result<Figures> {
    use cryptoki::mechanism::{
        eddsa::EddsaParams,
        eddsa::EddsaSignatureScheme,
        rsa::{PkcsMgfType, PkcsPssParams},
        Mechanism, MechanismType,
    };
    use hsmd_tests::pkcs11_bench::{load, Module};
    static P11: std::sync::OnceLock<std::sync::Arc<Module>> = std::sync::OnceLock::new();
    // SoftHSM reads its configuration when the module is first initialized,
    // here, before any client thread exists; it is initialized once per process.
    std::env::set_var("SOFTHSM2_CONF", hsm.conf());
    let module = match P11.get() {
        Some(m) => std::sync::Arc::clone(m),
        None => {
            let m = std::sync::Arc::new(load(
                std::path::Path::new(hsmd_tests::SOFTHSM_MODULE),
                &hsm.label,
                Some(hsm.pin.clone()),
            )?);
            let _ = P11.set(std::sync::Arc::clone(&m));
            m
        }
    };
    let label = label.to_owned();
    // The token works in this process: its CPU per signature is the token's.
    measure_served(clients, secs, 1, &[std::process::id()], move || {
        let (session, key) = module.signing_session(&label)?;
        let digest = vec![7u8; kind.digest_len()];
        Ok(move || -> Result<()> {
            // The mechanisms hsmd's helper uses for the same keys.
            let mechanism = match kind {
                Sig::Ed25519 => Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                Sig::P256 => Mechanism::Ecdsa,
                Sig::RsaPss2048 => Mechanism::RsaPkcsPss(PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: PkcsMgfType::MGF1_SHA256,
                    s_len: 32.into(),
                }),
            };
            session.sign(&mechanism, key, &digest)?;
            Ok(())
        })
    })
}

/// The header of the CPU column beside a `p11/ck` ratio: CPU time per
/// signature of the token used directly (this process), then of hsmd and its
/// PKCS#11 helper together. The ratio of the two bounds `p11/ck` wherever the
/// clients, hsmd, the helper and the token share the same cores.
const CPU_P11: &str = "CPU µs/op ck/p11";

/// Signing through hsmd with keys in each backend, same clients, beside the
/// token used directly and software signing in this process.
fn backend_suite(args: &Args) -> Result<()> {
    let hsm = hsmd_tests::SoftHsm::new("hsmd-bench");
    let tpm = hsmd_tests::Swtpm::start();
    let daemon = hsm
        .daemon(&format!("sessions = 8\n\n[backends.tpm]\ntcti = {:?}\n", tpm.tcti()))
        .env("TSS2_LOG", "all+NONE")
        .dev()
        .limit("max_connections", "64")
        .limit("reactor_threads", &args.reactor_threads.to_string())
        .start();
    let mut admin = daemon.client();
    for (name, key_type, backend) in [
        ("soft-ed25519", protocol::KeyType::Ed25519, "soft"),
        ("soft-p256", protocol::KeyType::EcdsaP256, "soft"),
        ("p11-ed25519", protocol::KeyType::Ed25519, "pkcs11"),
        ("p11-p256", protocol::KeyType::EcdsaP256, "pkcs11"),
        ("tpm-p256", protocol::KeyType::EcdsaP256, "tpm"),
        ("p11-rsa", protocol::KeyType::RsaPss2048, "pkcs11"),
        ("tpm-rsa", protocol::KeyType::RsaPss2048, "tpm"),
    ] {
        admin.call(Operation::KeyCreate {
            name: name.into(),
            key_type,
            usages: Vec::new(),
            options: protocol::KeyOptions {
                backend: Some(backend.into()),
                ..protocol::KeyOptions::default()
            },
        })?;
    }
    let Some(helper) = daemon.pkcs11_helper_pid().and_then(|p| u32::try_from(p).ok()) else {
        bail!("hsmd started no PKCS#11 helper for the token");
    };
    // hsmd and its helper together: what a token signature costs the daemon.
    let served = [daemon.pid(), helper];
    println!(
        "\nhsmd backend signing benchmark: {} s per run, median of {} round{}, {} cores, SoftHSM2 token with 8 sessions, swtpm on loopback (tpm: ecdsa-p256 and rsa only)",
        args.seconds,
        args.rounds,
        if args.rounds == 1 { "" } else { "s" },
        thread::available_parallelism().map_or(0, std::num::NonZero::get),
    );
    for (label, ed) in [("ecdsa-p256 sign", false), ("ed25519 sign", true)] {
        let t = if ed { "ed25519" } else { "p256" };
        println!("{label}:");
        println!(
            "{:>7} | {:>12} {:>22} | {:>12} {:>22} | {:>12} {:>22} | {:>12} | {:>9} | {:>11} {:>22} | {:>17}",
            "clients",
            "hsmd soft/s",
            LATENCIES,
            "hsmd p11/s",
            LATENCIES,
            "cryptoki/s",
            LATENCIES,
            "in-proc/s",
            "p11/ck",
            "hsmd tpm/s",
            LATENCIES,
            CPU_P11
        );
        for &clients in &args.clients {
            let (mut soft, mut p11, mut direct, mut local, mut tpm) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..args.rounds {
                // Only the token's signatures are charged CPU (to hsmd and its helper).
                let mut targets: Vec<(String, &mut Vec<Figures>, &[u32])> = vec![
                    (format!("soft-{t}"), &mut soft, &[]),
                    (format!("p11-{t}"), &mut p11, &served),
                ];
                if !ed {
                    targets.push(("tpm-p256".to_owned(), &mut tpm, &[]));
                }
                for (name, out, servers) in targets {
                    let socket = daemon.socket.clone();
                    out.push(measure_served(clients, args.seconds, 1, servers, move || {
                        let mut c = Client::connect_with(&socket, &ClientOptions::default())?;
                        let request = Operation::Sign(protocol::SignArgs {
                            name: name.clone(),
                            digest: vec![7; if ed { 64 } else { 32 }],
                        });
                        Ok(move || -> Result<()> {
                            c.call(request.clone())?;
                            Ok(())
                        })
                    })?);
                }
                direct.push(direct_pkcs11(
                    &hsm,
                    &format!("hsmd:p11-{t}:v1"),
                    if ed { Sig::Ed25519 } else { Sig::P256 },
                    clients,
                    args.seconds,
                )?);
                let make = if ed { in_process_ed25519 } else { in_process_p256 };
                local.push(measure(clients, args.seconds, move || Ok(make()))?);
            }
            let cpu = cpu_pair(&direct, &p11);
            let (s, p, d, l) = (median(soft), median(p11), median(direct), median(local));
            let tpm = if tpm.is_empty() {
                format!("{:>11} {:>22}", "-", "-")
            } else {
                let t = median(tpm);
                format!("{:>11.0} {:>22}", t.per_sec, t.latencies())
            };
            println!(
                "{clients:>7} | {:>12.0} {:>22} | {:>12.0} {:>22} | {:>12.0} {:>22} | {:>12.0} | {:>8.1}% | {tpm} | {cpu:>17}",
                s.per_sec,
                s.latencies(),
                p.per_sec,
                p.latencies(),
                d.per_sec,
                d.latencies(),
                l.per_sec,
                p.per_sec / d.per_sec * 100.0
            );
        }
    }
    rsa_rows(args, &daemon, &hsm, &served)
}

/// RSA-PSS 2048 signing with pkcs11 and tpm keys through hsmd, beside the
/// token used directly and OpenSSL's own RSA in software.
fn rsa_rows(args: &Args, daemon: &hsmd_tests::Daemon, hsm: &hsmd_tests::SoftHsm, served: &[u32]) -> Result<()> {
    println!("rsa-pss-2048 sign:");
    println!(
        "{:>7} | {:>12} {:>22} | {:>12} {:>22} | {:>9} | {:>11} {:>22} | {:>13} | {:>17}",
        "clients",
        "hsmd p11/s",
        LATENCIES,
        "cryptoki/s",
        LATENCIES,
        "p11/ck",
        "hsmd tpm/s",
        LATENCIES,
        "openssl sw/s",
        CPU_P11
    );
    for &clients in &args.clients {
        let (mut p11, mut direct, mut tpm, mut sw) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            for (name, out, servers) in [("p11-rsa", &mut p11, served), ("tpm-rsa", &mut tpm, &[])] {
                let socket = daemon.socket.clone();
                out.push(measure_served(clients, args.seconds, 1, servers, move || {
                    let mut c = Client::connect_with(&socket, &ClientOptions::default())?;
                    let request = Operation::Sign(protocol::SignArgs {
                        name: name.to_owned(),
                        digest: vec![7; 32],
                    });
                    Ok(move || -> Result<()> {
                        c.call(request.clone())?;
                        Ok(())
                    })
                })?);
            }
            direct.push(direct_pkcs11(
                hsm,
                "hsmd:p11-rsa:v1",
                Sig::RsaPss2048,
                clients,
                args.seconds,
            )?);
            sw.push(openssl_rsa2048(clients, args.seconds)?);
        }
        let cpu = cpu_pair(&direct, &p11);
        let (p, d, t) = (median(p11), median(direct), median(tpm));
        sw.sort_by(f64::total_cmp);
        let sw = sw[sw.len() / 2];
        println!(
            "{clients:>7} | {:>12.0} {:>22} | {:>12.0} {:>22} | {:>8.1}% | {:>11.0} {:>22} | {:>13.0} | {cpu:>17}",
            p.per_sec,
            p.latencies(),
            d.per_sec,
            d.latencies(),
            p.per_sec / d.per_sec * 100.0,
            t.per_sec,
            t.latencies(),
            sw
        );
    }
    Ok(())
}
