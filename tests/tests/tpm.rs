//! Issue 7, the `tpm` backend against swtpm (must-show 3, first part): a key
//! made inside the TPM signs, OpenSSL verifies, and the key survives a TPM
//! reset and an hsmd restart; a TPM that goes away is `backend-unavailable`
//! while other backends work.

use std::{fs, time::Duration};

use hsmd_tests::check::{ok, p as path};
use hsmd_tests::{openssl_verifies, Daemon, Swtpm};

fn health(d: &Daemon) -> (bool, String) {
    hsmd_tests::backend_health(d, "tpm")
}

/// An hsmd with the tpm backend on `tpm`, initialized with a key-file slot.
fn initialized(tpm: &Swtpm) -> (Daemon, std::path::PathBuf) {
    let d = Daemon::builder()
        .env("TSS2_LOG", "all+NONE")
        .extra(&format!("[backends.tpm]\ntcti = {:?}\n", tpm.tcti()))
        .start();
    let keyfile = d.dir().join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&keyfile)]));
    (d, keyfile)
}

#[test]
fn a_tpm_key_signs_for_openssl_and_survives_a_tpm_reset_and_a_restart() {
    let mut tpm = Swtpm::start();
    let (mut d, keyfile) = initialized(&tpm);
    let (up, detail) = health(&d);
    assert!(up && detail.contains("TPM 2.0"), "{detail}");
    let out = ok(&d.hsmctl(&["key", "create", "boot", "--type", "ecdsa-p256", "--backend", "tpm"]));
    assert!(out.contains("backend tpm"), "{out}");
    let out = d.hsmctl(&["key", "create", "ed", "--type", "ed25519", "--backend", "tpm"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("makes ecdsa-p256, rsa-pss-2048, rsa-pkcs1-2048 keys, not ed25519"),
        "{out:?}"
    );

    let data = d.dir().join("data");
    fs::write(&data, b"measured boot log").expect("write");
    let public = d.dir().join("boot.pem");
    ok(&d.hsmctl(&["key", "public", "--force", "boot", "-o", path(&public)]));
    let check = |d: &Daemon, n: &str| {
        let sig = d.dir().join(format!("{n}.sig"));
        ok(&d.hsmctl(&[
            "sign",
            "--force",
            "boot",
            "-i",
            path(&data),
            "-o",
            path(&sig),
            "--format",
            "raw",
        ]));
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
    // Two keys taking turns (hsmd keeps one loaded in the TPM and swaps).
    ok(&d.hsmctl(&["key", "create", "boot2", "--type", "ecdsa-p256", "--backend", "tpm"]));
    for (i, name) in ["boot2", "boot", "boot2", "boot"].iter().enumerate() {
        let sig = d.dir().join(format!("turn{i}.sig"));
        ok(&d.hsmctl(&["sign", "--force", name, "-i", path(&data), "-o", path(&sig)]));
        ok(&d.hsmctl(&["verify", name, "-i", path(&data), "-s", path(&sig)]));
    }

    // The TPM goes away: unavailable, red, and the soft backend still works.
    tpm.stop();
    let out = d.hsmctl(&[
        "sign",
        "--force",
        "boot",
        "-i",
        path(&data),
        "-o",
        path(&d.dir().join("x")),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(backend-unavailable)"),
        "{out:?}"
    );
    assert!(!health(&d).0);
    ok(&d.hsmctl(&["key", "create", "s", "--type", "ed25519"]));
    ok(&d.hsmctl(&[
        "sign",
        "--force",
        "s",
        "-i",
        path(&data),
        "-o",
        path(&d.dir().join("s.sig")),
    ]));

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

#[test]
fn tpm_rsa_2048_keys_sign_pss_and_pkcs1_for_openssl_and_survive_a_restart() {
    let tpm = Swtpm::start();
    let (mut d, keyfile) = initialized(&tpm);
    let data = d.dir().join("data");
    fs::write(&data, b"firmware image 7").expect("write");
    let types = ["rsa-pss-2048", "rsa-pkcs1-2048"];
    for t in types {
        let out = ok(&d.hsmctl(&["key", "create", t, "--type", t, "--backend", "tpm"]));
        assert!(out.contains("backend tpm"), "{out}");
    }
    let out = d.hsmctl(&["key", "create", "big", "--type", "rsa-pss-3072", "--backend", "tpm"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not rsa-pss-3072"),
        "{out:?}"
    );
    let check = |d: &Daemon, round: &str| {
        for t in types {
            let public = d.dir().join(format!("{t}.pem"));
            ok(&d.hsmctl(&["key", "public", "--force", t, "-o", path(&public)]));
            let sig = d.dir().join(format!("{t}.{round}.sig"));
            ok(&d.hsmctl(&[
                "sign",
                "--force",
                t,
                "-i",
                path(&data),
                "-o",
                path(&sig),
                "--format",
                "raw",
            ]));
            assert_eq!(fs::read(&sig).expect("sig").len(), 256);
            ok(&d.hsmctl(&["verify", t, "-i", path(&data), "-s", path(&sig), "--format", "raw"]));
            assert!(
                openssl_verifies(t, &public, &data, &sig),
                "openssl rejects the TPM's {t} signature"
            );
            let other = if t.starts_with("rsa-pss") {
                "rsa-pkcs1-2048"
            } else {
                "rsa-pss-2048"
            };
            assert!(
                !openssl_verifies(other, &public, &data, &sig),
                "{t}: passed as {other} too"
            );
            let mut bad = fs::read(&sig).expect("sig");
            bad[100] ^= 1;
            fs::write(&sig, bad).expect("write");
            assert!(!openssl_verifies(t, &public, &data, &sig), "{t}: a flipped bit passed");
        }
    };
    check(&d, "one");
    d.restart(false);
    ok(&d.hsmctl(&["unlock", "--keyfile", path(&keyfile)]));
    check(&d, "two");
}

#[test]
fn a_tpm2_slot_unlocks_at_start_and_refuses_after_a_bound_pcr_changes() {
    let tpm = Swtpm::start();
    let mut d = Daemon::builder()
        .env("TSS2_LOG", "all+NONE")
        .unlock("tpm2", "true")
        .extra(&format!("[backends.tpm]\ntcti = {:?}\n", tpm.tcti()))
        .start();
    let pass = d.dir().join("pass");
    fs::write(&pass, "correct horse battery staple").expect("write");
    ok(&d.hsmctl(&["init", "--passphrase-file", path(&pass)]));
    ok(&d.hsmctl(&["key", "create", "k", "--type", "ed25519"]));
    let out = ok(&d.hsmctl(&["slot", "add", "--tpm2", "--pcrs", "16,23", "--label", "boot"]));
    assert!(out.contains("slot"), "{out}");
    let list = ok(&d.hsmctl(&["slot", "list"]));
    assert!(list.contains("tpm2, sealed to PCRs 16,23"), "{list}");

    // An unattended start: the TPM unlocks, no passphrase.
    d.restart(false);
    let status = ok(&d.hsmctl(&["status"]));
    assert!(status.contains("state:        unlocked"), "{status}\n{}", d.log());
    assert!(d.log().contains("unlocked at start with the TPM"));
    ok(&d.hsmctl(&[
        "sign",
        "--force",
        "k",
        "-i",
        path(&pass),
        "-o",
        path(&d.dir().join("s1")),
    ]));
    // And on request, after a lock.
    ok(&d.hsmctl(&["lock"]));
    ok(&d.hsmctl(&["unlock", "--tpm2"]));

    // Extending a bound PCR (as a changed boot chain would) makes the slot refuse.
    let ext = std::process::Command::new("tpm2_pcrextend")
        .arg(format!("16:sha256={}", "ab".repeat(32)))
        .env("TPM2TOOLS_TCTI", tpm.tcti())
        .env("TSS2_LOG", "all+NONE")
        .output()
        .expect("run tpm2_pcrextend (Debian tpm2-tools)");
    assert!(ext.status.success(), "{ext:?}");
    d.restart(false);
    let out = d.hsmctl(&["status"]);
    assert_eq!(out.status.code(), Some(2), "locked: {out:?}");
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("state:        locked"), "{status}");
    assert!(d.log().contains("the TPM did not unlock"), "{}", d.log());
    let out = d.hsmctl(&["unlock", "--tpm2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("(unlock-failed)") && err.contains("PCR") && err.contains("another slot"),
        "{err}"
    );
    // The passphrase still works.
    std::thread::sleep(Duration::from_millis(300));
    ok(&d.hsmctl(&["unlock", "--passphrase-file", path(&pass)]));
    ok(&d.hsmctl(&[
        "sign",
        "--force",
        "k",
        "-i",
        path(&pass),
        "-o",
        path(&d.dir().join("s2")),
    ]));
}

#[test]
fn tpm2_slots_need_a_configured_tpm() {
    let d = Daemon::builder().start();
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&d.dir().join("k"))]));
    let out = d.hsmctl(&["slot", "add", "--tpm2"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no TPM is configured"),
        "{out:?}"
    );
    ok(&d.hsmctl(&["lock"]));
    let out = d.hsmctl(&["unlock", "--tpm2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(unlock-failed)") && err.contains("no tpm2 slot"), "{err}");
}

/// A backup of a keystore with a TPM2 slot and a key inside the TPM, restored
/// where there is no TPM: the slot and the key are named before anything
/// changes; an archive whose only slot is the TPM2 one is refused outright.
#[test]
fn a_restore_without_the_tpm_names_its_slot_and_key_and_refuses_when_no_slot_could_open() {
    let tpm = Swtpm::start();
    let (d, keyfile) = initialized(&tpm);
    ok(&d.hsmctl(&["slot", "add", "--tpm2", "--label", "boot"]));
    ok(&d.hsmctl(&["key", "create", "in-tpm", "--type", "ecdsa-p256", "--backend", "tpm"]));
    let both = d.dir().join("both-slots.hsmdbak");
    ok(&d.hsmctl(&["backup", "create", path(&both)]));
    // The key file's slot removed: the TPM2 slot alone opens that keystore.
    ok(&d.hsmctl(&["slot", "remove", "1"]));
    let pass = d.dir().join("backup-pass");
    fs::write(&pass, "correct horse battery staple").expect("write");
    let tpm_only = d.dir().join("tpm-only.hsmdbak");
    ok(&d.hsmctl(&["backup", "create", path(&tpm_only), "--passphrase-file", path(&pass)]));

    let other = Daemon::start();
    let state = || {
        let mut names: Vec<String> = fs::read_dir(other.dir().join("state"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = state();
    let e = hsmd_tests::check::refused(
        &other.hsmctl(&["backup", "restore", path(&both), "--keyfile", path(&keyfile)]),
        "failed-precondition",
    );
    assert!(
        e.contains("unlock slot 2 (tpm2, \"boot\"): no TPM is configured here")
            && e.contains("1 key on the tpm backend (in-tpm)")
            && e.contains("--accept-unusable"),
        "{e}"
    );
    let e = hsmd_tests::check::refused(
        &other.hsmctl(&["backup", "restore", path(&tpm_only), "--passphrase-file", path(&pass)]),
        "failed-precondition",
    );
    assert!(
        e.contains("none of the archive's unlock slots can open on this machine"),
        "{e}"
    );
    let e = hsmd_tests::check::refused(
        &other.hsmctl(&[
            "backup",
            "restore",
            path(&tpm_only),
            "--passphrase-file",
            path(&pass),
            "--accept-unusable",
        ]),
        "failed-precondition",
    );
    assert!(e.contains("could never be unlocked here"), "{e}");
    assert_eq!(state(), before, "a refused restore wrote something");
    ok(&other.hsmctl(&[
        "backup",
        "restore",
        path(&both),
        "--keyfile",
        path(&keyfile),
        "--accept-unusable",
    ]));
    ok(&other.hsmctl(&["unlock", "--keyfile", path(&keyfile)]));
}
