//! OpenSSH's programs as the clients and server of hsmd's agent socket:
//! `ssh-add`, `ssh-keygen -Y`, `ssh`, and an `sshd` started on loopback with
//! its own configuration in a temp dir.

use std::{
    fs,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

/// `ssh-add ARGS` against the agent at `socket`.
pub fn ssh_add(socket: &Path, args: &[&str]) -> Output {
    Command::new("ssh-add")
        .args(args)
        .env("SSH_AUTH_SOCK", socket)
        .output()
        .expect("run ssh-add (Debian package openssh-client)")
}

/// The `authorized_keys` lines `ssh-add -L` prints for the agent at
/// `socket`, sorted; empty when it has none.
pub fn agent_lines(socket: &Path) -> Vec<String> {
    listed(&ssh_add(socket, &["-L"]))
}

/// The lines of `ssh-add -L`'s output, sorted; empty when the agent said it
/// has none (any other failure fails the test).
pub fn listed(out: &Output) -> Vec<String> {
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        assert!(text.contains("no identities"), "ssh-add -L failed: {out:?}");
        return Vec::new();
    }
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// `ssh-keygen -Y verify` of `sig` over `data` by `public` (an
/// `authorized_keys` line) in `namespace`.
pub fn ssh_keygen_verifies(dir: &Path, public: &str, namespace: &str, data: &Path, sig: &Path) -> bool {
    let allowed = dir.join("allowed_signers");
    let mut fields = public.split_whitespace();
    let (kind, blob) = (fields.next().expect("type"), fields.next().expect("key"));
    fs::write(&allowed, format!("release@example.org {kind} {blob}\n")).expect("write");
    let out = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-f"])
        .arg(&allowed)
        .args(["-I", "release@example.org", "-n", namespace, "-s"])
        .arg(sig)
        .stdin(fs::File::open(data).expect("open"))
        .output()
        .expect("run ssh-keygen (Debian package openssh-client)");
    let said = String::from_utf8_lossy(&out.stdout);
    out.status.success() && said.contains(&format!("Good \"{namespace}\" signature"))
}

/// The SHA-256 fingerprint (`SHA256:…`) `ssh-keygen -l` prints for a public key file.
pub fn fingerprint(public: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(public)
        .output()
        .expect("run ssh-keygen");
    assert!(out.status.success(), "ssh-keygen -lf: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("a fingerprint")
        .to_owned()
}

/// An `sshd` on a loopback port, in the foreground, logging to a file;
/// stopped when dropped.
#[derive(Debug)]
pub struct Sshd {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Where it logs (`-E`).
    pub log: PathBuf,
}

impl Sshd {
    /// Starts `/usr/sbin/sshd -D` with `config` (whole lines: host keys,
    /// `AuthorizedKeysFile`, …) plus what every test needs: its port, no
    /// PAM or passwords, its pid file in `dir`.
    pub fn start(dir: &Path, config: &str) -> Self {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.exists(),
            "/usr/sbin/sshd is missing: install openssh-server (scripts/install-test-deps)"
        );
        // Privilege separation wants its empty directory when run as root.
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let file = dir.join("sshd_config");
        fs::write(
            &file,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nPidFile {}\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nStrictModes no\n\
                 PermitRootLogin prohibit-password\nLogLevel DEBUG1\n{config}",
                dir.join("sshd.pid").display()
            ),
        )
        .expect("write sshd_config");
        let log = dir.join("sshd.log");
        let child = Command::new(sshd)
            .arg("-D")
            .arg("-f")
            .arg(&file)
            .arg("-E")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd");
        let mut sshd = Self { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = sshd.child.try_wait() {
                panic!("sshd exited ({status}): {}", sshd.log_text());
            }
            assert!(Instant::now() < deadline, "sshd did not listen: {}", sshd.log_text());
            thread::sleep(Duration::from_millis(50));
        }
        sshd
    }

    /// What it has logged.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ssh -p PORT USER@127.0.0.1 COMMAND` with no configuration but
    /// `options` (`-o …`), host keys checked against `known_hosts`.
    pub fn ssh(&self, known_hosts: &Path, options: &[&str], command: &str) -> Output {
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map_or_else(|| "root".to_owned(), |u| u.name);
        Command::new("ssh")
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10"])
            .args(options)
            .args(["-p", &self.port.to_string()])
            .arg(format!("{user}@127.0.0.1"))
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .expect("run ssh (Debian package openssh-client)")
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
