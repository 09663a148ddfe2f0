//! hsmd's SSH agent socket, with OpenSSH's own programs as the clients:
//! `ssh-add -L` lists the caller's SSH keys as hsmctl writes them,
//! `ssh-keygen -Y sign` and git sign through it, `ssh` logs in to an `sshd`
//! with an hsmd key (the audit line naming the host key the session was bound
//! to), `sshd` serves a host key held in hsmd (`HostKeyAgent`), and malformed
//! messages close only their own connection.

use std::{
    fs,
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use hsmd_tests::check::{ok, p as path};
use hsmd_tests::openssh::{agent_lines, fingerprint, listed, ssh_add, ssh_keygen_verifies, Sshd};
use hsmd_tests::{Daemon, DaemonBuilder, SoftHsm};

const AGENT: &str = "[ssh_agent]\nsocket = \"$DIR/agent.sock\"\n";

fn agent(d: &Daemon) -> PathBuf {
    d.dir().join("agent.sock")
}

fn started(builder: DaemonBuilder) -> Daemon {
    let d = builder.extra(AGENT).start();
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&d.dir().join("unlock.key"))]));
    d
}

fn create(d: &Daemon, name: &str, key_type: &str, backend: &str, ssh: bool) {
    let mut args = vec!["key", "create", name, "--type", key_type, "--backend", backend];
    if ssh {
        args.extend(["--label", "ssh=yes"]);
    }
    ok(&d.hsmctl(&args));
}

fn openssh_line(d: &Daemon, name: &str) -> String {
    ok(&d.hsmctl(&["key", "public", name, "--format", "openssh"]))
        .trim_end()
        .to_owned()
}

#[test]
fn ssh_add_lists_exactly_the_ssh_keys_as_hsmctl_writes_them() {
    let hsm = SoftHsm::new("hsmd-agent-list");
    let d = started(hsm.daemon(""));
    create(&d, "laptop", "ed25519", "soft", true);
    create(&d, "ci", "ecdsa-p256", "soft", true);
    create(&d, "p384", "ecdsa-p384", "soft", true);
    create(&d, "token-rsa", "rsa-pkcs1-2048", "pkcs11", true);
    // Not offered: no ssh label, a type OpenSSH lacks, a key that may not sign.
    create(&d, "unlabelled", "ed25519", "soft", false);
    create(&d, "pss", "rsa-pss-2048", "pkcs11", true);
    ok(&d.hsmctl(&[
        "key",
        "create",
        "verify-only",
        "--type",
        "ed25519",
        "--usage",
        "verify",
        "--label",
        "ssh=yes",
    ]));
    create(&d, "suspended", "ed25519", "soft", true);
    ok(&d.hsmctl(&["key", "disable", "suspended"]));

    let mut expected: Vec<String> = ["laptop", "ci", "p384", "token-rsa"]
        .iter()
        .map(|n| openssh_line(&d, n))
        .collect();
    expected.sort();
    assert_eq!(agent_lines(&agent(&d)), expected);
    assert!(expected.iter().any(|l| l.ends_with(" hsmd:laptop")), "{expected:?}");

    // `key set` offers a key and takes it back.
    ok(&d.hsmctl(&["key", "set", "unlabelled", "--label", "ssh=yes"]));
    assert_eq!(agent_lines(&agent(&d)).len(), 5);
    ok(&d.hsmctl(&["key", "set", "unlabelled", "--remove-label", "ssh"]));
    assert_eq!(agent_lines(&agent(&d)), expected);

    // Locked: the agent lists nothing (ssh goes on to its other keys).
    ok(&d.hsmctl(&["lock"]));
    assert!(agent_lines(&agent(&d)).is_empty());
    let out = ssh_add(&agent(&d), &["-L"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no identities"),
        "{out:?}"
    );
}

#[test]
fn ssh_keygen_signs_through_the_agent_and_its_signatures_verify() {
    let hsm = SoftHsm::new("hsmd-agent-sign");
    let d = started(hsm.daemon(""));
    let data = d.dir().join("release.tar");
    fs::write(&data, b"a release signed through the agent").expect("write");
    for (name, key_type, backend) in [
        ("ed", "ed25519", "soft"),
        ("p256", "ecdsa-p256", "soft"),
        ("rsa", "rsa-pkcs1-2048", "pkcs11"),
    ] {
        create(&d, name, key_type, backend, true);
        let line = openssh_line(&d, name);
        let out = agent_sign(&d, name, &data);
        assert!(out.status.success(), "ssh-keygen -Y sign with {key_type}: {out:?}");
        let sig = d.dir().join("release.tar.sig");
        if key_type.starts_with("rsa") {
            // ssh-keygen asks an agent for rsa-sha2-512.
            let text = fs::read_to_string(&sig).expect("read");
            let blob = base64_body(&text);
            assert!(
                blob.windows(12).any(|w| w == b"rsa-sha2-512"),
                "not an rsa-sha2-512 signature"
            );
        }
        assert!(
            ssh_keygen_verifies(d.dir(), &line, "git", &data, &sig),
            "ssh-keygen rejects the {key_type} signature made through the agent"
        );
        // hsmctl reads it as its own.
        let verified = d.hsmctl(&[
            "verify",
            name,
            "-i",
            path(&data),
            "-s",
            path(&sig),
            "--format",
            "ssh",
            "-n",
            "git",
        ]);
        assert!(ok(&verified).contains("signature valid"), "{verified:?}");
        fs::remove_file(&sig).expect("rm");
    }
    // The agent's signatures are audited as hsmctl's are: the key, the hash, the length.
    let log = fs::read_to_string(d.dir().join("state/audit.log")).expect("audit log");
    let line = log
        .lines()
        .rfind(|l| l.contains("\"key:rsa\"") && l.contains("\"sign-message\""))
        .expect("an audit line for the agent's RSA signature");
    assert!(line.contains("\"hash\":\"sha512\""), "{line}");
    assert!(line.contains("\"message_bytes\":"), "{line}");

    // A key that is not offered cannot be signed with, even by its public key.
    create(&d, "hidden", "ed25519", "soft", false);
    let out = agent_sign(&d, "hidden", &data);
    assert!(!out.status.success(), "signed with a key not offered to SSH: {out:?}");
}

/// `ssh-keygen -Y sign -n git` of `data` (into `data.sig`) with the key's
/// public half alone: the private key is in hsmd, reached through the agent.
fn agent_sign(d: &Daemon, name: &str, data: &Path) -> std::process::Output {
    let public = d.dir().join(format!("{name}.pub"));
    fs::write(&public, format!("{}\n", openssh_line(d, name))).expect("write");
    Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", "git", "-f"])
        .arg(&public)
        .arg(data)
        .env("SSH_AUTH_SOCK", agent(d))
        .output()
        .expect("ssh-keygen")
}

fn base64_body(armored: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = armored.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).expect("base64")
}

#[test]
fn git_commits_signed_through_the_agent_verify() {
    let d = started(Daemon::builder());
    create(&d, "git-signing", "ed25519", "soft", true);
    let line = openssh_line(&d, "git-signing");
    let public = d.dir().join("git-signing.pub");
    fs::write(&public, format!("{line}\n")).expect("write");
    let mut fields = line.split_whitespace();
    let allowed = d.dir().join("allowed_signers");
    fs::write(
        &allowed,
        format!(
            "dev@example.org {} {}\n",
            fields.next().expect("type"),
            fields.next().expect("key")
        ),
    )
    .expect("write");
    let repo = d.dir().join("repo");
    let home = d.dir().join("home");
    fs::create_dir_all(&home).expect("mkdir");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(["-c", "user.name=Dev", "-c", "user.email=dev@example.org"])
            .args(["-c", "gpg.format=ssh"])
            .arg("-c")
            .arg(format!("user.signingkey={}", public.display()))
            .arg("-c")
            .arg(format!("gpg.ssh.allowedSignersFile={}", allowed.display()))
            .args(args)
            .current_dir(&repo)
            .env("HOME", &home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("SSH_AUTH_SOCK", agent(&d))
            .output()
            .expect("run git")
    };
    fs::create_dir_all(&repo).expect("mkdir");
    ok(&git(&["init", "-q"]));
    fs::write(repo.join("README"), "signed by a key git never sees\n").expect("write");
    ok(&git(&["add", "README"]));
    ok(&git(&["commit", "-q", "-S", "-m", "signed through hsmd's agent"]));
    let out = git(&["verify-commit", "HEAD"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(said.contains("Good \"git\" signature for dev@example.org"), "{said}");
    // Another key in the allowed-signers file: git says so.
    fs::write(
        &allowed,
        "dev@example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGRlbW9kZW1vZGVtb2RlbW9kZW1vZGVtb2RlbW9kZW1v\n",
    )
    .expect("write");
    assert!(!git(&["verify-commit", "HEAD"]).status.success());
}

/// Sends one agent message (type and body) and reads the answer's type.
fn exchange(s: &mut UnixStream, message: &[u8]) -> Option<u8> {
    let mut frame = u32::try_from(message.len()).expect("len").to_be_bytes().to_vec();
    frame.extend_from_slice(message);
    s.write_all(&frame).ok()?;
    let mut header = [0u8; 4];
    s.read_exact(&mut header).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
    s.read_exact(&mut body).ok()?;
    body.first().copied()
}

fn is_closed(s: &mut UnixStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(s.read(&mut byte), Ok(0) | Err(_))
}

fn ssh_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).expect("len").to_be_bytes());
    out.extend_from_slice(bytes);
}

const FAILURE: u8 = 5;

#[test]
fn malformed_agent_messages_close_only_their_connection() {
    let d = started(Daemon::builder());
    create(&d, "k", "ed25519", "soft", true);
    let connect = || {
        let s = UnixStream::connect(agent(&d)).expect("connect to the agent socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s
    };
    let mut steady = connect();
    assert_eq!(exchange(&mut steady, &[11]), Some(12), "identities answer");

    // Refused, and the connection goes on: unknown types, adding keys, the
    // agent's lock, unknown extensions.
    let mut s = connect();
    assert_eq!(exchange(&mut s, &[200, 1, 2, 3]), Some(FAILURE));
    let mut add = vec![17];
    ssh_string(&mut add, b"ssh-ed25519");
    add.extend_from_slice(&[0u8; 100]);
    assert_eq!(exchange(&mut s, &add), Some(FAILURE), "add identity");
    let mut lock = vec![22];
    ssh_string(&mut lock, b"a passphrase");
    assert_eq!(exchange(&mut s, &lock), Some(FAILURE), "lock");
    let mut ext = vec![27];
    ssh_string(&mut ext, b"no-such-extension@example.org");
    assert_eq!(exchange(&mut s, &ext), Some(FAILURE), "unknown extension");
    assert_eq!(exchange(&mut s, &[11]), Some(12), "still served");
    assert!(
        agent_lines(&agent(&d)).len() == 1,
        "the key is still listed (lock refused)"
    );

    // Closed: a sign request that does not parse, one with bytes after its
    // end, a truncated message, an oversized one (its body never read), an
    // empty one.
    let mut garbage = vec![13];
    garbage.extend_from_slice(&[0xff; 40]);
    // A well-formed sign request (an Ed25519 key blob, data, flags) and more.
    let mut blob = Vec::new();
    ssh_string(&mut blob, b"ssh-ed25519");
    ssh_string(&mut blob, &[9u8; 32]);
    let mut trailing = vec![13];
    ssh_string(&mut trailing, &blob);
    ssh_string(&mut trailing, b"session data");
    trailing.extend_from_slice(&0u32.to_be_bytes());
    for (what, bytes) in [
        ("a garbage sign request", {
            let mut f = 41u32.to_be_bytes().to_vec();
            f.extend_from_slice(&garbage);
            f
        }),
        ("an oversized message", (300 * 1024u32).to_be_bytes().to_vec()),
        ("an empty message", 0u32.to_be_bytes().to_vec()),
        ("a sign request with trailing bytes", {
            trailing.extend_from_slice(&[0; 9]);
            let mut f = u32::try_from(trailing.len()).expect("len").to_be_bytes().to_vec();
            f.extend_from_slice(&trailing);
            f
        }),
    ] {
        let mut s = connect();
        s.write_all(&bytes).expect("write");
        assert!(is_closed(&mut s), "{what} did not close its connection");
    }
    let mut s = connect();
    s.write_all(&[0, 0, 0, 100, 11, 0, 0]).expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert!(is_closed(&mut s), "a truncated message did not close its connection");

    // Everyone else is still served, on both sockets.
    assert_eq!(exchange(&mut steady, &[11]), Some(12));
    assert_eq!(agent_lines(&agent(&d)).len(), 1);
    ok(&d.hsmctl(&["status"]));
    let log = d.log();
    assert!(log.contains("agent connection closed: malformed sign request"), "{log}");
    assert!(log.contains("over the agent's limit of 262144"), "{log}");
    assert!(log.contains("9 bytes after its end"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// A loopback sshd whose user key, or host key, is in hsmd.
struct Login {
    d: Daemon,
    dir: PathBuf,
}

fn login_setup() -> Login {
    hsmd_tests::require_root("sshd runs as root to log users in");
    let d = started(Daemon::builder());
    let dir = d.dir().join("ssh");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    Login { d, dir }
}

fn file_key(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "{out:?}");
    key
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn ssh_logs_in_to_sshd_with_an_hsmd_key_and_the_audit_line_names_the_host() {
    let Login { d, dir } = login_setup();
    create(&d, "login", "ecdsa-p256", "soft", true);
    fs::write(dir.join("authorized_keys"), format!("{}\n", openssh_line(&d, "login"))).expect("write");
    let host = file_key(&dir, "host_ed25519");
    let sshd = Sshd::start(
        &dir,
        &format!(
            "HostKey {}\nAuthorizedKeysFile {}\n",
            host.display(),
            dir.join("authorized_keys").display()
        ),
    );
    let host_pub = fs::read_to_string(host.with_extension("pub")).expect("read");
    let known = dir.join("known_hosts");
    fs::write(&known, format!("[127.0.0.1]:{} {host_pub}", sshd.port)).expect("write");
    let agent_opt = format!("IdentityAgent={}", agent(&d).display());
    let out = sshd.ssh(&known, &["-o", &agent_opt], "echo logged-in-with-hsmd");
    assert!(
        out.status.success(),
        "ssh: {out:?}\nsshd: {}\nhsmd: {}",
        sshd.log_text(),
        d.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "logged-in-with-hsmd");

    // The signature that logged in is audited with the host it was for.
    let host_fp = fingerprint(&host.with_extension("pub"));
    let log = fs::read_to_string(d.dir().join("state/audit.log")).expect("audit log");
    let line = log
        .lines()
        .rfind(|l| l.contains("\"key:login\"") && l.contains("\"sign-message\""))
        .expect("an audit line for the login signature");
    assert!(
        line.contains(&format!("\"ssh_host_key\":\"{host_fp}\"")),
        "{line}\nexpected host {host_fp}"
    );
    assert!(line.contains("\"result\":\"success\""), "{line}");
    ok(&d.hsmctl(&["audit", "verify"]));

    // Without the agent (or with the key taken off SSH), no way in.
    ok(&d.hsmctl(&["key", "set", "login", "--remove-label", "ssh"]));
    let out = sshd.ssh(&known, &["-o", &agent_opt], "true");
    assert!(!out.status.success(), "logged in with a key no longer offered: {out:?}");
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn sshd_serves_a_host_key_held_in_hsmd_through_host_key_agent() {
    let Login { d, dir } = login_setup();
    create(&d, "host", "ed25519", "soft", true);
    let host_line = openssh_line(&d, "host");
    let host_pub = dir.join("hsmd_host_ed25519.pub");
    fs::write(&host_pub, format!("{host_line}\n")).expect("write");
    let user = file_key(&dir, "user_ed25519");
    fs::copy(user.with_extension("pub"), dir.join("authorized_keys")).expect("copy");
    let sshd = Sshd::start(
        &dir,
        &format!(
            "HostKey {}\nHostKeyAgent {}\nAuthorizedKeysFile {}\n",
            host_pub.display(),
            agent(&d).display(),
            dir.join("authorized_keys").display()
        ),
    );
    let known = dir.join("known_hosts");
    let mut fields = host_line.split_whitespace();
    let (kind, blob) = (fields.next().expect("type"), fields.next().expect("key"));
    fs::write(&known, format!("[127.0.0.1]:{} {kind} {blob}\n", sshd.port)).expect("write");
    let identity = format!("IdentityFile={}", user.display());
    let options = [
        "-o",
        &identity,
        "-o",
        "IdentityAgent=none",
        "-o",
        "HostKeyAlgorithms=ssh-ed25519",
    ];
    let out = sshd.ssh(&known, &options, "echo host-key-in-hsmd");
    assert!(
        out.status.success(),
        "ssh: {out:?}\nsshd: {}\nhsmd: {}",
        sshd.log_text(),
        d.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "host-key-in-hsmd");
    let log = fs::read_to_string(d.dir().join("state/audit.log")).expect("audit log");
    assert!(
        log.lines()
            .any(|l| l.contains("\"key:host\"") && l.contains("\"sign-message\"")),
        "no audit line for the host key's signature"
    );

    // A client pinning another host key is refused: the key really is hsmd's.
    let other = file_key(&dir, "other_host");
    let other_pub = fs::read_to_string(other.with_extension("pub")).expect("read");
    fs::write(&known, format!("[127.0.0.1]:{} {other_pub}", sshd.port)).expect("write");
    let out = sshd.ssh(&known, &options, "true");
    assert!(
        !out.status.success(),
        "connected despite another pinned host key: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HOST IDENTIFICATION HAS CHANGED"),
        "{out:?}"
    );
}

/// `ssh-add -L` run as `uid` against the agent socket.
fn listed_as(uid: u32, socket: &Path) -> Vec<String> {
    let out = hsmd_tests::as_uid(uid, "ssh-add")
        .arg("-L")
        .env("SSH_AUTH_SOCK", socket)
        .output()
        .expect("run setpriv (util-linux)");
    listed(&out)
}

#[test]
#[ignore = "needs root; scripts/test runs it as root"]
fn each_caller_is_offered_only_the_ssh_keys_their_policy_lets_them_sign_with() {
    hsmd_tests::require_root("acting as other uids");
    let d = Daemon::builder()
        .socket_mode("0666")
        .users(&["4001", "4002"])
        .extra(AGENT)
        .policy(
            r#"
[roles.ci-operator]
permissions = [{ resource = "keys", action = "*", keys = "ci-*" }]

[[bind]]
users = ["4001"]
roles = ["viewer"]

[[bind]]
users = ["4002"]
roles = ["ci-operator"]

[[bind]]
users = ["0"]
roles = ["admin"]
"#,
        )
        .start();
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&d.dir().join("unlock.key"))]));
    create(&d, "ci-deploy", "ed25519", "soft", true);
    create(&d, "prod-deploy", "ed25519", "soft", true);
    let socket = agent(&d);
    assert_eq!(
        listed_as(4002, &socket),
        vec![openssh_line(&d, "ci-deploy")],
        "the ci operator sees its key, not prod's"
    );
    assert!(
        listed_as(4001, &socket).is_empty(),
        "a viewer may read keys but not sign: it is offered none"
    );
    assert_eq!(agent_lines(&socket).len(), 2, "the admin (root) is offered both");
}

#[test]
fn an_uninitialized_hsmd_offers_no_keys_rather_than_failing() {
    let d = Daemon::builder().extra(AGENT).start();
    let out = ssh_add(&agent(&d), &["-L"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("no identities"), "{out:?}");
}
