//! Where hsmctl writes: never through a symbolic link, a FIFO, a socket or a
//! device, never over another user's file; a new file and `-o -` work.

use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, net::UnixListener},
    path::Path,
    process::Output,
};

use hsmd_tests::Daemon;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn ok(out: &Output) -> Vec<u8> {
    assert!(out.status.success(), "hsmctl failed: {out:?}");
    out.stdout.clone()
}

fn refused(out: &Output, path: &Path, why: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "not refused: {out:?}");
    assert!(
        err.contains(&path.display().to_string()) && err.contains(why),
        "the refusal names {} and {why:?}: {err}",
        path.display()
    );
}

/// The two commands that write plaintext to `-o`: `file retrieve` and `decrypt`.
struct Writers {
    d: Daemon,
    token: String,
    sealed: std::path::PathBuf,
}

const SECRET: &[u8] = b"the plaintext nobody else may see\n";

impl Writers {
    fn new() -> Self {
        let d = Daemon::builder().dev().start();
        // The file store's default wrapping key.
        ok(&d.hsmctl(&["key", "create", "files", "--type", "aes256-gcm"]));
        let plain = d.dir().join("plain");
        fs::write(&plain, SECRET).expect("write");
        let out = String::from_utf8_lossy(&ok(&d.hsmctl(&["file", "store", p(&plain)]))).into_owned();
        let token = out
            .lines()
            .find_map(|l| l.strip_prefix("Token: "))
            .expect("a Token: line")
            .trim()
            .to_owned();
        ok(&d.hsmctl(&["key", "create", "box", "--type", "aes256-gcm"]));
        let sealed = d.dir().join("sealed");
        ok(&d.hsmctl(&["encrypt", "box", "-i", p(&plain), "-o", p(&sealed)]));
        Self { d, token, sealed }
    }

    /// Runs each writer to `target`, with `--force` (one after the other to
    /// the same path; the refusals tested here hold even so).
    fn each(&self, target: &str) -> [(&'static str, Output); 2] {
        [
            (
                "file retrieve",
                self.d
                    .hsmctl(&["file", "retrieve", &self.token, "-o", target, "--force"]),
            ),
            (
                "decrypt",
                self.d
                    .hsmctl(&["decrypt", "box", "-i", p(&self.sealed), "-o", target, "--force"]),
            ),
        ]
    }
}

#[test]
fn links_fifos_sockets_and_devices_are_refused_and_new_files_and_stdout_work() {
    let w = Writers::new();
    let dir = w.d.dir().join("out");
    fs::create_dir(&dir).expect("mkdir");

    // A link to a file of ours: not followed, the file unchanged.
    let victim = w.d.dir().join("victim.conf");
    fs::write(&victim, "setting = 1\n").expect("write");
    let link = dir.join("link");
    std::os::unix::fs::symlink(&victim, &link).expect("symlink");
    // A FIFO: writing through it would hand the plaintext to its reader.
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).expect("mkfifo");
    let socket = dir.join("sock");
    let _listening = UnixListener::bind(&socket).expect("bind");
    for (target, why) in [
        (link.as_path(), "symbolic link"),
        (&fifo, "FIFO"),
        (&socket, "a socket"),
        (Path::new("/dev/zero"), "character device"),
        (&dir, "directory"),
    ] {
        for (cmd, out) in w.each(p(target)) {
            println!(
                "{cmd} -o {}: {}",
                target.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            refused(&out, target, why);
        }
    }
    assert_eq!(fs::read(&victim).expect("victim"), b"setting = 1\n");
    assert!(fs::symlink_metadata(&link).expect("link").file_type().is_symlink());

    // What does work: a new file, replacing one's own file, stdout, /dev/null.
    for (i, (cmd, out)) in w.each(p(&dir.join("new"))).into_iter().enumerate() {
        ok(&out);
        assert_eq!(
            fs::read(dir.join("new")).expect("new file"),
            SECRET,
            "{cmd} (round {i})"
        );
        assert_eq!(
            fs::metadata(dir.join("new")).expect("stat").permissions().mode() & 0o077,
            0,
            "{cmd}: the output is private"
        );
    }
    for target in ["-", "/dev/stdout"] {
        for (cmd, out) in w.each(target) {
            assert_eq!(ok(&out), SECRET, "{cmd} -o {target}");
        }
    }
    for (_, out) in w.each("/dev/null") {
        ok(&out);
    }
    assert!(!fs::metadata("/dev/null").expect("stat").is_file());
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n.to_string_lossy().starts_with(".hsmctl-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn root_does_not_follow_another_users_link_or_replace_their_file() {
    hsmd_tests::require_root("writing as root into another user's directory");
    let w = Writers::new();
    // Alice (uid 4001) owns a directory and plants things in it.
    let alice = 4001;
    let dir = w.d.dir().join("alice");
    fs::create_dir(&dir).expect("mkdir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    let own = |path: &Path| {
        std::os::unix::fs::lchown(path, Some(alice), Some(alice)).expect("chown to alice");
    };
    own(&dir);
    // Stands for /etc/some.conf: root's file elsewhere.
    let victim = w.d.dir().join("some.conf");
    fs::write(&victim, "root's settings\n").expect("write");
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = dir.join("out");
    std::os::unix::fs::symlink(&victim, &out).expect("symlink");
    own(&out);
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).expect("mkfifo");
    own(&fifo);
    let hers = dir.join("hers");
    fs::write(&hers, "alice's notes\n").expect("write");
    own(&hers);

    for (cmd, result) in w.each(p(&out)) {
        println!("{cmd}: {}", String::from_utf8_lossy(&result.stderr).trim());
        refused(&result, &out, "symbolic link");
    }
    for (_, result) in w.each(p(&fifo)) {
        refused(&result, &fifo, "FIFO");
    }
    for (_, result) in w.each(p(&hers)) {
        refused(&result, &hers, "belongs to uid 4001");
    }
    assert_eq!(fs::read(&victim).expect("victim"), b"root's settings\n");
    assert_eq!(
        fs::metadata(&victim).expect("stat").permissions().mode() & 0o777,
        0o644,
        "the victim's mode changed"
    );
    assert_eq!(fs::read(&hers).expect("hers"), b"alice's notes\n");
    // A new file in her directory is root's own and works.
    for (cmd, result) in w.each(p(&dir.join("fresh"))) {
        ok(&result);
        assert_eq!(fs::read(dir.join("fresh")).expect("fresh"), SECRET, "{cmd}");
    }
}

#[test]
fn an_output_that_is_the_input_file_is_refused_and_the_input_kept() {
    let w = Writers::new();
    let d = &w.d;
    ok(&d.hsmctl(&["key", "create", "s", "--type", "ed25519"]));
    ok(&d.hsmctl(&["key", "create", "m", "--type", "hmac-sha256"]));
    let data = d.dir().join("app.bin");
    fs::write(&data, SECRET).expect("write");
    // The same file under another name is the same file.
    let alias = d.dir().join("alias.bin");
    fs::hard_link(&data, &alias).expect("hard link");
    for out in [&data, &alias] {
        for args in [
            vec!["encrypt", "box", "-i", p(&data), "-o", p(out)],
            vec!["sign", "s", "-i", p(&data), "-o", p(out)],
            vec!["mac", "m", "-i", p(&data), "-o", p(out)],
        ] {
            refused(&d.hsmctl(&args), out, "it is the input file too");
            assert_eq!(
                fs::read(&data).expect("read"),
                SECRET,
                "{args:?} left the input as it was"
            );
        }
    }
    let sealed = w.sealed.clone();
    refused(
        &d.hsmctl(&["decrypt", "box", "-i", p(&sealed), "-o", p(&sealed)]),
        &sealed,
        "it is the input file too",
    );
    refused(
        &d.hsmctl(&["rewrap", "box", "-i", p(&sealed), "-o", p(&sealed)]),
        &sealed,
        "it is the input file too",
    );
    // Another path is fine.
    ok(&d.hsmctl(&["encrypt", "box", "-i", p(&data), "-o", p(&d.dir().join("app.enc"))]));
}

#[test]
fn an_existing_output_is_replaced_only_with_force() {
    let d = Daemon::builder().dev().start();
    for (name, t) in [("s", "ed25519"), ("e", "aes256-gcm"), ("m", "hmac-sha256")] {
        let mut args = vec!["key", "create", name, "--type", t];
        if t == "aes256-gcm" {
            args.push("--allow-plaintext-datakey");
        }
        ok(&d.hsmctl(&args));
    }
    let dir = d.dir();
    let data = dir.join("data");
    fs::write(&data, b"the data").expect("write");
    let ct = dir.join("data.enc");
    ok(&d.hsmctl(&["encrypt", "e", "-i", p(&data), "-o", p(&ct)]));
    let stored = String::from_utf8(ok(&d.hsmctl(&["--json", "file", "store", p(&data), "--key", "e"]))).expect("utf-8");
    let token = serde_json::from_str::<serde_json::Value>(&stored).expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let existing = dir.join("existing");
    let new_enc = dir.join("new.enc");
    let cases: Vec<Vec<&str>> = vec![
        vec!["sign", "s", "-i", p(&data), "-o", p(&existing)],
        vec!["mac", "m", "-i", p(&data), "-o", p(&existing)],
        vec!["encrypt", "e", "-i", p(&data), "-o", p(&existing)],
        vec!["decrypt", "e", "-i", p(&ct), "-o", p(&existing)],
        vec!["rewrap", "e", "-i", p(&ct), "-o", p(&existing)],
        vec!["key", "public", "s", "-o", p(&existing)],
        vec!["datakey", "e", "-o", p(&existing)],
        vec!["datakey", "e", "-o", p(&new_enc), "--plaintext-out", p(&existing)],
        vec!["file", "retrieve", &token, "-o", p(&existing)],
        vec!["backup", "create", p(&existing)],
    ];
    for args in cases {
        fs::write(&existing, b"kept").expect("write");
        let out = d.hsmctl(&args);
        refused(&out, &existing, "it exists; add --force to replace it");
        assert_eq!(
            fs::read(&existing).expect("read"),
            b"kept",
            "{args:?} wrote over the file"
        );
        let _ = fs::remove_file(&new_enc);
        let mut forced = args.clone();
        forced.push("--force");
        ok(&d.hsmctl(&forced));
        assert_ne!(
            fs::read(&existing).expect("read"),
            b"kept",
            "{forced:?} did not replace the file"
        );
    }
}
