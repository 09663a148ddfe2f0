//! Issue 7, the `tpm` backend against swtpm (must-show 3, first part): a key
//! made inside the TPM signs, OpenSSL verifies, and the key survives a TPM
//! reset and an hsmd restart; a TPM that goes away is `backend-unavailable`
//! while other backends work.

use std::{fs, path::Path, process::Output, time::Duration};

use hsmd_tests::{openssl_verifies, Daemon, Swtpm};

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "command failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn health(d: &Daemon) -> (bool, String) {
    let v: serde_json::Value = serde_json::from_str(&ok(&d.hsmctl(&["--json", "status"]))).expect("json");
    let b = v["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["name"] == "tpm")
        .expect("tpm in status")
        .clone();
    (
        b["healthy"] == true,
        b["detail"].as_str().unwrap_or_default().to_owned(),
    )
}

#[test]
fn a_tpm_key_signs_for_openssl_and_survives_a_tpm_reset_and_a_restart() {
    let mut tpm = Swtpm::start();
    let mut d = Daemon::builder()
        .env("TSS2_LOG", "all+NONE")
        .extra(&format!("[backends.tpm]\ntcti = {:?}\n", tpm.tcti()))
        .start();
    let keyfile = d.dir().join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&keyfile)]));
    let (up, detail) = health(&d);
    assert!(up && detail.contains("TPM 2.0"), "{detail}");
    let out = ok(&d.hsmctl(&["key", "create", "boot", "--type", "ecdsa-p256", "--backend", "tpm"]));
    assert!(out.contains("backend tpm"), "{out}");
    let out = d.hsmctl(&["key", "create", "ed", "--type", "ed25519", "--backend", "tpm"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("makes ecdsa-p256 keys, not ed25519"),
        "{out:?}"
    );

    let data = d.dir().join("data");
    fs::write(&data, b"measured boot log").expect("write");
    let public = d.dir().join("boot.pem");
    ok(&d.hsmctl(&["key", "public", "boot", "-o", path(&public)]));
    let check = |d: &Daemon, n: &str| {
        let sig = d.dir().join(format!("{n}.sig"));
        ok(&d.hsmctl(&["sign", "boot", "-i", path(&data), "-o", path(&sig), "--format", "raw"]));
        assert!(
            openssl_verifies("ecdsa-p256", &public, &data, &sig),
            "openssl rejects the TPM's signature"
        );
        let mut bad = fs::read(&sig).expect("sig");
        bad[10] ^= 1;
        fs::write(&sig, bad).expect("write");
        assert!(!openssl_verifies("ecdsa-p256", &public, &data, &sig));
    };
    check(&d, "one");

    // The TPM goes away: unavailable, red, and the soft backend still works.
    tpm.stop();
    let out = d.hsmctl(&["sign", "boot", "-i", path(&data), "-o", path(&d.dir().join("x"))]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(backend-unavailable)"),
        "{out:?}"
    );
    assert!(!health(&d).0);
    ok(&d.hsmctl(&["key", "create", "s", "--type", "ed25519"]));
    ok(&d.hsmctl(&["sign", "s", "-i", path(&data), "-o", path(&d.dir().join("s.sig"))]));

    // Back after a reset (same state, fresh start-up): the key still signs.
    tpm.restart();
    let d_tcti = tpm.tcti();
    // The port may have changed: point hsmd at it and restart hsmd too.
    let config = d.dir().join("hsmd.toml");
    let text = fs::read_to_string(&config).expect("config");
    let start = text.find("tcti = ").expect("tcti line");
    let end = start + text[start..].find('\n').expect("eol");
    fs::write(&config, format!("{}tcti = {d_tcti:?}{}", &text[..start], &text[end..])).expect("config");
    d.restart(false);
    ok(&d.hsmctl(&["unlock", "--keyfile", path(&keyfile)]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !health(&d).0 {
        assert!(std::time::Instant::now() < deadline, "tpm stays red: {}", health(&d).1);
        std::thread::sleep(Duration::from_millis(100));
    }
    check(&d, "two");
}
