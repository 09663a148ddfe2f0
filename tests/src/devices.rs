//! Devices the tests start of their own: SoftHSM2 tokens and swtpm TPMs.

use super::*;

/// The PKCS#11 module of Debian's `softhsm2` package.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 token of its own in a temp dir (its config, its token
/// directory, its PIN file), for one test.
#[derive(Debug)]
pub struct SoftHsm {
    dir: tempfile::TempDir,
    /// The token's label.
    pub label: String,
    /// The user PIN.
    pub pin: String,
}

impl SoftHsm {
    /// Initializes a fresh token labelled `label`. Panics, naming the fix, if
    /// SoftHSM2 is not installed (`scripts/install-test-deps` installs it).
    pub fn new(label: &str) -> Self {
        assert!(
            Path::new(SOFTHSM_MODULE).exists(),
            "{SOFTHSM_MODULE} is missing: install softhsm2 (scripts/install-test-deps)"
        );
        let dir = tempfile::Builder::new().prefix("softhsm-").tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("tokens")).expect("mkdir tokens");
        fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .expect("softhsm2.conf");
        let me = Self {
            dir,
            label: label.to_owned(),
            pin: "246813579".to_owned(),
        };
        let out = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                "13572468",
                "--pin",
                &me.pin,
            ])
            .env("SOFTHSM2_CONF", me.conf())
            .output()
            .expect("run softhsm2-util");
        assert!(out.status.success(), "softhsm2-util: {out:?}");
        let pin = me.dir.path().join("pin");
        fs::write(&pin, format!("{}\n", me.pin)).expect("pin file");
        fs::set_permissions(&pin, fs::Permissions::from_mode(0o600)).expect("chmod pin");
        me
    }

    /// The `SOFTHSM2_CONF` file.
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    /// Where the token's files live.
    pub fn token_dir(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    /// The `[backends.pkcs11]` section for this token, with `more` lines added.
    pub fn config(&self, more: &str) -> String {
        format!(
            "[backends.pkcs11]\nmodule = {SOFTHSM_MODULE:?}\ntoken_label = {:?}\npin_file = {:?}\n{more}\n",
            self.label,
            self.dir.path().join("pin")
        )
    }

    /// A daemon builder that uses this token.
    pub fn daemon(&self, more: &str) -> DaemonBuilder {
        Daemon::builder()
            .env("SOFTHSM2_CONF", &self.conf().display().to_string())
            .extra(&self.config(more))
    }

    /// Runs `pkcs11-tool` (OpenSC) logged in to this token.
    pub fn pkcs11_tool(&self, args: &[&str]) -> Output {
        Command::new("pkcs11-tool")
            .args([
                "--module",
                SOFTHSM_MODULE,
                "--token-label",
                &self.label,
                "--login",
                "--pin",
                &self.pin,
            ])
            .args(args)
            .env("SOFTHSM2_CONF", self.conf())
            .output()
            .expect("run pkcs11-tool (Debian opensc)")
    }
}

/// A software TPM (`swtpm`, Debian `swtpm`) of its own: state in a temp dir,
/// listening on two free loopback ports; stopped on drop.
#[derive(Debug)]
pub struct Swtpm {
    dir: TempDir,
    /// The TPM command port; the control port is the next one.
    pub port: u16,
    child: Option<Child>,
}

impl Swtpm {
    /// Starts a fresh TPM. Panics, naming the fix, if swtpm is not installed.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("swtpm-").tempdir().expect("tempdir");
        let mut me = Self {
            dir,
            port: 0,
            child: None,
        };
        me.launch(None);
        me
    }

    /// Starts swtpm on `port` (and the next one), or on free ports.
    fn launch(&mut self, port: Option<u16>) {
        for _ in 0..20 {
            let port = port.unwrap_or_else(free_port_pair);
            let child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--server"])
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--tpmstate")
                .arg(format!("dir={}", self.dir.path().display()))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run swtpm (Debian swtpm; scripts/install-test-deps)");
            self.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    self.port = port;
                    return;
                }
                if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                    // The port was taken: try another, or the same again
                    // once the old one's socket is gone.
                    thread::sleep(Duration::from_millis(100));
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            self.stop();
        }
        panic!("swtpm did not start");
    }

    /// The TCTI string for hsmd and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Stops the TPM (its state stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same state (a TPM reset: a reboot).
    pub fn restart(&mut self) {
        self.stop();
        self.launch(None);
    }

    /// Starts it again on the same state and the same ports, so a daemon
    /// configured with [`Swtpm::tcti`] finds it again.
    pub fn resume(&mut self) {
        self.stop();
        self.launch(Some(self.port));
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A small tmpfs mounted over a directory (root only), to fill to the last
/// byte; unmounted on drop.
#[derive(Debug)]
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `24m`) at `at`.
    pub fn mount(at: &Path, size: &str) -> Self {
        fs::create_dir_all(at).expect("mkdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(at)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount tmpfs: {out:?}");
        Self(at.to_owned())
    }

    /// Fills it to the last byte; returns the filler's path.
    pub fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let mut f = fs::File::create(&filler).expect("filler");
        let block = vec![0x5au8; 64 * 1024];
        loop {
            match f.write(&block) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = f.write(&[0u8; 1]);
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// Two consecutive free TCP ports on loopback (the OS picks the first).
fn free_port_pair() -> u16 {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = a.local_addr().expect("addr").port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}
