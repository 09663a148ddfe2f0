//! Issue 7, FIDO2 unlock slots through the public surface: `hsmctl slot add
//! --fido2` and `hsmctl unlock --fido2` against a real hsmd. No authenticator
//! is on the build machines, so the authenticator is hsmctl's emulated one
//! (feature `fido2-emulator`, chosen by `HSMCTL_FIDO2_EMULATOR`), which answers
//! hmac-secret as CTAP 2.1 defines it; with none, the commands say "no FIDO2
//! authenticator found" and exit 1.

use std::process::Output;

use hsmd_tests::check::{ok, p as path};
use hsmd_tests::{bin, Daemon};

fn hsmctl_with(d: &Daemon, emulator: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(bin("hsmctl"));
    cmd.arg("--socket")
        .arg(d.dir().join("hsmd.sock"))
        .args(args)
        .env_remove("HSMD_SOCKET");
    match emulator {
        Some(key) => cmd.env("HSMCTL_FIDO2_EMULATOR", key),
        None => cmd.env_remove("HSMCTL_FIDO2_EMULATOR"),
    };
    cmd.output().expect("run hsmctl")
}

#[test]
fn a_fido2_slot_enrols_and_unlocks_with_the_same_authenticator_only() {
    let d = Daemon::start();
    let keyfile = d.dir().join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&keyfile)]));
    ok(&d.hsmctl(&["key", "create", "k", "--type", "ed25519"]));
    let mine = "5a".repeat(32);
    ok(&hsmctl_with(
        &d,
        Some(&mine),
        &["slot", "add", "--fido2", "--label", "yubikey"],
    ));
    let list: serde_json::Value = serde_json::from_str(&ok(&d.hsmctl(&["--json", "slot", "list"]))).expect("json");
    let slot = list
        .as_array()
        .expect("slots")
        .iter()
        .find(|s| s["kind"] == "fido2")
        .unwrap_or_else(|| panic!("no fido2 slot: {list}"))
        .clone();
    assert_eq!(slot["label"], "yubikey");
    assert_eq!(slot["fido2"]["rp_id"], "hsmd");
    assert_eq!(slot["fido2"]["salt"].as_array().map(Vec::len), Some(32));

    ok(&d.hsmctl(&["lock"]));
    let out = ok(&hsmctl_with(&d, Some(&mine), &["unlock", "--fido2"]));
    assert!(out.contains(&format!("unlocked (slot {})", slot["id"])), "{out}");
    ok(&d.hsmctl(&[
        "sign",
        "--force",
        "k",
        "-i",
        path(&keyfile),
        "-o",
        path(&d.dir().join("s")),
    ]));

    // Another authenticator holds no credential of hsmd's.
    ok(&d.hsmctl(&["lock"]));
    let out = hsmctl_with(&d, Some(&"a5".repeat(32)), &["unlock", "--fido2"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds none"), "{out:?}");
    // A forged output for the right credential is refused by hsmd itself.
    let mut c = d.client();
    let cred: Vec<u8> = slot["fido2"]["credential_id"]
        .as_array()
        .expect("credential id")
        .iter()
        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()).expect("byte"))
        .collect();
    let e = c
        .call(protocol::Operation::Unlock {
            secret: protocol::UnlockSecret::Fido2 {
                credential_id: cred,
                secret: protocol::SecretBytes::new(vec![0; 32]),
            },
        })
        .expect_err("forged output");
    assert_eq!(e.code(), Some(protocol::ErrorCode::UnlockFailed), "{e}");
    // The other slots still work.
    std::thread::sleep(std::time::Duration::from_millis(600));
    ok(&d.hsmctl(&["unlock", "--keyfile", path(&keyfile)]));
}

#[test]
fn with_no_authenticator_the_commands_say_so_and_exit_1() {
    let d = Daemon::start();
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&d.dir().join("k"))]));
    for args in [&["slot", "add", "--fido2"][..], &["unlock", "--fido2"][..]] {
        let out = hsmctl_with(&d, None, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no FIDO2 authenticator found"), "{args:?}: {err}");
    }
    let list = ok(&d.hsmctl(&["slot", "list"]));
    assert!(!list.contains("fido2"), "{list}");
}
