//! Issue 7, the `pkcs11` backend against SoftHSM2 (must-shows 1 and 2): keys
//! (ECDSA, Ed25519, RSA-PSS, RSA PKCS#1 v1.5, AES-GCM) made inside the token
//! and never extractable, used through hsmctl and
//! checked by OpenSSL and OpenSC's pkcs11-tool; eight signers at once; a
//! token that goes away and comes back; a helper killed or hung mid-request;
//! a module outside the allow-list.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use hsmd_tests::check::{ok, p as path};
use hsmd_tests::{bin, openssl_verifies, Daemon, SoftHsm};
use nix::sys::signal::{kill, Signal};
use protocol::{Client, ErrorCode, Operation, Reply};

fn pkcs11_health(d: &Daemon) -> (bool, String) {
    hsmd_tests::backend_health(d, "pkcs11")
}

fn wait_health(d: &Daemon, healthy: bool, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (h, detail) = pkcs11_health(d);
        if h == healthy {
            return detail;
        }
        assert!(
            Instant::now() < deadline,
            "pkcs11 health stayed {h} ({detail}); log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until hsmd counts `n` requests sent to the helper and unanswered.
fn wait_unanswered(d: &Daemon, n: u32) {
    let want = format!("hsmd_backend_unanswered_requests{{backend=\"pkcs11\"}} {n}\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = ok(&d.hsmctl(&["metrics"]));
        if metrics.contains(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never {n} unanswered: {}; log:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("unanswered") || l.contains("operation=\"sign\""))
                .collect::<Vec<_>>()
                .join("; "),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sign(c: &mut Client, name: &str, len: usize) -> Result<Vec<u8>, ErrorCode> {
    match c.call(Operation::Sign(protocol::SignArgs {
        name: name.into(),
        digest: vec![0x5a; len],
    })) {
        Ok(Reply::Signature { signature, .. }) => Ok(signature),
        Ok(other) => panic!("sign answered {other:?}"),
        Err(e) => Err(e.code().unwrap_or(ErrorCode::Internal)),
    }
}

fn started(hsm: &SoftHsm, more: &str) -> (Daemon, std::path::PathBuf) {
    let d = hsm.daemon(more).start();
    let keyfile = d.dir().join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&keyfile)]));
    (d, keyfile)
}

/// The token object labelled `label` of `class` in pkcs11-tool's listing,
/// asserted to be sensitive and never extractable; returns its usage line.
fn locked_in_usage(list: &str, class: &str, label: &str) -> String {
    let block = objects(list)
        .into_iter()
        .find(|b| b.starts_with(class) && b.lines().any(|l| l.trim() == format!("label:      {label}")))
        .unwrap_or_else(|| panic!("no {class} labelled {label}:\n{list}"));
    let line = |name: &str| {
        block
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or("")
            .to_owned()
    };
    let access = line("Access:");
    assert!(
        access.contains("sensitive") && access.contains("never extractable"),
        "{label}: {access}\n{list}"
    );
    line("Usage:")
}

/// pkcs11-tool's listing cut into one block per object.
fn objects(list: &str) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    for line in list.lines() {
        if !line.starts_with(' ') && line.contains("Object;") {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    blocks
}

#[test]
fn token_keys_sign_encrypt_survive_a_restart_and_stay_inside_the_token() {
    let hsm = SoftHsm::new("hsmd-keys");
    let (mut d, keyfile) = started(&hsm, "");
    let data = d.dir().join("data.bin");
    fs::write(&data, b"the release artefact, version 1.2.3").expect("write");
    for t in ["ecdsa-p256", "ecdsa-p384", "ed25519", "aes256-gcm"] {
        let out = ok(&d.hsmctl(&["key", "create", &format!("tok-{t}"), "--type", t, "--backend", "pkcs11"]));
        assert!(out.contains("backend pkcs11"), "{out}");
    }
    // What the token cannot make is refused, naming what it can.
    let out = d.hsmctl(&[
        "key",
        "create",
        "tok-mac",
        "--type",
        "hmac-sha256",
        "--backend",
        "pkcs11",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot make hmac-sha256 keys") && err.contains("(invalid-argument)"),
        "{err}"
    );

    let sigs = |d: &Daemon, round: &str| {
        for t in ["ecdsa-p256", "ecdsa-p384", "ed25519"] {
            let name = format!("tok-{t}");
            let public = d.dir().join(format!("{t}.pem"));
            ok(&d.hsmctl(&["key", "public", "--force", &name, "-o", path(&public)]));
            let sig = d.dir().join(format!("{t}.{round}.sig"));
            ok(&d.hsmctl(&[
                "sign",
                "--force",
                &name,
                "-i",
                path(&data),
                "-o",
                path(&sig),
                "--format",
                "raw",
            ]));
            ok(&d.hsmctl(&["verify", &name, "-i", path(&data), "-s", path(&sig), "--format", "raw"]));
            assert!(
                openssl_verifies(t, &public, &data, &sig),
                "openssl rejects the token's {t} signature"
            );
            let mut bad = fs::read(&sig).expect("sig");
            bad[8] ^= 1;
            fs::write(&sig, &bad).expect("write");
            assert!(
                !openssl_verifies(t, &public, &data, &sig),
                "{t}: openssl accepted a flipped bit"
            );
        }
    };
    sigs(&d, "before");
    let ct = d.dir().join("ct");
    ok(&d.hsmctl(&[
        "encrypt",
        "--force",
        "tok-aes256-gcm",
        "-i",
        path(&data),
        "-o",
        path(&ct),
    ]));
    let pt = d.dir().join("pt");
    ok(&d.hsmctl(&["decrypt", "--force", "tok-aes256-gcm", "-i", path(&ct), "-o", path(&pt)]));
    assert_eq!(fs::read(&pt).expect("pt"), fs::read(&data).expect("data"));

    // Restart: the keys are found again by CKA_ID, and old ciphertext opens.
    d.restart(false);
    ok(&d.hsmctl(&["unlock", "--keyfile", path(&keyfile)]));
    sigs(&d, "after");
    fs::remove_file(&pt).expect("rm");
    ok(&d.hsmctl(&["decrypt", "--force", "tok-aes256-gcm", "-i", path(&ct), "-o", path(&pt)]));
    assert_eq!(fs::read(&pt).expect("pt"), fs::read(&data).expect("data"));
    // A flipped ciphertext bit is a decryption failure, not a backend error.
    let mut bad = fs::read(&ct).expect("ct");
    let last = bad.len() - 1;
    bad[last] ^= 1;
    fs::write(&ct, &bad).expect("write");
    let out = d.hsmctl(&["decrypt", "--force", "tok-aes256-gcm", "-i", path(&ct), "-o", path(&pt)]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(decrypt-failed)"),
        "{out:?}"
    );

    // OpenSC lists the objects: private and secret keys sensitive and never
    // extractable, labelled with the key's name and version.
    let list = ok(&hsm.pkcs11_tool(&["--list-objects"]));
    for (t, class) in [
        ("ecdsa-p256", "Private Key Object; EC"),
        ("ecdsa-p384", "Private Key Object; EC"),
        ("ed25519", "Private Key Object; EC_EDWARDS"),
        ("aes256-gcm", "Secret Key Object; AES"),
    ] {
        let usage = locked_in_usage(&list, class, &format!("hsmd:tok-{t}:v1"));
        assert!(!usage.contains("unwrap") && !usage.contains("derive"), "{t}: {usage}");
    }
    // Reading a private value out is refused by the token itself.
    let out = hsm.pkcs11_tool(&[
        "--read-object",
        "--type",
        "secrkey",
        "--label",
        "hsmd:tok-aes256-gcm:v1",
    ]);
    assert!(!out.status.success(), "the AES key was read out: {out:?}");

    // Rotation makes a new token object per version; purge removes them all.
    ok(&d.hsmctl(&["key", "rotate", "tok-ecdsa-p256"]));
    let list = ok(&hsm.pkcs11_tool(&["--list-objects", "--type", "privkey"]));
    assert!(
        list.contains("hsmd:tok-ecdsa-p256:v1") && list.contains("hsmd:tok-ecdsa-p256:v2"),
        "{list}"
    );
    ok(&d.hsmctl(&["key", "delete", "tok-ecdsa-p256"]));
    ok(&d.hsmctl(&["key", "purge", "tok-ecdsa-p256", "--yes"]));
    let list = ok(&hsm.pkcs11_tool(&["--list-objects"]));
    assert!(!list.contains("tok-ecdsa-p256"), "purged key's objects remain:\n{list}");
    assert!(list.contains("hsmd:tok-ed25519:v1"), "{list}");
}

/// OpenSSL's verdict on an RSA signature under the *other* scheme than the
/// key's: PSS as PKCS#1 v1.5, or PKCS#1 v1.5 as PSS.
fn openssl_accepts_as_other_scheme(t: &str, public: &Path, data: &Path, sig: &Path) -> bool {
    let other = if t.starts_with("rsa-pss-") {
        t.replace("rsa-pss-", "rsa-pkcs1-")
    } else {
        t.replace("rsa-pkcs1-", "rsa-pss-")
    };
    openssl_verifies(&other, public, data, sig)
}

#[test]
fn rsa_token_keys_sign_in_their_own_scheme_for_openssl_and_never_leave_the_token() {
    let hsm = SoftHsm::new("hsmd-rsa");
    let (mut d, keyfile) = started(&hsm, "");
    let data = d.dir().join("release.tar");
    fs::write(&data, b"an RSA-signed release artefact").expect("write");
    let types = ["rsa-pss-2048", "rsa-pss-3072", "rsa-pkcs1-2048", "rsa-pkcs1-4096"];
    for t in types {
        let out = ok(&d.hsmctl(&["key", "create", t, "--type", t, "--backend", "pkcs11"]));
        assert!(out.contains("backend pkcs11"), "{out}");
    }
    // hsmd holds no RSA private key in software: the soft backend refuses,
    // naming where RSA keys can live.
    let out = d.hsmctl(&["key", "create", "soft-rsa", "--type", "rsa-pss-2048"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not make rsa-pss-2048 keys") && err.contains("--backend pkcs11"),
        "{err}"
    );

    let sign_all = |d: &Daemon, round: &str| {
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
            let bits: usize = t.rsplit('-').next().and_then(|b| b.parse().ok()).expect("bits");
            assert_eq!(
                fs::read(&sig).expect("sig").len(),
                bits / 8,
                "{t}: modulus-length signature"
            );
            ok(&d.hsmctl(&["verify", t, "-i", path(&data), "-s", path(&sig), "--format", "raw"]));
            assert!(
                openssl_verifies(t, &public, &data, &sig),
                "openssl rejects the token's {t} signature"
            );
            // The key's scheme only: the same signature is no good as the other.
            assert!(
                !openssl_accepts_as_other_scheme(t, &public, &data, &sig),
                "{t}: the signature also passed as the other RSA scheme"
            );
            let mut bad = fs::read(&sig).expect("sig");
            bad[bits / 16] ^= 1;
            let flipped = d.dir().join(format!("{t}.{round}.bad"));
            fs::write(&flipped, &bad).expect("write");
            assert!(
                !openssl_verifies(t, &public, &data, &flipped),
                "{t}: openssl accepted a flipped bit"
            );
            let out = d.hsmctl(&["verify", t, "-i", path(&data), "-s", path(&flipped), "--format", "raw"]);
            assert!(!out.status.success(), "{t}: hsmd accepted a flipped bit");
        }
    };
    sign_all(&d, "before");

    // The public key in the other formats: PKCS#1 DER as OpenSSL reads it, and
    // an ssh-rsa line equal to what ssh-keygen derives from the PEM; PSS has
    // no OpenSSH form, and says so.
    let raw = d.dir().join("pkcs1.der");
    ok(&d.hsmctl(&[
        "key",
        "public",
        "--force",
        "rsa-pkcs1-2048",
        "--format",
        "raw",
        "-o",
        path(&raw),
    ]));
    let from_raw = ok(&Command::new("openssl")
        .args([
            "rsa",
            "-RSAPublicKey_in",
            "-inform",
            "DER",
            "-in",
            path(&raw),
            "-pubout",
        ])
        .output()
        .expect("openssl"));
    let pem = fs::read_to_string(d.dir().join("rsa-pkcs1-2048.pem")).expect("pem");
    assert_eq!(from_raw, pem);
    let ours = ok(&d.hsmctl(&["key", "public", "rsa-pkcs1-2048", "--format", "openssh"]));
    let theirs = ok(&Command::new("ssh-keygen")
        .args(["-i", "-m", "PKCS8", "-f", path(&d.dir().join("rsa-pkcs1-2048.pem"))])
        .output()
        .expect("ssh-keygen (Debian openssh-client)"));
    let blob = |line: &str| line.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    assert_eq!(blob(&ours), blob(&theirs));
    let out = d.hsmctl(&["key", "public", "rsa-pss-2048", "--format", "openssh"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no OpenSSH form"),
        "{out:?}"
    );

    // The token holds each private key sensitive, never extractable, for
    // signing only: no decryption (an RSA padding oracle), unwrap or derive.
    let list = ok(&hsm.pkcs11_tool(&["--list-objects", "--type", "privkey"]));
    let public_list = ok(&hsm.pkcs11_tool(&["--list-objects", "--type", "pubkey"]));
    for t in types {
        let label = format!("hsmd:{t}:v1");
        let bits: &str = t.rsplit('-').next().expect("bits");
        assert!(
            public_list.contains(&format!("Public Key Object; RSA {bits} bits\n  label:      {label}")),
            "{t}: no {bits}-bit public key:\n{public_list}"
        );
        let usage = locked_in_usage(&list, "Private Key Object; RSA", &label);
        assert!(usage.contains("sign"), "{t}: {usage}");
        for never in ["decrypt", "unwrap", "derive"] {
            assert!(!usage.contains(never), "{t} may {never}: {usage}");
        }
    }

    // Found again by CKA_ID after a restart.
    d.restart(false);
    ok(&d.hsmctl(&["unlock", "--keyfile", path(&keyfile)]));
    sign_all(&d, "after");
}

/// Makes an ECDSA P-256 key `name` in the token; returns its public key.
fn token_p256_key(d: &Daemon, name: &str) -> p256::ecdsa::VerifyingKey {
    ok(&d.hsmctl(&["key", "create", name, "--type", "ecdsa-p256", "--backend", "pkcs11"]));
    let public = d.hsmctl(&["key", "public", name, "--format", "der"]).stdout;
    use p256::pkcs8::DecodePublicKey as _;
    p256::ecdsa::VerifyingKey::from_public_key_der(&public).expect("spki")
}

/// Asserts `der` is `key`'s signature over the digest [`sign`] sends.
fn assert_signs(key: &p256::ecdsa::VerifyingKey, der: &[u8]) {
    let sig = p256::ecdsa::Signature::from_der(der).expect("DER");
    use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
    key.verify_prehash(&[0x5a; 32], &sig).expect("valid");
}

#[test]
fn eight_clients_sign_at_once_and_all_succeed() {
    let hsm = SoftHsm::new("hsmd-par");
    let (d, _) = started(&hsm, "sessions = 4\n");
    let key = token_p256_key(&d, "p");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let mut c = d.client();
            std::thread::spawn(move || (0..100).map(|_| sign(&mut c, "p", 32)).collect::<Vec<_>>())
        })
        .collect();
    let mut n = 0;
    for t in threads {
        for s in t.join().expect("thread") {
            assert_signs(&key, &s.expect("every signature succeeds"));
            n += 1;
        }
    }
    assert_eq!(n, 800);
    assert!(pkcs11_health(&d).1.contains("4 sessions"));
}

/// Eight signers keep the helper busy (more requests in flight than it has
/// sessions, answers read by whichever waiting request leads) while the helper
/// is killed: every request in flight ends, signed or `backend-unavailable`,
/// none hangs or fails otherwise, every signature made verifies, and the
/// signers go on with the next helper.
#[test]
fn a_helper_killed_under_eight_signers_ends_every_request_and_signing_goes_on() {
    let hsm = SoftHsm::new("hsmd-kill8");
    let (d, _) = started(&hsm, "sessions = 4\nop_timeout = \"5s\"\n");
    let key = token_p256_key(&d, "p");
    let first = d.pkcs11_helper_pid().expect("helper running");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let mut c = d.client();
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut results = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let t = Instant::now();
                    results.push((sign(&mut c, "p", 32), t.elapsed()));
                }
                results
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    kill(nix::unistd::Pid::from_raw(first), Signal::SIGKILL).expect("kill helper");
    // Long enough for the next helper to start and serve.
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.pkcs11_helper_pid().is_none_or(|p| p == first) {
        assert!(Instant::now() < deadline, "no new helper; log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut signed, mut unavailable, mut after) = (0, 0, 0);
    for t in threads {
        let results = t.join().expect("signer thread");
        let failed_at = results.iter().position(|(r, _)| r.is_err());
        for (i, (r, took)) in results.iter().enumerate() {
            assert!(*took < Duration::from_secs(5), "a request waited {took:?}");
            match r {
                Ok(der) => {
                    assert_signs(&key, der);
                    signed += 1;
                    if failed_at.is_some_and(|f| i > f) {
                        after += 1;
                    }
                }
                Err(ErrorCode::BackendUnavailable) => unavailable += 1,
                Err(other) => panic!("a request failed with {other:?}; log:\n{}", d.log()),
            }
        }
    }
    assert!(signed > 100, "{signed} signed");
    assert!(
        unavailable <= 8,
        "{unavailable} requests failed: only those in flight may"
    );
    assert!(
        after > 0 || unavailable == 0,
        "no signer signed again after its failure"
    );
    sign(&mut d.client(), "p", 32).expect("signs on the new helper");
}

#[test]
fn a_removed_token_is_unavailable_with_red_health_and_comes_back() {
    let hsm = SoftHsm::new("hsmd-gone");
    let (d, _) = started(&hsm, "health_interval = \"200ms\"\n");
    ok(&d.hsmctl(&["key", "create", "t", "--type", "ed25519", "--backend", "pkcs11"]));
    ok(&d.hsmctl(&["key", "create", "s", "--type", "ed25519"]));
    let mut c = d.client();
    sign(&mut c, "t", 64).expect("signs while present");

    let moved = hsm.token_dir().with_extension("away");
    fs::rename(hsm.token_dir(), &moved).expect("move token away");
    fs::create_dir(hsm.token_dir()).expect("empty token dir");
    assert_eq!(sign(&mut c, "t", 64), Err(ErrorCode::BackendUnavailable));
    let detail = wait_health(&d, false, Duration::from_secs(5));
    assert!(detail.contains("hsmd-gone"), "{detail}");
    let metrics = ok(&d.hsmctl(&["metrics"]));
    assert!(metrics.contains("hsmd_backend_up{backend=\"pkcs11\"} 0"), "{metrics}");
    // Other backends keep working, and the daemon is up.
    sign(&mut c, "s", 64).expect("soft key signs");
    let out = d.hsmctl(&[
        "sign",
        "--force",
        "t",
        "-i",
        "/etc/hostname",
        "-o",
        path(&d.dir().join("x")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(backend-unavailable)") && err.contains("pkcs11"), "{err}");

    fs::remove_dir(hsm.token_dir()).expect("rmdir");
    fs::rename(&moved, hsm.token_dir()).expect("token back");
    wait_health(&d, true, Duration::from_secs(40));
    sign(&mut c, "t", 64).expect("signs again once the token is back");
}

/// The helper hsmd says it uses now (`helper pid N` in its health), after
/// checking that it is hsmd's child.
fn live_helper(d: &Daemon) -> i32 {
    let (_, detail) = pkcs11_health(d);
    let pid: i32 = detail
        .rsplit_once("helper pid ")
        .and_then(|(_, p)| p.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no helper pid in the health: {detail}"));
    assert_eq!(d.pkcs11_helper_pid(), Some(pid), "hsmd's word and its children differ");
    pid
}

/// Stops `pid` with SIGSTOP and waits until every one of its threads has.
fn stop_helper(pid: i32) {
    kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP).expect("stop helper");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let states: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
            .expect("helper's threads")
            .filter_map(|t| fs::read_to_string(t.ok()?.path().join("stat")).ok())
            .filter_map(|s| Some(s.rsplit_once(") ")?.1.chars().next()?.to_string()))
            .collect();
        if states.iter().all(|s| s == "T" || s == "t") {
            return;
        }
        assert!(Instant::now() < deadline, "helper {pid} did not stop: {states:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_killed_or_hung_helper_fails_only_its_request_and_is_restarted() {
    let hsm = SoftHsm::new("hsmd-kill");
    // No health check during the test: one slower than op_timeout on a busy
    // machine would replace the helper the test is about to stop or kill.
    let (d, _) = started(&hsm, "op_timeout = \"1s\"\nhealth_interval = \"1h\"\n");
    ok(&d.hsmctl(&["key", "create", "k", "--type", "ecdsa-p256", "--backend", "pkcs11"]));
    let mut c = d.client();
    sign(&mut c, "k", 32).expect("first signature");
    wait_unanswered(&d, 0);

    // Killed mid-signature: stop the helper, send the request, and kill the
    // helper once hsmd counts the request as sent to it.
    let first = live_helper(&d);
    stop_helper(first);
    let mut c2 = d.client();
    let inflight = std::thread::spawn(move || sign(&mut c2, "k", 32));
    wait_unanswered(&d, 1);
    kill(nix::unistd::Pid::from_raw(first), Signal::SIGKILL).expect("kill helper");
    let r = inflight.join().expect("thread");
    assert_eq!(
        r,
        Err(ErrorCode::BackendUnavailable),
        "helper {first}; log:\n{}",
        d.log()
    );
    sign(&mut c, "k", 32).expect("the next signature works on a new helper");
    let second = live_helper(&d);
    assert_ne!(first, second);
    assert!(wait_health(&d, true, Duration::from_secs(5)).contains("restarted 1 times"));

    // Hung: a helper that stops answering is given op_timeout, then replaced.
    stop_helper(second);
    let t = Instant::now();
    let r = sign(&mut c, "k", 32);
    assert_eq!(
        r,
        Err(ErrorCode::BackendUnavailable),
        "helper {second} stopped; hsmd now: {:?}; log:\n{}",
        pkcs11_health(&d),
        d.log()
    );
    assert!(t.elapsed() >= Duration::from_millis(900), "{:?}", t.elapsed());
    assert!(d.log().contains("did not answer within 1s"), "{}", d.log());
    sign(&mut c, "k", 32).expect("works again after the hung helper is replaced");
    assert_ne!(d.pkcs11_helper_pid(), Some(second));
    // hsmd itself never went down.
    ok(&d.hsmctl(&["status"]));
}

/// A request larger than the socket's buffer, sent to a helper that has
/// stopped reading, cannot be written whole: the writing thread gives up at
/// op_timeout and the helper is replaced, instead of that thread (and every
/// request queued for the socket behind it) waiting for ever.
#[test]
fn a_request_a_hung_helper_never_takes_is_refused_at_op_timeout_and_the_helper_replaced() {
    let hsm = SoftHsm::new("hsmd-full");
    let (d, _) = started(&hsm, "op_timeout = \"1s\"\nhealth_interval = \"1h\"\n");
    ok(&d.hsmctl(&["key", "create", "k", "--type", "aes256-gcm", "--backend", "pkcs11"]));
    let encrypt = |c: &mut Client, len: usize| {
        c.call(Operation::Encrypt(protocol::EncryptArgs {
            name: "k".into(),
            version: None,
            plaintext: protocol::SecretBytes::new(vec![7; len]),
            aad: Vec::new(),
        }))
    };
    let mut c = d.client();
    encrypt(&mut c, 16).expect("a small encryption first");
    let first = live_helper(&d);
    stop_helper(first);
    // 900 KiB: several times what the socket holds, within the frame limit.
    let t = Instant::now();
    let r = encrypt(&mut c, 900 * 1024);
    assert_eq!(
        r.as_ref().err().and_then(protocol::ClientError::code),
        Some(ErrorCode::BackendUnavailable),
        "{r:?} after {:?}; log:\n{}",
        t.elapsed(),
        d.log()
    );
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert!(d.log().contains("did not take a request within 1s"), "{}", d.log());
    encrypt(&mut c, 16).expect("encryption works again on a new helper");
    assert_ne!(d.pkcs11_helper_pid(), Some(first));
}

/// A token's signature is awaited on the reactor, not by a thread: with one
/// blocking thread and the helper stopped, signatures of digests and of a
/// message wait on the token
/// while requests that need the thread (listing keys reads SQLite) are still
/// served at once; when the token resumes, every waiting signature is made.
#[test]
fn signatures_waiting_on_a_hung_token_hold_no_thread_from_other_requests() {
    let hsm = SoftHsm::new("hsmd-wait");
    let d = hsm
        .daemon("op_timeout = \"20s\"\nhealth_interval = \"1h\"\n")
        .limit("blocking_threads", "1")
        .start();
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&d.dir().join("unlock.key"))]));
    let key = token_p256_key(&d, "w");
    let mut c = d.client();
    // The first use loads the key (on the thread); later ones are sent from
    // the reactor.
    assert_signs(&key, &sign(&mut c, "w", 32).expect("first signature"));

    let helper = live_helper(&d);
    stop_helper(helper);
    let waiting: Vec<_> = (0..4)
        .map(|_| {
            let mut c = d.client();
            std::thread::spawn(move || sign(&mut c, "w", 32))
        })
        .collect();
    // A message signed (hashed in hsmd, the digest signed by the token).
    let by_message = {
        let mut c = d.client();
        std::thread::spawn(move || {
            c.call(Operation::SignMessage(protocol::SignMessageArgs {
                name: "w".into(),
                message: b"a commit to sign".to_vec(),
                hash: None,
            }))
        })
    };
    // All five are with the token at once: none waits for a thread.
    wait_unanswered(&d, 5);
    let t = Instant::now();
    let listed = ok(&d.hsmctl(&["key", "list"]));
    assert!(listed.contains('w'), "{listed}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "listing keys waited {:?} behind signatures waiting on the token",
        t.elapsed()
    );
    kill(nix::unistd::Pid::from_raw(helper), Signal::SIGCONT).expect("resume helper");
    for w in waiting {
        let signed = w.join().expect("thread");
        assert_signs(&key, &signed.unwrap_or_else(|e| panic!("{e:?}; log:\n{}", d.log())));
    }
    let Ok(Reply::Signature { signature, .. }) = by_message.join().expect("thread") else {
        panic!("the message was not signed; log:\n{}", d.log())
    };
    use p256::ecdsa::signature::Verifier as _;
    let sig = p256::ecdsa::Signature::from_der(&signature).expect("DER");
    key.verify(b"a commit to sign", &sig)
        .expect("the message's signature checks");
    assert_eq!(d.pkcs11_helper_pid(), Some(helper), "the same helper served them");
}

#[test]
fn a_missing_module_leaves_the_backend_red_but_hsmd_up() {
    let hsm = SoftHsm::new("hsmd-nomod");
    let d = Daemon::builder()
        .extra(
            &hsm.config("")
                .replace(hsmd_tests::SOFTHSM_MODULE, "/usr/lib/hsmd-test-no-such/libvendor.so"),
        )
        .start();
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&d.dir().join("k"))]));
    let detail = wait_health(&d, false, Duration::from_secs(5));
    assert!(detail.contains("does not exist"), "{detail}");
    let out = d.hsmctl(&["key", "create", "t", "--type", "ed25519", "--backend", "pkcs11"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(backend-unavailable)"),
        "{out:?}"
    );
    ok(&d.hsmctl(&["key", "create", "s", "--type", "ed25519"]));
}

#[test]
fn a_module_outside_the_allow_list_is_refused_at_start_with_the_rule_named() {
    let hsm = SoftHsm::new("hsmd-allow");
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("libsofthsm2.so");
    fs::copy(hsmd_tests::SOFTHSM_MODULE, &copy).expect("copy module");
    let config = dir.path().join("hsmd.toml");
    fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[socket]\npath = {:?}\n{}",
            dir.path().join("state"),
            dir.path().join("s.sock"),
            hsm.config("").replace(hsmd_tests::SOFTHSM_MODULE, path(&copy))
        ),
    )
    .expect("config");
    for args in [vec!["--check-config"], vec![]] {
        let out = Command::new(bin("hsmd"))
            .args(&args)
            .arg("--config")
            .arg(&config)
            .env("SOFTHSM2_CONF", hsm.conf())
            .output()
            .expect("run hsmd");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("is outside backends.pkcs11.allowed_module_dirs") && err.contains(path(&copy)),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_refused_pin_is_tried_once_and_not_again() {
    let hsm = SoftHsm::new("hsmd-pin");
    let d = hsm.daemon("").start();
    // Replace the PIN file's content with a wrong PIN and restart hsmd on it.
    let pin = hsm.config("");
    let pin_path = pin
        .lines()
        .find_map(|l| l.strip_prefix("pin_file = "))
        .map(|p| p.trim_matches('"').to_owned())
        .expect("pin_file line");
    fs::write(&pin_path, "00000000\n").expect("wrong pin");
    drop(d);
    let d = hsm.daemon("health_interval = \"200ms\"\n").start();
    let detail = wait_health(&d, false, Duration::from_secs(5));
    assert!(
        detail.contains("refused the PIN") && detail.contains("hsmd restarts"),
        "{detail}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        d.log().matches("the PKCS#11 token refused the PIN").count(),
        1,
        "{}",
        d.log()
    );
}

#[test]
fn a_pin_sealed_in_the_keystore_opens_the_token_at_each_unlock_and_never_sits_in_a_file() {
    let hsm = SoftHsm::new("hsmd-sealed");
    // No pin_file: the PIN comes from the keystore.
    let config: String = hsm
        .config("health_interval = \"200ms\"\n")
        .lines()
        .filter(|l| !l.starts_with("pin_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut d = Daemon::builder()
        .env("SOFTHSM2_CONF", &hsm.conf().display().to_string())
        .extra(&config)
        .start();
    let keyfile = d.dir().join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&keyfile)]));
    let detail = wait_health(&d, false, Duration::from_secs(5));
    assert!(detail.contains("set-pin"), "{detail}");
    let out = d.hsmctl(&["key", "create", "t", "--type", "ecdsa-p256", "--backend", "pkcs11"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(backend-unavailable)"),
        "{out:?}"
    );

    // A wrong PIN: refused once, red, and not retried.
    let out = d.hsmctl_with_stdin(&["backend", "pkcs11", "set-pin", "--pin-file", "-"], b"00000000\n");
    ok(&out);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pkcs11_health(&d).1.contains("refused the PIN") {
        assert!(Instant::now() < deadline, "{}", pkcs11_health(&d).1);
        std::thread::sleep(Duration::from_millis(100));
    }
    // The right one.
    ok(&d.hsmctl_with_stdin(
        &["backend", "pkcs11", "set-pin", "--pin-file", "-"],
        format!("{}\n", hsm.pin).as_bytes(),
    ));
    wait_health(&d, true, Duration::from_secs(5));
    ok(&d.hsmctl(&["key", "create", "t", "--type", "ecdsa-p256", "--backend", "pkcs11"]));
    let mut c = d.client();
    sign(&mut c, "t", 32).expect("signs");

    // After a restart hsmd is locked and the token waits; unlocking hands the PIN over.
    d.restart(false);
    assert!(!pkcs11_health(&d).0);
    ok(&d.hsmctl(&["unlock", "--keyfile", path(&keyfile)]));
    wait_health(&d, true, Duration::from_secs(5));
    let mut c = d.client();
    sign(&mut c, "t", 32).expect("signs after unlock");

    // The PIN is in no file of hsmd's, and the set-pin is audited.
    for entry in fs::read_dir(d.dir().join("state")).expect("state") {
        let p = entry.expect("entry").path();
        if p.is_file() {
            let bytes = fs::read(&p).expect("read");
            assert!(
                !bytes.windows(hsm.pin.len()).any(|w| w == hsm.pin.as_bytes()),
                "{} holds the PIN in clear",
                p.display()
            );
        }
    }
    let audit = ok(&d.hsmctl(&["--json", "audit", "show", "--event", "BACKEND_PIN_SET"]));
    let audit: Vec<serde_json::Value> = serde_json::from_str(&audit).expect("one JSON array of events");
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert!(audit.iter().all(|e| e["backend"] == "pkcs11"), "{audit:?}");
}
