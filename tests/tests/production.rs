//! The production profile (issue 5, must-show 7): `hsmd --check-config` and
//! start-up refuse each weakening setting, naming the key and the fix; a
//! configuration without any passes.

use std::{fs, os::unix::fs::PermissionsExt, path::Path, process::Command};

use hsmd_tests::bin;

fn base(dir: &Path) -> String {
    let state = dir.join("state");
    fs::create_dir_all(&state).expect("mkdir");
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).expect("chmod");
    fs::write(
        dir.join("policy.toml"),
        "[[bind]]\nusers = [\"0\"]\nroles = [\"admin\"]\n",
    )
    .expect("policy");
    format!(
        "profile = \"production\"\nstate_dir = {state:?}\n\n[socket]\npath = {sock:?}\nmode = \"0660\"\n\n\
         [log]\nlevel = \"info\"\n\n[memory]\nrequire_lock = true\n\n[policy]\npath = {policy:?}\n\n\
         [rate_limit]\nper_second = 100\n\n[audit]\nenabled = true\n",
        sock = dir.join("hsmd.sock"),
        policy = dir.join("policy.toml"),
    )
}

fn check(dir: &Path, text: &str, extra_args: &[&str]) -> (bool, String) {
    let config = dir.join("hsmd.toml");
    fs::write(&config, text).expect("config");
    let out = Command::new(bin("hsmd"))
        .arg("--check-config")
        .arg("--config")
        .arg(&config)
        .args(extra_args)
        .output()
        .expect("run hsmd");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_production_config_without_weak_settings_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, text) = check(dir.path(), &base(dir.path()), &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains("profile production: no setting weakens the daemon"),
        "{text}"
    );
}

#[test]
fn each_weak_setting_is_refused_with_its_key_and_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = base(dir.path());
    let cases: [(&str, String, &str); 8] = [
        (
            "socket.mode",
            good.replace("mode = \"0660\"", "mode = \"0666\""),
            "use 0660",
        ),
        (
            "policy.path",
            good.replace(&format!("path = {:?}", dir.path().join("policy.toml")), "")
                .replace("[policy]\n", ""),
            "every admitted peer would be admin",
        ),
        (
            "audit.enabled",
            good.replace("enabled = true", "enabled = false"),
            "set audit.enabled = true",
        ),
        (
            "rate_limit.per_second",
            good.replace("per_second = 100", "per_second = 0"),
            "rate limits are off",
        ),
        (
            "memory.require_lock",
            good.replace("require_lock = true", "require_lock = false"),
            "CAP_IPC_LOCK",
        ),
        (
            "log.level",
            good.replace("level = \"info\"", "level = \"debug\""),
            "use info",
        ),
        (
            "backends.mock",
            format!("{good}\n[backends.mock]\nlatency = \"1ms\"\n"),
            "remove the [backends.mock] section",
        ),
        (
            "log.level",
            good.replace("level = \"info\"", "level = \"hsmd=trace,warn\""),
            "use info",
        ),
    ];
    for (key, text, fix) in cases {
        let (ok, out) = check(dir.path(), &text, &[]);
        assert!(!ok, "{key} accepted:\n{text}");
        assert!(out.contains("profile = \"production\" refuses"), "{out}");
        assert!(out.contains(key) && out.contains(fix), "{key}: {out}");
    }
    // An empty policy.
    fs::write(dir.path().join("policy.toml"), "[roles.x]\npermissions = []\n").expect("write");
    let (ok, out) = check(dir.path(), &good, &[]);
    assert!(!ok && out.contains("binds no user or group"), "{out}");
    fs::write(
        dir.path().join("policy.toml"),
        "[[bind]]\nusers = [\"0\"]\nroles = [\"admin\"]\n",
    )
    .expect("write");
    // A state directory others can read.
    fs::set_permissions(dir.path().join("state"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let (ok, out) = check(dir.path(), &good, &[]);
    assert!(!ok && out.contains("state_dir") && out.contains("chmod 0700"), "{out}");
    fs::set_permissions(dir.path().join("state"), fs::Permissions::from_mode(0o700)).expect("chmod");
    // --dev with the production profile.
    let (ok, out) = check(dir.path(), &good, &["--dev"]);
    assert!(!ok && out.contains("throw-away"), "{out}");
    // Several at once are all listed.
    let many = good
        .replace("enabled = true", "enabled = false")
        .replace("per_second = 100", "per_second = 0");
    let (_, out) = check(dir.path(), &many, &[]);
    assert!(
        out.contains("audit.enabled") && out.contains("rate_limit.per_second"),
        "{out}"
    );
}

#[test]
fn start_up_refuses_what_check_config_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = base(dir.path()).replace("enabled = true", "enabled = false");
    let config = dir.path().join("hsmd.toml");
    fs::write(&config, text).expect("config");
    let out = Command::new(bin("hsmd"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run hsmd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audit.enabled: the audit log is off"), "{err}");
    assert!(!dir.path().join("hsmd.sock").exists(), "never listened");
}
