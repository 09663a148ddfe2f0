//! Issue 7, must-show 4: `hsmctl hardware scan --json` on a machine with a
//! swtpm and a SoftHSM2 token lists both, and lists no FIDO2 device (there is
//! none on the build machines) without failing.

use std::process::Command;

use hsmd_tests::{bin, SoftHsm, Swtpm, SOFTHSM_MODULE};

#[test]
fn hardware_scan_lists_the_tpm_and_the_token_and_no_fido_device() {
    let tpm = Swtpm::start();
    let hsm = SoftHsm::new("scan-me");
    let out = Command::new(bin("hsmctl"))
        .args(["--json", "hardware", "scan", "--tcti", &tpm.tcti()])
        .env("SOFTHSM2_CONF", hsm.conf())
        .env("TSS2_LOG", "all+NONE")
        .env_remove("HSMD_SOCKET")
        .output()
        .expect("run hsmctl");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");

    let tpms = v["tpm"].as_array().expect("tpm list");
    let ours = tpms
        .iter()
        .find(|t| t["path"] == tpm.tcti())
        .unwrap_or_else(|| panic!("swtpm not listed: {v}"));
    assert_eq!(ours["error"], serde_json::Value::Null, "{ours}");
    assert_eq!(ours["version"], "2");
    assert!(ours["manufacturer"].as_str().is_some_and(|m| !m.is_empty()), "{ours}");
    assert!(ours["firmware"].as_str().is_some(), "{ours}");

    let real = std::fs::canonicalize(SOFTHSM_MODULE).expect("module");
    let softhsm = v["pkcs11"]
        .as_array()
        .expect("pkcs11 list")
        .iter()
        .find(|m| m["path"] == real.display().to_string())
        .unwrap_or_else(|| panic!("SoftHSM2 not listed: {v}"));
    assert!(
        softhsm["library"].as_str().is_some_and(|l| l.contains("SoftHSM")),
        "{softhsm}"
    );
    let token = softhsm["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .find_map(|s| s["token"].as_object())
        .unwrap_or_else(|| panic!("no token in {softhsm}"));
    assert_eq!(token["label"], "scan-me");

    assert_eq!(v["fido2"], serde_json::json!([]), "{v}");

    // The human table says the same.
    let out = Command::new(bin("hsmctl"))
        .args(["hardware", "scan", "--tcti", &tpm.tcti()])
        .env("SOFTHSM2_CONF", hsm.conf())
        .env("TSS2_LOG", "all+NONE")
        .output()
        .expect("run hsmctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("token \"scan-me\""), "{text}");
    assert!(text.contains("FIDO2/U2F authenticators:\n  none found"), "{text}");
}
