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
