//! Writes the seed inputs of the targets whose seeds are made from hsmd's own
//! encoders (`cargo run -p hsmd-fuzzing --example seeds`), into
//! `fuzz/seeds/TARGET/`. The seeds are committed; this is how they were made.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{fs, path::Path};

use protocol::{
    codec,
    formats::{encrypted, signature},
    message::ClientHello,
    BatchItem, DecryptAnyVersionArgs, KeyOptions, KeyType, Operation, Reply, Request, Response, SecretBytes, SignArgs,
    Usage, WireError, PROTOCOL_VERSION,
};

fn hello() -> Request {
    Request {
        id: 1,
        op: Operation::Hello(ClientHello {
            protocol_version: PROTOCOL_VERSION,
            client: "fuzz".into(),
        }),
    }
}

fn requests() -> Vec<Request> {
    let sign = |name: &str, len| SignArgs {
        name: name.into(),
        digest: vec![7; len],
    };
    let ops = vec![
        Operation::Ping { payload: vec![1, 2, 3] },
        Operation::Status,
        Operation::WhoAmI,
        Operation::KeyList,
        Operation::KeyInfo { name: "ed".into() },
        Operation::KeyPublic { name: "p256".into() },
        Operation::Sign(sign("ed", 64)),
        Operation::Sign(sign("p256", 32)),
        Operation::Encrypt(protocol::EncryptArgs {
            name: "aes".into(),
            version: None,
            plaintext: SecretBytes::new(b"data".to_vec()),
            aad: b"aad".to_vec(),
        }),
        Operation::DecryptAnyVersion(DecryptAnyVersionArgs {
            name: "aes".into(),
            sealed: vec![0; 40],
            aad: Vec::new(),
            allow_compromised: false,
        }),
        Operation::Mac(protocol::MacArgs {
            name: "mac".into(),
            data: b"m".to_vec(),
        }),
        Operation::Batch {
            items: vec![BatchItem::Sign(sign("ed", 64)), BatchItem::Sign(sign("p256", 32))],
        },
        Operation::KeyCreate {
            name: "new".into(),
            key_type: KeyType::Ed25519,
            usages: vec![Usage::Sign],
            options: KeyOptions::default(),
        },
        Operation::KeyRotate { name: "aes".into() },
        Operation::SshIdentities,
        Operation::AuditVerify,
        Operation::PolicyShow,
        Operation::Metrics,
    ];
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| Request { id: i as u64 + 2, op })
        .collect()
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let max = protocol::frame::DEFAULT_MAX_FRAME;
    let mut stream = codec::encode_frame(&hello(), max).unwrap();
    for r in requests() {
        stream.extend(codec::encode_frame(&r, max).unwrap());
    }

    // frame: a generous limit and a tight one, with reads of odd sizes.
    write(
        "frame",
        "pipelined",
        &[[0xff, 0xff, 1, 3, 0, 7].as_slice(), &stream].concat(),
    );
    write(
        "frame",
        "over-limit",
        &[[0x10, 0x00, 5, 0, 0, 0].as_slice(), &stream].concat(),
    );

    // request: each request, a reply and an error.
    for (i, r) in std::iter::once(hello()).chain(requests()).enumerate() {
        write("request", &format!("request-{i:02}"), &codec::encode_body(&r).unwrap());
    }
    let ok = Response {
        id: 3,
        result: Ok(Reply::Signature {
            version: 1,
            signature: vec![1; 64],
        }),
    };
    let refused = Response {
        id: 4,
        result: Err(WireError::new(protocol::ErrorCode::PermissionDenied, "no")),
    };
    write("request", "response-ok", &codec::encode_body(&ok).unwrap());
    write("request", "response-error", &codec::encode_body(&refused).unwrap());

    // config and policy: the packaged files.
    let packaging = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    write("config", "packaged", &fs::read(packaging.join("hsmd.toml")).unwrap());
    write(
        "config",
        "limits",
        b"[limits]\nmax_frame_bytes = 4096\nidle_timeout = \"2s\"\n[audit]\nenabled = false\n",
    );
    write("policy", "packaged", &fs::read(packaging.join("policy.toml")).unwrap());

    // encrypted_file: a header and two chunks (not decryptable: no key here).
    let header = encrypted::Header {
        key: "aes".into(),
        version: 2,
        chunk_size: 16,
    };
    let mut file = header.to_bytes();
    file.extend(encrypted::chunk_bytes(&[1; 16 + encrypted::OVERHEAD]));
    file.extend(encrypted::chunk_bytes(&[2; 5 + encrypted::OVERHEAD]));
    write("encrypted_file", "two-chunks", &file);

    // signature_file: hsmctl's own (the SSHSIG seed was made by ssh-keygen).
    write(
        "signature_file",
        "hsmctl",
        signature::write("release", 3, KeyType::EcdsaP256, &[0x30, 0x06, 2, 1, 1, 2, 1, 1]).as_bytes(),
    );

    // filestore: a stored file's header, and a chunk to seal and damage.
    write(
        "filestore",
        "header",
        br#"{"format":1,"token":"t","name":"n","chunk_size":4096,"key":"k","key_version":1,"wrapped_data_key":"00","nonce_prefix":"00010203040506","owner_uid":0,"created_unix":0}"#,
    );
    write("filestore", "chunk", &[0u8; 64]);

    // audit: no edit (a clean log, then a crash's leftovers), and some edits.
    write("audit", "clean", &[0, 0]);
    write("audit", "crash-tail", &[40, 0]);
    write("audit", "edits", &[0xff, 0, 1, 3, 0, 0, 2, 5, 3, 1, 2, 4, 9]);

    // connection: the pipelined stream, whole and in 1 KiB writes, and the
    // agent socket's identities and sign requests.
    write("connection", "main", &[[0u8].as_slice(), &stream].concat());
    write("connection", "main-1k", &[[2u8].as_slice(), &stream].concat());
    let agent = [
        [0, 0, 0, 1, 11].as_slice(),               // REQUEST_IDENTITIES
        &[0, 0, 0, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0], // SIGN_REQUEST with empty fields
        &[0, 0, 0, 1, 27],                         // EXTENSION, truncated
    ]
    .concat();
    write("connection", "agent", &[[1u8].as_slice(), &agent].concat());

    // agent: one of each message hsmd reads, a session-bind signed by a
    // host key (and one whose signature is wrong), and an unknown extension.
    for (name, bytes) in agent_messages() {
        write("agent", name, &bytes);
    }

    // pkcs11: programs' call sequences, each tried on every object the
    // session finds (the handles' order is the module's).
    for (name, calls) in pkcs11_calls() {
        write("pkcs11", name, &hsmd_fuzzing::pkcs11::encode(&calls));
    }
}

fn pkcs11_calls() -> Vec<(&'static str, Vec<hsmd_fuzzing::pkcs11::Call>)> {
    use hsmd_fuzzing::pkcs11::{Attr, Call, Mech, MessageParams, Obj, Param, Pick, Value};
    // Indexes into the target's lists of mechanisms and attribute types.
    let (ecdsa, ecdsa_sha256, eddsa, pss, ec_gen, ed_gen, gcm, aes_gen) = (0, 1, 4, 10, 11, 12, 14, 15);
    let (class, label, token, sensitive, extractable, ec_params, value_len, id) = (0, 2, 4, 6, 7, 14, 20, 3);
    let mech = |k: u8, param| Mech {
        kind: Pick::Known(k),
        param,
    };
    let attr = |k: u8, value| Attr {
        kind: Pick::Known(k),
        value,
    };
    let sign = |k, key, parts: Vec<Vec<u8>>, out| Call::Sign {
        mech: mech(k, Param::None),
        key,
        parts,
        out,
    };
    let seal = |key, data: &[u8], out| Call::Message {
        decrypt: false,
        mech: mech(gcm, Param::None),
        key,
        params: MessageParams {
            absent: false,
            iv_len: 12,
            iv_fixed_bits: 0,
            generator: Pick::Known(3),
            tag_bits: 128,
            iv: Vec::new(),
            tag: Vec::new(),
        },
        aad: b"header".to_vec(),
        data: data.to_vec(),
        out,
    };
    let every = |f: &dyn Fn(Obj) -> Call| (0..8).map(|i| f(Obj::Found(i))).collect::<Vec<_>>();
    vec![
        (
            "sign-each-way",
            [
                every(&|k| sign(ecdsa_sha256, k, vec![b"part one ".to_vec(), b"part two".to_vec()], None)),
                every(&|k| sign(eddsa, k, vec![b"a message".to_vec()], Some(64))),
                every(&|k| sign(ecdsa, k, vec![vec![7; 32]], Some(10))),
            ]
            .concat(),
        ),
        ("seal", every(&|k| seal(k, b"the plaintext", None))),
        (
            "generate-use-destroy",
            vec![
                Call::GenerateKeyPair {
                    mech: mech(ec_gen, Param::None),
                    public: vec![attr(ec_params, Value::Curve(0)), attr(label, Value::Label(1))],
                    private: vec![attr(sensitive, Value::True), attr(token, Value::True)],
                },
                sign(ecdsa_sha256, Obj::Made(0), vec![b"data".to_vec()], None),
                Call::GenerateKeyPair {
                    mech: mech(ed_gen, Param::None),
                    public: vec![attr(label, Value::Label(2))],
                    private: vec![],
                },
                sign(eddsa, Obj::Made(1), vec![b"data".to_vec()], None),
                Call::GenerateKey {
                    mech: mech(aes_gen, Param::None),
                    template: vec![
                        attr(label, Value::Label(3)),
                        attr(value_len, Value::Small(32)),
                        attr(sensitive, Value::True),
                        attr(extractable, Value::False),
                    ],
                },
                seal(Obj::Made(2), b"sealed with a new key", Some(64)),
                Call::Destroy { object: Obj::Made(0) },
            ],
        ),
        (
            "refused",
            vec![
                Call::GenerateKey {
                    mech: mech(aes_gen, Param::None),
                    template: vec![attr(label, Value::Label(4)), attr(value_len, Value::Small(16))],
                },
                Call::GenerateKeyPair {
                    mech: mech(ec_gen, Param::None),
                    public: vec![attr(ec_params, Value::Curve(4)), attr(id, Value::Bytes(vec![1]))],
                    private: vec![attr(label, Value::Null(4))],
                },
                Call::EncryptInit {
                    mech: mech(
                        gcm,
                        Param::Gcm {
                            iv: vec![0; 12],
                            aad: Vec::new(),
                            tag_bits: 128,
                        },
                    ),
                    key: Obj::Found(0),
                },
                Call::Sign {
                    mech: mech(
                        pss,
                        Param::Pss {
                            hash: Pick::Known(1),
                            mgf: 1,
                            salt: 20,
                        },
                    ),
                    key: Obj::Found(0),
                    parts: vec![vec![1]],
                    out: None,
                },
                Call::Sign {
                    mech: mech(
                        eddsa,
                        Param::Eddsa {
                            prehash: true,
                            context: b"ctx".to_vec(),
                        },
                    ),
                    key: Obj::Found(1),
                    parts: vec![vec![1]],
                    out: None,
                },
                Call::Decrypt {
                    mech: mech(
                        gcm,
                        Param::Gcm {
                            iv: vec![0; 12],
                            aad: Vec::new(),
                            tag_bits: 96,
                        },
                    ),
                    key: Obj::Found(2),
                    parts: vec![vec![0; 40]],
                    out: Some(100),
                },
            ],
        ),
        (
            "objects",
            [
                vec![Call::Find {
                    template: vec![attr(class, Value::Small(3)), attr(label, Value::Bytes(b"ed".to_vec()))],
                    max: 4,
                }],
                every(&|o| Call::Attributes {
                    object: o,
                    wanted: (0..24)
                        .map(|a| (Pick::Known(a), if a % 2 == 0 { None } else { Some(4) }))
                        .collect(),
                }),
            ]
            .concat(),
        ),
    ]
}

fn agent_messages() -> Vec<(&'static str, Vec<u8>)> {
    use ed25519_dalek::Signer as _;
    use ssh_agent_lib::{
        proto::{extension::SessionBind, Extension, PublicCredential, Request, SignRequest},
        ssh_encoding::Encode as _,
        ssh_key::{public::Ed25519PublicKey, public::KeyData, Algorithm, Signature},
    };
    let host = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let host_key = KeyData::Ed25519(Ed25519PublicKey(host.verifying_key().to_bytes()));
    let session_id = vec![9u8; 32];
    let signed = |data: &[u8]| Signature::new(Algorithm::Ed25519, host.sign(data).to_bytes().to_vec()).unwrap();
    let bind = |signature| SessionBind {
        host_key: host_key.clone(),
        session_id: session_id.clone(),
        signature,
        is_forwarding: false,
    };
    let encode = |request: Request| {
        let mut out = Vec::new();
        request.encode(&mut out).unwrap();
        out
    };
    vec![
        ("identities", vec![11]),
        (
            "sign",
            encode(Request::SignRequest(SignRequest {
                credential: PublicCredential::Key(host_key.clone()),
                data: b"git commit".to_vec(),
                flags: 0,
            })),
        ),
        (
            "sign-rsa-sha2-512",
            encode(Request::SignRequest(SignRequest {
                credential: PublicCredential::Key(host_key.clone()),
                data: vec![1; 64],
                flags: 4,
            })),
        ),
        (
            "session-bind",
            encode(Request::Extension(
                Extension::new_message(bind(signed(&session_id))).unwrap(),
            )),
        ),
        (
            "session-bind-forged",
            encode(Request::Extension(
                Extension::new_message(bind(signed(b"another session"))).unwrap(),
            )),
        ),
        (
            "extension-unknown",
            encode(Request::Extension(Extension {
                name: "query".into(),
                details: Vec::new().into(),
            })),
        ),
        ("add-identity", vec![17, 0, 0, 0, 11]),
        ("lock", vec![22, 0, 0, 0, 4, b'p', b'a', b's', b's']),
        ("unknown", vec![200]),
    ]
}
