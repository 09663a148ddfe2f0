//! The fault-injection soak: one hsmd with keys in software, in a SoftHSM2
//! token (through the PKCS#11 helper) and in a TPM (swtpm), its state
//! directory on a small tmpfs, under mixed load from four uids and hostile
//! frames with connection churn, while faults are injected one after another:
//! SIGKILL and SIGTERM with a restart, the state directory filled to ENOSPC and
//! freed, the PKCS#11 helper killed, swtpm stopped and started again, the
//! policy file broken and edited.
//!
//! Every answer is checked (signatures verify, decryptions and retrieved
//! files match, a uid without the right is refused), and every write the
//! daemon acknowledged (keys created and deleted, rotations, files stored and
//! deleted) is looked for after every restart and at the end, beside
//! `audit verify`. The [`Summary`] is the table `hsmd-bench --suite soak`
//! prints and the test asserts on.
//!
//! Needs root: the load runs as other uids (`setpriv`) and the tmpfs is
//! mounted.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex, MutexGuard, RwLock,
    },
    thread,
    time::{Duration, Instant},
};

use ed25519_dalek::pkcs8::DecodePublicKey as _;
use nix::sys::signal::{kill, Signal};
use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
use protocol::{
    Client, ClientError, ClientOptions, DecryptArgs, EncryptArgs, KeyOptions, KeyType, Operation, Reply, SecretBytes,
    SignArgs,
};
use sha2::{Digest as _, Sha256, Sha512};

use crate::{as_uid, backend_health, bin, Daemon, SmallDisk, SoftHsm, Swtpm};

/// A member of the built-in operator role: creates and deletes keys, stores,
/// reads back and deletes files.
const OPERATOR: u32 = 4101;
/// May sign with `s-ed` and nothing else.
const LIMITED: u32 = 4102;
/// Sends hostile frames and churns connections (`hsmd-hostile soak`).
const HOSTILE: u32 = 4103;

const POLICY: &str = r#"
[roles.signer]
permissions = [{ resource = "keys", action = "sign", keys = "s-ed" }]

[[bind]]
users = ["4101", "4103"]
roles = ["operator"]

[[bind]]
users = ["4102"]
roles = ["signer"]

[[bind]]
users = ["0"]
roles = ["admin"]
"#;

/// How long and how hard.
#[derive(Debug, Clone)]
pub struct Options {
    /// The whole run.
    pub duration: Duration,
    /// The mean time between two faults (each waits between half and one and
    /// a half of it).
    pub fault_every: Duration,
    /// The bound hsmd's resident set must stay under, KiB.
    pub rss_bound_kib: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(20 * 60),
            fault_every: Duration::from_secs(8),
            rss_bound_kib: 128 * 1024,
        }
    }
}

/// The faults the soak injects, in the order of the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL at a random moment, then a restart.
    Kill,
    /// SIGTERM, then a restart.
    Term,
    /// The state directory filled to the last byte for two seconds.
    DiskFull,
    /// The PKCS#11 helper process killed.
    Pkcs11Helper,
    /// swtpm stopped for two seconds, then started on the same state.
    TpmGone,
    /// The policy file replaced with text that does not parse, then put back.
    PolicyBroken,
    /// The policy file rewritten (a valid change), then put back.
    PolicyEdited,
}

impl Fault {
    /// Every fault, once each.
    pub const ALL: [Self; 7] = [
        Self::Kill,
        Self::Term,
        Self::DiskFull,
        Self::Pkcs11Helper,
        Self::TpmGone,
        Self::PolicyBroken,
        Self::PolicyEdited,
    ];

    fn describe(self) -> &'static str {
        match self {
            Self::Kill => "SIGKILL and restart",
            Self::Term => "SIGTERM and restart",
            Self::DiskFull => "state directory full (ENOSPC) for 2 s",
            Self::Pkcs11Helper => "PKCS#11 helper killed",
            Self::TpmGone => "swtpm stopped for 2 s and restarted",
            Self::PolicyBroken => "policy file broken for 2 s",
            Self::PolicyEdited => "policy file edited for 2 s",
        }
    }
}

/// Answers to one kind of request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Answered with success and checked right.
    pub done: u64,
    /// Refused as expected (a uid without the right).
    pub refused: u64,
    /// Failed with an error or a lost connection during a fault: not
    /// acknowledged, so nothing was owed.
    pub failed: u64,
}

/// What a soak run did and found.
#[derive(Debug, Default)]
pub struct Summary {
    /// How long it ran.
    pub elapsed: Duration,
    /// Per kind of request.
    pub ops: BTreeMap<&'static str, Tally>,
    /// Error codes of the failed requests, with counts.
    pub errors: BTreeMap<String, u64>,
    /// Faults injected, per kind.
    pub faults: BTreeMap<Fault, u64>,
    /// Faults hsmd did not come back from in time (what and how).
    pub unrecovered: Vec<String>,
    /// Acknowledged writes checked after restarts and at the end.
    pub writes_checked: u64,
    /// Acknowledged writes missing (must be empty).
    pub lost: Vec<String>,
    /// Answers that were wrong: a bad signature, other bytes back, a refusal
    /// not given (must be empty).
    pub wrong: Vec<String>,
    /// `audit verify` runs that passed.
    pub verifies: u64,
    /// Recoveries `audit verify` named (torn tails cut, lines adopted).
    pub recoveries: BTreeSet<String>,
    /// Tamper reports: `audit verify` failing, or an `AUDIT_TAMPERED` line
    /// (must be empty: nobody tampered).
    pub false_tamper: Vec<String>,
    /// Requests answered `internal` (must be empty: every failure a fault
    /// causes has a code and words of its own).
    pub internal: Vec<String>,
    /// Panics in hsmd's log (must be 0).
    pub panics: usize,
    /// Restarts done (SIGKILL and SIGTERM).
    pub restarts: u64,
    /// hsmd's resident set, min and max over the run, KiB.
    pub rss_kib: (u64, u64),
    /// The bound it had to stay under, KiB.
    pub rss_bound_kib: u64,
}

impl Summary {
    /// Whether the run found nothing wrong.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.lost.is_empty()
            && self.wrong.is_empty()
            && self.false_tamper.is_empty()
            && self.unrecovered.is_empty()
            && self.internal.is_empty()
            && self.panics == 0
            && self.rss_kib.1 <= self.rss_bound_kib
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "soak of {:.0} s", self.elapsed.as_secs_f64())?;
        writeln!(f)?;
        writeln!(
            f,
            "| requests | answered right | refused as they must be | failed during faults |"
        )?;
        writeln!(f, "| --- | ---: | ---: | ---: |")?;
        let mut total = Tally::default();
        for (what, t) in &self.ops {
            writeln!(f, "| {what} | {} | {} | {} |", t.done, t.refused, t.failed)?;
            total.done += t.done;
            total.refused += t.refused;
            total.failed += t.failed;
        }
        writeln!(
            f,
            "| **all** | **{}** | **{}** | **{}** |",
            total.done, total.refused, total.failed
        )?;
        writeln!(f)?;
        let errors: Vec<String> = self.errors.iter().map(|(c, n)| format!("{c} {n}")).collect();
        writeln!(f, "Errors of the failed requests: {}.", errors.join(", "))?;
        writeln!(f)?;
        writeln!(f, "| faults injected | count |")?;
        writeln!(f, "| --- | ---: |")?;
        for (fault, n) in &self.faults {
            writeln!(f, "| {} | {n} |", fault.describe())?;
        }
        writeln!(f, "| **all** | **{}** |", self.faults.values().sum::<u64>())?;
        writeln!(f)?;
        writeln!(f, "| check | result |")?;
        writeln!(f, "| --- | --- |")?;
        writeln!(
            f,
            "| acknowledged writes lost (of {} checked) | {} |",
            self.writes_checked,
            self.lost.len()
        )?;
        writeln!(f, "| wrong answers | {} |", self.wrong.len())?;
        writeln!(f, "| false tamper reports | {} |", self.false_tamper.len())?;
        writeln!(f, "| faults not recovered from | {} |", self.unrecovered.len())?;
        writeln!(f, "| requests answered `internal` | {} |", self.internal.len())?;
        writeln!(f, "| panics in hsmd's log | {} |", self.panics)?;
        writeln!(
            f,
            "| `audit verify` passes (recoveries named) | {} ({}) |",
            self.verifies,
            self.recoveries.len()
        )?;
        writeln!(f, "| restarts | {} |", self.restarts)?;
        writeln!(
            f,
            "| hsmd RSS min / max (bound) | {:.1} / {:.1} MiB ({:.0} MiB) |",
            self.rss_kib.0 as f64 / 1024.0,
            self.rss_kib.1 as f64 / 1024.0,
            self.rss_bound_kib as f64 / 1024.0
        )?;
        for (what, list) in [
            ("lost", &self.lost),
            ("wrong", &self.wrong),
            ("false tamper", &self.false_tamper),
            ("not recovered", &self.unrecovered),
            ("internal", &self.internal),
        ] {
            for item in list.iter().take(20) {
                writeln!(f, "{what}: {item}")?;
            }
        }
        Ok(())
    }
}

/// What the load threads record: every acknowledged write, every answer.
#[derive(Debug, Default)]
struct Ledger {
    summary: Summary,
    /// Keys created and acknowledged: name → still alive (its delete not
    /// acknowledged).
    keys: BTreeMap<String, bool>,
    /// Files stored and acknowledged: token → (SHA-256, alive).
    files: BTreeMap<String, (String, bool)>,
    /// The highest acknowledged version of the key `rot`.
    rotated: u32,
}

/// The state shared by the load threads and the fault loop.
struct Shared {
    ledger: Mutex<Ledger>,
    /// Deletes hold it shared from request to record; a check of the
    /// acknowledged writes holds it alone, so no delete is half recorded.
    deletes: RwLock<()>,
    stop: AtomicBool,
    socket: PathBuf,
    /// hsmd's current pid, for the RSS sampler.
    pid: AtomicU32,
    hsmctl: PathBuf,
    work: PathBuf,
}

impl Shared {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn record(&self, what: &'static str, outcome: Outcome) {
        let mut l = self.ledger();
        let s = &mut l.summary;
        let t = s.ops.entry(what).or_default();
        match outcome {
            Outcome::Done => t.done += 1,
            Outcome::Refused => t.refused += 1,
            Outcome::Failed(code) => {
                t.failed += 1;
                *s.errors.entry(format!("{code} ({what})")).or_default() += 1;
            }
            Outcome::Wrong(why) => s.wrong.push(format!("{what}: {why}")),
            Outcome::Internal(message) => {
                t.failed += 1;
                s.internal.push(format!("{what}: {message}"));
            }
        }
    }

    /// `hsmctl --json ARGS…` as `uid`.
    fn hsmctl(&self, uid: u32, args: &[&str]) -> Output {
        let mut cmd = if uid == 0 {
            Command::new(&self.hsmctl)
        } else {
            as_uid(uid, &self.hsmctl)
        };
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .args(args)
            .env_remove("HSMD_SOCKET")
            .stdin(Stdio::null())
            .output()
            .expect("run hsmctl")
    }
}

enum Outcome {
    Done,
    Refused,
    /// Failed with this code (not acknowledged, so nothing was owed).
    Failed(String),
    Wrong(String),
    /// Answered `internal`, with the message.
    Internal(String),
}

/// The error code of a failed `hsmctl --json` run, or what kept it from
/// answering.
fn code_of(out: &Output) -> String {
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("hsmctl exit {:?}", out.status.code()))
}

/// A failed `hsmctl` run as an outcome: `internal` is kept with its words.
fn failed(out: &Output) -> Outcome {
    match code_of(out) {
        code if code == "internal" => Outcome::Internal(stderr(out)),
        code => Outcome::Failed(code),
    }
}

fn failed_client(e: &ClientError) -> Outcome {
    match e.code() {
        Some(protocol::ErrorCode::Internal) => Outcome::Internal(e.to_string()),
        Some(code) => Outcome::Failed(code.to_string()),
        None => Outcome::Failed("connection-lost".to_owned()),
    }
}

/// A small xorshift generator: the load needs variety, not secrecy.
struct Dice(u64);

impl Dice {
    fn new() -> Self {
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).expect("getrandom");
        Self(u64::from_le_bytes(seed) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        getrandom::fill(&mut v).expect("getrandom");
        v
    }
}

fn client(socket: &Path) -> Result<Client, ClientError> {
    Client::connect_with(
        socket,
        &ClientOptions {
            client_name: "hsmd-soak".into(),
            timeout: Some(Duration::from_secs(30)),
        },
    )
}

/// Public keys of the keys the load signs with (they never rotate).
#[derive(Clone)]
struct Publics {
    ed: ed25519_dalek::VerifyingKey,
    p11: p256::ecdsa::VerifyingKey,
    tpm: p256::ecdsa::VerifyingKey,
}

/// What the root clients sign with: (what, key, digest length).
const SIGNERS: [(&str, &str, usize); 3] = [
    ("sign ed25519 (software, root)", "s-ed", 64),
    ("sign P-256 (SoftHSM2 token, root)", "p11-ec", 32),
    ("sign P-256 (TPM, root)", "tpm-ec", 32),
];

impl Publics {
    /// Whether `reply` is a signature over `digest` by `key`.
    fn check(&self, key: &str, digest: &[u8], reply: &Reply) -> Outcome {
        match key {
            "s-ed" => check_ed(&self.ed, digest, reply),
            "p11-ec" => check_p256(&self.p11, digest, reply),
            _ => check_p256(&self.tpm, digest, reply),
        }
    }
}

fn public_der(c: &mut Client, name: &str) -> Vec<u8> {
    match c.call(Operation::KeyPublic { name: name.into() }) {
        Ok(Reply::PublicKey { spki_der, .. }) => spki_der,
        other => panic!("public key of {name}: {other:?}"),
    }
}

fn create(c: &mut Client, name: &str, key_type: KeyType, backend: Option<&str>) {
    c.call(Operation::KeyCreate {
        name: name.into(),
        key_type,
        usages: Vec::new(),
        options: KeyOptions {
            backend: backend.map(str::to_owned),
            ..KeyOptions::default()
        },
    })
    .unwrap_or_else(|e| panic!("create {name}: {e}"));
}

/// Signs, encrypts and rotates as root through the client library, checking
/// every answer.
fn root_load(shared: &Shared, publics: &Publics, rotates: bool) {
    let mut dice = Dice::new();
    let mut conn: Option<Client> = None;
    let mut last_rotation = Instant::now();
    let mut i = 0u64;
    while !shared.stopped() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match client(&shared.socket) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        i += 1;
        let (what, result): (&'static str, Result<Outcome, ClientError>) = match (i % 4) as usize {
            n @ 0..=2 => {
                let (what, key, len) = SIGNERS[n];
                let digest = dice.bytes(len);
                let r = c.call(Operation::Sign(SignArgs {
                    name: key.into(),
                    digest: digest.clone(),
                }));
                (what, r.map(|reply| publics.check(key, &digest, &reply)))
            }
            _ if rotates && last_rotation.elapsed() > Duration::from_secs(2) => {
                last_rotation = Instant::now();
                let r = c.call(Operation::KeyRotate { name: "rot".into() });
                ("rotate (root)", r.map(|reply| check_rotation(shared, &reply)))
            }
            _ => {
                let len = 1 + dice.below(4096) as usize;
                ("encrypt and decrypt (root)", seal_and_open(c, &mut dice, len))
            }
        };
        match result {
            Ok(outcome) => shared.record(what, outcome),
            Err(e) => {
                if e.code().is_none() {
                    conn = None;
                }
                shared.record(what, failed_client(&e));
            }
        }
        // Bounded load: the audit log of a long run stays within its files.
        thread::sleep(Duration::from_millis(2));
    }
}

fn check_ed(key: &ed25519_dalek::VerifyingKey, digest: &[u8], reply: &Reply) -> Outcome {
    let Reply::Signature { signature, .. } = reply else {
        return Outcome::Wrong(format!("answered {reply:?}"));
    };
    match ed25519_dalek::Signature::from_slice(signature).map(|s| key.verify_strict(digest, &s)) {
        Ok(Ok(())) => Outcome::Done,
        _ => Outcome::Wrong(format!(
            "an Ed25519 signature that does not verify: {}",
            hex::encode(signature)
        )),
    }
}

fn check_p256(key: &p256::ecdsa::VerifyingKey, digest: &[u8], reply: &Reply) -> Outcome {
    let Reply::Signature { signature, .. } = reply else {
        return Outcome::Wrong(format!("answered {reply:?}"));
    };
    match p256::ecdsa::Signature::from_der(signature).map(|s| key.verify_prehash(digest, &s)) {
        Ok(Ok(())) => Outcome::Done,
        _ => Outcome::Wrong(format!(
            "a P-256 signature that does not verify: {}",
            hex::encode(signature)
        )),
    }
}

fn check_rotation(shared: &Shared, reply: &Reply) -> Outcome {
    let Reply::KeyUpdated(k) = reply else {
        return Outcome::Wrong(format!("answered {reply:?}"));
    };
    let mut l = shared.ledger();
    if k.version <= l.rotated {
        return Outcome::Wrong(format!(
            "rotation answered version {} after version {} was acknowledged: a rotation was lost",
            k.version, l.rotated
        ));
    }
    l.rotated = k.version;
    Outcome::Done
}

fn seal_and_open(c: &mut Client, dice: &mut Dice, len: usize) -> Result<Outcome, ClientError> {
    let plaintext = dice.bytes(len);
    let aad = dice.bytes(16);
    let Reply::Encrypted { version, sealed } = c.call(Operation::Encrypt(EncryptArgs {
        name: "box".into(),
        version: None,
        plaintext: SecretBytes::new(plaintext.clone()),
        aad: aad.clone(),
    }))?
    else {
        return Ok(Outcome::Wrong("encrypt answered something else".into()));
    };
    let reply = c.call(Operation::Decrypt(DecryptArgs {
        name: "box".into(),
        version,
        sealed,
        aad,
        allow_compromised: false,
    }))?;
    Ok(match reply {
        Reply::Decrypted { plaintext: got } if got.expose() == plaintext.as_slice() => Outcome::Done,
        Reply::Decrypted { .. } => Outcome::Wrong(format!("decrypting gave other bytes than the {len} sealed")),
        other => Outcome::Wrong(format!("decrypt answered {other:?}")),
    })
}

/// The operator's day through hsmctl: keys created and deleted, files stored,
/// read back and deleted; at most 40 of each alive, so a long run stays
/// within the tmpfs.
fn operator_load(shared: &Shared) {
    let mut dice = Dice::new();
    let dir = shared.work.join("operator");
    let mut i = 0u64;
    while !shared.stopped() {
        i += 1;
        match i % 4 {
            0 => {
                let name = format!("w-{i}");
                let out = shared.hsmctl(OPERATOR, &["key", "create", &name, "--type", "ed25519"]);
                if out.status.success() {
                    shared.ledger().keys.insert(name, true);
                    shared.record("key create (operator)", Outcome::Done);
                } else {
                    shared.record("key create (operator)", failed(&out));
                }
                let alive: Vec<String> = shared
                    .ledger()
                    .keys
                    .iter()
                    .filter(|k| *k.1)
                    .map(|k| k.0.clone())
                    .collect();
                if alive.len() > 40 {
                    delete_key(shared, &alive[0]);
                }
            }
            1 => {
                let len = if dice.below(20) == 0 {
                    1 << 20
                } else {
                    1 + dice.below(64 * 1024) as usize
                };
                let data = dice.bytes(len);
                let path = dir.join(format!("in-{i}"));
                fs::write(&path, &data).expect("write the file to store");
                let out = shared.hsmctl(OPERATOR, &["file", "store", "-q", path_str(&path)]);
                let _ = fs::remove_file(&path);
                let token = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .ok()
                    .and_then(|v| v["token"].as_str().map(str::to_owned));
                match token {
                    Some(token) if out.status.success() => {
                        shared
                            .ledger()
                            .files
                            .insert(token, (hex::encode(Sha256::digest(&data)), true));
                        shared.record("file store (operator)", Outcome::Done);
                    }
                    _ => shared.record("file store (operator)", failed(&out)),
                }
                let alive: Vec<String> = shared
                    .ledger()
                    .files
                    .iter()
                    .filter(|f| f.1 .1)
                    .map(|f| f.0.clone())
                    .collect();
                if alive.len() > 40 {
                    delete_file(shared, &alive[dice.below(alive.len() as u64) as usize]);
                }
            }
            2 => {
                let alive: Vec<(String, String)> = shared
                    .ledger()
                    .files
                    .iter()
                    .filter(|f| f.1 .1)
                    .map(|f| (f.0.clone(), f.1 .0.clone()))
                    .collect();
                if alive.is_empty() {
                    continue;
                }
                let (token, sha) = &alive[dice.below(alive.len() as u64) as usize];
                let outcome = retrieve(shared, OPERATOR, &dir, token, sha);
                shared.record("file retrieve (operator)", outcome);
            }
            _ => {
                let out = shared.hsmctl(OPERATOR, &["file", "list"]);
                let outcome = if out.status.success() {
                    Outcome::Done
                } else {
                    failed(&out)
                };
                shared.record("file list (operator)", outcome);
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Reads a stored file back and compares it with what was stored.
fn retrieve(shared: &Shared, uid: u32, dir: &Path, token: &str, sha: &str) -> Outcome {
    let out_path = dir.join(format!("out-{token}"));
    let out = shared.hsmctl(
        uid,
        &["file", "retrieve", "-q", "--force", token, "-o", path_str(&out_path)],
    );
    let got = fs::read(&out_path).ok();
    let _ = fs::remove_file(&out_path);
    if !out.status.success() {
        let code = code_of(&out);
        if code == "not-found" && shared.ledger().files.get(token).is_some_and(|f| f.1) {
            return Outcome::Wrong(format!("stored file {token} (acknowledged) was not found"));
        }
        return Outcome::Failed(code);
    }
    match got {
        Some(bytes) if hex::encode(Sha256::digest(&bytes)) == sha => Outcome::Done,
        Some(bytes) => Outcome::Wrong(format!("file {token} came back as other bytes ({} bytes)", bytes.len())),
        None => Outcome::Wrong(format!("file {token}: retrieve succeeded but wrote no file")),
    }
}

fn delete_key(shared: &Shared, name: &str) {
    let _held = shared.deletes.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = shared.hsmctl(OPERATOR, &["key", "delete", name]);
    if out.status.success() {
        shared.ledger().keys.insert(name.to_owned(), false);
        shared.record("key delete (operator)", Outcome::Done);
    } else {
        // Done or not: the answer was lost, so nothing is owed either way.
        shared.ledger().keys.remove(name);
        shared.record("key delete (operator)", failed(&out));
    }
}

fn delete_file(shared: &Shared, token: &str) {
    let _held = shared.deletes.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = shared.hsmctl(OPERATOR, &["file", "delete", "--yes", token]);
    if out.status.success() {
        if let Some(f) = shared.ledger().files.get_mut(token) {
            f.1 = false;
        }
        shared.record("file delete (operator)", Outcome::Done);
    } else {
        shared.ledger().files.remove(token);
        shared.record("file delete (operator)", failed(&out));
    }
}

/// A uid that may sign with `s-ed` only: its signatures must verify, and
/// every other key must be refused to it, through every policy edit.
fn limited_load(shared: &Shared, ed: &ed25519_dalek::VerifyingKey) {
    let dir = shared.work.join("limited");
    let data = dir.join("data");
    let sig = dir.join("sig");
    fs::write(&data, b"signed by the limited uid").expect("write");
    let digest = Sha512::digest(b"signed by the limited uid");
    let mut i = 0u64;
    let sign = |key: &str| {
        let _ = fs::remove_file(&sig);
        shared.hsmctl(
            LIMITED,
            &[
                "sign",
                key,
                "-i",
                path_str(&data),
                "-o",
                path_str(&sig),
                "--format",
                "raw",
            ],
        )
    };
    while !shared.stopped() {
        i += 1;
        if i.is_multiple_of(2) {
            let out = sign("s-ed");
            let outcome = if !out.status.success() {
                failed(&out)
            } else {
                let written = fs::read(&sig).unwrap_or_default();
                match ed25519_dalek::Signature::from_slice(&written).map(|s| ed.verify_strict(&digest, &s)) {
                    Ok(Ok(())) => Outcome::Done,
                    _ => Outcome::Wrong("the limited uid's signature does not verify".into()),
                }
            };
            shared.record("sign ed25519 (limited uid)", outcome);
        } else {
            let key = if i % 4 == 1 { "p11-ec" } else { "box" };
            let out = sign(key);
            let outcome = if out.status.success() {
                Outcome::Wrong(format!(
                    "the limited uid signed with {key}, which its role does not allow"
                ))
            } else {
                match code_of(&out).as_str() {
                    "permission-denied" => Outcome::Refused,
                    code => Outcome::Failed(code.to_owned()),
                }
            };
            shared.record("sign with a key not allowed (limited uid)", outcome);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `audit verify`, and a backup made and verified, every two seconds.
fn auditor_load(shared: &Shared) {
    let dir = shared.work.join("backups");
    let archive = dir.join("state.hsmdbak");
    let mut i = 0u64;
    while !shared.stopped() {
        i += 1;
        if i.is_multiple_of(2) {
            let outcome = audit_verify(shared);
            shared.record("audit verify (root)", outcome);
        } else {
            let out = shared.hsmctl(0, &["backup", "create", "--force", path_str(&archive)]);
            if out.status.success() {
                shared.record("backup create (root)", Outcome::Done);
                let out = shared.hsmctl(0, &["backup", "verify", path_str(&archive)]);
                let outcome = if out.status.success() {
                    Outcome::Done
                } else {
                    match code_of(&out).as_str() {
                        code @ ("tampered" | "decrypt-failed" | "invalid-argument") => {
                            Outcome::Wrong(format!("a backup hsmd made does not verify ({code}): {}", stderr(&out)))
                        }
                        code => Outcome::Failed(code.to_owned()),
                    }
                };
                shared.record("backup verify (root)", outcome);
            } else {
                shared.record("backup create (root)", failed(&out));
            }
        }
        let until = Instant::now() + Duration::from_secs(2);
        while !shared.stopped() && Instant::now() < until {
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// One `audit verify`: recoveries are noted, a tamper report is a false alarm.
fn audit_verify(shared: &Shared) -> Outcome {
    let out = shared.hsmctl(0, &["audit", "verify"]);
    if out.status.success() {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mut l = shared.ledger();
        l.summary.verifies += 1;
        for r in v["recoveries"].as_array().into_iter().flatten() {
            if let Some(r) = r.as_str() {
                l.summary.recoveries.insert(r.to_owned());
            }
        }
        return Outcome::Done;
    }
    let code = code_of(&out);
    if code == "tampered" {
        shared.ledger().summary.false_tamper.push(stderr(&out));
    }
    Outcome::Failed(code)
}

/// Every acknowledged write, looked for: keys alive or deleted as
/// acknowledged, the rotated key at least at its acknowledged version, files
/// present or gone; with `contents`, every alive file read back and compared.
fn check_writes(shared: &Shared, when: &str, contents: bool) {
    let _alone = shared
        .deletes
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (keys, files, rotated) = {
        let l = shared.ledger();
        (l.keys.clone(), l.files.clone(), l.rotated)
    };
    let mut lost = Vec::new();
    let mut c = client(&shared.socket).expect("connect for the check");
    for (name, alive) in &keys {
        match c.call(Operation::KeyInfo { name: name.clone() }) {
            Ok(Reply::Key(k)) if k.deleted_unix.is_some() != *alive => {}
            Ok(Reply::Key(_)) => lost.push(format!(
                "{when}: key {name} should be {} (acknowledged) but is not",
                if *alive { "alive" } else { "deleted" }
            )),
            Err(e) if !alive && e.code() == Some(protocol::ErrorCode::NotFound) => {}
            other => lost.push(format!("{when}: key {name} (acknowledged): {other:?}")),
        }
    }
    match c.call(Operation::KeyInfo { name: "rot".into() }) {
        Ok(Reply::Key(k)) if k.version >= rotated => {}
        other => lost.push(format!(
            "{when}: key rot was rotated to version {rotated} (acknowledged), now {other:?}"
        )),
    }
    for (token, (sha, alive)) in &files {
        let found = c.call(Operation::FileInfo { token: token.clone() });
        match (found, alive) {
            (Ok(Reply::File(_)), true) => {
                if contents {
                    if let Outcome::Wrong(why) = retrieve(shared, 0, &shared.work.join("root"), token, sha) {
                        lost.push(format!("{when}: {why}"));
                    }
                }
            }
            (Err(e), false) if e.code() == Some(protocol::ErrorCode::NotFound) => {}
            (other, alive) => lost.push(format!(
                "{when}: file {token} should be {} (acknowledged): {other:?}",
                if *alive { "present" } else { "gone" }
            )),
        }
    }
    let mut l = shared.ledger();
    l.summary.writes_checked += (keys.len() + files.len() + 1) as u64;
    l.summary.lost.extend(lost);
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !ok() {
        if Instant::now() > deadline {
            return Err(format!("{what} did not happen within {limit:?}"));
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn audit_healthy(socket: &Path) -> bool {
    client(socket)
        .and_then(|mut c| c.status())
        .is_ok_and(|s| s.audit.healthy)
}

/// Runs the soak and returns what it found. Panics when it cannot set up
/// (not root, SoftHSM2 or swtpm missing) or hsmd does not start again after a
/// restart.
pub fn run(opts: &Options) -> Summary {
    crate::require_root("the soak runs load as other uids and mounts a tmpfs");
    let hsm = SoftHsm::new("soak");
    let mut tpm = Swtpm::start();
    let prepared = hsm
        .daemon("")
        .env("TSS2_LOG", "all+NONE")
        .env("HSMD_LOG", "info")
        .socket_mode("0666")
        .users(&["0", "4101", "4102", "4103"])
        .keys("min_rotation_period", "\"1s\"")
        .extra(&format!(
            "[backends.tpm]\ntcti = {:?}\n\n[audit]\nmax_file_bytes = 4194304\nkeep_files = 8\n",
            tpm.tcti()
        ))
        .policy(POLICY)
        .prepare();
    let disk = SmallDisk::mount(&prepared.dir.path().join("state"), "96m");
    let mut d = prepared.start();
    let keyfile = d.dir().join("unlock.key");
    let out = d.hsmctl(&["init", "--keyfile-out", path_str(&keyfile)]);
    assert!(out.status.success(), "hsmctl init: {out:?}");
    // Restarts unlock by themselves with the key file.
    let config = d.dir().join("hsmd.toml");
    let text = fs::read_to_string(&config).expect("config");
    let text = text.replacen(
        "[unlock]\n",
        &format!("[unlock]\nkeyfile = {:?}\n", path_str(&keyfile)),
        1,
    );
    fs::write(&config, text).expect("config");
    d.restart(false);

    let mut c = d.client();
    create(&mut c, "s-ed", KeyType::Ed25519, None);
    create(&mut c, "p11-ec", KeyType::EcdsaP256, Some("pkcs11"));
    create(&mut c, "tpm-ec", KeyType::EcdsaP256, Some("tpm"));
    create(&mut c, "box", KeyType::Aes256Gcm, None);
    create(&mut c, "files", KeyType::Aes256Gcm, None);
    create(&mut c, "rot", KeyType::Ed25519, None);
    let publics = Publics {
        ed: ed25519_dalek::VerifyingKey::from_public_key_der(&public_der(&mut c, "s-ed")).expect("ed25519 SPKI"),
        p11: p256::ecdsa::VerifyingKey::from_public_key_der(&public_der(&mut c, "p11-ec")).expect("P-256 SPKI"),
        tpm: p256::ecdsa::VerifyingKey::from_public_key_der(&public_der(&mut c, "tpm-ec")).expect("P-256 SPKI"),
    };
    drop(c);

    // Copies the other uids can run, and their own work directories.
    let copy = |name: &str| {
        let to = d.dir().join(name);
        fs::copy(bin(name), &to).expect("copy binary");
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).expect("chmod");
        to
    };
    let work = d.dir().join("work");
    for (sub, uid) in [
        ("operator", OPERATOR),
        ("limited", LIMITED),
        ("backups", 0),
        ("root", 0),
    ] {
        let dir = work.join(sub);
        fs::create_dir_all(&dir).expect("mkdir");
        nix::unistd::chown(&dir, Some(uid.into()), Some(uid.into())).expect("chown");
    }
    let shared = Arc::new(Shared {
        ledger: Mutex::new(Ledger::default()),
        deletes: RwLock::new(()),
        stop: AtomicBool::new(false),
        socket: d.socket.clone(),
        pid: AtomicU32::new(d.pid()),
        hsmctl: copy("hsmctl"),
        work,
    });
    let hostile = copy("hsmd-hostile");
    let mut hostile = as_uid(HOSTILE, &hostile)
        .arg("soak")
        .arg(&d.socket)
        .arg(opts.duration.as_secs().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run hsmd-hostile");

    // The clock starts with the load, after set-up.
    let started = Instant::now();
    let mut threads = Vec::new();
    for rotates in [true, false] {
        let (shared, publics) = (Arc::clone(&shared), publics.clone());
        threads.push(thread::spawn(move || root_load(&shared, &publics, rotates)));
    }
    let s = Arc::clone(&shared);
    threads.push(thread::spawn(move || operator_load(&s)));
    let (s, ed) = (Arc::clone(&shared), publics.ed);
    threads.push(thread::spawn(move || limited_load(&s, &ed)));
    let s = Arc::clone(&shared);
    threads.push(thread::spawn(move || auditor_load(&s)));
    let s = Arc::clone(&shared);
    let sampler = thread::spawn(move || {
        let (mut min, mut max) = (u64::MAX, 0);
        while !s.stopped() {
            let pid = s.pid.load(Ordering::Relaxed);
            if let Some(kib) = rss_kib(pid) {
                min = min.min(kib);
                max = max.max(kib);
            }
            thread::sleep(Duration::from_millis(250));
        }
        (if max == 0 { 0 } else { min }, max)
    });

    let deadline = started + opts.duration;
    let mut dice = Dice::new();
    let mut order: Vec<Fault> = Vec::new();
    let policy_path = d.dir().join("policy.toml");
    loop {
        let half = opts.fault_every.as_millis() as u64 / 2;
        let wait = Duration::from_millis(half + dice.below(2 * half + 1));
        if Instant::now() + wait + Duration::from_secs(5) > deadline {
            break;
        }
        thread::sleep(wait);
        if order.is_empty() {
            order = Fault::ALL.to_vec();
            // A fresh shuffle each cycle: every fault comes, in no fixed order.
            for i in (1..order.len()).rev() {
                order.swap(i, dice.below(i as u64 + 1) as usize);
            }
        }
        let Some(fault) = order.pop() else { continue };
        let result = inject(fault, &mut d, &disk, &mut tpm, &policy_path, &shared);
        let mut l = shared.ledger();
        *l.summary.faults.entry(fault).or_default() += 1;
        if let Err(why) = result {
            l.summary.unrecovered.push(format!("{}: {why}", fault.describe()));
        }
    }

    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a load thread panicked");
    }
    let rss = sampler.join().expect("sampler");
    let _ = hostile.wait();
    // At the end: a restart, then every acknowledged write with its bytes.
    d.restart(false);
    shared.pid.store(d.pid(), Ordering::Relaxed);
    check_writes(&shared, "at the end", true);
    let outcome = audit_verify(&shared);
    if let Outcome::Failed(code) = outcome {
        shared
            .ledger()
            .summary
            .unrecovered
            .push(format!("the last audit verify failed: {code}"));
    }
    let state = d.dir().join("state");
    let tampered = fs::read_dir(&state)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("audit.log"))
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .flat_map(|t| {
            t.lines()
                .filter(|l| l.contains("\"AUDIT_TAMPERED\""))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    let panics = d.log().matches("panicked").count();
    drop(d);
    drop(disk);
    let mut l = shared.ledger();
    l.summary.false_tamper.extend(tampered);
    l.summary.panics = panics;
    l.summary.rss_kib = rss;
    l.summary.rss_bound_kib = opts.rss_bound_kib;
    l.summary.elapsed = started.elapsed();
    std::mem::take(&mut l.summary)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Injects one fault and waits until hsmd has recovered from it.
fn inject(
    fault: Fault,
    d: &mut Daemon,
    disk: &SmallDisk,
    tpm: &mut Swtpm,
    policy: &Path,
    shared: &Shared,
) -> Result<(), String> {
    match fault {
        Fault::Kill | Fault::Term => {
            d.restart(fault == Fault::Kill);
            shared.pid.store(d.pid(), Ordering::Relaxed);
            shared.ledger().summary.restarts += 1;
            check_writes(
                shared,
                &format!("after restart {}", shared.ledger().summary.restarts),
                false,
            );
            match audit_verify(shared) {
                Outcome::Done => Ok(()),
                Outcome::Failed(code) => Err(format!("audit verify after the restart: {code}")),
                _ => Ok(()),
            }
        }
        Fault::DiskFull => {
            let filler = disk.fill();
            thread::sleep(Duration::from_secs(2));
            fs::remove_file(&filler).map_err(|e| format!("remove the filler: {e}"))?;
            wait_for("the audit log resuming", Duration::from_secs(20), || {
                audit_healthy(&shared.socket)
            })
        }
        Fault::Pkcs11Helper => {
            let Some(pid) = d.pkcs11_helper_pid() else {
                return Err("no PKCS#11 helper was running".into());
            };
            kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).map_err(|e| format!("kill the helper: {e}"))?;
            wait_for("the pkcs11 backend healthy again", Duration::from_secs(20), || {
                backend_health(d, "pkcs11").0
            })
        }
        Fault::TpmGone => {
            tpm.stop();
            thread::sleep(Duration::from_secs(2));
            tpm.resume();
            wait_for("the tpm backend healthy again", Duration::from_secs(60), || {
                backend_health(d, "tpm").0
            })
        }
        Fault::PolicyBroken | Fault::PolicyEdited => {
            let good = fs::read_to_string(policy).map_err(|e| format!("read the policy: {e}"))?;
            let edit = if fault == Fault::PolicyBroken {
                format!("{good}\n[[bind]\nusers = [\"4102\"\nroles = [\"admin\"]\n")
            } else {
                // Valid, and changes nothing the load depends on.
                format!("{good}\n[roles.unused]\npermissions = [{{ resource = \"keys\", action = \"list\" }}]\n")
            };
            fs::write(policy, edit).map_err(|e| format!("write the policy: {e}"))?;
            thread::sleep(Duration::from_secs(2));
            fs::write(policy, good).map_err(|e| format!("put the policy back: {e}"))?;
            Ok(())
        }
    }
}

/// Whether a summary's every fault kind was injected at least once.
#[must_use]
pub fn every_fault_injected(summary: &Summary) -> bool {
    Fault::ALL.iter().all(|f| summary.faults.get(f).is_some_and(|n| *n > 0))
}
