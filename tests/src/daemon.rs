//! The daemon under test: building the binaries, configuring and starting
//! `hsmd`, talking to it (client, hsmctl, raw frames), reading its process.

use super::*;

/// Directory holding the `hsmd` and `hsmctl` binaries of this build profile,
/// built (once per test process) so tests never run stale binaries.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let mut dir = exe.parent().expect("exe dir").to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        if std::env::var_os("HSMD_TEST_NO_BUILD").is_none() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let target_dir = dir.parent().expect("target dir");
            let mut cmd = Command::new(cargo);
            cmd.args([
                "build",
                "--quiet",
                "-p",
                "hsmd",
                "-p",
                "hsmctl",
                "-p",
                "hsmd-pkcs11",
                "--features",
                &features(),
                "--target-dir",
            ])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build for hsmd and hsmctl");
            assert!(status.success(), "cargo build of hsmd and hsmctl failed");
        }
        dir
    })
}

/// The features the binaries are built with: the TPM backend where the TSS
/// libraries are installed (the tests start swtpm), FIDO2 where libudev is,
/// and the tests' FIDO2 emulator. A machine without those libraries
/// (`scripts/install-test-deps` installs them) still builds and runs every
/// test that does not need them; the TPM and FIDO2 tests then fail, saying the
/// backend or authenticator support is missing.
fn features() -> String {
    let has = |lib: &str| {
        Command::new("pkg-config")
            .args(["--exists", lib])
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut features = vec!["hsmctl/fido2-emulator"];
    if has("tss2-esys") {
        features.extend(["hsmd/tpm", "hsmctl/tpm"]);
    } else {
        eprintln!("hsmd tests: no tss2-esys (libtss2-dev): building without the TPM backend");
    }
    if has("libudev") {
        features.push("hsmctl/fido2");
    } else {
        eprintln!("hsmd tests: no libudev (libudev-dev): building hsmctl without FIDO2");
    }
    features.join(",")
}

/// Path of a workspace binary (`hsmd`, `hsmctl`).
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing; run cargo build --workspace",
        path.display()
    );
    path
}

/// hsmd's PKCS#11 module (`libhsmd_pkcs11.so`) of this build.
pub fn pkcs11_module() -> PathBuf {
    bin("libhsmd_pkcs11.so")
}

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct DaemonBuilder {
    dev: bool,
    socket_mode: String,
    socket_group: Option<String>,
    allow_root: bool,
    users: Vec<String>,
    groups: Vec<String>,
    limits: Vec<(String, String)>,
    env: Vec<(String, String)>,
    require_lock: bool,
    unlock: Vec<(String, String)>,
    keys: Vec<(String, String)>,
    extra: String,
    policy: Option<String>,
    base: Option<PathBuf>,
}

impl Default for DaemonBuilder {
    fn default() -> Self {
        Self {
            dev: false,
            socket_mode: "0600".into(),
            socket_group: None,
            allow_root: true,
            users: vec![nix::unistd::getuid().as_raw().to_string()],
            groups: Vec::new(),
            limits: Vec::new(),
            env: Vec::new(),
            // Locking is still attempted; this only decides whether failing is fatal,
            // so the suite also runs for developers without CAP_IPC_LOCK.
            require_lock: false,
            unlock: Vec::new(),
            keys: Vec::new(),
            extra: String::new(),
            policy: None,
            base: None,
        }
    }
}

impl DaemonBuilder {
    /// Puts the daemon's directory (state, socket, config) under `base`
    /// instead of the system temp directory (the file benchmark uses tmpfs).
    #[must_use]
    pub fn base_dir(mut self, base: &Path) -> Self {
        self.base = Some(base.to_owned());
        self
    }

    /// Runs with `--dev` (throw-away; serves its owner and root; dev-only ops).
    #[must_use]
    pub fn dev(mut self) -> Self {
        self.dev = true;
        self
    }
    /// Sets `socket.mode`.
    #[must_use]
    pub fn socket_mode(mut self, mode: &str) -> Self {
        mode.clone_into(&mut self.socket_mode);
        self
    }
    /// Sets `socket.group`.
    #[must_use]
    pub fn socket_group(mut self, group: &str) -> Self {
        self.socket_group = Some(group.into());
        self
    }
    /// Sets `access.users` (replacing the default: the test's own uid).
    #[must_use]
    pub fn users(mut self, users: &[&str]) -> Self {
        self.users = users.iter().map(ToString::to_string).collect();
        self
    }
    /// Sets `access.groups`.
    #[must_use]
    pub fn groups(mut self, groups: &[&str]) -> Self {
        self.groups = groups.iter().map(ToString::to_string).collect();
        self
    }
    /// Sets `access.allow_root`.
    #[must_use]
    pub fn allow_root(mut self, allow: bool) -> Self {
        self.allow_root = allow;
        self
    }
    /// Sets `limits.KEY = VALUE` (VALUE is a TOML literal, e.g. `3` or `"1s"`).
    #[must_use]
    pub fn limit(mut self, key: &str, value: &str) -> Self {
        self.limits.push((key.into(), value.into()));
        self
    }
    /// Sets `memory.require_lock`.
    #[must_use]
    pub fn require_lock(mut self, require: bool) -> Self {
        self.require_lock = require;
        self
    }
    /// Sets `unlock.KEY = VALUE` (VALUE is a TOML literal).
    #[must_use]
    pub fn unlock(mut self, key: &str, value: &str) -> Self {
        self.unlock.push((key.into(), value.into()));
        self
    }
    /// Sets `keys.KEY = VALUE` (VALUE is a TOML literal).
    #[must_use]
    pub fn keys(mut self, key: &str, value: &str) -> Self {
        self.keys.push((key.into(), value.into()));
        self
    }
    /// Appends raw TOML (whole sections) to the config.
    #[must_use]
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }
    /// Uses `policy` (TOML) as the daemon's policy file, `$DIR/policy.toml`.
    #[must_use]
    pub fn policy(mut self, policy: &str) -> Self {
        self.policy = Some(policy.into());
        self
    }
    /// Adds an environment variable for the daemon.
    #[must_use]
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Writes the config into a fresh temp dir and returns the dir and paths,
    /// without starting anything.
    pub fn prepare(&self) -> Prepared {
        let mut builder = tempfile::Builder::new();
        builder.prefix("hsmd-test-");
        let dir = match &self.base {
            Some(base) => builder.tempdir_in(base),
            None => builder.tempdir(),
        }
        .expect("tempdir");
        // Other uids (the `nobody` tests) must be able to reach the socket.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
        let socket = dir.path().join("hsmd.sock");
        let config = dir.path().join("hsmd.toml");
        let list = |v: &[String]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
        let mut text = format!(
            "state_dir = {:?}\n\n[socket]\npath = {:?}\nmode = {:?}\n\n[access]\nallow_root = {}\nusers = [{}]\ngroups = [{}]\n\n[log]\nlevel = \"debug\"\n\n[memory]\nrequire_lock = {}\n\n[limits]\n",
            dir.path().join("state"),
            socket,
            self.socket_mode,
            self.allow_root,
            list(&self.users),
            list(&self.groups),
            self.require_lock,
        );
        if let Some(group) = &self.socket_group {
            text = text.replacen("[access]", &format!("group = {group:?}\n\n[access]"), 1);
        }
        for (k, v) in &self.limits {
            text.push_str(&format!("{k} = {v}\n"));
        }
        // OWASP's floor keeps test unlocks fast; the default cost is covered by
        // the keystore's unit tests.
        text.push_str("\n[unlock]\nargon2_memory_kib = 19456\nargon2_iterations = 2\n");
        for (k, v) in &self.unlock {
            text.push_str(&format!("{k} = {v}\n"));
        }
        text.push_str("\n[keys]\n");
        for (k, v) in &self.keys {
            text.push_str(&format!("{k} = {v}\n"));
        }
        text.push('\n');
        text.push_str(&self.extra.replace("$DIR", &dir.path().display().to_string()));
        if let Some(policy) = &self.policy {
            let path = dir.path().join("policy.toml");
            fs::write(&path, policy).expect("write policy");
            text.push_str(&format!("\n[policy]\npath = {path:?}\n"));
        }
        fs::write(&config, text).expect("write config");
        Prepared {
            dir,
            socket,
            config,
            builder: self.clone(),
        }
    }

    /// Starts the daemon and waits until it answers.
    pub fn start(&self) -> Daemon {
        self.prepare().start()
    }
}

/// A temp dir with a config, ready to start a daemon in.
#[derive(Debug)]
pub struct Prepared {
    /// The temp dir (removed on drop).
    pub dir: TempDir,
    /// The configured socket path.
    pub socket: PathBuf,
    /// The config file.
    pub config: PathBuf,
    builder: DaemonBuilder,
}

impl Prepared {
    /// The `hsmd` command this daemon would run, for tests that wrap it.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(bin("hsmd"));
        cmd.arg("--config").arg(&self.config);
        if self.builder.dev {
            // --dev keeps its state in a scratch dir unless told where.
            cmd.arg("--dev").arg("--socket").arg(&self.socket);
            cmd.arg("--state-dir").arg(self.dir.path().join("state"));
        }
        cmd.env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        cmd.env_remove("HSMD_LOG");
        // After the removals: a test may set HSMD_LOG itself.
        for (k, v) in &self.builder.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts `hsmd` here and waits until it answers a hello.
    pub fn start(self) -> Daemon {
        let mut cmd = self.command();
        let socket = self.socket.clone();
        self.spawn(&mut cmd, &socket)
    }

    /// Spawns `cmd` (an hsmd, possibly wrapped) whose socket will be `socket`.
    pub fn spawn(self, cmd: &mut Command, socket: &Path) -> Daemon {
        let log_path = self.dir.path().join("hsmd.log");
        let log = fs::File::create(&log_path).expect("create log");
        self.spawn_with_stderr(cmd, socket, log.into())
    }

    /// Starts `hsmd` here with its stderr going to `stderr` (then
    /// [`Daemon::log`] reads nothing) and waits until it answers.
    pub fn start_with_stderr(self, stderr: Stdio) -> Daemon {
        let mut cmd = self.command();
        let socket = self.socket.clone();
        self.spawn_with_stderr(&mut cmd, &socket, stderr)
    }

    fn spawn_with_stderr(self, cmd: &mut Command, socket: &Path, stderr: Stdio) -> Daemon {
        let log_path = self.dir.path().join("hsmd.log");
        if !log_path.exists() {
            fs::File::create(&log_path).expect("create log");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn hsmd");
        let mut daemon = Daemon {
            child,
            socket: socket.to_owned(),
            log_path,
            prepared: self,
        };
        daemon.wait_ready();
        daemon
    }
}

/// A running `hsmd`; killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// Where it listens.
    pub socket: PathBuf,
    log_path: PathBuf,
    prepared: Prepared,
}

impl Daemon {
    /// Starts a daemon with the default test config.
    pub fn start() -> Self {
        DaemonBuilder::default().start()
    }

    /// A builder for a daemon with other settings.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("hsmd exited during start-up ({status}); log:\n{}", self.log());
            }
            if self.socket.exists() && Client::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hsmd did not answer within 20 s; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The test's temp dir.
    pub fn dir(&self) -> &Path {
        self.prepared.dir.path()
    }

    /// A connected client (hello done).
    pub fn client(&self) -> Client {
        Client::connect_with(
            &self.socket,
            &ClientOptions {
                client_name: "hsmd-tests".into(),
                timeout: Some(Duration::from_secs(20)),
            },
        )
        .expect("connect to hsmd")
    }

    /// Runs `hsmctl --socket SOCKET ARGS…`.
    pub fn hsmctl(&self, args: &[&str]) -> Output {
        Command::new(bin("hsmctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("HSMD_SOCKET")
            .output()
            .expect("run hsmctl")
    }

    /// Stops the daemon if it runs (SIGTERM, or SIGKILL when `hard`) and starts
    /// it again on the same config, state and socket.
    pub fn restart(&mut self, hard: bool) {
        if self.is_running() {
            self.signal(if hard { Signal::SIGKILL } else { Signal::SIGTERM });
            let status = self.wait_exit(Duration::from_secs(15));
            assert!(hard || status.success(), "hsmd exited {status}; log:\n{}", self.log());
        }
        let log = fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .expect("open log");
        self.child = self
            .prepared
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("respawn hsmd");
        self.wait_ready();
    }

    /// Runs `hsmctl` with `stdin` fed to it.
    pub fn hsmctl_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(bin("hsmctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("HSMD_SOCKET")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run hsmctl");
        child.stdin.take().expect("stdin").write_all(stdin).expect("feed stdin");
        child.wait_with_output().expect("hsmctl output")
    }

    /// Everything the daemon has logged so far. hsmd writes its log from a
    /// thread of its own, a moment after the event: this waits until the
    /// file has stopped growing (30 ms without change, at most 1 s).
    pub fn log(&self) -> String {
        let size = || fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut last = size();
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(30));
            let now = size();
            if now == last {
                break;
            }
            last = now;
        }
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends a signal.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("kill");
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "hsmd did not exit within {limit:?}; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid of hsmd's PKCS#11 helper (a child running `--pkcs11-helper`),
    /// if one runs.
    pub fn pkcs11_helper_pid(&self) -> Option<i32> {
        // Any of hsmd's threads may have spawned it: look at each one's children.
        let tasks = fs::read_dir(format!("/proc/{}/task", self.pid())).ok()?;
        tasks
            .filter_map(|t| fs::read_to_string(t.ok()?.path().join("children")).ok())
            .flat_map(|c| {
                c.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .find(|p| {
                fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("--pkcs11-helper"))
            })
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// A `kB` field of the daemon's `/proc/PID/status` (`VmRSS`, `VmHWM`,
    /// `VmPeak`, `VmLck`, …), in KiB.
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// The daemon's peak resident set (VmHWM), KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM")
    }

    /// The daemon's resident set now (VmRSS), KiB.
    pub fn vm_rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS")
    }

    /// Peak virtual memory of the daemon (VmPeak), in KiB.
    pub fn vm_peak_kib(&self) -> u64 {
        self.proc_status_kib("VmPeak")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw socket connection for speaking (mis)formed bytes to the daemon.
#[derive(Debug)]
pub struct Raw(pub UnixStream);

impl Raw {
    /// Connects without saying hello.
    pub fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        Self(s)
    }

    /// Writes bytes as they are.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_all(bytes)
    }

    /// Writes one frame around `body`.
    pub fn write_frame(&mut self, body: &[u8]) {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        self.write(&f).expect("write frame");
    }

    /// Sends a correct hello and checks the answer.
    pub fn hello(&mut self) {
        let body = codec::encode_body(&protocol::Request {
            id: 1,
            op: protocol::Operation::Hello(protocol::ClientHello {
                protocol_version: protocol::PROTOCOL_VERSION,
                client: "raw".into(),
            }),
        })
        .expect("encode");
        self.write_frame(&body);
        let r = self.read_response().expect("hello answer");
        assert!(r.result.is_ok(), "hello refused: {r:?}");
    }

    /// Reads one response frame; `None` at end of stream.
    pub fn read_response(&mut self) -> Option<Response> {
        let mut header = [0u8; HEADER_LEN];
        if self.0.read_exact(&mut header).is_err() {
            return None;
        }
        let len = u32::from_be_bytes(header) as usize;
        assert!(len <= 1 << 20, "daemon sent a {len}-byte frame");
        let mut body = vec![0; len];
        self.0.read_exact(&mut body).expect("whole response body");
        Some(codec::decode_body(&body).expect("daemon sent a malformed response"))
    }

    /// Whether the daemon has closed the connection (reads end of stream).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

/// The error code of a response, or a panic naming what came instead.
pub fn error_code(r: &Response) -> protocol::ErrorCode {
    match &r.result {
        Err(e) => e.code,
        Ok(reply) => panic!("expected an error, got {reply:?}"),
    }
}

/// Whether the tests run as root (needed to act as another uid).
pub fn is_root() -> bool {
    nix::unistd::getuid().is_root()
}

/// `program` run as `uid` (its own gid, no supplementary groups) with
/// util-linux's `setpriv`: how the root-only tests act as other users.
pub fn as_uid(uid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let id = uid.to_string();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", &id, "--regid", &id, "--clear-groups", "--"])
        .arg(program);
    cmd
}

/// For the tests marked `#[ignore = "needs root…"]`, which `scripts/test`
/// runs as root with `--include-ignored`: run any other way they fail, naming
/// why, instead of passing without having run.
pub fn require_root(why: &str) {
    assert!(
        is_root(),
        "this test needs root ({why}); run it as root, as scripts/test does"
    );
}

/// A backend's health as `hsmctl --json status` reports it: (healthy, detail).
pub fn backend_health(d: &Daemon, name: &str) -> (bool, String) {
    let out = d.hsmctl(&["--json", "status"]);
    // 0 unlocked, 2 locked or uninitialized: either way it answered.
    assert!(matches!(out.status.code(), Some(0 | 2)), "hsmctl status: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    let b = v["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in status: {v}"))
        .clone();
    (
        b["healthy"] == true,
        b["detail"].as_str().unwrap_or_default().to_owned(),
    )
}
