//! No user can lock out the others: a member of the operator role holding
//! stores open on silent pipes, connections up to and past its cap, or every
//! frame-path session it may, costs only its own share; root, admins and other
//! users are still served. The hostile user is `hsmd-hostile` run as another
//! uid (`setpriv`, so these tests need root).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    time::{Duration, Instant},
};

use hsmd_tests::check::ok;
use hsmd_tests::{bin, Daemon, DaemonBuilder};

const ATTACKER: u32 = 4001;
const OTHER: u32 = 4002;
const ADMIN: u32 = 4003;
const OPERATOR: u32 = 4004;

const POLICY: &str = r#"
[[bind]]
users = ["4001", "4002", "4004"]
roles = ["operator"]

[[bind]]
users = ["0", "4003"]
roles = ["admin"]
"#;

struct Setup {
    d: Daemon,
    hsmctl: PathBuf,
    hostile: PathBuf,
    work: PathBuf,
}

fn setup(builder: DaemonBuilder) -> Setup {
    hsmd_tests::require_root("acting as other uids");
    let d = builder
        .socket_mode("0666")
        .users(&["4001", "4002", "4003", "4004"])
        .policy(POLICY)
        .start();
    ok(&d.hsmctl(&[
        "init",
        "--keyfile-out",
        d.dir().join("unlock.key").to_str().expect("utf-8"),
    ]));
    // Copies the other uids can run (the build tree may be private).
    let copy = |from: &Path, name: &str| {
        let to = d.dir().join(name);
        fs::copy(from, &to).expect("copy binary");
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).expect("chmod");
        to
    };
    let hsmctl = copy(&bin("hsmctl"), "hsmctl");
    let hostile = copy(Path::new(env!("CARGO_BIN_EXE_hsmd-hostile")), "hsmd-hostile");
    let work = d.dir().join("work");
    fs::create_dir(&work).expect("mkdir");
    fs::set_permissions(&work, fs::Permissions::from_mode(0o777)).expect("chmod");
    fs::write(work.join("data"), b"release 1.0").expect("write");
    fs::set_permissions(work.join("data"), fs::Permissions::from_mode(0o644)).expect("chmod");
    let s = Setup {
        d,
        hsmctl,
        hostile,
        work,
    };
    ok(&s.d.hsmctl(&["key", "create", "files", "--type", "aes256-gcm"]));
    ok(&s.d.hsmctl(&["key", "create", "s", "--type", "ed25519"]));
    s
}

/// A running `hsmd-hostile` and what it reported.
struct Hostile {
    child: Child,
    ok: usize,
    refused: usize,
    first_refusal: String,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Setup {
    fn hsmctl_as(&self, uid: u32, args: &[&str]) -> Output {
        hsmd_tests::as_uid(uid, &self.hsmctl)
            .arg("--socket")
            .arg(&self.d.socket)
            .args(args)
            .current_dir(&self.work)
            .output()
            .expect("run setpriv (util-linux)")
    }

    fn hostile(&self, uid: u32, what: &str, n: usize) -> Hostile {
        let mut child = hsmd_tests::as_uid(uid, &self.hostile)
            .arg(what)
            .arg(&self.d.socket)
            .arg(n.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run hsmd-hostile");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read its report");
        println!("hsmd-hostile {what} {n} as uid {uid}: {}", line.trim());
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        };
        Hostile {
            ok: field("ok="),
            refused: field("refused="),
            first_refusal: line
                .split_once("first_refusal=")
                .map(|(_, m)| m.trim().to_owned())
                .unwrap_or_default(),
            child,
        }
    }

    /// Runs `f`, which must finish within `limit`; returns how long it took.
    fn within(&self, what: &str, limit: Duration, f: impl FnOnce()) -> Duration {
        let started = Instant::now();
        f();
        let took = started.elapsed();
        assert!(took < limit, "{what} took {took:?}; log:\n{}", self.d.log());
        took
    }
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn silent_pipes_held_by_one_user_cost_only_that_users_share() {
    let s = setup(Daemon::builder());
    ok(&s.d.hsmctl(&["status"]));
    let before = s.d.vm_rss_kib();
    let attack = s.hostile(ATTACKER, "silent-pipes", 32);
    // A store takes its chunk buffers only once its pipe gives bytes.
    let during = s.d.vm_rss_kib();
    println!("RSS {before} KiB before, {during} KiB with 4 stores waiting on silent pipes");
    // Each waiting store costs its thread (a locked stack), not its buffers.
    assert!(
        during < before + 12 * 1024,
        "RSS grew from {before} KiB to {during} KiB"
    );
    // Four stores wait on their pipes (files.max_transfers_per_uid); the rest
    // are refused at once, naming the limit.
    assert_eq!((attack.ok, attack.refused), (4, 28), "{}", attack.first_refusal);
    assert!(
        attack.first_refusal.starts_with("(busy)") && attack.first_refusal.contains("files.max_transfers_per_uid = 4"),
        "{}",
        attack.first_refusal
    );
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        // Each on a fresh connection: the identity lookup at connect is timed too.
        worst = worst.max(s.within("root's status", Duration::from_secs(1), || {
            let mut c = s.d.client();
            c.status().expect("status");
        }));
        worst = worst.max(s.within("root's whoami", Duration::from_secs(1), || {
            let mut c = s.d.client();
            assert_eq!(c.whoami().expect("whoami").uid, 0);
        }));
        // A third uid signs, through hsmctl (process start included).
        worst = worst.max(s.within("another uid's sign", Duration::from_secs(1), || {
            ok(&s.hsmctl_as(
                OTHER,
                &["sign", "--force", "s", "-i", "data", "-o", &format!("sig{round}")],
            ));
        }));
    }
    println!("with 4 stores held on silent pipes and 28 refused, the slowest answer took {worst:?}");
    // Another uid still has its own share of transfers.
    let store = s.hsmctl_as(OTHER, &["file", "store", "data"]);
    assert!(ok(&store).contains("Token: "));
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn one_uid_gets_its_share_of_connections_and_root_and_admins_still_get_in() {
    let s = setup(
        Daemon::builder()
            .limit("max_connections", "20")
            .limit("max_connections_per_uid", "8")
            .limit("reserved_connections", "4"),
    );
    let greedy = s.hostile(ATTACKER, "connections", 12);
    assert_eq!((greedy.ok, greedy.refused), (8, 4), "{}", greedy.first_refusal);
    assert!(
        greedy.first_refusal.starts_with("(too-many-connections)")
            && greedy.first_refusal.contains("limits.max_connections_per_uid = 8"),
        "{}",
        greedy.first_refusal
    );
    // A second user fills the rest of the general places (20 - 4 kept).
    let second = s.hostile(OTHER, "connections", 8);
    assert_eq!(second.ok, 8, "{}", second.first_refusal);
    // An operator finds only the kept places, which are not for it.
    let third = s.hostile(OPERATOR, "connections", 2);
    assert_eq!((third.ok, third.refused), (0, 2), "{}", third.first_refusal);
    assert!(
        third.first_refusal.contains("kept for root and the admin role"),
        "{}",
        third.first_refusal
    );
    // Root and an admin get in to look and to lock.
    s.within("root's status", Duration::from_secs(1), || {
        ok(&s.d.hsmctl(&["status"]));
    });
    s.within("an admin's status", Duration::from_secs(1), || {
        ok(&s.hsmctl_as(ADMIN, &["status"]));
    });
    ok(&s.d.hsmctl(&["lock"]));
    drop((greedy, second, third));

    // Frame-path sessions: one uid holds at most its share ...
    let key = s.d.dir().join("unlock.key");
    ok(&s.d.hsmctl(&["unlock", "--keyfile", key.to_str().expect("utf-8")]));
    let held = s.hostile(ATTACKER, "sessions", 12);
    assert_eq!((held.ok, held.refused), (8, 4), "{}", held.first_refusal);
    assert!(
        held.first_refusal.starts_with("(busy)") && held.first_refusal.contains("files.max_sessions_per_uid = 8"),
        "{}",
        held.first_refusal
    );
    // ... and root is served meanwhile.
    ok(&s.d.hsmctl(&[
        "file",
        "store",
        s.work.join("data").to_str().expect("utf-8"),
        "--via",
        "frames",
    ]));
    // Closing the connection frees them (and their unfinished stores).
    drop(held);
    let again = s.hostile(ATTACKER, "sessions", 8);
    assert_eq!(again.ok, 8, "the sessions were not freed: {}", again.first_refusal);
    drop(again);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let debris: Vec<_> = fs::read_dir(s.d.dir().join("state/files"))
            .expect("files dir")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| n.to_string_lossy().starts_with(".incoming"))
            .collect();
        if debris.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "abandoned stores left {debris:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of one unlabelled metric in `hsmctl metrics` output.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn half_sent_large_frames_hold_only_their_share_of_frame_memory() {
    // Enough connections for one uid that, unbounded, they would hold 150 MiB.
    let s = setup(
        Daemon::builder()
            .limit("max_connections", "256")
            .limit("max_connections_per_uid", "200"),
    );
    ok(&s.d.hsmctl(&["status"]));
    let before = s.d.vm_rss_kib();
    let attack = s.hostile(ATTACKER, "half-frames", 150);
    assert_eq!(attack.ok, 150, "{}", attack.first_refusal);
    // Time for hsmd to read all it will (well inside limits.frame_timeout).
    std::thread::sleep(Duration::from_secs(2));
    let during = s.d.vm_rss_kib();
    let metrics = ok(&s.d.hsmctl(&["metrics"]));
    let held = metric(&metrics, "hsmd_frame_memory_bytes");
    let waits = metric(&metrics, "hsmd_frame_memory_waits_total");
    println!("RSS {before} KiB before, {during} KiB with 150 half-sent 1 MiB frames; frame memory held {held} B, waits {waits}");
    // The attacker's share (limits.frame_memory_per_uid, 4 MiB): four frames.
    assert!(held <= 4.0 * 1024.0 * 1024.0, "held {held}");
    assert!(held >= 3.0 * 1024.0 * 1024.0, "the first frames were read: held {held}");
    assert!(waits >= 100.0, "the rest wait: {waits}");
    assert!(
        during < before + 16 * 1024,
        "RSS grew from {before} KiB to {during} KiB"
    );
    // Others have the rest of the frame memory: root and another user are served.
    s.within("root's status", Duration::from_secs(1), || {
        ok(&s.d.hsmctl(&["status"]));
    });
    s.within("another user's sign", Duration::from_secs(2), || {
        ok(&s.hsmctl_as(OTHER, &["sign", "--force", "s", "-i", "data", "-o", "data.sig"]));
    });
    drop(attack);
}
