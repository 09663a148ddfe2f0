//! Issue 7, key backends behind the one trait. This file: the `mock` backend
//! (must-show 5) and what every backend shares: `--backend` on creation, the
//! backend in key info, audit lines and policy, health in status and metrics.

use hsmd_tests::check::ok;
use hsmd_tests::Daemon;
use protocol::{ErrorCode, KeyOptions, KeyType, Operation, Reply};

fn mock_daemon(latency: &str, failure_rate: f64) -> Daemon {
    Daemon::builder()
        .dev()
        .extra(&format!(
            "[backends.mock]\nlatency = {latency:?}\nfailure_rate = {failure_rate}\n"
        ))
        .start()
}

fn create(d: &Daemon, name: &str, key_type: KeyType, backend: Option<&str>) -> Result<Reply, protocol::ClientError> {
    d.client().call(Operation::KeyCreate {
        name: name.into(),
        key_type,
        usages: Vec::new(),
        options: KeyOptions {
            backend: backend.map(str::to_owned),
            ..KeyOptions::default()
        },
    })
}

/// Creates a mock key, retrying the injected failures.
fn create_mock(d: &Daemon, name: &str, key_type: KeyType) {
    for _ in 0..200 {
        match create(d, name, key_type, Some("mock")) {
            Ok(_) => return,
            Err(e) if e.code() == Some(ErrorCode::BackendFailed) => continue,
            Err(e) => panic!("creating {name}: {e}"),
        }
    }
    panic!("200 injected failures in a row at rate 0.5");
}

#[test]
fn mock_failures_surface_as_backend_errors_in_client_and_audit_while_soft_keys_work() {
    let d = mock_daemon("0s", 0.5);
    create_mock(&d, "flaky", KeyType::Ed25519);
    ok(&d.hsmctl(&["key", "create", "steady", "--type", "ed25519"]));
    let info = ok(&d.hsmctl(&["key", "info", "flaky"]));
    assert!(info.contains("backend:      mock"), "{info}");
    let info = ok(&d.hsmctl(&["key", "info", "steady"]));
    assert!(info.contains("backend:      soft"), "{info}");

    let data = d.dir().join("data");
    std::fs::write(&data, b"release artefact").expect("write");
    let data = data.to_str().expect("utf-8");
    let (mut good, mut failed) = (0, 0);
    for i in 0..40 {
        let sig = d.dir().join(format!("sig{i}"));
        let out = d.hsmctl(&[
            "sign",
            "--force",
            "flaky",
            "-i",
            data,
            "-o",
            sig.to_str().expect("utf-8"),
        ]);
        if out.status.success() {
            good += 1;
        } else {
            failed += 1;
            assert_eq!(out.status.code(), Some(1), "{out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("the mock backend failed: injected failure of sign") && err.contains("(backend-failed)"),
                "{err}"
            );
        }
        // The soft key never fails.
        ok(&d.hsmctl(&[
            "sign",
            "steady",
            "-i",
            data,
            "-o",
            d.dir().join("s").to_str().expect("utf-8"),
            "--force",
        ]));
    }
    // Binomial(40, 0.5): both outcomes occur except with probability 2^-39.
    assert!(good > 0 && failed > 0, "{good} signed, {failed} failed");

    // The protocol code, for programs.
    let mut c = d.client();
    let codes: Vec<_> = (0..30)
        .map(|_| {
            c.call(Operation::Sign(protocol::SignArgs {
                name: "flaky".into(),
                digest: vec![1; 64],
            }))
            .err()
            .and_then(|e| e.code())
        })
        .collect();
    assert!(codes.contains(&Some(ErrorCode::BackendFailed)), "{codes:?}");
    assert!(codes.contains(&None), "{codes:?}");

    // The audit log names the backend of every key event, failures included.
    let lines = ok(&d.hsmctl(&["--json", "audit", "show", "--event", "SIGN"]));
    let events: Vec<serde_json::Value> = serde_json::from_str(&lines).expect("one JSON array of events");
    let of = |key: &str, result: &str| {
        events
            .iter()
            .filter(|e| e["resource"] == format!("key:{key}") && e["result"] == result)
            .collect::<Vec<_>>()
    };
    let mock_failures = of("flaky", "failure");
    assert!(!mock_failures.is_empty(), "{lines}");
    for e in &mock_failures {
        assert_eq!(e["backend"], "mock", "{e}");
        assert_eq!(e["metadata"]["error"], "backend-failed", "{e}");
        assert!(
            e["metadata"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("injected failure")),
            "{e}"
        );
    }
    assert!(of("flaky", "success").iter().all(|e| e["backend"] == "mock"));
    let soft = of("steady", "success");
    assert_eq!(soft.len(), 40, "{lines}");
    assert!(soft.iter().all(|e| e["backend"] == "soft"));
    assert!(of("steady", "failure").is_empty());
    let created = ok(&d.hsmctl(&["--json", "audit", "show", "--event", "KEY_CREATED", "--key", "flaky"]));
    let created: Vec<serde_json::Value> = serde_json::from_str(&created).expect("one JSON array of events");
    assert!(
        !created.is_empty() && created.iter().all(|e| e["backend"] == "mock"),
        "{created:?}"
    );
}

#[test]
fn mock_latency_is_felt_by_the_client_and_other_keys_are_not_held_up() {
    // A latency far above a loaded machine's jitter: held up, the fast calls
    // below would wait over 1.4 s; free, they take a few milliseconds.
    let d = mock_daemon("1500ms", 0.0);
    create_mock(&d, "slow", KeyType::HmacSha256);
    ok(&d.hsmctl(&["key", "create", "fast", "--type", "hmac-sha256"]));
    let mac = |name: &str| {
        Operation::Mac(protocol::MacArgs {
            name: name.into(),
            data: b"x".to_vec(),
        })
    };
    let mut c = d.client();
    let t = std::time::Instant::now();
    c.call(mac("slow")).expect("mac");
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    // A slow backend operation runs off the reactor: a soft key answers meanwhile.
    let slow = {
        let mut c = d.client();
        std::thread::spawn(move || c.call(mac("slow")).expect("mac"))
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut c2 = d.client();
    let t = std::time::Instant::now();
    for _ in 0..20 {
        c2.call(mac("fast")).expect("mac");
    }
    assert!(t.elapsed() < std::time::Duration::from_millis(700), "{:?}", t.elapsed());
    slow.join().expect("slow thread");
}

#[test]
fn backends_show_in_status_and_metrics_and_an_unconfigured_one_is_named() {
    let d = mock_daemon("0s", 0.0);
    let status = ok(&d.hsmctl(&["status"]));
    assert!(status.contains("backends:     soft     ok"), "{status}");
    assert!(
        status.contains("mock     ok        software keys with injected latency"),
        "{status}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&d.hsmctl(&["--json", "status"]))).expect("json");
    let names: Vec<_> = json["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| (b["name"].as_str().unwrap_or("?").to_owned(), b["healthy"].as_bool()))
        .collect();
    assert_eq!(
        names,
        vec![("soft".to_owned(), Some(true)), ("mock".to_owned(), Some(true))]
    );
    create_mock(&d, "m", KeyType::Aes256Gcm);
    let metrics = ok(&d.hsmctl(&["metrics"]));
    assert!(metrics.contains("hsmd_backend_up{backend=\"mock\"} 1"), "{metrics}");
    assert!(metrics.contains("hsmd_backend_up{backend=\"soft\"} 1"), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hsmd_keys{") && l.contains("backend=\"mock\"") && l.ends_with(" 1")),
        "{metrics}"
    );

    // A backend this daemon does not have: refused before anything is made.
    let out = d.hsmctl(&["key", "create", "t", "--type", "ecdsa-p256", "--backend", "tpm"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no backend \"tpm\" is configured")
            && err.contains("configured: soft, mock")
            && err.contains("(backend-unavailable)"),
        "{err}"
    );
    assert!(!ok(&d.hsmctl(&["key", "list"])).contains(" t "));

    // Without [backends.mock] the mock is not there at all.
    let plain = Daemon::builder().dev().start();
    let e = create(&plain, "m", KeyType::Ed25519, Some("mock")).expect_err("no mock");
    assert_eq!(e.code(), Some(ErrorCode::BackendUnavailable), "{e}");
}

#[test]
fn the_default_backend_takes_keys_that_name_none_and_rotation_stays_in_it() {
    let d = Daemon::builder()
        .dev()
        .extra("[backends]\ndefault = \"mock\"\n\n[backends.mock]\nfailure_rate = 0.0\n")
        .start();
    ok(&d.hsmctl(&["key", "create", "k", "--type", "ecdsa-p256"]));
    ok(&d.hsmctl(&["key", "rotate", "k"]));
    let info: serde_json::Value = serde_json::from_str(&ok(&d.hsmctl(&["--json", "key", "info", "k"]))).expect("json");
    assert_eq!(info["backend"], "mock");
    assert_eq!(info["version"], 2);
    ok(&d.hsmctl(&["key", "create", "s", "--type", "ecdsa-p256", "--backend", "soft"]));
    let info: serde_json::Value = serde_json::from_str(&ok(&d.hsmctl(&["--json", "key", "info", "s"]))).expect("json");
    assert_eq!(info["backend"], "soft");
}

#[test]
fn a_policy_permission_limited_to_a_backend_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    let me = nix::unistd::getuid().as_raw();
    std::fs::write(
        &policy,
        format!(
            "[roles.soft-signer]\npermissions = [\n  {{ resource = \"keys\", action = \"*\", keys = \"*\", backend = \"soft\" }},\n  \
             {{ resource = \"keys\", action = \"create\", keys = \"made-*\", backend = \"mock\" }},\n  \
             {{ resource = \"keystore\", action = \"*\" }},\n]\n\n[[bind]]\nusers = [\"{me}\"]\nroles = [\"soft-signer\"]\n"
        ),
    )
    .expect("policy");
    let d = Daemon::builder()
        .dev()
        .extra(&format!(
            "[policy]\npath = {policy:?}\n\n[backends.mock]\nfailure_rate = 0.0\n"
        ))
        .start();
    ok(&d.hsmctl(&["key", "create", "s", "--type", "ed25519"]));
    let out = d.hsmctl(&["key", "create", "m", "--type", "ed25519", "--backend", "mock"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(permission-denied)"), "{out:?}");
    let mut c = d.client();
    c.call(Operation::Sign(protocol::SignArgs {
        name: "s".into(),
        digest: vec![0; 64],
    }))
    .expect("soft key signs");
    // A mock key it may create but not use: the check reads the key's own backend.
    ok(&d.hsmctl(&["key", "create", "made-m", "--type", "ed25519", "--backend", "mock"]));
    let e = c
        .call(Operation::Sign(protocol::SignArgs {
            name: "made-m".into(),
            digest: vec![0; 64],
        }))
        .expect_err("a mock key is outside the role's backend");
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
}
