//! The request path in process (no socket, no daemon): a request is planned,
//! authorized against the policy, run where its plan says (on the reactor
//! when its key is hot, else on the blocking pool) and answered, for single
//! requests and batches. The end-to-end tests cover the same through the
//! socket and hsmctl; these show the pipeline alone, in milliseconds.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{path::Path, sync::Arc};

use hsmd::{
    auth::{policy::Policy, AccessGate, Credentials, PeerIdentity},
    config::Limits,
    keystore::{slots::Argon2Cost, Vault},
    ops::{self, Caller, Shared, Work},
};
use protocol::{BatchItem, ErrorCode, KeyOptions, KeyType, NewSlot, Operation, Reply, SecretBytes, WireError};

/// uid 4100 may only verify; uid 0 is admin.
const POLICY: &str = r#"
[roles.checker]
permissions = [ { resource = "keys", action = "verify" } ]

[[bind]]
users = ["4100"]
roles = ["checker"]

[[bind]]
users = ["0"]
roles = ["admin"]
"#;

struct Setup {
    _dir: tempfile::TempDir,
    shared: Arc<Shared>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = Vault::open(dir.path(), Argon2Cost::FLOOR).expect("open");
    vault
        .custody()
        .init(&NewSlot::Keyfile {
            label: "first".into(),
            key: SecretBytes::new(vec![7; 32]),
        })
        .expect("init");
    let shared = Shared::new(Limits::default(), AccessGate::dev(0), true, Arc::new(vault));
    shared.set_policy(Policy::parse(POLICY, Path::new("policy.toml")).expect("policy"));
    Setup {
        _dir: dir,
        shared: Arc::new(shared),
    }
}

fn caller(uid: u32) -> Caller {
    let peer = PeerIdentity::resolve(Credentials {
        uid,
        gid: uid,
        pid: None,
    });
    Caller {
        who: Arc::new(hsmd::audit::Who {
            uid,
            user: peer.user.clone(),
            pid: None,
            executable: None,
            connection: 1,
            ssh_host_key: None,
        }),
        peer,
        admitted_because: "a test".into(),
        connection_id: 1,
    }
}

/// Routes `op` and runs its work where the pipeline put it; says where.
fn ask(s: &Setup, who: &Caller, op: Operation) -> (&'static str, Result<Reply, WireError>) {
    match ops::route(op, who, &s.shared, None) {
        Work::Done(a) => ("reactor", a.result),
        Work::Blocking(job) => ("pool", job().result),
        Work::Transfer(job) => ("own thread", job().result),
        Work::Later(pending) => {
            let (tx, rx) = std::sync::mpsc::channel();
            pending.then(move |a| tx.send(a).unwrap());
            let answer = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("answered");
            ("later", answer.result)
        }
    }
}

fn create(s: &Setup, name: &str, key_type: KeyType) {
    let op = Operation::KeyCreate {
        name: name.into(),
        key_type,
        usages: vec![],
        options: KeyOptions::default(),
    };
    let (_, r) = ask(s, &caller(0), op);
    assert!(matches!(r, Ok(Reply::KeyCreated(_))), "{r:?}");
}

/// A signing request over a digest of the size the key type signs.
fn sign(name: &str) -> Operation {
    Operation::Sign(protocol::SignArgs {
        name: name.into(),
        digest: vec![
            1;
            match name {
                "ec" => 32,
                "ec384" => 48,
                _ => 64,
            }
        ],
    })
}

#[test]
fn a_key_use_runs_on_the_pool_until_its_key_is_hot_then_on_the_reactor() {
    let s = setup();
    create(&s, "ed", KeyType::Ed25519);
    create(&s, "ec", KeyType::EcdsaP256);
    create(&s, "ec384", KeyType::EcdsaP384);
    let admin = caller(0);

    // The first use loads and unwraps the key, off the reactor.
    let (first, r) = ask(&s, &admin, sign("ed"));
    assert_eq!(first, "pool");
    let Ok(Reply::Signature { version: 1, signature }) = r else {
        panic!("{r:?}")
    };
    // Now cached and unwrapped: answered on the reactor.
    let (second, r) = ask(&s, &admin, sign("ed"));
    assert_eq!(second, "reactor");
    assert!(matches!(r, Ok(Reply::Signature { version: 1, .. })), "{r:?}");

    // The signature checks, and a wrong one does not.
    let verify = |signature: Vec<u8>| {
        Operation::Verify(protocol::VerifyArgs {
            name: "ed".into(),
            version: 1,
            digest: vec![1; 64],
            signature,
            allow_compromised: false,
        })
    };
    assert!(matches!(
        ask(&s, &admin, verify(signature.clone())).1,
        Ok(Reply::Verified { valid: true })
    ));
    let mut bad = signature;
    bad[0] ^= 1;
    assert!(matches!(
        ask(&s, &admin, verify(bad)).1,
        Ok(Reply::Verified { valid: false })
    ));

    // ECDSA P-256 costs about what Ed25519 does: the reactor once hot.
    let places: Vec<&str> = (0..2)
        .map(|_| {
            let (where_, r) = ask(&s, &admin, sign("ec"));
            assert!(r.is_ok(), "{r:?}");
            where_
        })
        .collect();
    assert_eq!(places, ["pool", "reactor"]);
    // P-384 is too slow for the reactor even when hot.
    for _ in 0..2 {
        let (where_, r) = ask(&s, &admin, sign("ec384"));
        assert_eq!(where_, "pool");
        assert!(r.is_ok(), "{r:?}");
    }
}

#[test]
fn a_request_without_its_permission_is_refused_before_it_runs() {
    let s = setup();
    create(&s, "ed", KeyType::Ed25519);
    let checker = caller(4100);

    let (where_, r) = ask(&s, &checker, sign("ed"));
    assert_eq!(where_, "reactor", "a refusal is answered at once");
    let e = r.expect_err("refused");
    assert_eq!(e.code, ErrorCode::PermissionDenied);
    assert!(e.message.contains("keys:sign"), "{}", e.message);
    // Nothing ran: the key was never loaded, so a use by admin is still cold.
    assert_eq!(ask(&s, &caller(0), sign("ed")).0, "pool");

    // What the role grants runs.
    let op = Operation::Verify(protocol::VerifyArgs {
        name: "ed".into(),
        version: 1,
        digest: vec![1; 64],
        signature: vec![0; 64],
        allow_compromised: false,
    });
    assert!(matches!(ask(&s, &checker, op).1, Ok(Reply::Verified { valid: false })));

    // Custody needs its own permission.
    let e = ask(&s, &checker, Operation::Lock).1.expect_err("refused");
    assert_eq!(e.code, ErrorCode::PermissionDenied);
    assert!(e.message.contains("keystore:lock"), "{}", e.message);
}

#[test]
fn a_batch_authorizes_and_answers_each_item_in_its_slot() {
    let s = setup();
    create(&s, "ed", KeyType::Ed25519);
    let items = vec![
        BatchItem::Sign(protocol::SignArgs {
            name: "ed".into(),
            digest: vec![2; 64],
        }),
        BatchItem::Verify(protocol::VerifyArgs {
            name: "ed".into(),
            version: 1,
            digest: vec![2; 64],
            signature: vec![0; 64],
            allow_compromised: false,
        }),
        BatchItem::Sign(protocol::SignArgs {
            name: "missing".into(),
            digest: vec![2; 64],
        }),
    ];
    let (where_, r) = ask(&s, &caller(4100), Operation::Batch { items: items.clone() });
    assert_eq!(where_, "pool");
    let Ok(Reply::Batch(results)) = r else { panic!("{r:?}") };
    assert_eq!(results.len(), 3);
    assert_eq!(
        results[0].as_ref().expect_err("no sign permission").code,
        ErrorCode::PermissionDenied
    );
    assert!(
        matches!(results[1], Ok(Reply::Verified { valid: false })),
        "{:?}",
        results[1]
    );
    assert_eq!(
        results[2].as_ref().expect_err("denied first").code,
        ErrorCode::PermissionDenied
    );

    let (_, r) = ask(&s, &caller(0), Operation::Batch { items });
    let Ok(Reply::Batch(results)) = r else { panic!("{r:?}") };
    assert!(
        matches!(results[0], Ok(Reply::Signature { version: 1, .. })),
        "{:?}",
        results[0]
    );
    assert!(matches!(results[1], Ok(Reply::Verified { valid: false })));
    assert_eq!(results[2].as_ref().expect_err("no such key").code, ErrorCode::NotFound);
}
