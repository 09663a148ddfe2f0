//! hsmd's PKCS#11 module (`libhsmd_pkcs11.so`) with other people's programs
//! as its clients: OpenSC's `pkcs11-tool` lists, signs and generates keys;
//! OpenSSL's PKCS#11 engine (libp11) signs and makes a certificate;
//! `gnutls-serv` serves TLS 1.3 with the key in hsmd while `gnutls-cli`
//! connects; `ssh-keygen -D` prints the keys; Parsec's `cryptoki` encrypts
//! and decrypts with AES-GCM. OpenSSL checks every signature against `hsmctl
//! key public`, hsmd's own `Decrypt` every ciphertext. A second uid sees
//! nothing, a locked hsmd and a killed one give PKCS#11 errors, not crashes.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use hsmd_tests::check::{json, ok, p as path};
use hsmd_tests::{openssl_verifies, pkcs11_module, Daemon};

/// The PKCS#11 engine `libengine-pkcs11-openssl` installs, in OpenSSL's
/// engine directory (`openssl version -e`), which names the architecture.
fn engine() -> PathBuf {
    let out = ok(&Command::new("openssl")
        .args(["version", "-e"])
        .output()
        .expect("openssl"));
    let dir = out
        .split('"')
        .nth(1)
        .unwrap_or_else(|| panic!("no ENGINESDIR in {out:?}"));
    let engine = PathBuf::from(dir).join("pkcs11.so");
    assert!(
        engine.exists(),
        "{} is missing: install libengine-pkcs11-openssl (scripts/install-test-deps)",
        engine.display()
    );
    engine
}

fn started() -> Daemon {
    let d = Daemon::start();
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&d.dir().join("unlock.key"))]));
    d
}

fn create(d: &Daemon, name: &str, key_type: &str) {
    ok(&d.hsmctl(&["key", "create", name, "--type", key_type]));
}

fn key_id(d: &Daemon, name: &str) -> String {
    json(&d.hsmctl(&["--json", "key", "info", name]))["id"]
        .as_str()
        .expect("key id")
        .to_owned()
}

fn public_pem(d: &Daemon, name: &str) -> PathBuf {
    let pem = d.dir().join(format!("{name}.pem"));
    fs::write(&pem, ok(&d.hsmctl(&["key", "public", name]))).expect("write");
    pem
}

/// Fails the test unless `openssl pkeyutl -verify` accepts `sig` over
/// `input` (the message itself with `raw`, as Ed25519 signs; else a digest).
fn pkeyutl_verifies(public: &Path, input: &Path, sig: &Path, raw: bool) {
    let verified = Command::new("openssl")
        .args(["pkeyutl", "-verify", "-pubin"])
        .args(raw.then_some("-rawin"))
        .arg("-inkey")
        .arg(public)
        .arg("-in")
        .arg(input)
        .arg("-sigfile")
        .arg(sig)
        .output()
        .expect("openssl");
    assert!(
        ok(&verified).contains("Signature Verified Successfully"),
        "{verified:?}"
    );
}

/// `pkcs11-tool --module libhsmd_pkcs11.so ARGS…` against `d`.
fn pkcs11_tool(d: &Daemon, args: &[&str]) -> Output {
    Command::new("pkcs11-tool")
        .arg("--module")
        .arg(pkcs11_module())
        .args(args)
        .env("HSMD_SOCKET", &d.socket)
        .env("HSMD_PKCS11_DEBUG", "1")
        .output()
        .expect("run pkcs11-tool (opensc)")
}

fn audit(d: &Daemon) -> String {
    fs::read_to_string(d.dir().join("state/audit.log")).expect("audit log")
}

/// Held by each test that loads the module into this process: the module is
/// loaded once per process, and reads `$HSMD_SOCKET` at `C_Initialize`.
static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The handle of the object of `class` labelled `label`.
fn find(
    session: &cryptoki::session::Session,
    class: cryptoki::object::ObjectClass,
    label: &str,
) -> cryptoki::object::ObjectHandle {
    use cryptoki::object::Attribute;
    let found = session
        .find_objects(&[Attribute::Class(class), Attribute::Label(label.into())])
        .expect("C_FindObjects");
    *found.first().unwrap_or_else(|| panic!("no {class} object {label:?}"))
}

/// Loads the module into this process for `d`, initialized.
fn in_process(d: &Daemon) -> (std::sync::MutexGuard<'static, ()>, cryptoki::context::Pkcs11) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let held = IN_PROCESS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    std::env::set_var("HSMD_SOCKET", &d.socket);
    let p11 = Pkcs11::new(pkcs11_module()).expect("load the module");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    (held, p11)
}

#[test]
fn pkcs11_tool_lists_signs_and_generates_keys() {
    let d = started();
    create(&d, "web", "ecdsa-p256");
    create(&d, "release", "ed25519");
    create(&d, "box", "aes256-gcm");

    let slots = ok(&pkcs11_tool(&d, &["-L"]));
    assert!(slots.contains("token label        : hsmd"), "{slots}");
    assert!(slots.contains("token initialized"), "{slots}");

    let objects = ok(&pkcs11_tool(&d, &["-O"]));
    for (name, kind) in [("web", "EC"), ("release", "EC_EDWARDS")] {
        let id = key_id(&d, name);
        assert!(
            objects.contains(&format!(
                "Private Key Object; {kind}\n  label:      {name}\n  ID:         {id}"
            )),
            "{name}'s private key object: {objects}"
        );
        assert!(
            objects.contains(&format!("label:      {name}\n  ID:         {id}\n  Usage:      verify")),
            "{name}'s public key object: {objects}"
        );
    }
    assert!(
        objects.contains("Access:     sensitive, always sensitive, never extractable"),
        "{objects}"
    );
    assert!(
        objects.contains(&format!(
            "Secret Key Object; AES length 32\n  label:      box\n  ID:         {}\n  Usage:      encrypt, decrypt",
            key_id(&d, "box")
        )),
        "an AES key is a secret key object: {objects}"
    );

    // ECDSA over SHA-256 of 100 KB (hashed in the module, signed in hsmd).
    let data = d.dir().join("data");
    fs::write(&data, vec![0x5a; 100_000]).expect("write");
    let sig = d.dir().join("web.sig");
    ok(&pkcs11_tool(
        &d,
        &[
            "--sign",
            "-m",
            "ECDSA-SHA256",
            "--id",
            &key_id(&d, "web"),
            "--signature-format",
            "openssl",
            "-i",
            path(&data),
            "-o",
            path(&sig),
        ],
    ));
    assert!(openssl_verifies("ecdsa-p256", &public_pem(&d, "web"), &data, &sig));
    // And hsmd checks it through the module; one byte more and it does not.
    let p11_verify = |mechanism: &str, name: &str, input: &PathBuf, sig: &PathBuf, extra: &[&str]| {
        let id = key_id(&d, name);
        let mut args = vec!["--verify", "-m", mechanism, "--id", &id, "--input-file", path(input)];
        args.extend(["--signature-file", path(sig)]);
        args.extend(extra);
        String::from_utf8_lossy(&pkcs11_tool(&d, &args).stdout).into_owned()
    };
    let openssl_format = ["--signature-format", "openssl"];
    assert!(p11_verify("ECDSA-SHA256", "web", &data, &sig, &openssl_format).contains("Signature is valid"));
    let altered = d.dir().join("altered");
    fs::write(&altered, vec![0x5a; 100_001]).expect("write");
    assert!(p11_verify("ECDSA-SHA256", "web", &altered, &sig, &openssl_format).contains("Invalid signature"));

    // Pure Ed25519 over the message itself.
    let message = d.dir().join("message");
    fs::write(&message, b"release v1.2.3\n").expect("write");
    let sig = d.dir().join("release.sig");
    ok(&pkcs11_tool(
        &d,
        &[
            "--sign",
            "-m",
            "EDDSA",
            "--id",
            &key_id(&d, "release"),
            "-i",
            path(&message),
            "-o",
            path(&sig),
        ],
    ));
    pkeyutl_verifies(&public_pem(&d, "release"), &message, &sig, true);
    assert!(p11_verify("EDDSA", "release", &message, &sig, &[]).contains("Signature is valid"));
    let log = audit(&d);
    assert!(
        log.lines()
            .any(|l| l.contains("\"key:release\"") && l.contains("\"sign-message\"") && l.contains("pkcs11-tool")),
        "the Ed25519 signature's audit line names pkcs11-tool"
    );

    // A key made through the module is an hsmd key.
    let made = ok(&pkcs11_tool(
        &d,
        &["--keypairgen", "--key-type", "EC:prime256v1", "--label", "from-p11"],
    ));
    assert!(made.contains("label:      from-p11"), "{made}");
    let keys = ok(&d.hsmctl(&["key", "list"]));
    assert!(
        keys.lines()
            .any(|l| l.starts_with("from-p11") && l.contains("ecdsa-p256")),
        "{keys}"
    );
    // C_GenerateKey makes an AES key, 256-bit only.
    let made = ok(&pkcs11_tool(
        &d,
        &[
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            "aes-from-p11",
            "--sensitive",
        ],
    ));
    assert!(made.contains("label:      aes-from-p11"), "{made}");
    let info = json(&d.hsmctl(&["--json", "key", "info", "aes-from-p11"]));
    assert_eq!(info["key_type"], "aes256-gcm", "{info}");
    assert_eq!(info["usages"], serde_json::json!(["encrypt", "decrypt"]), "{info}");
    // ... and destroying its object deletes it (softly, as `key delete`).
    ok(&pkcs11_tool(
        &d,
        &["--delete-object", "--type", "secrkey", "--label", "aes-from-p11"],
    ));
    let info = json(&d.hsmctl(&["--json", "key", "info", "aes-from-p11"]));
    assert!(info["deleted_unix"].is_u64(), "{info}");
    let keygen = |bytes: &str, extra: &[&str]| {
        let key_type = format!("AES:{bytes}");
        let mut args = vec!["--keygen", "--key-type", &key_type, "--label", "aes128"];
        args.extend(extra);
        let out = pkcs11_tool(&d, &args);
        assert!(!out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let short = keygen("16", &["--sensitive"]);
    assert!(
        short.contains("CKR_ATTRIBUTE_VALUE_INVALID") && short.contains("256 bits"),
        "{short}"
    );
    // pkcs11-tool asks for a readable key unless told --sensitive; hsmd
    // cannot give one, and says so rather than pretend.
    let readable = keygen("32", &[]);
    assert!(readable.contains("never leaves hsmd"), "{readable}");
    assert!(!ok(&d.hsmctl(&["key", "list"])).contains("aes128"));

    // hsmd names its keys' ids; a caller's CKA_ID is refused, not ignored.
    let refused = pkcs11_tool(
        &d,
        &[
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--label",
            "x",
            "--id",
            "01",
        ],
    );
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("CKR_ATTRIBUTE_READ_ONLY"),
        "{refused:?}"
    );
}

/// An OpenSSL config that loads the PKCS#11 engine with hsmd's module.
fn openssl_conf(d: &Daemon) -> PathBuf {
    let conf = d.dir().join("openssl.cnf");
    fs::write(
        &conf,
        format!(
            "openssl_conf = openssl_init\n[openssl_init]\nengines = engine_section\n\
             [engine_section]\npkcs11 = pkcs11_section\n[pkcs11_section]\nengine_id = pkcs11\n\
             dynamic_path = {}\nMODULE_PATH = {}\ninit = 0\n",
            engine().display(),
            pkcs11_module().display()
        ),
    )
    .expect("write");
    conf
}

fn openssl(d: &Daemon, args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .env("OPENSSL_CONF", openssl_conf(d))
        .env("HSMD_SOCKET", &d.socket)
        .env("HSMD_PKCS11_DEBUG", "1")
        .output()
        .expect("run openssl")
}

/// A self-signed certificate for the hsmd key `name`, made by `openssl req`
/// through the engine.
fn certificate(d: &Daemon, name: &str) -> PathBuf {
    let cert = d.dir().join(format!("{name}.crt"));
    let uri = format!("pkcs11:object={name};type=private");
    ok(&openssl(
        d,
        &[
            "req",
            "-x509",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-key",
            &uri,
            "-subj",
            "/CN=localhost",
            "-days",
            "2",
            "-out",
            path(&cert),
        ],
    ));
    cert
}

#[test]
fn openssl_signs_and_makes_a_certificate_through_the_engine() {
    let d = started();
    create(&d, "tls", "ecdsa-p256");
    let digest = d.dir().join("digest");
    fs::write(&digest, [0x42; 32]).expect("write");
    let sig = d.dir().join("sig");
    ok(&openssl(
        &d,
        &[
            "pkeyutl",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-sign",
            "-inkey",
            "pkcs11:object=tls;type=private",
            "-in",
            path(&digest),
            "-out",
            path(&sig),
        ],
    ));
    pkeyutl_verifies(&public_pem(&d, "tls"), &digest, &sig, false);

    let cert = certificate(&d, "tls");
    // Self-signed by the hsmd key: its own public key checks its signature,
    // and that public key is hsmctl's.
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&cert)
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(ok(&verify).contains(": OK"), "{verify:?}");
    let cert_key = Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(&cert)
        .output()
        .expect("openssl");
    assert_eq!(ok(&cert_key), ok(&d.hsmctl(&["key", "public", "tls"])));
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

#[test]
fn gnutls_serves_tls13_with_the_key_in_hsmd() {
    let d = started();
    create(&d, "tls", "ecdsa-p256");
    let cert = certificate(&d, "tls");
    let port = free_port();
    let server_log = d.dir().join("gnutls-serv.log");
    let mut server = Command::new("gnutls-serv")
        .arg("--provider")
        .arg(pkcs11_module())
        .arg("--x509certfile")
        .arg(&cert)
        .args([
            "--x509keyfile",
            "pkcs11:object=tls;type=private",
            "--echo",
            "-p",
            &port.to_string(),
        ])
        .env("HSMD_SOCKET", &d.socket)
        .env("HSMD_PKCS11_DEBUG", "1")
        .stdout(fs::File::create(&server_log).expect("log"))
        .stderr(Stdio::null())
        .spawn()
        .expect("run gnutls-serv (gnutls-bin)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "gnutls-serv did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let signatures = || {
        audit(&d)
            .lines()
            .filter(|l| l.contains("gnutls-serv") && l.contains("\"SIGN\"") && l.contains("\"key:tls\""))
            .count()
    };
    let signed_before = signatures();
    let mut client = Command::new("gnutls-cli")
        .args(["--x509cafile", path(&cert), "-p", &port.to_string(), "localhost"])
        .args(["--priority", "NORMAL:-VERS-ALL:+VERS-TLS1.3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run gnutls-cli");
    {
        use std::io::Write as _;
        let mut stdin = client.stdin.take().expect("stdin");
        stdin.write_all(b"hello through hsmd\n").expect("write");
    }
    let out = client.wait_with_output().expect("gnutls-cli");
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Handshake was completed") || text.contains("Handshake was completed"),
        "{out:?}\nserver: {}",
        fs::read_to_string(&server_log).unwrap_or_default()
    );
    assert!(format!("{text}{err}").contains("(TLS1.3"), "not TLS 1.3: {out:?}");
    assert!(text.contains("hello through hsmd"), "no echo: {out:?}");
    assert!(
        signatures() > signed_before,
        "the handshake's signature has no audit line naming gnutls-serv"
    );
}

#[test]
fn ssh_keygen_prints_the_keys_openssh_can_use() {
    let d = started();
    create(&d, "host", "ecdsa-p256");
    create(&d, "p384", "ecdsa-p384");
    let out = Command::new("ssh-keygen")
        .arg("-D")
        .arg(pkcs11_module())
        .env("HSMD_SOCKET", &d.socket)
        .output()
        .expect("ssh-keygen");
    let listed = ok(&out);
    for name in ["host", "p384"] {
        let line = ok(&d.hsmctl(&["key", "public", name, "--format", "openssh"]));
        let blob = line.split_whitespace().nth(1).expect("blob");
        assert!(listed.contains(blob), "{name} missing from ssh-keygen -D: {listed}");
    }
}

/// The module loaded into this process through cryptoki, as a program links
/// it: secrets are not readable, a locked hsmd is `CKR_USER_NOT_LOGGED_IN`
/// until unlocked, and a killed hsmd is `CKR_DEVICE_REMOVED` (the host lives
/// on) until it is back, when the same session signs again. One test, since
/// a module is initialized once per process.
#[test]
fn locked_and_killed_daemons_are_errors_the_host_program_survives() {
    use cryptoki::{
        error::{Error, RvError},
        mechanism::Mechanism,
        object::{AttributeInfo, AttributeType, ObjectClass},
    };
    let mut d = started();
    create(&d, "web", "ecdsa-p256");
    let (_held, p11) = in_process(&d);
    let slot = p11.get_slots_with_token().expect("slots")[0];
    let session = p11.open_rw_session(slot).expect("session");
    let key = find(&session, ObjectClass::PRIVATE_KEY, "web");
    let info = session
        .get_attribute_info(key, &[AttributeType::Value, AttributeType::Sensitive])
        .expect("attribute info");
    assert!(
        matches!(info[..], [AttributeInfo::Sensitive, AttributeInfo::Available(1)]),
        "the private scalar is sensitive: {info:?}"
    );
    let sign = || session.sign(&Mechanism::Ecdsa, key, &[7; 32]);
    assert_eq!(sign().expect("sign").len(), 64);

    ok(&d.hsmctl(&["lock"]));
    assert!(
        matches!(sign(), Err(Error::Pkcs11(RvError::UserNotLoggedIn, _))),
        "locked: {:?}",
        sign()
    );
    ok(&d.hsmctl(&["unlock", "--keyfile", path(&d.dir().join("unlock.key"))]));
    assert_eq!(sign().expect("sign after unlock").len(), 64);

    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(10));
    assert!(
        matches!(sign(), Err(Error::Pkcs11(RvError::DeviceRemoved, _))),
        "killed: {:?}",
        sign()
    );
    assert!(
        p11.get_slots_with_token().expect("slots").is_empty(),
        "no token while hsmd is gone"
    );

    d.restart(false);
    ok(&d.hsmctl(&["unlock", "--keyfile", path(&d.dir().join("unlock.key"))]));
    assert_eq!(
        sign().expect("sign after hsmd is back").len(),
        64,
        "the session outlives hsmd's restart"
    );
    drop(session);
    p11.finalize().expect("C_Finalize");
}

#[test]
fn a_key_without_a_usage_is_refused_at_init_as_its_attributes_say() {
    use cryptoki::{
        error::{Error, RvError},
        mechanism::Mechanism,
        object::{Attribute, AttributeType, ObjectClass},
    };
    let d = started();
    ok(&d.hsmctl(&["key", "create", "signer", "--type", "ecdsa-p256", "--usage", "sign"]));
    ok(&d.hsmctl(&["key", "create", "checker", "--type", "ecdsa-p256", "--usage", "verify"]));
    create(&d, "box", "aes256-gcm");
    let (_held, p11) = in_process(&d);
    let slot = p11.get_slots_with_token().expect("slots")[0];
    let session = p11.open_rw_session(slot).expect("session");
    let rv = |e: Error| match e {
        Error::Pkcs11(rv, _) => rv,
        other => panic!("not a PKCS#11 error: {other}"),
    };
    let flag = |handle, kind| match &session.get_attributes(handle, &[kind]).expect("attributes")[..] {
        [Attribute::Sign(v) | Attribute::Verify(v)] => *v,
        other => panic!("{other:?}"),
    };
    let signer = find(&session, ObjectClass::PRIVATE_KEY, "signer");
    let signer_public = find(&session, ObjectClass::PUBLIC_KEY, "signer");
    let checker = find(&session, ObjectClass::PRIVATE_KEY, "checker");
    let checker_public = find(&session, ObjectClass::PUBLIC_KEY, "checker");
    assert!(flag(signer, AttributeType::Sign) && !flag(signer_public, AttributeType::Verify));
    assert!(!flag(checker, AttributeType::Sign) && flag(checker_public, AttributeType::Verify));

    // What the attributes deny is refused at init, not by hsmd at the end
    // (which a program would see as CKR_FUNCTION_FAILED).
    let signature = session.sign(&Mechanism::EcdsaSha256, signer, b"data").expect("C_Sign");
    for key in [signer, signer_public] {
        assert_eq!(
            rv(session
                .verify(&Mechanism::EcdsaSha256, key, b"data", &signature)
                .unwrap_err()),
            RvError::KeyFunctionNotPermitted
        );
    }
    assert_eq!(
        rv(session.sign(&Mechanism::EcdsaSha256, checker, b"data").unwrap_err()),
        RvError::KeyFunctionNotPermitted
    );
    let theirs = session.sign(&Mechanism::EcdsaSha256, signer, b"more").expect("C_Sign");
    assert_eq!(
        rv(session
            .verify(&Mechanism::EcdsaSha256, checker_public, b"more", &theirs)
            .unwrap_err()),
        RvError::SignatureInvalid,
        "checker verifies (and the signer's signature is not its own)"
    );
    // An AES key signs nothing, and says so.
    let aes = find(&session, ObjectClass::SECRET_KEY, "box");
    assert_eq!(
        rv(session.sign(&Mechanism::EcdsaSha256, aes, b"data").unwrap_err()),
        RvError::KeyTypeInconsistent
    );
    drop(session);
    p11.finalize().expect("C_Finalize");
}

#[test]
fn aes_gcm_encrypts_with_ivs_hsmd_draws_and_decrypts_what_any_version_sealed() {
    use cryptoki::{
        error::{Error, RvError},
        mechanism::{
            aead::{GcmMessageParams, GcmParams, GeneratorFunction},
            Mechanism, MessageParam,
        },
        object::{AttributeInfo, AttributeType, ObjectClass},
    };
    let d = started();
    create(&d, "vault", "aes256-gcm");
    let (_held, p11) = in_process(&d);
    let slot = p11.get_slots_with_token().expect("slots")[0];
    let session = p11.open_rw_session(slot).expect("session");
    let key = find(&session, ObjectClass::SECRET_KEY, "vault");
    let info = session
        .get_attribute_info(key, &[AttributeType::Value, AttributeType::ValueLen])
        .expect("attribute info");
    assert!(
        matches!(info[..], [AttributeInfo::Sensitive, AttributeInfo::Available(_)]),
        "the key is sensitive: {info:?}"
    );
    let rv = |e: Error| match e {
        Error::Pkcs11(rv, _) => rv,
        other => panic!("not a PKCS#11 error: {other}"),
    };

    // Encrypt: hsmd draws the IV and the module writes it, and the tag, into
    // the caller's parameters.
    let aad = b"record 17";
    let plaintext = b"the launch codes".as_slice();
    let encrypt = |generator| {
        let (mut iv, mut tag) = ([0u8; 12], [0u8; 16]);
        let params = GcmMessageParams::new(&mut iv, 0.into(), generator, &mut tag).expect("params");
        let ciphertext = session.encrypt_message(&MessageParam::AesGcmMessage(params), aad, plaintext)?;
        Ok::<_, Error>((iv, ciphertext, tag))
    };
    // The message interface's init takes the mechanism; each message brings
    // its own parameters.
    let (mut no_iv, mut no_tag) = ([0u8; 12], [0u8; 16]);
    let gcm = Mechanism::AesGcmMessage(
        GcmMessageParams::new(&mut no_iv, 0.into(), GeneratorFunction::NoGenerate, &mut no_tag).expect("params"),
    );
    session.message_encrypt_init(&gcm, key).expect("C_MessageEncryptInit");
    let (iv, ciphertext, tag) = encrypt(GeneratorFunction::GenerateRandom).expect("C_EncryptMessage");
    assert_eq!(ciphertext.len(), plaintext.len());
    assert_ne!(ciphertext, plaintext);
    let (iv2, _, _) = encrypt(GeneratorFunction::GenerateRandom).expect("a second message");
    assert_ne!(iv, [0; 12], "the IV hsmd drew was written back");
    assert_ne!(iv, iv2, "each message gets its own IV");
    assert_eq!(
        rv(encrypt(GeneratorFunction::NoGenerate).unwrap_err()),
        RvError::MechanismParamInvalid,
        "a caller's own IV is refused"
    );
    session.message_encrypt_final().expect("C_MessageEncryptFinal");

    // hsmd's own Decrypt opens it: IV, ciphertext and tag are its sealed form.
    let sealed = [&iv[..], &ciphertext, &tag].concat();
    let opened = d
        .client()
        .decrypt("vault".into(), 1, sealed.clone(), aad.to_vec(), false)
        .expect("hsmd decrypts what the module sealed");
    assert_eq!(opened.expose(), plaintext);

    // Single-part C_Encrypt would take the caller's IV: refused.
    let mut caller_iv = [9u8; 12];
    let single = Mechanism::AesGcm(GcmParams::new(&mut caller_iv, aad, 128.into()).expect("params"));
    assert_eq!(
        rv(session.encrypt(&single, key, plaintext).unwrap_err()),
        RvError::MechanismParamInvalid
    );

    // What hsmd sealed before a rotation opens through C_Decrypt after it,
    // in one part or several, and the audit line names the version.
    let before = d
        .client()
        .encrypt(
            "vault".into(),
            None,
            protocol::SecretBytes::new(plaintext.to_vec()),
            aad.to_vec(),
        )
        .expect("encrypt");
    assert_eq!(before.version, 1);
    ok(&d.hsmctl(&["key", "rotate", "vault"]));
    let (old_iv, old_body) = before.sealed.split_at(12);
    let mut old_iv: [u8; 12] = old_iv.try_into().unwrap();
    let decrypt = |iv: &mut [u8; 12], aad: &[u8], body: &[u8]| {
        session.decrypt(
            &Mechanism::AesGcm(GcmParams::new(iv, aad, 128.into()).expect("params")),
            key,
            body,
        )
    };
    assert_eq!(
        decrypt(&mut old_iv, aad, old_body).expect("C_Decrypt of version 1"),
        plaintext
    );
    let log = audit(&d);
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("\"key:vault\"") && l.contains("\"decrypt\""))
        .expect("the decryption's audit line");
    assert!(line.contains("\"version\":1") && line.contains("\"success\""), "{line}");
    session
        .decrypt_init(
            &Mechanism::AesGcm(GcmParams::new(&mut old_iv, aad, 128.into()).expect("params")),
            key,
        )
        .expect("C_DecryptInit");
    let (first, rest) = old_body.split_at(5);
    assert!(
        session.decrypt_update(first).expect("C_DecryptUpdate").is_empty(),
        "nothing before the tag checks out"
    );
    assert!(session.decrypt_update(rest).expect("C_DecryptUpdate").is_empty());
    assert_eq!(session.decrypt_final().expect("C_DecryptFinal"), plaintext);

    // The message interface opens it too; a flipped bit, other associated
    // data, or a version below the key's minimum do not.
    session.message_decrypt_init(&gcm, key).expect("C_MessageDecryptInit");
    let open = |iv: &[u8; 12], tag: &[u8; 16], aad: &[u8], body: &[u8]| {
        let (mut iv, mut tag) = (*iv, *tag);
        let params = GcmMessageParams::new(&mut iv, 0.into(), GeneratorFunction::NoGenerate, &mut tag).expect("params");
        session.decrypt_message(&MessageParam::AesGcmMessage(params), aad, body)
    };
    assert_eq!(open(&iv, &tag, aad, &ciphertext).expect("C_DecryptMessage"), plaintext);
    let mut flipped = ciphertext.clone();
    flipped[0] ^= 1;
    assert_eq!(
        rv(open(&iv, &tag, aad, &flipped).unwrap_err()),
        RvError::EncryptedDataInvalid
    );
    assert_eq!(
        rv(open(&iv, &tag, b"record 18", &ciphertext).unwrap_err()),
        RvError::EncryptedDataInvalid
    );
    session.message_decrypt_final().expect("C_MessageDecryptFinal");
    ok(&d.hsmctl(&["key", "set", "vault", "--min-decrypt-version", "2"]));
    assert_eq!(
        rv(decrypt(&mut old_iv, aad, old_body).unwrap_err()),
        RvError::EncryptedDataInvalid,
        "version 1 no longer decrypts"
    );
    drop(session);
    p11.finalize().expect("C_Finalize");
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn a_second_uid_without_the_right_sees_no_objects_and_cannot_sign() {
    hsmd_tests::require_root("acting as another uid");
    let d = Daemon::builder()
        .socket_mode("0666")
        .users(&["4001", "4002"])
        .policy(
            r#"
[roles.web-signer]
permissions = [{ resource = "keys", action = "*", keys = "web" }]

[[bind]]
users = ["4002"]
roles = ["web-signer"]

[[bind]]
users = ["0"]
roles = ["admin"]
"#,
        )
        .start();
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&d.dir().join("unlock.key"))]));
    create(&d, "web", "ecdsa-p256");
    create(&d, "other", "ecdsa-p256");
    let data = d.dir().join("data");
    fs::write(&data, b"data").expect("write");
    let as_uid = |uid: u32, args: &[&str]| {
        hsmd_tests::as_uid(uid, "pkcs11-tool")
            .arg("--module")
            .arg(pkcs11_module())
            .args(args)
            .env("HSMD_SOCKET", &d.socket)
            .output()
            .expect("run pkcs11-tool as another uid")
    };
    let sign = |uid: u32| {
        as_uid(
            uid,
            &[
                "--sign",
                "-m",
                "ECDSA-SHA256",
                "--id",
                &key_id(&d, "web"),
                "-i",
                path(&data),
                "-o",
                "/dev/null",
            ],
        )
    };

    let listed = String::from_utf8_lossy(&as_uid(4001, &["-O"]).stdout).into_owned();
    assert!(
        !listed.contains("Key Object"),
        "uid 4001 has no role but sees: {listed}"
    );
    let refused = sign(4001);
    assert!(!refused.status.success(), "uid 4001 signed: {refused:?}");

    let listed = ok(&as_uid(4002, &["-O"]));
    assert!(listed.contains("label:      web"), "{listed}");
    assert!(
        !listed.contains("label:      other"),
        "uid 4002 sees a key it may not use: {listed}"
    );
    ok(&sign(4002));
    let log = audit(&d);
    assert!(
        log.lines()
            .any(|l| l.contains("\"uid\":4002") && l.contains("\"SIGN\"") && l.contains("\"key:web\"")),
        "the signature is audited under the caller's own uid"
    );
}

#[test]
fn an_unreachable_hsmd_is_an_empty_slot_list_not_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(pkcs11_module())
        .arg("-L")
        .env("HSMD_SOCKET", dir.path().join("no.sock"))
        .output()
        .expect("pkcs11-tool");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Slot 0 (0x1): hsmd at"), "{text}");
    assert!(text.contains("(empty)"), "no token while hsmd is unreachable: {text}");
}

/// RSA keys (hsmd keeps them in a PKCS#11 token: SoftHSM2 here) sign through
/// the module with PKCS#1 v1.5 over SHA-256 and SHA-384 and with PSS, each
/// checked by OpenSSL; a PSS key refuses PKCS#1 v1.5 and the reverse.
#[test]
fn rsa_keys_sign_pkcs1_and_pss_through_the_module() {
    let hsm = hsmd_tests::SoftHsm::new("hsmd-p11-module-rsa");
    let d = hsm.daemon("").start();
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&d.dir().join("unlock.key"))]));
    for (name, key_type) in [("rsa", "rsa-pkcs1-2048"), ("pss", "rsa-pss-2048")] {
        ok(&d.hsmctl(&["key", "create", name, "--type", key_type, "--backend", "pkcs11"]));
    }
    let data = d.dir().join("data");
    fs::write(&data, vec![0x33; 5000]).expect("write");
    let sign = |name: &str, mechanism: &str, extra: &[&str]| {
        let sig = d.dir().join(format!("{name}-{mechanism}.sig"));
        let mut args = vec!["--sign", "-m", mechanism];
        let id = key_id(&d, name);
        args.extend(["--id", &id, "-i", path(&data), "-o", path(&sig)]);
        args.extend(extra);
        (pkcs11_tool(&d, &args), sig)
    };
    let (out, sig) = sign("rsa", "SHA256-RSA-PKCS", &[]);
    ok(&out);
    assert!(openssl_verifies("rsa-pkcs1-2048", &public_pem(&d, "rsa"), &data, &sig));
    // SHA-384 goes to hsmd whole (SignMessage): the pkcs11 backend hashes it.
    let (out, sig) = sign("rsa", "SHA384-RSA-PKCS", &[]);
    ok(&out);
    let sha384 = Command::new("openssl")
        .args(["dgst", "-sha384", "-verify", path(&public_pem(&d, "rsa")), "-signature"])
        .args([path(&sig), path(&data)])
        .output()
        .expect("openssl");
    assert_eq!(ok(&sha384).trim(), "Verified OK");
    // pkcs11-tool's defaults for SHA256-RSA-PKCS-PSS are the key's own
    // parameters: SHA-256, MGF1-SHA-256, a 32-byte salt.
    let (out, sig) = sign("pss", "SHA256-RSA-PKCS-PSS", &[]);
    ok(&out);
    assert!(openssl_verifies("rsa-pss-2048", &public_pem(&d, "pss"), &data, &sig));
    // Each key signs with its own scheme only.
    let (out, _) = sign("pss", "SHA256-RSA-PKCS", &[]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CKR_KEY_TYPE_INCONSISTENT"),
        "{out:?}"
    );
    let (out, _) = sign("pss", "SHA256-RSA-PKCS-PSS", &["--salt-len", "20"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CKR_MECHANISM_PARAM_INVALID"),
        "{out:?}"
    );
}

/// A program whose environment cannot be set (one p11-kit loads the module
/// into) finds hsmd through the module's configuration file; a broken file
/// stops `C_Initialize` instead of silently using another hsmd.
#[test]
fn the_module_reads_its_socket_from_its_configuration_file() {
    let d = started();
    let conf = d.dir().join("pkcs11.toml");
    let list = |conf: &PathBuf| {
        Command::new("pkcs11-tool")
            .arg("--module")
            .arg(pkcs11_module())
            .arg("-L")
            .env_remove("HSMD_SOCKET")
            .env("HSMD_PKCS11_CONFIG", conf)
            .env("HSMD_PKCS11_DEBUG", "1")
            .output()
            .expect("pkcs11-tool")
    };
    fs::write(&conf, format!("socket = {:?}\n", d.socket)).expect("write");
    let listed = ok(&list(&conf));
    assert!(
        listed.contains(&format!("hsmd at {}", d.socket.display())) && listed.contains("token label        : hsmd"),
        "{listed}"
    );
    fs::write(&conf, "socket = \"relative/hsmd.sock\"\n").expect("write");
    let out = list(&conf);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("C_Initialize") && err.contains("not an absolute path"),
        "{err}"
    );
}
