//! Every committed seed and every input a fuzzer found failing, through the
//! target it belongs to: a crash, once fixed, stays fixed under `cargo test`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{fs, path::Path};

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries.map(|e| e.expect("read the directory").path()).collect();
    files.sort();
    files
}

#[test]
fn every_seed_and_every_found_crash_runs_clean() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, target) in hsmd_fuzzing::TARGETS {
        let seeds = inputs(&fuzz.join("seeds").join(name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name}/ has no seed");
        for input in seeds.iter().chain(&inputs(&fuzz.join("regressions").join(name))) {
            let data = fs::read(input).expect("read an input");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name} fails on {}", input.display());
        }
    }
}

#[test]
fn the_connection_seeds_reach_the_server_and_get_answers() {
    // A target whose inputs never got past the first check would still run
    // clean; these seeds must be answered at length.
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/connection");
    let answered = |name: &str| hsmd_fuzzing::connection::exchange(&fs::read(seeds.join(name)).unwrap());
    let main = answered("main");
    assert!(main > 2000, "the pipelined requests got {main} bytes of answers");
    // (Not the same length: the first run created a key, rotated one, and
    // the metrics grew.)
    let pieces = answered("main-1k");
    assert!(pieces > 2000, "the same requests in 1 KiB writes got {pieces} bytes");
    let agent = answered("agent");
    assert!(agent >= 9, "the agent answered {agent} bytes");
}

#[test]
fn the_agent_seeds_are_read_as_the_requests_they_are() {
    // The agent target returns early on what does not parse; its seeds must
    // get past that, each as what it was made to be.
    use hsmd::server::agent::message::{parse, Message};
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/agent");
    let read = |name: &str| parse(&fs::read(seeds.join(name)).unwrap());
    assert_eq!(read("identities"), Ok(Message::Identities));
    assert!(matches!(read("sign"), Ok(Message::Sign(r)) if r.data == b"git commit"));
    assert!(matches!(read("sign-rsa-sha2-512"), Ok(Message::Sign(r)) if r.flags == 4));
    assert!(matches!(read("session-bind"), Ok(Message::SessionBind(b)) if b.session_id == [9; 32]));
    assert!(matches!(read("session-bind-forged"), Ok(Message::ForgedSessionBind(_))));
    assert_eq!(read("extension-unknown"), Ok(Message::UnknownExtension("query".into())));
    assert_eq!(read("add-identity"), Ok(Message::AddOrRemove(17)));
    assert_eq!(read("lock"), Ok(Message::LockOrUnlock(22)));
    assert_eq!(read("unknown"), Ok(Message::Unknown(200)));
    let err = parse(&[13, 0, 0]).unwrap_err();
    assert_eq!(err.what, "sign request", "{err}");
    // ssh-agent-lib leaves an extension's details unchecked at their end.
    let longer = [fs::read(seeds.join("session-bind")).unwrap(), vec![0]].concat();
    let err = parse(&longer).unwrap_err();
    assert_eq!(err.what, "session-bind@openssh.com", "{err}");
    assert!(err.why.contains("1 bytes after its end"), "{err}");
}

#[test]
fn the_pkcs11_seeds_sign_seal_and_generate_through_the_module() {
    // The target's oracles (a signature verifies, a sealed message opens)
    // run only on success: the seeds must get there.
    use hsmd_fuzzing::pkcs11::exercise;
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/pkcs11");
    let run = |name: &str| exercise(&fs::read(seeds.join(name)).unwrap()).expect("the seed decodes");
    // (Each seed tries the first eight objects, wrapping around: a key may
    // be tried more than once.)
    let signed = run("sign-each-way");
    // The P-256 key with two mechanisms, the Ed25519 key with one.
    assert!(signed.signed >= 3, "{signed:?}");
    let sealed = run("seal");
    assert!(sealed.sealed >= 1, "{sealed:?}");
    let made = run("generate-use-destroy");
    assert_eq!((made.made, made.signed, made.sealed), (3, 2, 1), "{made:?}");
    let refused = run("refused");
    assert_eq!((refused.made, refused.signed, refused.sealed), (0, 0, 0), "{refused:?}");
    assert!(refused.refused >= 4, "{refused:?}");
    // What a seed made is gone again: the same keys can be made again.
    assert_eq!(run("generate-use-destroy").made, 3);
}
