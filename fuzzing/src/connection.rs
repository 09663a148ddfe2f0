//! A connection to a real hsmd server in this process: its main socket
//! (hello, pipelining, limits, every operation a policy lets the caller try)
//! or its SSH agent socket, fed the input's bytes, read until the server
//! closes. The server must answer or close, never hang or die, and keep
//! serving the next connection.
//!
//! Input: the first byte picks the socket (bit 0: the agent's) and the size
//! of the writes (bits 1-7: 1 + that many KiB, or all at once for 0); the
//! rest is what the client sends.

use std::{
    io::{Read as _, Write as _},
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use hsmd::{
    auth::{policy::Policy, AccessGate},
    config::Limits,
    keystore::{slots::Argon2Cost, Vault},
    ops::Shared,
};
use protocol::{KeyOptions, KeyType, NewSlot, SecretBytes};

/// The caller may use, create and change keys, files, and read the audit
/// log, policy and metrics; not custody (a `Lock` would leave every later
/// input facing a locked keystore).
const POLICY: &str = r#"
[roles.fuzz]
permissions = [
  { resource = "keys", action = "*" },
  { resource = "files", action = "*" },
  { resource = "audit", action = "read" },
  { resource = "policy", action = "read" },
  { resource = "metrics", action = "read" },
  { resource = "keystore", action = "slot-list" },
]

[[bind]]
users = ["UID"]
roles = ["fuzz"]
"#;

/// An hsmd server running in this process.
pub(crate) struct Server {
    _dir: tempfile::TempDir,
    /// Its main socket.
    pub(crate) main: PathBuf,
    agent: PathBuf,
}

/// The server, started by the first caller.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    let ssh = KeyOptions {
        labels: [("ssh".to_owned(), "yes".to_owned())].into(),
        ..KeyOptions::default()
    };
    SERVER.get_or_init(|| {
        start(&[
            ("ed", KeyType::Ed25519, &[], &ssh),
            ("p256", KeyType::EcdsaP256, &[], &ssh),
            ("aes", KeyType::Aes256Gcm, &[], &KeyOptions::default()),
            ("mac", KeyType::HmacSha256, &[], &KeyOptions::default()),
        ])
    })
}

/// A key the server starts with: name, type, usages (empty: the type's
/// own), options.
pub(crate) type Key<'a> = (&'a str, KeyType, &'a [protocol::Usage], &'a KeyOptions);

/// Starts a server in this process with these keys, on a keystore of its own.
pub(crate) fn start(keys: &[Key<'_>]) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let uid = std::fs::metadata(dir.path()).expect("stat").uid();
    let vault = Vault::open(dir.path(), Argon2Cost::FLOOR).expect("open the keystore");
    vault
        .custody()
        .init(&NewSlot::Keyfile {
            label: "fuzz".into(),
            key: SecretBytes::new(vec![7; 32]),
        })
        .expect("init");
    for (name, key_type, usages, options) in keys {
        vault
            .keys()
            .create_key(name, *key_type, usages, options, uid, None)
            .expect("create a key");
    }
    let limits = Limits {
        idle_timeout: Duration::from_secs(2),
        frame_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let shared = Shared::new(limits, AccessGate::dev(uid), false, Arc::new(vault));
    let policy = POLICY.replace("UID", &uid.to_string());
    shared.set_policy(Policy::parse(&policy, std::path::Path::new("policy.toml")).expect("policy"));
    let shared = Arc::new(shared);
    let (main, agent) = (dir.path().join("hsmd.sock"), dir.path().join("agent.sock"));
    let (m, a) = (main.clone(), agent.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let main = tokio::net::UnixListener::bind(&m).expect("bind");
            let agent = tokio::net::UnixListener::bind(&a).expect("bind");
            ready_tx.send(()).expect("ready");
            hsmd::server::serve(&main, Some(&agent), shared).await;
        });
    });
    ready_rx.recv().expect("the server starts");
    Server { _dir: dir, main, agent }
}

/// Sends the input's bytes on one connection and reads until the server closes.
pub fn run(data: &[u8]) {
    exchange(data);
}

/// As [`run`]; answers how many bytes the server sent back.
pub fn exchange(data: &[u8]) -> usize {
    let Some((&flags, bytes)) = data.split_first() else {
        return 0;
    };
    let server = server();
    let path = if flags & 1 == 1 { &server.agent } else { &server.main };
    let write_size = match usize::from(flags >> 1) {
        0 => usize::MAX,
        kib => kib * 1024,
    };
    let mut stream = UnixStream::connect(path).expect("the server accepts");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut reader = stream.try_clone().expect("clone");
    // Read while writing: a server that has answers to send stops reading
    // until they are taken.
    let answers = std::thread::spawn(move || {
        let mut total = 0usize;
        let mut buf = vec![0; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(total),
                Err(e) => return Err(e),
            }
        }
    });
    for chunk in bytes.chunks(write_size.max(1)) {
        // The server may close first (a protocol violation ends the
        // connection); what it had to say is still read.
        if stream.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    answers
        .join()
        .expect("the reader")
        .unwrap_or_else(|e| panic!("the server neither answered nor closed the connection: {e}"))
}
