//! Memory hardening at start (issue 3, Memory): all memory locked where the
//! process may lock it, no core dumps, not dumpable; where locking is impossible,
//! production refuses to start and `require_lock = false` warns.

use std::{
    fs,
    os::unix::fs::{chown, MetadataExt, PermissionsExt},
    process::Command,
};

use hsmd_tests::{bin, Daemon, Prepared};

fn proc_status_field(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn a_daemon_that_may_lock_memory_locks_all_of_it_and_cannot_dump_core() {
    hsmd_tests::require_root("locking all memory needs CAP_IPC_LOCK");
    let d = Daemon::builder().require_lock(true).start();
    let status = d.client().status().expect("status");
    assert!(status.memory_locked, "status reports locked memory");
    let locked = proc_status_field(d.pid(), "VmLck:");
    assert!(locked > 1024, "VmLck is {locked} kB");
    let limits = fs::read_to_string(format!("/proc/{}/limits", d.pid())).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    assert_eq!(core.split_whitespace().collect::<Vec<_>>()[4..6], ["0", "0"], "{core}");
    let text = String::from_utf8(d.hsmctl(&["status"]).stdout).expect("utf-8");
    assert!(text.contains("memory:       locked"), "{text}");
}

/// Prepares a daemon dir that `nobody` owns, with a copy of hsmd it can run.
fn prepared_for_nobody(require_lock: bool) -> (Prepared, std::path::PathBuf) {
    let prepared = Daemon::builder().require_lock(require_lock).prepare();
    chown(prepared.dir.path(), Some(65534), Some(65534)).expect("chown");
    let hsmd = prepared.dir.path().join("hsmd");
    fs::copy(bin("hsmd"), &hsmd).expect("copy hsmd");
    fs::set_permissions(&hsmd, fs::Permissions::from_mode(0o755)).expect("chmod");
    (prepared, hsmd)
}

fn as_nobody_with_small_memlock(hsmd: &std::path::Path, prepared: &Prepared) -> Command {
    let mut cmd = hsmd_tests::as_uid(65534, "prlimit");
    cmd.args(["--memlock=65536:65536", "--"])
        .arg(hsmd)
        .arg("--config")
        .arg(&prepared.config);
    cmd
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn production_refuses_to_start_when_memory_cannot_be_locked() {
    hsmd_tests::require_root("acting as nobody");
    let (prepared, hsmd) = prepared_for_nobody(true);
    let out = as_nobody_with_small_memlock(&hsmd, &prepared).output().expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot lock memory"), "{err}");
    assert!(err.contains("RLIMIT_MEMLOCK is 64 KiB"), "{err}");
    assert!(err.contains("LimitMEMLOCK=infinity"), "the fix is named: {err}");
    assert!(!prepared.socket.exists(), "it never listened");
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn without_require_lock_it_warns_serves_and_is_still_not_dumpable() {
    hsmd_tests::require_root("acting as nobody");
    let (prepared, hsmd) = prepared_for_nobody(false);
    let socket = prepared.socket.clone();
    let mut cmd = as_nobody_with_small_memlock(&hsmd, &prepared);
    let d = prepared.spawn(&mut cmd, &socket);
    let status = d.client().status().expect("status");
    assert!(!status.memory_locked);
    assert!(d.log().contains("memory is NOT locked"), "{}", d.log());
    assert_eq!(proc_status_field(d.pid(), "VmLck:"), 0);
    assert_eq!(proc_status_field(d.pid(), "Uid:"), 65534, "really runs as nobody");
    // A non-dumpable process's /proc entries belong to root, not to its own uid,
    // so other processes of the same user cannot read or ptrace it.
    let owner = fs::metadata(format!("/proc/{}/environ", d.pid())).expect("stat").uid();
    assert_eq!(owner, 0, "/proc/PID/environ of a non-dumpable process is root's");
}

/// Where in `pid`'s memory `needle` occurs: (mapping, offset) pairs. Reads
/// /proc/PID/mem as root (the daemon is not dumpable; root may still read it).
fn find_in_memory(pid: u32, needles: &[(&str, &[u8])]) -> Vec<String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut found = Vec::new();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let name = parts.nth(3).unwrap_or("[anon]");
        // Writable memory is where freed buffers live; the binary's own pages
        // cannot hold a request's bytes.
        if !perms.starts_with("rw") || name == "[vvar]" {
            continue;
        }
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).expect("hex"),
            u64::from_str_radix(hi, 16).expect("hex"),
        );
        let mut bytes = vec![0u8; usize::try_from(hi - lo).expect("size")];
        if mem.seek(SeekFrom::Start(lo)).is_err() || mem.read_exact(&mut bytes).is_err() {
            continue;
        }
        for (what, needle) in needles {
            for (at, _) in bytes.windows(needle.len()).enumerate().filter(|(_, w)| w == needle) {
                found.push(format!("{what} in {name} at {:#x}", lo + at as u64));
            }
        }
    }
    found
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn no_plaintext_or_data_key_stays_in_memory_after_its_request() {
    use protocol::{KeyOptions, KeyType, Operation, Reply, SecretBytes};
    hsmd_tests::require_root("reading another process's memory");
    let d = Daemon::builder().dev().start();
    let mut c = d.client();
    let create = |c: &mut protocol::Client, name: &str, plaintext_datakey: bool| {
        c.call(Operation::KeyCreate {
            name: name.into(),
            key_type: KeyType::Aes256Gcm,
            usages: Vec::new(),
            options: KeyOptions {
                allow_plaintext_datakey: plaintext_datakey,
                ..KeyOptions::default()
            },
        })
        .expect("create key");
    };
    create(&mut c, "box", true);
    create(&mut c, "files", false);
    let random = |n: usize| {
        let mut v = vec![0u8; n];
        getrandom::fill(&mut v).expect("random");
        v
    };
    // Sealed and opened.
    let sealed_text = random(4096);
    let Reply::Encrypted { version, sealed } = c
        .call(Operation::Encrypt(protocol::EncryptArgs {
            name: "box".into(),
            version: None,
            plaintext: protocol::SecretBytes::new(sealed_text.clone()),
            aad: Vec::new(),
        }))
        .expect("encrypt")
    else {
        panic!("encrypt answer")
    };
    let opened_text = random(4096);
    let Reply::Encrypted { sealed: sealed2, .. } = c
        .call(Operation::Encrypt(protocol::EncryptArgs {
            name: "box".into(),
            version: Some(version),
            plaintext: protocol::SecretBytes::new(opened_text.clone()),
            aad: Vec::new(),
        }))
        .expect("encrypt")
    else {
        panic!("encrypt answer")
    };
    let _ = sealed;
    match c
        .call(Operation::Decrypt(protocol::DecryptArgs {
            name: "box".into(),
            version,
            sealed: sealed2,
            aad: Vec::new(),
            allow_compromised: false,
        }))
        .expect("decrypt")
    {
        Reply::Decrypted { plaintext } => assert_eq!(plaintext.expose(), opened_text.as_slice()),
        other => panic!("decrypt answer {other:?}"),
    }
    // A data key given out in plain.
    let data_key = match c
        .call(Operation::DataKey {
            name: "box".into(),
            aad: Vec::new(),
            plaintext: true,
        })
        .expect("datakey")
    {
        Reply::DataKey { plaintext: Some(k), .. } => k.expose().to_vec(),
        other => panic!("datakey answer {other:?}"),
    };
    // A file stored and read back one frame at a time.
    let file_text = random(8192);
    let Reply::FileSession { session, .. } = c
        .call(Operation::FileStoreBegin {
            name: "f".into(),
            key: "files".into(),
            chunk_size: 65536,
        })
        .expect("begin")
    else {
        panic!("begin answer")
    };
    c.call(Operation::FileStoreChunk {
        session,
        index: 0,
        last: true,
        bytes: SecretBytes::new(file_text.clone()),
    })
    .expect("chunk");
    let Reply::File(info) = c.call(Operation::FileStoreFinish { session }).expect("finish") else {
        panic!("finish answer")
    };
    let Reply::FileSession { session, .. } = c
        .call(Operation::FileRetrieveBegin { token: info.token })
        .expect("retrieve")
    else {
        panic!("retrieve answer")
    };
    match c.call(Operation::FileRetrieveNext { session }).expect("next") {
        Reply::FileChunk { bytes, .. } => assert_eq!(bytes.expose(), file_text.as_slice()),
        other => panic!("chunk answer {other:?}"),
    }
    drop(c);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pieces: Vec<(String, Vec<u8>)> = [
        ("the sealed plaintext", &sealed_text),
        ("the decrypted plaintext", &opened_text),
        ("the stored file", &file_text),
    ]
    .into_iter()
    .flat_map(|(what, text)| {
        [0, 1000, 3000].map(|at| (format!("{what} (bytes {at}..{})", at + 24), text[at..at + 24].to_vec()))
    })
    .chain([("the plaintext data key".to_owned(), data_key.clone())])
    .collect();
    let needles: Vec<(&str, &[u8])> = pieces.iter().map(|(w, b)| (w.as_str(), b.as_slice())).collect();
    let found = find_in_memory(d.pid(), &needles);
    // The check can see: the daemon's own copy of the sealing key's name is there.
    assert!(
        !find_in_memory(d.pid(), &[("a key name", b"files".as_slice())]).is_empty(),
        "the memory scan finds nothing at all"
    );
    assert!(
        found.is_empty(),
        "left in hsmd's memory after the requests finished:\n{}",
        found.join("\n")
    );
}
