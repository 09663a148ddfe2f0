//! `hsmd --user`: an unprivileged user runs hsmd for themself, as ssh-agent
//! runs, with state and sockets in their XDG directories; it serves them and
//! no one else, root included.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use hsmd_tests::bin;
use hsmd_tests::check::ok;

const UID: u32 = 4011;

/// A command run as `UID` with the user's XDG environment under `base`.
fn as_user(base: &Path, program: &Path) -> Command {
    let mut cmd = hsmd_tests::as_uid(UID, program);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", base.join("home"))
        .env("XDG_RUNTIME_DIR", base.join("run"))
        .env("XDG_DATA_HOME", base.join("home/.local/share"))
        .env("XDG_CONFIG_HOME", base.join("home/.config"))
        .current_dir(base.join("home"));
    cmd
}

struct UserDaemon {
    child: Child,
}

impl Drop for UserDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run")
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn an_unprivileged_user_runs_hsmd_for_themself_and_ssh_add_lists_their_key() {
    hsmd_tests::require_root("acting as an unprivileged user");
    let base_dir = tempfile::Builder::new()
        .prefix("hsmd-user-")
        .tempdir()
        .expect("tempdir");
    let base = base_dir.path();
    fs::set_permissions(base, fs::Permissions::from_mode(0o755)).expect("chmod");
    // The user's home and runtime directory, theirs alone; the binaries where
    // they can run them.
    for dir in ["home", "run"] {
        fs::create_dir(base.join(dir)).expect("mkdir");
        nix::unistd::chown(&base.join(dir), Some(UID.into()), Some(UID.into())).expect("chown");
        fs::set_permissions(base.join(dir), fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    let (hsmd, hsmctl): (PathBuf, PathBuf) = (base.join("hsmd"), base.join("hsmctl"));
    for (from, to) in [(bin("hsmd"), &hsmd), (bin("hsmctl"), &hsmctl)] {
        fs::copy(from, to).expect("copy");
        fs::set_permissions(to, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let log = fs::File::create(base.join("hsmd.log")).expect("log");
    let daemon = UserDaemon {
        child: as_user(base, &hsmd)
            .arg("--user")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start hsmd --user"),
    };
    let socket = base.join("run/hsmd/hsmd.sock");
    let agent = base.join("run/hsmd/ssh-agent.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    // hsmctl finds the user's own daemon by XDG_RUNTIME_DIR, no --socket.
    while !matches!(run(as_user(base, &hsmctl).arg("status")).status.code(), Some(0 | 2)) {
        assert!(
            Instant::now() < deadline,
            "hsmd --user did not start: {}",
            fs::read_to_string(base.join("hsmd.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let _ = &daemon;

    ok(&run(as_user(base, &hsmctl).args([
        "init",
        "--keyfile-out",
        "unlock.key",
    ])));
    ok(&run(as_user(base, &hsmctl).args([
        "key", "create", "laptop", "--type", "ed25519", "--label", "ssh=yes",
    ])));
    let line = ok(&run(
        as_user(base, &hsmctl).args(["key", "public", "laptop", "--format", "openssh"])
    ));
    let listed = run(as_user(base, Path::new("/usr/bin/ssh-add"))
        .arg("-L")
        .env("SSH_AUTH_SOCK", &agent));
    assert_eq!(ok(&listed), line, "ssh-add -L through the user's agent socket");

    // Its state is in the user's XDG data directory, theirs; its sockets are
    // the user's alone.
    let keystore = base.join("home/.local/share/hsmd/keystore.sqlite");
    assert_eq!(fs::metadata(&keystore).expect("keystore").uid(), UID);
    for s in [&socket, &agent] {
        let meta = fs::metadata(s).expect("socket");
        assert_eq!((meta.uid(), meta.mode() & 0o777), (UID, 0o600), "{}", s.display());
    }

    // Anyone else is refused, root included (root gets past the file mode;
    // the daemon's own gate refuses it).
    let out = run(Command::new(bin("hsmctl")).arg("--socket").arg(&socket).arg("status"));
    assert!(!out.status.success(), "root was served by a user's hsmd: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission-denied"), "{err}");
    let out = run(Command::new("ssh-add").arg("-L").env("SSH_AUTH_SOCK", &agent));
    assert!(!out.status.success(), "root listed a user's keys: {out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hsmd:laptop"), "{out:?}");
    let other = run(hsmd_tests::as_uid(4012, "ssh-add")
        .arg("-L")
        .env("SSH_AUTH_SOCK", &agent));
    assert!(!other.status.success(), "another user listed the keys: {other:?}");
}
