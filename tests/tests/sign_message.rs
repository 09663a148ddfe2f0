//! Message signing: `SignMessage` signs the message a standard hands it (pure
//! Ed25519 over the message, ECDSA and RSA over a hash the client names) in
//! the soft backend and in a SoftHSM2 token, OpenSSL agrees, what a key or
//! backend cannot do is refused with the reason, batches hold it, and the
//! audit line names the hash and length but never the message.

use std::{fs, path::Path, process::Command};

use hsmd_tests::check::{ok, p as path};
use hsmd_tests::{openssh::ssh_keygen_verifies, Daemon, SoftHsm};
use protocol::{BatchItem, Client, ErrorCode, HashAlg, Reply, SignMessageArgs, MAX_SIGN_MESSAGE};

/// Whether OpenSSL accepts `sig` over the message in `msg`: Ed25519 over the
/// message itself, others over its `hash` (`sha256`, …).
fn openssl_accepts(key_type: &str, hash: &str, public: &Path, msg: &Path, sig: &Path) -> bool {
    let mut cmd = Command::new("openssl");
    if key_type == "ed25519" {
        cmd.args([
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            path(public),
            "-rawin",
            "-in",
            path(msg),
        ])
        .args(["-sigfile", path(sig)]);
    } else {
        cmd.args([
            "dgst",
            &format!("-{hash}"),
            "-verify",
            path(public),
            "-signature",
            path(sig),
            path(msg),
        ]);
    }
    cmd.output().expect("run openssl").status.success()
}

fn sign(c: &mut Client, name: &str, message: &[u8], hash: Option<HashAlg>) -> Result<(u32, Vec<u8>), ErrorCode> {
    c.sign_message(name.into(), message.to_vec(), hash)
        .map(|s| (s.version, s.signature))
        .map_err(|e| e.code().unwrap_or(ErrorCode::Internal))
}

fn started(hsm: &SoftHsm) -> Daemon {
    let d = hsm.daemon("").start();
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&d.dir().join("unlock.key"))]));
    d
}

#[test]
fn messages_are_signed_as_the_standards_sign_them_and_openssl_agrees() {
    let hsm = SoftHsm::new("hsmd-message");
    let d = started(&hsm);
    // An SSH session's signed data is about this size: not a digest's.
    let message: Vec<u8> = (0..150u8).collect();
    let msg = d.dir().join("message.bin");
    fs::write(&msg, &message).expect("write");
    let cases: &[(&str, &str, Option<HashAlg>, &str)] = &[
        ("ed25519", "soft", None, ""),
        ("ecdsa-p256", "soft", None, "sha256"),
        ("ecdsa-p256", "soft", Some(HashAlg::Sha384), "sha384"),
        ("ecdsa-p256", "soft", Some(HashAlg::Sha512), "sha512"),
        ("ecdsa-p384", "soft", None, "sha384"),
        ("ecdsa-p384", "soft", Some(HashAlg::Sha256), "sha256"),
        ("ed25519", "pkcs11", None, ""),
        ("ecdsa-p256", "pkcs11", Some(HashAlg::Sha512), "sha512"),
        ("ecdsa-p384", "pkcs11", None, "sha384"),
        ("rsa-pkcs1-2048", "pkcs11", None, "sha256"),
        // rsa-sha2-512, as SSH clients ask of an agent.
        ("rsa-pkcs1-2048", "pkcs11", Some(HashAlg::Sha512), "sha512"),
        ("rsa-pss-2048", "pkcs11", Some(HashAlg::Sha256), "sha256"),
    ];
    let mut c = d.client();
    for (i, &(key_type, backend, hash, openssl_hash)) in cases.iter().enumerate() {
        let name = format!("k{i}-{key_type}-{backend}");
        ok(&d.hsmctl(&["key", "create", &name, "--type", key_type, "--backend", backend]));
        let public = d.dir().join(format!("{name}.pem"));
        ok(&d.hsmctl(&["key", "public", &name, "-o", path(&public)]));
        let (version, signature) = sign(&mut c, &name, &message, hash).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let sig = d.dir().join(format!("{name}.sig"));
        fs::write(&sig, &signature).expect("write");
        let what = format!("{name} over {}", hash.map_or("its own hash", HashAlg::as_str));
        if key_type.starts_with("rsa-pss") {
            // OpenSSL needs PSS's parameters; hsmd's are SHA-256, MGF1-SHA-256, salt 32.
            let out = Command::new("openssl")
                .args([
                    "dgst",
                    "-sha256",
                    "-sigopt",
                    "rsa_padding_mode:pss",
                    "-sigopt",
                    "rsa_pss_saltlen:32",
                ])
                .args([
                    "-sigopt",
                    "rsa_mgf1_md:sha256",
                    "-verify",
                    path(&public),
                    "-signature",
                    path(&sig),
                    path(&msg),
                ])
                .output()
                .expect("openssl");
            assert!(out.status.success(), "openssl rejects {what}: {out:?}");
        } else {
            assert!(
                openssl_accepts(key_type, openssl_hash, &public, &msg, &sig),
                "openssl rejects {what}"
            );
        }
        if key_type == "ed25519" {
            // Pure Ed25519: not a signature over the message's SHA-512 (hsmd's `Sign`).
            assert_eq!(signature.len(), 64);
        }
        let check = |c: &mut Client, message: &[u8]| {
            c.verify_message(name.clone(), version, message.to_vec(), hash, signature.clone(), false)
                .expect("verify-message")
        };
        assert!(check(&mut c, &message), "hsmd rejects its own {what}");
        let mut altered = message.clone();
        altered[7] ^= 1;
        assert!(!check(&mut c, &altered), "hsmd accepts {what} over an altered message");
    }
}

#[test]
fn what_a_key_or_its_backend_cannot_sign_is_refused_with_the_reason() {
    let hsm = SoftHsm::new("hsmd-refusals");
    let d = started(&hsm);
    for (name, key_type, backend) in [
        ("ed", "ed25519", "soft"),
        ("ec", "ecdsa-p256", "soft"),
        ("rsa", "rsa-pss-2048", "pkcs11"),
        ("box", "aes256-gcm", "soft"),
    ] {
        ok(&d.hsmctl(&["key", "create", name, "--type", key_type, "--backend", backend]));
    }
    let mut c = d.client();
    let refusal = |c: &mut Client, name: &str, message: &[u8], hash: Option<HashAlg>| {
        let e = c
            .sign_message(name.into(), message.to_vec(), hash)
            .expect_err("refused");
        assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
        e.to_string()
    };
    let e = refusal(&mut c, "ed", b"m", Some(HashAlg::Sha512));
    assert!(e.contains("pure Ed25519"), "{e}");
    let e = refusal(&mut c, "rsa", b"m", Some(HashAlg::Sha512));
    assert!(
        e.contains("cannot sign over sha512") && e.contains("binds its hash"),
        "{e}"
    );
    // The bound: the largest message signs, one byte more is refused.
    let largest = vec![b'x'; MAX_SIGN_MESSAGE];
    assert!(sign(&mut c, "ec", &largest, None).is_ok());
    let e = refusal(&mut c, "ec", &[largest, vec![b'x']].concat(), None);
    assert!(
        e.contains("at most 65536 bytes") && e.contains("sign the digest"),
        "{e}"
    );
    // A key that may not sign (by its usages, or its type) cannot sign a
    // message either.
    ok(&d.hsmctl(&["key", "create", "checker", "--type", "ed25519", "--usage", "verify"]));
    for name in ["checker", "box"] {
        let e = c.sign_message(name.into(), b"m".to_vec(), None).expect_err("refused");
        assert_eq!(e.code(), Some(ErrorCode::FailedPrecondition), "{e}");
        assert!(e.to_string().contains("may not be used to sign"), "{e}");
    }
}

#[test]
fn batches_hold_message_signatures_and_the_audit_line_names_hash_and_length_never_the_message() {
    let d = Daemon::start();
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&d.dir().join("unlock.key"))]));
    ok(&d.hsmctl(&["key", "create", "ssh", "--type", "ecdsa-p256"]));
    let secret = b"session data that must never reach the audit log 7f3a9c";
    let mut c = d.client();
    let items = vec![
        BatchItem::SignMessage(SignMessageArgs {
            name: "ssh".into(),
            message: secret.to_vec(),
            hash: Some(HashAlg::Sha384),
        }),
        BatchItem::SignMessage(SignMessageArgs {
            name: "ssh".into(),
            message: secret.to_vec(),
            hash: None,
        }),
    ];
    let results = c.batch(items).expect("batch");
    assert_eq!(results.len(), 2);
    for r in results {
        assert!(matches!(r, Ok(Reply::Signature { version: 1, .. })), "{r:?}");
    }
    let log = fs::read_to_string(d.dir().join("state").join("audit.log")).expect("audit log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .filter(|v: &serde_json::Value| v["action"] == "sign-message")
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert_eq!(lines[0]["metadata"]["hash"], "sha384");
    assert_eq!(lines[1]["metadata"]["hash"], "default");
    for l in &lines {
        assert_eq!(l["metadata"]["message_bytes"], secret.len());
        assert_eq!(l["resource"], "key:ssh");
        assert_eq!(l["result"], "success");
    }
    assert!(!log.contains("7f3a9c"), "the message reached the audit log");
}

#[test]
fn hsmctl_writes_ssh_signatures_that_ssh_keygen_accepts_and_reads_them_back() {
    let hsm = SoftHsm::new("hsmd-sshsig");
    let d = started(&hsm);
    let data = d.dir().join("release.tar");
    fs::write(&data, b"a release signed the way git and ssh-keygen sign").expect("write");
    for (name, key_type, backend) in [
        ("ed", "ed25519", "soft"),
        ("p256", "ecdsa-p256", "soft"),
        ("p384", "ecdsa-p384", "soft"),
        ("rsa", "rsa-pkcs1-2048", "pkcs11"),
    ] {
        ok(&d.hsmctl(&["key", "create", name, "--type", key_type, "--backend", backend]));
        let public = ok(&d.hsmctl(&["key", "public", name, "--format", "openssh"]));
        let sig = d.dir().join(format!("{name}.sig"));
        ok(&d.hsmctl(&[
            "sign",
            name,
            "-i",
            path(&data),
            "-o",
            path(&sig),
            "--format",
            "ssh",
            "-n",
            "file",
        ]));
        let text = fs::read_to_string(&sig).expect("read");
        assert!(text.starts_with("-----BEGIN SSH SIGNATURE-----\n"), "{text}");
        assert!(
            ssh_keygen_verifies(d.dir(), &public, "file", &data, &sig),
            "ssh-keygen rejects the {key_type} signature"
        );
        // A signature is for its namespace only.
        assert!(!ssh_keygen_verifies(d.dir(), &public, "git", &data, &sig));
        let verify = |ns: &str| {
            d.hsmctl(&[
                "verify",
                name,
                "-i",
                path(&data),
                "-s",
                path(&sig),
                "--format",
                "ssh",
                "-n",
                ns,
            ])
        };
        assert!(ok(&verify("file")).contains("signature valid"));
        let out = verify("git");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("not \"git\""), "{out:?}");
    }
    // An altered file: both refuse it.
    let public = ok(&d.hsmctl(&["key", "public", "ed", "--format", "openssh"]));
    let sig = d.dir().join("ed.sig");
    fs::write(&data, b"a release signed the way git and ssh-keygen sign, altered").expect("write");
    assert!(!ssh_keygen_verifies(d.dir(), &public, "file", &data, &sig));
    let out = d.hsmctl(&[
        "verify",
        "ed",
        "-i",
        path(&data),
        "-s",
        path(&sig),
        "--format",
        "ssh",
        "-n",
        "file",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // No namespace, no SSH signature.
    let out = d.hsmctl(&["sign", "ed", "-i", path(&data), "--format", "ssh"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a namespace"),
        "{out:?}"
    );
}

#[test]
fn an_rsa_sha2_512_ssh_signature_made_with_the_library_satisfies_ssh_keygen_and_hsmctl() {
    use protocol::formats::sshsig;
    let hsm = SoftHsm::new("hsmd-rsa512");
    let d = started(&hsm);
    ok(&d.hsmctl(&[
        "key",
        "create",
        "rsa",
        "--type",
        "rsa-pkcs1-2048",
        "--backend",
        "pkcs11",
    ]));
    let public = ok(&d.hsmctl(&["key", "public", "rsa", "--format", "openssh"]));
    let data = d.dir().join("commit.txt");
    fs::write(&data, b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n").expect("write");
    // What an SSH client asks of an agent for an RSA key: rsa-sha2-512.
    let hash = sshsig::hash("sha512", &fs::read(&data).expect("read"));
    let blob = sshsig::signed_data("git", &hash).expect("signed data");
    let mut c = d.client();
    let signed = c.sign_message("rsa".into(), blob, Some(HashAlg::Sha512)).expect("sign");
    let text = sshsig::armor(
        &public,
        protocol::KeyType::RsaPkcs1_2048,
        "git",
        &hash,
        &signed.signature,
        Some(HashAlg::Sha512),
    )
    .expect("armor");
    let sig = d.dir().join("commit.sig");
    fs::write(&sig, &text).expect("write");
    assert!(
        ssh_keygen_verifies(d.dir(), &public, "git", &data, &sig),
        "ssh-keygen rejects rsa-sha2-512"
    );
    let out = ok(&d.hsmctl(&[
        "verify",
        "rsa",
        "-i",
        path(&data),
        "-s",
        path(&sig),
        "--format",
        "ssh",
        "-n",
        "git",
    ]));
    assert!(out.contains("signature valid"), "{out}");
}
