//! `hsmd-bench --suite agent`: SSH agent signatures through hsmd's agent
//! socket beside OpenSSH's own `ssh-agent`, in the same run, with keys of the
//! same types and the same client: a thread per client, each on its own
//! connection, sending SIGN_REQUESTs of 150 bytes of session data (the size of
//! what ssh signs to log in) one at a time. Beside them, the same signature
//! made in this process with the crates hsmd's soft backend uses, on as many
//! threads: the ceiling any front end of hsmd's can reach.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use base64::Engine as _;

use crate::{
    measure::{in_process_ed25519, in_process_p256, measure, median, LATENCIES},
    Daemon,
};

/// What to run.
#[derive(Debug, Clone)]
pub struct AgentBench {
    /// Seconds per measured run.
    pub seconds: f64,
    /// Runs per figure (the median is printed).
    pub rounds: usize,
    /// Client counts, one row each.
    pub clients: Vec<usize>,
    /// hsmd's `limits.reactor_threads`.
    pub reactor_threads: u32,
}

/// OpenSSH's agent on a socket in a temp dir; killed when dropped.
struct SshAgent {
    child: Child,
    socket: PathBuf,
}

impl Drop for SshAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(socket: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {}", socket.display());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts `ssh-agent -D` holding fresh keys of `types` (`ssh-keygen -t`).
fn ssh_agent(dir: &Path, types: &[(&str, &str)]) -> Result<SshAgent> {
    let socket = dir.join("ssh-agent.sock");
    let child = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start ssh-agent (Debian package openssh-client)")?;
    let agent = SshAgent { child, socket };
    wait_for(&agent.socket)?;
    for (kind, bits) in types {
        let key = dir.join(format!("id_{kind}"));
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-b", bits, "-N", "", "-f"])
            .arg(&key)
            .output()?;
        if !out.status.success() {
            bail!("ssh-keygen -t {kind}: {out:?}");
        }
        let out = Command::new("ssh-add")
            .arg("-q")
            .arg(&key)
            .env("SSH_AUTH_SOCK", &agent.socket)
            .output()?;
        if !out.status.success() {
            bail!("ssh-add {kind}: {out:?}");
        }
    }
    Ok(agent)
}

/// The public key blobs an agent lists, by SSH key type (`ssh-ed25519`, …).
fn blobs(socket: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let out = Command::new("ssh-add")
        .arg("-L")
        .env("SSH_AUTH_SOCK", socket)
        .output()?;
    if !out.status.success() {
        bail!("ssh-add -L: {out:?}");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let mut f = line.split_whitespace();
            let kind = f.next().context("key type")?.to_owned();
            let blob = base64::engine::general_purpose::STANDARD.decode(f.next().context("key")?)?;
            Ok((kind, blob))
        })
        .collect()
}

fn ssh_string(out: &mut Vec<u8>, bytes: &[u8]) -> Result<()> {
    out.extend_from_slice(&u32::try_from(bytes.len())?.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// A client that asks the agent at `socket` to sign 150 bytes with `blob`'s
/// key, one request at a time, and checks each answer is a signature.
fn signer(socket: &Path, blob: &[u8]) -> Result<impl FnMut() -> Result<()> + Send + 'static> {
    let mut stream = UnixStream::connect(socket)?;
    let mut message = vec![13u8];
    ssh_string(&mut message, blob)?;
    ssh_string(&mut message, &[0x5a; 150])?;
    message.extend_from_slice(&0u32.to_be_bytes());
    let mut frame = u32::try_from(message.len())?.to_be_bytes().to_vec();
    frame.extend_from_slice(&message);
    let mut answer = Vec::with_capacity(512);
    Ok(move || {
        stream.write_all(&frame)?;
        let mut header = [0u8; 4];
        stream.read_exact(&mut header)?;
        let len = u32::from_be_bytes(header) as usize;
        if len > 64 * 1024 {
            bail!("an answer of {len} bytes");
        }
        answer.resize(len, 0);
        stream.read_exact(&mut answer)?;
        if answer.first() != Some(&14) {
            bail!("the agent did not sign (answer type {:?})", answer.first());
        }
        Ok(())
    })
}

/// Runs the suite and prints its table.
///
/// # Errors
/// A daemon, agent or client that fails.
pub fn run(b: &AgentBench) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let daemon = Daemon::builder()
        .dev()
        .limit("max_connections", "64")
        .limit("reactor_threads", &b.reactor_threads.to_string())
        .extra("[ssh_agent]\nsocket = \"$DIR/agent.sock\"\n")
        .start();
    let hsmd_agent = daemon.dir().join("agent.sock");
    for (name, key_type) in [
        ("ssh-ed25519", protocol::KeyType::Ed25519),
        ("ssh-p256", protocol::KeyType::EcdsaP256),
    ] {
        daemon.client().call(protocol::Operation::KeyCreate {
            name: name.into(),
            key_type,
            usages: Vec::new(),
            options: protocol::KeyOptions {
                labels: [(protocol::SSH_LABEL.to_owned(), "yes".to_owned())].into(),
                ..protocol::KeyOptions::default()
            },
        })?;
    }
    let openssh = ssh_agent(dir.path(), &[("ed25519", "256"), ("ecdsa", "256")])?;
    let (hsmd_keys, openssh_keys) = (blobs(&hsmd_agent)?, blobs(&openssh.socket)?);
    println!(
        "\nSSH agent signing benchmark: {} s per run, median of {} round{}, {} cores, 150-byte session data, one request at a time per client",
        b.seconds,
        b.rounds,
        if b.rounds == 1 { "" } else { "s" },
        thread::available_parallelism().map_or(0, std::num::NonZero::get),
    );
    for (label, kind, local) in [
        ("ed25519", "ssh-ed25519", in_process_ed25519 as fn() -> _),
        ("ecdsa-p256", "ecdsa-sha2-nistp256", in_process_p256),
    ] {
        let find = |keys: &[(String, Vec<u8>)]| {
            keys.iter()
                .find(|(k, _)| k == kind)
                .map(|(_, b)| b.clone())
                .with_context(|| format!("no {kind} key listed"))
        };
        let (ours, theirs) = (find(&hsmd_keys)?, find(&openssh_keys)?);
        println!("{label}:");
        println!(
            "{:>7} | {:>12} {:>22} | {:>13} {:>22} | {:>12} | {:>12}",
            "clients", "hsmd/s", LATENCIES, "ssh-agent/s", LATENCIES, "hsmd/agent", "in-proc/s"
        );
        for &clients in &b.clients {
            let (mut h, mut o, mut l) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..b.rounds {
                let (socket, blob) = (hsmd_agent.clone(), ours.clone());
                h.push(measure(clients, b.seconds, move || signer(&socket, &blob))?);
                let (socket, blob) = (openssh.socket.clone(), theirs.clone());
                o.push(measure(clients, b.seconds, move || signer(&socket, &blob))?);
                l.push(measure(clients, b.seconds, move || Ok(local()))?);
            }
            let (h, o, l) = (median(h), median(o), median(l));
            println!(
                "{clients:>7} | {:>12.0} {:>22} | {:>13.0} {:>22} | {:>11.1}× | {:>12.0}",
                h.per_sec,
                h.latencies(),
                o.per_sec,
                o.latencies(),
                h.per_sec / o.per_sec,
                l.per_sec
            );
        }
    }
    Ok(())
}
