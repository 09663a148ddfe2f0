//! Must show 7: `hsmd --check-config` on a config with an unknown key fails and
//! names the key; valid configs pass; a bad config stops start-up; the policy
//! file it names is checked as start-up would load it.

use std::{fs, process::Command};

use hsmd_tests::{bin, Daemon};

fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hsmd.toml");
    fs::write(&path, text).expect("write");
    let out = Command::new(bin("hsmd"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run hsmd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_key_fails_and_names_the_key_and_line() {
    let (ok, _, err) = check("state_dir = \"/var/lib/hsmd\"\n\n[limits]\nmax_conections = 3\n");
    assert!(!ok);
    assert!(err.contains("max_conections"), "{err}");
    assert!(err.contains("line 4"), "{err}");
    // It also says what would have been valid.
    assert!(err.contains("max_connections"), "{err}");

    let (ok, _, err) = check("[sockets]\npath = \"/run/x.sock\"\n");
    assert!(!ok);
    assert!(err.contains("sockets"), "{err}");
}

#[test]
fn the_policy_file_is_checked_too_and_the_packaged_one_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    let config = format!("[policy]\npath = {:?}\n", policy.to_str().expect("utf-8"));
    fs::write(&policy, "[[bind]]\nusers = [\"root\"]\nroles = [\"nosuch\"]\n").expect("write");
    let (ok, _, err) = check(&config);
    assert!(!ok, "a policy start-up would refuse passed --check-config");
    assert!(err.contains("unknown role \"nosuch\""), "{err}");
    let packaged = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/policy.toml");
    fs::copy(packaged, &policy).expect("copy");
    let (ok, out, err) = check(&config);
    assert!(ok, "{err}");
    assert!(out.contains("policy") && out.contains("is valid (3 roles)"), "{out}");
}

#[test]
fn valid_config_passes_and_reports_warnings() {
    let (ok, out, err) = check("[socket]\nmode = \"0666\"\n[limits]\nidle_timeout = \"90s\"\n");
    assert!(ok, "{err}");
    assert!(out.contains("is valid"), "{out}");
    assert!(out.contains("warning: socket.mode 0666"), "{out}");
}

#[test]
fn out_of_range_and_mistyped_values_are_refused_with_the_key() {
    for (text, needle) in [
        ("[limits]\nmax_frame_bytes = 5\n", "limits.max_frame_bytes"),
        ("[limits]\nmax_connections = \"many\"\n", "max_connections"),
        ("[socket]\nmode = \"rw-rw----\"\n", "mode"),
        ("[log]\nformat = \"xml\"\n", "xml"),
        (
            "[socket]\ngroup = \"no-such-group-hsmd-test\"\n",
            "no-such-group-hsmd-test",
        ),
    ] {
        let (ok, _, err) = check(text);
        assert!(!ok, "{text:?} should be refused");
        assert!(err.contains(needle), "{text:?}: {err}");
    }
}

#[test]
fn daemon_refuses_to_start_on_a_bad_config() {
    let prepared = Daemon::builder().prepare();
    fs::write(&prepared.config, "bogus = true\n").expect("write");
    let out = prepared.command().output().expect("run hsmd");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus"), "{err}");
    assert!(!prepared.socket.exists());
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = Command::new(bin("hsmd"))
        .args(["--check-config", "--config", "/nonexistent/hsmd.toml"])
        .output()
        .expect("run hsmd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read config file /nonexistent/hsmd.toml"), "{err}");
}

#[test]
fn without_a_config_file_hsmd_runs_on_defaults_and_says_so() {
    let prepared = Daemon::builder().prepare();
    // An installed package's /etc/hsmd/hsmd.toml would be read instead of
    // the defaults; hsmd then runs in a mount namespace of its own where
    // /etc/hsmd is empty (which needs root).
    let installed = std::path::Path::new("/etc/hsmd").exists();
    let mut cmd = if installed {
        assert!(
            hsmd_tests::is_root(),
            "this machine has /etc/hsmd; hiding it from hsmd needs root (or remove the hsmd package)"
        );
        let mut c = Command::new("unshare");
        c.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs /etc/hsmd && exec \"$0\" \"$@\"",
        ])
        .arg(bin("hsmd"));
        c
    } else {
        Command::new(bin("hsmd"))
    };
    cmd.arg("--socket")
        .arg(&prepared.socket)
        .arg("--state-dir")
        .arg(prepared.dir.path().join("state"));
    let socket = prepared.socket.clone();
    let d = prepared.spawn(&mut cmd, &socket);
    assert!(d.log().contains("running on built-in defaults"), "{}", d.log());
    let status = d.client().status().expect("status");
    assert_eq!(status.max_connections, 256, "the built-in default");
    assert!(!status.dev_mode);
    let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&socket).expect("stat").permissions());
    assert_eq!(mode & 0o777, 0o660, "the built-in socket mode");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let prepared = Daemon::builder().prepare();
    let mut cmd = prepared.command();
    cmd.args(["--log-format", "json"]);
    let socket = prepared.socket.clone();
    let d = prepared.spawn(&mut cmd, &socket);
    d.client().ping(vec![]).expect("ping");
    let log = d.log();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 2, "{log}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{line}");
    }
    assert!(log.contains("\"message\":\"hsmd is listening\""), "{log}");
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn the_socket_gets_the_configured_group() {
    use std::os::unix::fs::MetadataExt;
    hsmd_tests::require_root("giving a file to another group");
    let Some(group) = nix::unistd::Group::from_gid(65534.into()).ok().flatten() else {
        panic!("this test gives the socket to group 65534 (nogroup), which this machine lacks");
    };
    let d = Daemon::builder().socket_mode("0660").socket_group(&group.name).start();
    assert_eq!(fs::metadata(&d.socket).expect("stat").gid(), 65534);
}
