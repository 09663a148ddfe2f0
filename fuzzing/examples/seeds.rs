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
}
