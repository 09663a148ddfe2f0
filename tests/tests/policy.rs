//! The policy and rate limits (issue 5, must-shows 1–3), acted out by three
//! numeric uids in child processes (`setpriv`, so the test needs root):
//! 4001 is a viewer, 4002 operates `ci-*` keys, 4003 is an admin.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use hsmd_tests::check::ok;
use hsmd_tests::{bin, Daemon};

const POLICY: &str = r#"
[roles.ci-operator]
permissions = [
  { resource = "keys", action = "*", keys = "ci-*" },
]

[[bind]]
users = ["4001"]
roles = ["viewer"]

[[bind]]
users = ["4002"]
roles = ["ci-operator"]

[[bind]]
users = ["4003", "0"]
roles = ["admin"]
"#;

struct Setup {
    d: Daemon,
    hsmctl: PathBuf,
    work: PathBuf,
    policy: PathBuf,
}

fn setup(extra: &str) -> Setup {
    hsmd_tests::require_root("acting as other uids");
    let d = Daemon::builder()
        .socket_mode("0666")
        .users(&["4001", "4002", "4003", "4005"])
        .extra(&format!("[policy]\npath = \"$DIR/policy.toml\"\n{extra}"))
        .prepare();
    fs::write(d.dir.path().join("policy.toml"), POLICY).expect("write policy");
    let d = d.start();
    ok(&d.hsmctl(&[
        "init",
        "--keyfile-out",
        d.dir().join("unlock.key").to_str().expect("utf-8"),
    ]));
    let hsmctl = d.dir().join("hsmctl");
    fs::copy(bin("hsmctl"), &hsmctl).expect("copy hsmctl");
    fs::set_permissions(&hsmctl, fs::Permissions::from_mode(0o755)).expect("chmod");
    let work = d.dir().join("work");
    fs::create_dir(&work).expect("mkdir");
    fs::set_permissions(&work, fs::Permissions::from_mode(0o777)).expect("chmod");
    fs::write(work.join("data"), b"release 1.0").expect("write");
    fs::set_permissions(work.join("data"), fs::Permissions::from_mode(0o644)).expect("chmod");
    let policy = d.dir().join("policy.toml");
    Setup {
        d,
        hsmctl,
        work,
        policy,
    }
}

impl Setup {
    fn as_uid(&self, uid: u32, args: &[&str]) -> Output {
        hsmd_tests::as_uid(uid, &self.hsmctl)
            .arg("--socket")
            .arg(&self.d.socket)
            .args(args)
            .current_dir(&self.work)
            .output()
            .expect("run setpriv (util-linux)")
    }

    fn sign(&self, uid: u32, key: &str) -> Output {
        self.as_uid(
            uid,
            &["sign", "--force", key, "-i", "data", "-o", &format!("{key}.{uid}.sig")],
        )
    }
}

fn denied(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("(permission-denied)"), "{err}");
    err
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).expect("write");
    fs::rename(&tmp, path).expect("rename");
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn viewers_operators_of_a_pattern_and_admins_get_exactly_their_permissions() {
    let s = setup("");
    ok(&s.d.hsmctl(&["key", "create", "ci-release", "--type", "ed25519"]));
    ok(&s.d.hsmctl(&["key", "create", "prod-root", "--type", "ed25519"]));

    // Viewer: lists, never signs.
    let list = ok(&s.as_uid(4001, &["key", "list"]));
    assert!(list.contains("ci-release") && list.contains("prod-root"), "{list}");
    let err = denied(&s.sign(4001, "ci-release"));
    assert!(
        err.contains("keys:sign on key \"ci-release\"") && err.contains("your roles are viewer"),
        "{err}"
    );

    // Operator of ci-*: signs ci-release, not prod-root, and sees only ci-*.
    ok(&s.sign(4002, "ci-release"));
    // hsmctl reads the key's type first; with no permission at all on the key
    // even that is refused, and the refusal says so.
    let err = denied(&s.sign(4002, "prod-root"));
    assert!(
        err.contains("uid 4002 may not use key \"prod-root\": no role grants any keys permission on it"),
        "{err}"
    );
    // Asked directly, the refusal names the permission.
    let err = denied(&s.as_uid(4002, &["key", "rotate", "prod-root"]));
    assert!(err.contains("keys:rotate on key \"prod-root\""), "{err}");
    let list = ok(&s.as_uid(4002, &["key", "list"]));
    assert!(list.contains("ci-release") && !list.contains("prod-root"), "{list}");
    ok(&s.as_uid(4002, &["key", "create", "ci-new", "--type", "ecdsa-p256"]));
    denied(&s.as_uid(4002, &["key", "create", "prod-new", "--type", "ecdsa-p256"]));
    denied(&s.as_uid(4002, &["lock"]));

    // Admin: everything.
    ok(&s.sign(4003, "prod-root"));
    ok(&s.as_uid(4003, &["key", "delete", "ci-new"]));
    ok(&s.as_uid(4003, &["key", "purge", "ci-new", "--yes"]));

    // whoami and policy check explain.
    let who = ok(&s.as_uid(4002, &["whoami"]));
    assert!(who.contains("ci-operator (binding 2 (user 4002))"), "{who}");
    assert!(who.contains("keys:* on ci-* (role ci-operator)"), "{who}");
    let out = s.d.hsmctl(&["policy", "check", "4002", "sign", "prod-root"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("DENIED"), "{out:?}");
    let yes = ok(&s.d.hsmctl(&["policy", "check", "4002", "sign", "ci-release"]));
    assert!(
        yes.contains("ALLOWED") && yes.contains("role ci-operator") && yes.contains("binding 2"),
        "{yes}"
    );
    // Reading the policy is itself a permission.
    denied(&s.as_uid(4001, &["policy", "show"]));
    assert!(ok(&s.d.hsmctl(&["policy", "show"])).contains("ci-operator"));
    // Refusals are logged with who and what.
    assert!(s.d.log().contains("access denied"), "{}", s.d.log());
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn an_edited_policy_applies_within_seconds_and_a_broken_one_is_refused() {
    let s = setup("");
    ok(&s.d.hsmctl(&["key", "create", "ci-release", "--type", "ed25519"]));
    denied(&s.sign(4001, "ci-release"));
    // An editor's save: write elsewhere, rename over.
    write_atomically(
        &s.policy,
        &POLICY.replace("roles = [\"viewer\"]", "roles = [\"ci-operator\"]"),
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while !s.sign(4001, "ci-release").status.success() {
        assert!(Instant::now() < deadline, "policy not reloaded: {}", s.d.log());
        thread::sleep(Duration::from_millis(100));
    }
    assert!(s.d.log().contains("policy reloaded"), "{}", s.d.log());

    // A broken edit, written in place: refused, the previous policy stays.
    fs::write(
        &s.policy,
        POLICY.replace("roles = [\"viewer\"]", "roles = [\"no-such-role\"]"),
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !s.d.log().contains("policy reload refused") {
        assert!(Instant::now() < deadline, "no refusal logged: {}", s.d.log());
        thread::sleep(Duration::from_millis(100));
    }
    assert!(s.d.log().contains("no-such-role"));
    ok(&s.sign(4001, "ci-release"));
    // Both the reload and the refusal are in the audit log.
    let audited = |event: &str| {
        serde_json::from_str::<Vec<serde_json::Value>>(&ok(&s.d.hsmctl(&["--json", "audit", "show", "--event", event])))
            .expect("one JSON array of events")
            .len()
    };
    assert_eq!(audited("POLICY_RELOADED"), 1);
    assert_eq!(audited("CONFIG_ERROR"), 1);
    let err = ok(&s.d.hsmctl(&["--json", "audit", "show", "--event", "CONFIG_ERROR"]));
    assert!(
        err.contains("no-such-role") && err.contains("previous policy stays"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn a_uid_over_its_rate_is_limited_and_another_is_not() {
    let s = setup("[rate_limit]\nper_second = 2\nburst = 5\n");
    let out = s.as_uid(4002, &["ping", "-c", "30"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(rate-limited)") && err.contains("retry after"), "{err}");
    // Another uid has its own bucket.
    ok(&s.as_uid(4003, &["ping", "-c", "5"]));
    // And the limited uid gets through again after waiting.
    thread::sleep(Duration::from_millis(1100));
    ok(&s.as_uid(4002, &["ping", "-c", "2"]));
}

#[test]
fn a_policy_that_does_not_load_stops_the_daemon_from_starting() {
    let prepared = Daemon::builder()
        .policy("[[bind]]\nusers = [\"x\"]\nroles = [\"wizard\"]\n")
        .prepare();
    let out = prepared.command().output().expect("run hsmd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown role \"wizard\"") && err.contains("policy.path"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn audit_show_returns_exactly_the_events_asked_for_and_denials_are_audited() {
    let s = setup("");
    ok(&s.d.hsmctl(&["key", "create", "ci-release", "--type", "ed25519"]));
    ok(&s.d.hsmctl(&["key", "create", "ci-other", "--type", "ed25519"]));
    for _ in 0..2 {
        ok(&s.sign(4002, "ci-release"));
    }
    ok(&s.sign(4002, "ci-other"));
    for _ in 0..3 {
        ok(&s.sign(4003, "ci-release"));
    }
    denied(&s.sign(4001, "ci-release"));

    let show = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["--json", "audit", "show"];
        all.extend_from_slice(args);
        serde_json::from_str(&ok(&s.d.hsmctl(&all))).expect("one JSON array of events")
    };
    let lines = show(&["--since", "1d", "--event", "SIGN", "--user", "4002"]);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines
        .iter()
        .all(|l| l["event_type"] == "SIGN" && l["uid"] == 4002 && l["result"] == "success"));
    let lines = show(&[
        "--since",
        "1d",
        "--event",
        "SIGN",
        "--user",
        "4002",
        "--key",
        "ci-release",
    ]);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|l| l["resource"] == "key:ci-release"));
    let lines = show(&["--event", "SIGN", "--user", "4003"]);
    assert_eq!(lines.len(), 3, "{lines:?}");
    let denials = show(&["--event", "ACCESS_DENIED", "--user", "4001"]);
    assert_eq!(denials.len(), 1, "{denials:?}");
    assert_eq!(denials[0]["result"], "failure");
    assert!(denials[0]["risk_score"].as_u64().expect("risk") >= 6);
    assert!(
        denials[0]["metadata"]["message"]
            .as_str()
            .expect("message")
            .contains("keys:sign"),
        "{denials:?}"
    );
    // Who may read the audit log is itself policy.
    denied(&s.as_uid(4002, &["audit", "show"]));
    // The human table too.
    let table = ok(&s.d.hsmctl(&["audit", "show", "--event", "SIGN", "--user", "4002"]));
    assert_eq!(table.lines().count(), 4, "a header and three rows: {table}");
}

/// A user made for one test and removed after it (even if the test fails).
struct TempUser(String);

impl TempUser {
    fn add(name: &str, uid: u32) -> Self {
        let _ = Command::new("userdel").arg(name).output();
        let out = Command::new("useradd")
            .args(["--no-create-home", "--uid", &uid.to_string(), "--user-group", name])
            .output()
            .expect("useradd (passwd)");
        assert!(out.status.success(), "useradd: {out:?}");
        Self(name.to_owned())
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).output();
    }
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn owned_only_rights_follow_the_user_not_a_recycled_uid() {
    let s = setup("");
    let with_self_service = POLICY.to_owned()
        + "\n[roles.self-service]\npermissions = [ { resource = \"keys\", action = \"*\", owned = true } ]\n\n\
           [[bind]]\nusers = [\"4005\"]\nroles = [\"self-service\"]\n";
    fs::write(&s.policy, &with_self_service).expect("write");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !s.d.log().contains("policy reloaded") {
        assert!(Instant::now() < deadline, "{}", s.d.log());
        thread::sleep(Duration::from_millis(50));
    }
    ok(&s.d.hsmctl(&["key", "create", "roots", "--type", "ed25519"]));
    let alice = TempUser::add("hsmd-test-alice", 4005);
    ok(&s.as_uid(4005, &["key", "create", "alices", "--type", "ed25519"]));
    ok(&s.sign(4005, "alices"));
    denied(&s.sign(4005, "roots"));
    let info = ok(&s.d.hsmctl(&["key", "info", "alices"]));
    assert!(info.contains("uid 4005 (hsmd-test-alice)"), "{info}");

    // Alice leaves; her uid goes to someone else.
    drop(alice);
    let list = ok(&s.d.hsmctl(&["key", "list"]));
    assert!(
        list.contains("OWNER GONE (uid 4005 is no longer hsmd-test-alice)"),
        "{list}"
    );
    let _mallory = TempUser::add("hsmd-test-mallory", 4005);
    let err = denied(&s.sign(4005, "alices"));
    assert!(err.contains("alices"), "{err}");
    let list = ok(&s.d.hsmctl(&["key", "list"]));
    assert!(list.contains("OWNER GONE"), "recycled, still gone: {list}");
    // Deleting the orphan is an admin's call.
    denied(&s.as_uid(4005, &["key", "delete", "alices"]));
    ok(&s.as_uid(4003, &["key", "delete", "alices"]));
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn storing_a_file_takes_encrypt_on_the_wrapping_key_and_its_line_names_the_key() {
    let s = setup("");
    // 4002 may use the file store, and keys only under ci-*.
    let with_files = POLICY.to_owned()
        + "\n[roles.filer]\npermissions = [ { resource = \"files\", action = \"*\" } ]\n\n\
           [[bind]]\nusers = [\"4002\"]\nroles = [\"filer\"]\n";
    fs::write(&s.policy, &with_files).expect("write");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !s.d.log().contains("policy reloaded") {
        assert!(Instant::now() < deadline, "{}", s.d.log());
        thread::sleep(Duration::from_millis(50));
    }
    ok(&s.d.hsmctl(&["key", "create", "files", "--type", "aes256-gcm"]));
    ok(&s.d.hsmctl(&["key", "create", "ci-files", "--type", "aes256-gcm"]));
    let show = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["--json", "audit", "show", "--user", "4002"];
        all.extend_from_slice(args);
        serde_json::from_str(&ok(&s.d.hsmctl(&all))).expect("one JSON array of events")
    };
    for via in ["fd", "frames"] {
        // The default wrapping key `files` is not one of 4002's.
        let err = denied(&s.as_uid(4002, &["file", "store", "data", "--via", via]));
        assert!(err.contains("keys:encrypt on key \"files\""), "{via}: {err}");
        // With a key it may encrypt with, the store works.
        let out = ok(&s.as_uid(4002, &["file", "store", "data", "--key", "ci-files", "--via", via]));
        assert!(out.contains("Token: "), "{out}");
    }
    let denials = show(&["--event", "ACCESS_DENIED"]);
    assert_eq!(denials.len(), 2, "{denials:?}");
    assert!(
        denials.iter().all(|l| l["resource"] == "key:files"
            && l["metadata"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("keys:encrypt"))),
        "{denials:?}"
    );
    let stored = show(&["--event", "FILE_STORED"]);
    assert_eq!(stored.len(), 2, "{stored:?}");
    for line in &stored {
        assert_eq!(line["metadata"]["key"], "ci-files", "{line}");
        assert_eq!(line["metadata"]["version"], 1, "{line}");
        assert!(line["metadata"]["token"].is_string(), "{line}");
    }
    // The line stored through the descriptor is the key's own line.
    assert_eq!(show(&["--event", "FILE_STORED", "--key", "ci-files"]).len(), 1);
}

#[test]
fn key_exists_answers_only_those_with_a_permission_on_the_key_and_never_about_others() {
    let s = setup("");
    ok(&s.d.hsmctl(&["key", "create", "ci-release", "--type", "ed25519"]));
    ok(&s.d.hsmctl(&["key", "create", "team-key", "--type", "ed25519"]));
    // The ci operator: yes for its own pattern, and no for an absent ci-* name.
    let yes = s.as_uid(4002, &["key", "exists", "ci-release"]);
    assert_eq!(yes.status.code(), Some(0), "{yes:?}");
    let no = s.as_uid(4002, &["--json", "key", "exists", "ci-nothing"]);
    assert_eq!(no.status.code(), Some(1), "{no:?}");
    let doc: serde_json::Value = serde_json::from_slice(&no.stdout).expect("one JSON document");
    assert_eq!(doc["exists"], false, "{doc}");
    assert_eq!(doc["error"]["code"], "absent", "{doc}");
    // Outside its pattern it is refused alike whether the key is there or
    // not, so a refusal says nothing about which keys exist.
    for name in ["team-key", "no-such-key"] {
        let err = denied(&s.as_uid(4002, &["key", "exists", name]));
        assert!(err.contains(&format!("key {name:?}")), "{err}");
    }
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn a_message_signature_needs_the_keys_sign_permission_as_a_digest_signature_does() {
    let s = setup("");
    for key in ["ci-ssh", "prod-ssh"] {
        ok(&s.d.hsmctl(&["key", "create", key, "--type", "ed25519"]));
    }
    let ssh_sign = |uid: u32, key: &str| {
        s.as_uid(
            uid,
            &[
                "sign",
                "--force",
                key,
                "-i",
                "data",
                "-o",
                &format!("{key}.{uid}.ssh"),
                "--format",
                "ssh",
                "-n",
                "git",
            ],
        )
    };
    // The operator of ci-* keys signs a message with one, not with another key.
    let sig = ok(&ssh_sign(4002, "ci-ssh"));
    assert!(sig.is_empty(), "{sig}");
    let written = fs::read_to_string(s.work.join("ci-ssh.4002.ssh")).expect("the signature");
    assert!(written.starts_with("-----BEGIN SSH SIGNATURE-----"), "{written}");
    denied(&ssh_sign(4002, "prod-ssh"));
    // A viewer reads the key and its public half, and is refused the signature
    // itself: the message signature's own check, keys:sign on the key.
    let err = denied(&ssh_sign(4001, "ci-ssh"));
    assert!(err.contains("keys:sign on key \"ci-ssh\""), "{err}");
}
