//! What each fuzz target does, one function per target, each taking the
//! fuzzer's bytes. `fuzz/` (cargo-fuzz) calls these from its targets; this
//! crate's tests replay the committed seeds (`fuzz/seeds/TARGET/`) and every
//! input a fuzzer ever found failing (`fuzz/regressions/TARGET/`) through the
//! same functions, so a fixed crash stays fixed under `cargo test`.
//!
//! A target panics only on a broken invariant, never on bad input: hostile
//! bytes must come back as an error. Where random bytes would not get past a
//! checksum or a hash chain, the input is a structure (`arbitrary`) that
//! builds a valid value first and then damages it in the ways the input says.

#![allow(clippy::missing_panics_doc)] // Panicking on a broken invariant is the point.

use arbitrary::{Arbitrary, Unstructured};

pub mod agent;
pub mod audit;
pub mod backup;
pub mod connection;
pub mod pkcs11;

/// A target: what it does with the fuzzer's bytes.
pub type Target = fn(&[u8]);

/// Every target, by the name `fuzz/fuzz_targets/NAME.rs` and the corpus
/// directories use.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame", frame),
    ("request", request),
    ("config", config),
    ("policy", policy),
    ("encrypted_file", encrypted_file),
    ("signature_file", signature_file),
    ("filestore", filestore),
    ("audit", audit::run),
    ("backup", backup::run),
    ("connection", connection::run),
    ("agent", agent::run),
    ("pkcs11", pkcs11::run),
];

/// The receive buffer every client reads frames with, fed in reads of the
/// sizes the input picks: it must hand out exactly the frames a single read
/// of everything gives, and stop at the same over-limit header.
///
/// Input: the receiver's frame limit less one (u16, little-endian), four
/// read sizes used in turn (0: all that is left), then the stream.
pub fn frame(data: &[u8]) {
    use protocol::recv::RecvBuf;
    if data.len() < 6 {
        return;
    }
    let max = u32::from(u16::from_le_bytes([data[0], data[1]])) + 1;
    let (sizes, stream) = (&data[2..6], &data[6..]);
    let collect = |reads: &mut dyn Iterator<Item = usize>| {
        let mut buf = RecvBuf::default();
        let (mut frames, mut rest) = (Vec::new(), stream);
        loop {
            match buf.next_frame(max) {
                Ok(Some(body)) => {
                    assert!(body.len() <= max as usize, "a frame over the limit was handed out");
                    frames.push(body.to_vec());
                    continue;
                }
                Ok(None) => {}
                Err(e) => return (frames, Some(e.to_string())),
            }
            if rest.is_empty() {
                return (frames, None);
            }
            let spare = buf.spare();
            let n = match reads.next() {
                Some(0) | None => rest.len(),
                Some(n) => n,
            }
            .min(spare.len())
            .min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            buf.filled(n);
            rest = &rest[n..];
        }
    };
    let whole = collect(&mut std::iter::empty());
    let pieces = collect(&mut sizes.iter().map(|s| usize::from(*s)).cycle());
    assert_eq!(whole, pieces, "frames depend on how the bytes were split into reads");
}

/// Request, response and hello bodies: whatever decodes re-encodes to
/// something that decodes to the same value, and a request's fixed prefix
/// names its id and operation.
pub fn request(data: &[u8]) {
    use protocol::{codec, message::ClientHello, Request, Response};
    if let Ok(request) = codec::decode_body::<Request>(data) {
        let again = codec::encode_body(&request).expect("a decoded request encodes");
        assert_eq!(codec::decode_body::<Request>(&again).ok(), Some(request.clone()));
        let (id, _) = codec::peek_request_header(data).expect("a request has a header");
        assert_eq!(id, request.id);
        let _ = request.op.carries_fd();
    }
    if let Ok(response) = codec::decode_body::<Response>(data) {
        let again = codec::encode_body(&response).expect("a decoded response encodes");
        assert_eq!(codec::decode_body::<Response>(&again).ok(), Some(response));
    }
    let _ = codec::decode_body::<ClientHello>(data);
}

/// `hsmd.toml`: parsed and checked, or refused with an error.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = hsmd::config::Config::parse(text, None) {
            let _ = format!("{config:?}");
        }
    }
}

/// `policy.toml`: parsed and checked, or refused; a parsed policy answers
/// questions about any uid without panicking.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(policy) = hsmd::auth::policy::Policy::parse(text, std::path::Path::new("policy.toml")) else {
        return;
    };
    for uid in [0, 1000, 4200] {
        let peer = hsmd::auth::PeerIdentity::resolve(hsmd::auth::Credentials {
            uid,
            gid: uid,
            pid: None,
        });
        for permission in hsmd::auth::permission::Permission::all() {
            let _ = policy.check(&peer, permission.on(Some("k")), "soft", || Some(uid));
        }
    }
}

/// hsmctl's encrypted-file format: the header, then chunk after chunk until
/// the end or an error, without ever needing the key.
pub fn encrypted_file(data: &[u8]) {
    use protocol::formats::encrypted::{Chunks, Header};
    let mut reader = data;
    let Ok(header) = Header::read_from(&mut reader) else {
        return;
    };
    let mut chunks = Chunks::new(&mut reader, &header);
    for _ in 0..1024 {
        match chunks.next_chunk() {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

/// The signature files hsmctl writes and reads: its own format and SSHSIG
/// (against a fixed Ed25519 public key).
pub fn signature_file(data: &[u8]) {
    use protocol::formats::{signature, sshsig};
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(parsed) = signature::parse(text) {
        let _ = format!("{parsed:?}");
    }
    // The key the seed's SSHSIG was made with (`ssh-keygen -Y sign`).
    const PUBLIC: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG/+xF6xJr+HGY41l6ATyKS3gOOXNhuNr5Vnb2LwuctP fuzz";
    let _ = sshsig::parse(text, PUBLIC, protocol::KeyType::Ed25519, "file");
}

/// A stored file's header and chunks: the header parses and round-trips,
/// and a chunk opens only as it was sealed.
#[derive(Debug, Arbitrary)]
struct FilestoreInput {
    header: Vec<u8>,
    plaintext: Vec<u8>,
    index: u8,
    total: u8,
    /// A byte of the sealed chunk to change (`None`: none).
    flip: Option<(u16, u8)>,
}

/// The file store's header parser and chunk cipher, with a fixed data key.
pub fn filestore(data: &[u8]) {
    use hsmd::filestore::format::{ChunkCipher, Header};
    let Ok(input) = FilestoreInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    if let Ok(header) = Header::parse(&input.header) {
        let bytes = header.to_bytes().expect("a parsed header encodes");
        assert_eq!(Header::parse(&bytes).ok(), Some(header));
    }
    let header = Header {
        format: hsmd::filestore::format::FORMAT,
        token: "00000000-0000-4000-8000-000000000000".into(),
        name: "f".into(),
        chunk_size: hsmd::filestore::format::MIN_CHUNK,
        key: "k".into(),
        key_version: 1,
        wrapped_data_key: String::new(),
        nonce_prefix: "00010203040506".into(),
        owner_uid: 0,
        created_unix: 0,
    };
    let header_bytes = header.to_bytes().expect("header");
    let cipher = ChunkCipher::new(&[7; 32], &header, &header_bytes).expect("cipher");
    let total = u64::from(input.total).max(1);
    let index = u64::from(input.index) % total;
    let size = input.plaintext.len() as u64;
    let mut buf = input.plaintext.clone();
    let Ok(tag) = cipher.seal_detached(index, index + 1 == total, size, &mut buf) else {
        return;
    };
    buf.extend_from_slice(&tag);
    let mut changed = false;
    if let Some((at, bits)) = input.flip {
        if bits != 0 {
            let at = usize::from(at) % buf.len();
            buf[at] ^= bits;
            changed = true;
        }
    }
    match cipher.open_in_place(index, total, size, &mut buf) {
        Ok(n) => {
            assert!(!changed, "a changed chunk opened");
            assert_eq!(&buf[..n], &input.plaintext[..]);
        }
        Err(_) => assert!(changed, "an unchanged chunk did not open"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_a_cargo_fuzz_target() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
        for (name, _) in TARGETS {
            assert!(
                dir.join(format!("{name}.rs")).exists(),
                "fuzz/fuzz_targets/{name}.rs is missing"
            );
        }
    }
}
