//! The token file store (issue 6, must-shows 1–5): round trips at the chunk
//! boundaries and of 100 MiB, with the descriptor passed to hsmd and with the
//! bytes in frames; each kind of tampering with the stored chunks or header
//! fails retrieval naming the chunk and writes nothing; a store killed midway
//! leaves no token and its debris is cleaned at the next start; other uids,
//! traversal tokens and names, and planted symlinks are refused; passed
//! descriptors are checked and a stalled pipe times out; the progress bar
//! shows on a terminal only; a gibibyte goes through in bounded memory.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use hsmd_tests::check::{ok, p, refused};
use hsmd_tests::{bin, Daemon};
use protocol::{ErrorCode, Operation, Reply};

/// Both ways bytes travel: the descriptor passed to hsmd, and frames.
const VIAS: [&str; 2] = ["fd", "frames"];

fn token_of(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("Token: "))
        .expect("a Token: line")
        .trim()
        .to_owned()
}

fn random_bytes(n: usize, _seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).expect("random");
    v
}

/// `hsmctl file store -` with `args`, its stdin and stdout piped.
fn store_from_stdin(d: &Daemon, args: &[&str]) -> std::process::Child {
    Command::new(bin("hsmctl"))
        .args(["--socket", p(&d.socket), "file", "store", "-"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn hsmctl")
}

fn dev() -> Daemon {
    let d = Daemon::builder().dev().start();
    ok(&d.hsmctl(&["key", "create", "files", "--type", "aes256-gcm"]));
    d
}

#[test]
fn files_of_every_boundary_size_and_100_mib_come_back_identical_under_their_names() {
    let d = dev();
    let dir = d.dir().to_owned();
    let chunk = 64 * 1024;
    for via in VIAS {
        for (size, chunk_arg) in [
            (0, "64KiB"),
            (1, "64KiB"),
            (chunk, "64KiB"),
            (chunk + 1, "64KiB"),
            (100 << 20, "512KiB"),
        ] {
            let name = format!("data-{via}-{size}.bin");
            let src = dir.join(&name);
            let data = random_bytes(size, size as u64 + 7);
            fs::write(&src, &data).expect("write");
            let stored = d.hsmctl(&["file", "store", p(&src), "--chunk-size", chunk_arg, "--via", via]);
            let token = token_of(&ok(&stored));
            assert!(stored.stderr.is_empty(), "no progress bar off a terminal: {stored:?}");
            let out = dir.join(format!("out-{via}-{size}"));
            fs::create_dir(&out).expect("mkdir");
            ok(&d.hsmctl(&["file", "retrieve", "--force", &token, p(&out), "--via", via]));
            let back = fs::read(out.join(&name)).expect("restored under its original name");
            assert!(back == data, "{via}, size {size}: bytes differ");
            let info: serde_json::Value =
                serde_json::from_str(&ok(&d.hsmctl(&["--json", "file", "info", &token]))).expect("json");
            assert_eq!(info["size"], size);
            assert_eq!(info["name"], name.as_str());
            // The checksum is the BLAKE3 hash of the file, as b3sum prints it.
            assert_eq!(
                info["checksum"],
                blake3::hash(&data).to_hex().as_str(),
                "{via}, size {size}"
            );
            fs::remove_file(&src).expect("rm");
        }
    }
    let one = dir.join("one");
    fs::write(&one, b"1").expect("write");
    // A chunk that cannot fit a frame is refused before anything is stored
    // when chunks travel in frames; a passed descriptor has no such limit.
    let err = refused(
        &d.hsmctl(&["file", "store", p(&one), "--chunk-size", "1MiB", "--via", "frames"]),
        "invalid-argument",
    );
    assert!(err.contains("frame limit"), "{err}");
    ok(&d.hsmctl(&["file", "store", p(&one), "--chunk-size", "8MiB"]));
    for bad in ["5000", "2KiB", "16MiB"] {
        let err = refused(
            &d.hsmctl(&["file", "store", p(&one), "--chunk-size", bad]),
            "invalid-argument",
        );
        assert!(err.contains("power of two"), "{bad}: {err}");
    }

    // stdin in, stdout out, both ways.
    for via in VIAS {
        let mut child = store_from_stdin(&d, &["--name", "piped.txt", "--via", via]);
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"through a pipe")
            .expect("write");
        let token = token_of(&String::from_utf8_lossy(
            &child.wait_with_output().expect("wait").stdout,
        ));
        let out = ok(&d.hsmctl(&["file", "retrieve", "--force", &token, "-o", "-", "--via", via]));
        assert_eq!(out, "through a pipe");
        let list = ok(&d.hsmctl(&["file", "list"]));
        assert!(list.contains("piped.txt") && list.contains(&token), "{list}");
        // Into a device, which must stay the device.
        ok(&d.hsmctl(&["file", "retrieve", "--force", &token, "-o", "/dev/null", "--via", via]));
        assert!(
            !fs::metadata("/dev/null").expect("stat").is_file(),
            "/dev/null was replaced"
        );
    }
}

/// A stored file's sealed chunks as (length-prefixed) records of its one segment.
fn records(seg: &Path) -> Vec<Vec<u8>> {
    let bytes = fs::read(seg).expect("segment");
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4")) as usize;
        out.push(bytes[at + 4..at + 4 + len].to_vec());
        at += 4 + len;
    }
    out
}

fn write_records(seg: &Path, recs: &[Vec<u8>]) {
    let mut bytes = Vec::new();
    for r in recs {
        bytes.extend_from_slice(&(r.len() as u32).to_be_bytes());
        bytes.extend_from_slice(r);
    }
    fs::write(seg, bytes).expect("write segment");
}

#[test]
fn every_kind_of_tampering_fails_retrieval_naming_the_chunk_and_writes_nothing() {
    let d = dev();
    let dir = d.dir().to_owned();
    let src = dir.join("five.bin");
    fs::write(&src, random_bytes(4 * 4096 + 100, 3)).expect("write");
    let store = |path: &Path| token_of(&ok(&d.hsmctl(&["file", "store", p(path), "--chunk-size", "4KiB"])));
    let token = store(&src);
    let other = store(&src);
    let files = dir.join("state/files");
    let seg = files.join(&token).join("seg-000000");
    let header = files.join(&token).join("header.json");
    let original = records(&seg);
    let original_header = fs::read(&header).expect("header");
    assert_eq!(original.len(), 5);
    let theirs = records(&files.join(&other).join("seg-000000"));

    // (what, the segment's records, a replacement header, what the error says)
    type Case<'a> = (&'a str, Vec<Vec<u8>>, Option<Vec<u8>>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "a flipped bit",
            {
                let mut r = original.clone();
                r[2][50] ^= 0x04;
                r
            },
            None,
            "chunk 2 of 5 does not authenticate",
        ),
        (
            "two chunks swapped",
            {
                let mut r = original.clone();
                r.swap(1, 3);
                r
            },
            None,
            "chunk 1 of 5 does not authenticate",
        ),
        (
            "the last chunk dropped",
            original[..4].to_vec(),
            None,
            "ends after chunk 3 of 5",
        ),
        (
            "a chunk duplicated",
            {
                let mut r = original.clone();
                r.insert(2, original[1].clone());
                r
            },
            None,
            "chunk 2 of 5 does not authenticate",
        ),
        (
            "a chunk added at the end",
            {
                let mut r = original.clone();
                r.push(original[4].clone());
                r
            },
            None,
            "chunk 5 is beyond the 5 chunks",
        ),
        (
            "a chunk from another file",
            {
                let mut r = original.clone();
                r[3] = theirs[3].clone();
                r
            },
            None,
            "chunk 3 of 5 does not authenticate",
        ),
        (
            "the header edited",
            original.clone(),
            Some(
                String::from_utf8(original_header.clone())
                    .expect("utf-8")
                    .replace("five.bin", "fivE.bin")
                    .into_bytes(),
            ),
            "chunk 0 of 5 does not authenticate",
        ),
    ];
    for (what, recs, new_header, says) in cases {
        write_records(&seg, &recs);
        if let Some(h) = &new_header {
            fs::write(&header, h).expect("write header");
        }
        for via in VIAS {
            let out_path = dir.join("restored.bin");
            let err = refused(
                &d.hsmctl(&["file", "retrieve", "--force", &token, "-o", p(&out_path), "--via", via]),
                "decrypt-failed",
            );
            assert!(err.contains(says) && err.contains(&token), "{what}, {via}: {err}");
            assert!(!out_path.exists(), "{what}, {via}: an output file was written");
            let leftovers: Vec<_> = fs::read_dir(&dir)
                .expect("dir")
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
                .collect();
            assert!(
                leftovers.is_empty(),
                "{what}, {via}: temporary output left: {leftovers:?}"
            );
        }
        // To stdout, where nothing can be taken back: the descriptor path holds
        // the batch with the last chunk (here, all five) until every check passed.
        let out = d.hsmctl(&["file", "retrieve", "--force", &token, "-o", "-"]);
        refused(&out, "decrypt-failed");
        assert!(
            out.stdout.is_empty(),
            "{what}: {} bytes reached stdout",
            out.stdout.len()
        );
        write_records(&seg, &original);
        fs::write(&header, &original_header).expect("restore header");
    }
    // Untouched, it retrieves.
    ok(&d.hsmctl(&["file", "retrieve", "--force", &token, "-o", p(&dir.join("fine.bin"))]));
    assert_eq!(
        fs::read(dir.join("fine.bin")).expect("read"),
        fs::read(&src).expect("read")
    );
}

#[test]
fn a_store_killed_midway_leaves_no_token_and_its_debris_is_cleaned_at_start() {
    let mut d = Daemon::start();
    let keyfile = d.dir().join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", p(&keyfile)]));
    ok(&d.hsmctl(&["key", "create", "files", "--type", "aes256-gcm"]));
    let mut child = store_from_stdin(&d, &["--name", "partial.bin", "--chunk-size", "4KiB"]);
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&random_bytes(64 * 1024, 9)).expect("write");
    stdin.flush().expect("flush");
    // Wait until hsmd has begun writing this file.
    let files = d.dir().join("state/files");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !fs::read_dir(&files)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with(".incoming-"))
        })
        .unwrap_or(false)
    {
        assert!(std::time::Instant::now() < deadline, "no store began: {}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    d.restart(true);
    drop(stdin);
    let _ = child.wait();
    assert!(
        d.log().contains("removed what interrupted file stores left behind"),
        "{}",
        d.log()
    );
    let left: Vec<_> = fs::read_dir(&files)
        .expect("files dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "debris left: {left:?}");
    ok(&d.hsmctl(&["unlock", "--keyfile", p(&keyfile)]));
    assert_eq!(ok(&d.hsmctl(&["--json", "file", "list"])).trim(), "[]");
}

#[test]
fn tokens_names_and_symlinks_cannot_reach_outside_the_store() {
    let d = dev();
    let dir = d.dir().to_owned();
    for token in [
        "../../etc/passwd",
        "..",
        "0f8fad5b-d9cb-469f-a165-70867728950e/../x",
        "/etc",
    ] {
        refused(
            &d.hsmctl(&["file", "retrieve", "--force", token, "-o", p(&dir.join("x"))]),
            "invalid-argument",
        );
        refused(&d.hsmctl(&["file", "delete", token, "--yes"]), "invalid-argument");
    }
    let src = dir.join("a");
    fs::write(&src, b"a").expect("write");
    for name in ["../evil", "a/b", "..", "."] {
        let err = refused(
            &d.hsmctl(&["file", "store", p(&src), "--name", name]),
            "invalid-argument",
        );
        assert!(err.contains("not a file name hsmd keeps"), "{err}");
    }
    // A symlink planted where a token would be is not followed.
    let planted = "0f8fad5b-d9cb-469f-a165-70867728950e";
    std::os::unix::fs::symlink(&dir, dir.join("state/files").join(planted)).expect("symlink");
    let err = refused(&d.hsmctl(&["file", "info", planted]), "tampered");
    assert!(err.contains("not a directory"), "{err}");
    refused(&d.hsmctl(&["file", "delete", planted, "--yes"]), "tampered");
    assert!(dir.join("a").exists(), "nothing outside the store was touched");
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn another_uid_can_neither_retrieve_nor_delete_a_file() {
    hsmd_tests::require_root("acting as another uid");
    let d = Daemon::builder()
        .socket_mode("0666")
        .users(&["4002", "4005"])
        .policy(
            "[roles.fetcher]\npermissions = [ { resource = \"files\", action = \"store\" }, \
         { resource = \"files\", action = \"retrieve\" }, \
         { resource = \"keys\", action = \"encrypt\", keys = \"files\" } ]\n\
         [[bind]]\nusers = [\"4002\"]\nroles = [\"operator\"]\n[[bind]]\nusers = [\"4005\"]\nroles = [\"fetcher\"]\n\
         [[bind]]\nusers = [\"0\"]\nroles = [\"admin\"]\n",
        )
        .start();
    ok(&d.hsmctl(&["init", "--keyfile-out", p(&d.dir().join("k"))]));
    ok(&d.hsmctl(&["key", "create", "files", "--type", "aes256-gcm"]));
    let src = d.dir().join("secret.txt");
    fs::write(&src, b"root's").expect("write");
    let token = token_of(&ok(&d.hsmctl(&["file", "store", p(&src)])));
    let hsmctl: PathBuf = d.dir().join("hsmctl");
    fs::copy(bin("hsmctl"), &hsmctl).expect("copy");
    fs::set_permissions(&hsmctl, fs::Permissions::from_mode(0o755)).expect("chmod");
    let as_uid = |uid: u32, args: &[&str]| {
        hsmd_tests::as_uid(uid, &hsmctl)
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .current_dir("/tmp")
            .output()
            .expect("setpriv")
    };
    let as_4002 = |args: &[&str]| as_uid(4002, args);
    // Answered exactly as a token that does not exist: nothing says the
    // file is there, or whose it is.
    let unknown = "0f8fad5b-d9cb-469f-a165-70867728950e";
    for args in [
        vec!["file", "retrieve", "TOKEN", "-o", "-"],
        vec!["file", "delete", "TOKEN", "--yes"],
        vec!["file", "info", "TOKEN"],
    ] {
        let with = |t: &str| -> Vec<String> {
            args.iter()
                .map(|a| if *a == "TOKEN" { t.to_owned() } else { (*a).to_owned() })
                .collect()
        };
        let theirs = with(&token);
        let err = refused(
            &as_4002(&theirs.iter().map(String::as_str).collect::<Vec<_>>()),
            "not-found",
        );
        let none = with(unknown);
        let err_none = refused(
            &as_4002(&none.iter().map(String::as_str).collect::<Vec<_>>()),
            "not-found",
        );
        assert_eq!(err.replace(&token, "T"), err_none.replace(unknown, "T"), "{args:?}");
        assert!(!err.contains("uid 0"), "{err}");
    }
    assert_eq!(
        ok(&as_4002(&["--json", "file", "list"])).trim(),
        "[]",
        "others' files are not listed"
    );
    // 4002's own file is 4002's.
    let theirs = token_of(&ok(&as_4002(&["file", "store", "-", "--name", "mine"])));
    ok(&as_4002(&["file", "delete", &theirs, "--yes"]));
    // A role that may store and retrieve but not read metadata
    // (files:info) still retrieves its own file to -o.
    let fetched = token_of(&ok(&as_uid(4005, &["file", "store", "-", "--name", "f"])));
    refused(&as_uid(4005, &["file", "info", &fetched]), "permission-denied");
    assert_eq!(
        ok(&as_uid(4005, &["file", "retrieve", "--force", &fetched, "-o", "-"])),
        ""
    );
    // The owner (an admin here) still can.
    ok(&d.hsmctl(&["file", "delete", &token, "--yes"]));
}

#[test]
fn storing_and_retrieving_a_gibibyte_keeps_the_daemon_under_64_mib_resident() {
    let d = dev();
    let mut child = store_from_stdin(&d, &["--name", "big.bin", "--chunk-size", "512KiB"]);
    let mut stdin = child.stdin.take().expect("stdin");
    let block = random_bytes(1 << 20, 0);
    for _ in 0..1024 {
        stdin.write_all(&block).expect("write");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{out:?}");
    let token = token_of(&String::from_utf8_lossy(&out.stdout));
    let after_store = d.vm_hwm_kib();
    // Read it back to /dev/null.
    ok(&d.hsmctl(&["file", "retrieve", "--force", &token, "-o", "/dev/null"]));
    let peak = d.vm_hwm_kib();
    println!("hsmd peak resident: {after_store} KiB after storing 1 GiB, {peak} KiB after retrieving it");
    assert!(peak < 64 * 1024, "hsmd peaked at {peak} KiB");
    let info: serde_json::Value =
        serde_json::from_str(&ok(&d.hsmctl(&["--json", "file", "info", &token]))).expect("json");
    assert_eq!(info["size"], 1u64 << 30);
    let segments = fs::read_dir(d.dir().join("state/files").join(&token))
        .expect("dir")
        .count();
    assert!(segments <= 20, "{segments} files for 1 GiB");
}

#[test]
fn passed_descriptors_are_checked_and_a_stalled_pipe_times_out_without_a_token() {
    let d = Daemon::builder().dev().extra("[files]\nio_timeout = \"1s\"\n").start();
    ok(&d.hsmctl(&["key", "create", "files", "--type", "aes256-gcm"]));
    let store = || Operation::FileStoreFd {
        name: "x".into(),
        key: "files".into(),
        chunk_size: 65536,
    };
    let mut c = d.client();
    let code = |r: Result<Reply, protocol::ClientError>| r.err().and_then(|e| e.code());

    // A request that must carry a descriptor and came without one.
    let e = c.call(store()).expect_err("no descriptor");
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument));
    assert!(e.to_string().contains("must carry a file descriptor"), "{e}");

    // Descriptors open the wrong way round.
    let w = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(d.dir().join("w"))
        .expect("open");
    let e = c
        .call_with_fd(store(), std::os::fd::AsFd::as_fd(&w))
        .expect_err("write-only input");
    assert!(e.to_string().contains("not open for reading"), "{e}");
    let r = fs::File::open(d.dir().join("w")).expect("open");
    let e = c
        .call_with_fd(
            Operation::FileRetrieveFd {
                token: "0f8fad5b-d9cb-469f-a165-70867728950e".into(),
            },
            std::os::fd::AsFd::as_fd(&r),
        )
        .expect_err("read-only output");
    assert!(e.to_string().contains("not open for writing"), "{e}");

    // A pipe whose writer neither writes nor closes: the store gives up after
    // files.io_timeout, leaves nothing, and others are served meanwhile.
    let (rd, wr) = nix::unistd::pipe().expect("pipe");
    let stalled = std::thread::spawn({
        let socket = d.socket.clone();
        move || {
            let mut c = protocol::Client::connect(&socket).expect("connect");
            let started = std::time::Instant::now();
            let r = c.call_with_fd(
                Operation::FileStoreFd {
                    name: "stalled".into(),
                    key: "files".into(),
                    chunk_size: 65536,
                },
                std::os::fd::AsFd::as_fd(&rd),
            );
            (r, started.elapsed())
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(c.ping(b"still here".to_vec()).expect("ping"), b"still here");
    let (result, took) = stalled.join().expect("join");
    drop(wr);
    let e = result.expect_err("stalled");
    assert_eq!(e.code(), Some(ErrorCode::FrameTimeout), "{e}");
    assert!(e.to_string().contains("neither gave nor took bytes"), "{e}");
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    assert_eq!(ok(&d.hsmctl(&["--json", "file", "list"])).trim(), "[]");
    let debris = fs::read_dir(d.dir().join("state/files")).expect("files").count();
    assert_eq!(debris, 0, "an abandoned store left its directory");

    // Descriptors sent ahead of any request that uses them: a few wait, more
    // close the connection.
    let mut c = d.client();
    for _ in 0..4 {
        assert!(matches!(
            c.call_with_fd(Operation::Ping { payload: vec![] }, std::os::fd::AsFd::as_fd(&r)),
            Ok(Reply::Pong { .. })
        ));
    }
    assert_eq!(
        code(c.call_with_fd(Operation::Ping { payload: vec![] }, std::os::fd::AsFd::as_fd(&r))),
        Some(ErrorCode::ProtocolViolation)
    );
    assert!(d.client().ping(vec![1]).is_ok(), "the daemon serves on");
}

#[test]
fn the_progress_bar_shows_bytes_rate_and_eta_on_a_terminal_and_nothing_with_quiet() {
    let d = dev();
    let src = d.dir().join("forty.bin");
    fs::write(&src, random_bytes(40 << 20, 1)).expect("write");
    // `script` runs hsmctl on a pseudo-terminal and copies what it drew.
    let on_tty = |extra: &str| {
        let cmd = format!(
            "{} --socket {} file store {} --chunk-size 4KiB {extra}",
            p(&bin("hsmctl")),
            p(&d.socket),
            p(&src)
        );
        let out = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("TERM", "xterm")
            .output()
            .expect("script (bsdutils)");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let drawn = on_tty("");
    assert!(drawn.contains("Token: "), "{drawn}");
    assert!(drawn.contains("storing") && drawn.contains("ETA"), "no bar: {drawn}");
    assert!(
        drawn.contains("40.00 MiB/40.00 MiB"),
        "the bar's last state is not the whole file: {drawn}"
    );
    let quiet = on_tty("--quiet");
    assert!(quiet.contains("Token: "), "{quiet}");
    assert!(
        !quiet.contains("storing") && !quiet.contains("ETA"),
        "--quiet drew a bar: {quiet}"
    );
}
