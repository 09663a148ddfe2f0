//! Issue 3, encryption and MACs through hsmctl: files of any size in chunks;
//! altered, reordered, truncated files and other associated data all fail, and
//! a failed decryption leaves no output behind.

use std::fs;

use hsmd_tests::check::{ok, p as path};
use hsmd_tests::Daemon;

fn unlocked_with_keys() -> Daemon {
    let d = Daemon::start();
    let keyfile = d.dir().join("unlock.key");
    ok(&d.hsmctl(&["init", "--keyfile-out", path(&keyfile)]));
    ok(&d.hsmctl(&["key", "create", "box", "--type", "aes256-gcm"]));
    ok(&d.hsmctl(&["key", "create", "box2", "--type", "aes256-gcm"]));
    ok(&d.hsmctl(&["key", "create", "tagger", "--type", "hmac-sha256"]));
    d
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect()
}

/// Splits an encrypted file into its header and its chunks.
fn split(file: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let name_len = u16::from_be_bytes([file[8], file[9]]) as usize;
    let header_len = 8 + 2 + name_len + 4 + 4;
    let mut chunks = Vec::new();
    let mut at = header_len;
    while at < file.len() {
        let len = u32::from_be_bytes(file[at..at + 4].try_into().expect("4 bytes")) as usize;
        chunks.push(file[at..at + 4 + len].to_vec());
        at += 4 + len;
    }
    (file[..header_len].to_vec(), chunks)
}

#[test]
fn files_of_every_size_round_trip_in_chunks() {
    let d = unlocked_with_keys();
    for len in [0usize, 1, 256 * 1024, 256 * 1024 + 1, 1_300_000] {
        let plain = d.dir().join(format!("p{len}"));
        let enc = d.dir().join(format!("e{len}"));
        let back = d.dir().join(format!("b{len}"));
        let bytes = data(len);
        fs::write(&plain, &bytes).expect("write");
        ok(&d.hsmctl(&[
            "encrypt",
            "--force",
            "box",
            "-i",
            path(&plain),
            "-o",
            path(&enc),
            "--aad",
            "ctx",
        ]));
        let sealed = fs::read(&enc).expect("read");
        assert_eq!(&sealed[..8], b"HSMDENC1");
        let (_, chunks) = split(&sealed);
        assert_eq!(chunks.len(), len.div_ceil(256 * 1024).max(1), "chunks for {len} bytes");
        if len >= 64 {
            assert!(!sealed.windows(64).any(|w| w == &bytes[..64]), "plaintext visible");
        }
        ok(&d.hsmctl(&[
            "decrypt",
            "--force",
            "box",
            "-i",
            path(&enc),
            "-o",
            path(&back),
            "--aad",
            "ctx",
        ]));
        assert_eq!(fs::read(&back).expect("read"), bytes, "{len} bytes");
    }
    // Pipes.
    let out = d.hsmctl_with_stdin(&["encrypt", "--force", "box", "-i", "-", "-o", "-"], b"through a pipe");
    assert!(out.status.success());
    let out = d.hsmctl_with_stdin(&["decrypt", "--force", "box", "-i", "-", "-o", "-"], &out.stdout);
    assert_eq!(ok(&out), "through a pipe");
}

#[test]
fn altered_reordered_truncated_or_rebound_ciphertexts_fail_and_write_nothing() {
    let d = unlocked_with_keys();
    let plain = d.dir().join("plain");
    fs::write(&plain, data(700_000)).expect("write");
    let enc = d.dir().join("enc");
    ok(&d.hsmctl(&[
        "encrypt",
        "--force",
        "box",
        "-i",
        path(&plain),
        "-o",
        path(&enc),
        "--aad",
        "v1",
    ]));
    let sealed = fs::read(&enc).expect("read");
    let (header, chunks) = split(&sealed);
    assert_eq!(chunks.len(), 3);

    let mut flipped = sealed.clone();
    let at = sealed.len() - 100;
    flipped[at] ^= 1;
    let mut reordered = header.clone();
    for i in [1, 0, 2] {
        reordered.extend_from_slice(&chunks[i]);
    }
    let mut truncated = header.clone();
    truncated.extend_from_slice(&chunks[0]);
    truncated.extend_from_slice(&chunks[1]);
    let mut duplicated = header.clone();
    for i in [0, 0, 1, 2] {
        duplicated.extend_from_slice(&chunks[i]);
    }
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("flipped", flipped, "v1"),
        ("reordered", reordered, "v1"),
        ("truncated", truncated, "v1"),
        ("duplicated", duplicated, "v1"),
        ("other aad", sealed.clone(), "v2"),
    ];
    for (what, bytes, aad) in cases {
        let bad = d.dir().join("bad");
        fs::write(&bad, &bytes).expect("write");
        let out_path = d.dir().join(format!("out-{}", what.replace(' ', "-")));
        let out = d.hsmctl(&[
            "decrypt",
            "--force",
            "box",
            "-i",
            path(&bad),
            "-o",
            path(&out_path),
            "--aad",
            aad,
        ]);
        assert_eq!(out.status.code(), Some(1), "{what}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("does not decrypt"),
            "{what}: {out:?}"
        );
        assert!(!out_path.exists(), "{what}: a failed decryption left output behind");
    }
    // Another key with the same header name does not open it either.
    let mut other = sealed.clone();
    // Header: magic, u16 name length (bytes 8..10), name ("box", bytes 10..13).
    other.splice(10..13, b"box2".iter().copied());
    other[9] = 4;
    let moved = d.dir().join("moved");
    fs::write(&moved, &other).expect("write");
    let out = d.hsmctl(&[
        "decrypt",
        "--force",
        "box2",
        "-i",
        path(&moved),
        "-o",
        "-",
        "--aad",
        "v1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn macs_verify_and_a_changed_byte_does_not() {
    let d = unlocked_with_keys();
    let input = d.dir().join("record");
    fs::write(&input, b"{\"amount\": 100}").expect("write");
    let tag = d.dir().join("record.mac");
    ok(&d.hsmctl(&["mac", "--force", "tagger", "-i", path(&input), "-o", path(&tag)]));
    assert!(fs::read_to_string(&tag)
        .expect("tag")
        .starts_with("hsmd-mac v1\nkey: tagger\nversion: 1\ntag: "));
    assert!(ok(&d.hsmctl(&["mac-verify", "tagger", "-i", path(&input), "-t", path(&tag)])).contains("tag valid"));
    fs::write(&input, b"{\"amount\": 900}").expect("write");
    let out = d.hsmctl(&["mac-verify", "tagger", "-i", path(&input), "-t", path(&tag)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("INVALID"));
}

#[test]
fn keys_are_used_only_for_what_they_allow_and_not_while_locked() {
    let d = unlocked_with_keys();
    ok(&d.hsmctl(&["key", "create", "signer", "--type", "ed25519"]));
    let out = d.hsmctl_with_stdin(&["encrypt", "--force", "signer", "-i", "-", "-o", "-"], b"x");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(failed-precondition)"),
        "{out:?}"
    );
    let out = d.hsmctl_with_stdin(&["mac", "--force", "box", "-i", "-", "-o", "-"], b"x");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(failed-precondition)"),
        "{out:?}"
    );
    ok(&d.hsmctl(&["lock"]));
    let out = d.hsmctl_with_stdin(&["encrypt", "--force", "box", "-i", "-", "-o", "-"], b"x");
    assert!(String::from_utf8_lossy(&out.stderr).contains("(locked)"), "{out:?}");
}
