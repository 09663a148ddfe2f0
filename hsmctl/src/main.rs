//! hsmctl: the command line for hsmd, built only on the protocol crate's client.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use protocol::{Client, ClientError, ClientOptions, GroupInfo, PeerInfo, StatusInfo};
use serde_json::json;

const EXAMPLES: &str = "\
Examples:
  eval \"$(hsmd --dev)\" &          # start a throw-away daemon (or paste its export line)
  hsmctl status
  hsmctl --json status | jq .state
  hsmctl whoami
  hsmctl ping -c 100

Exit codes:
  0  success
  1  hsmd refused the request, or it failed
  2  usage error (bad command line)
  3  cannot reach hsmd (no socket, connection refused, no answer)";

/// Talk to the hsmd key daemon.
#[derive(Debug, Parser)]
#[command(version, after_help = EXAMPLES)]
struct Cli {
    /// hsmd's socket
    #[arg(long, global = true, env = "HSMD_SOCKET", default_value = protocol::DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,
    /// Print machine-readable JSON instead of text
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for each answer
    #[arg(long, global = true, default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The daemon's state, version, uptime, backends and connection count
    #[command(after_help = "Example:\n  hsmctl status\n  hsmctl --json status")]
    Status,
    /// Who the daemon sees you as: uid, user, groups, and what you may do
    #[command(after_help = "Example:\n  hsmctl whoami")]
    Whoami,
    /// Round trips to the daemon, with their latency
    #[command(after_help = "Example:\n  hsmctl ping -c 10 --size 64")]
    Ping {
        /// How many round trips
        #[arg(short, long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
        /// Bytes of payload echoed each time
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=65_536))]
        size: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.json {
                let code = e.code();
                println!(
                    "{}",
                    json!({ "error": {
                        "message": e.to_string(),
                        "code": code.map(|c| c.as_str()),
                        "number": code.map(|c| c.number()),
                    }})
                );
            } else {
                eprintln!("hsmctl: {e}");
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

/// 3 when the daemon could not be reached or went away, 1 when it answered no.
fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Closed | ClientError::TimedOut(_) => 3,
        _ => 1,
    }
}

fn connect(cli: &Cli) -> Result<Client, ClientError> {
    Client::connect_with(
        &cli.socket,
        &ClientOptions {
            client_name: concat!("hsmctl/", env!("CARGO_PKG_VERSION")).to_owned(),
            timeout: Some(Duration::from_secs(cli.timeout)),
        },
    )
}

fn run(cli: &Cli) -> Result<(), ClientError> {
    let mut client = connect(cli)?;
    match &cli.command {
        Command::Status => {
            let s = client.status()?;
            if cli.json {
                print_json(&s);
            } else {
                print_status(&s);
            }
        }
        Command::Whoami => {
            let p = client.whoami()?;
            if cli.json {
                print_json(&p);
            } else {
                print_whoami(&p);
            }
        }
        Command::Ping { count, size } => {
            let payload = vec![0xa5u8; *size as usize];
            let mut samples = Vec::with_capacity(*count as usize);
            for _ in 0..*count {
                let started = Instant::now();
                let echoed = client.ping(payload.clone())?;
                samples.push(started.elapsed());
                if echoed != payload {
                    return Err(ClientError::UnexpectedReply {
                        expected: "the same payload",
                        got: "a different payload",
                    });
                }
            }
            print_ping(cli.json, client.server().daemon_version.as_str(), &samples);
        }
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("hsmctl: cannot format JSON: {e}"),
    }
}

fn print_status(s: &StatusInfo) {
    let backends = if s.backends.is_empty() {
        "none".to_owned()
    } else {
        s.backends.join(", ")
    };
    println!("state:        {}", s.state.as_str());
    println!(
        "version:      hsmd {} (protocol {})",
        s.daemon_version, s.protocol_version
    );
    println!("uptime:       {}", format_duration(s.uptime_secs));
    println!("backends:     {backends}");
    println!("connections:  {} of {}", s.connections, s.max_connections);
    println!("in flight:    {}", s.requests_in_flight);
    println!(
        "mode:         {}",
        if s.dev_mode {
            "dev (throw-away, not for production)"
        } else {
            "production"
        }
    );
    println!(
        "memory:       {}",
        if s.memory_locked {
            "locked (never swapped)"
        } else {
            "NOT locked: keys could reach swap (see the daemon's log)"
        }
    );
    println!("pid:          {}", s.pid);
}

fn group_label(g: &GroupInfo) -> String {
    match &g.name {
        Some(n) => format!("{} ({n})", g.gid),
        None => g.gid.to_string(),
    }
}

fn print_whoami(p: &PeerInfo) {
    let user = p.user.as_deref().map_or_else(String::new, |u| format!(" ({u})"));
    println!("uid:          {}{user}", p.uid);
    println!("group:        {}", group_label(&p.group));
    println!(
        "groups:       {}",
        p.groups.iter().map(group_label).collect::<Vec<_>>().join(", ")
    );
    println!("pid:          {}", p.pid);
    println!("executable:   {}", p.executable.as_deref().unwrap_or("unknown"));
    println!("admitted:     {}", p.admitted_because);
    println!(
        "roles:        {}",
        if p.roles.is_empty() {
            "none (roles and permissions arrive with the policy file)".to_owned()
        } else {
            p.roles.join(", ")
        }
    );
    println!("connection:   {}", p.connection_id);
}

fn print_ping(json: bool, version: &str, samples: &[Duration]) {
    let micros: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    let min = micros.iter().copied().fold(f64::INFINITY, f64::min);
    let max = micros.iter().copied().fold(0.0, f64::max);
    let avg = micros.iter().sum::<f64>() / micros.len() as f64;
    if json {
        println!(
            "{}",
            json!({"round_trips": micros.len(), "min_us": min, "avg_us": avg, "max_us": max, "daemon_version": version})
        );
    } else {
        println!(
            "pong from hsmd {version}: {} round trip{}, latency min {min:.0} µs, avg {avg:.0} µs, max {max:.0} µs",
            micros.len(),
            if micros.len() == 1 { "" } else { "s" }
        );
    }
}

fn format_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m {s}s"),
    }
}
