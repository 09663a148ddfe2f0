//! Must show 8: the benchmark runs and prints both figures (hsmd and the raw
//! echo baseline of the same frame size, measured in the same run). The figures
//! themselves come from a release run (see BENCHMARKS.md); this is a smoke run.

use std::process::Command;

#[test]
fn benchmark_prints_hsmd_and_raw_echo_figures_side_by_side() {
    let out = Command::new(env!("CARGO_BIN_EXE_hsmd-bench"))
        .args(["--quick", "--suite", "ping", "--clients", "1,8"])
        .output()
        .expect("run hsmd-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("raw echo rt/s") && text.contains("hsmd ping rt/s"),
        "{text}"
    );
    let rows = hsmd_tests::table_rows(&text);
    assert_eq!(rows.len(), 2, "one row per client count: {text}");
    for row in rows {
        // clients, raw rt/s, p50, p99, p99.9, max, hsmd rt/s, p50, p99,
        // p99.9, max, ratio, p99 ratio, echo and hsmd CPU µs per round trip
        assert_eq!(row.len(), 15, "{row:?}");
        assert!(row[1] > 0.0 && row[6] > 0.0, "both servers answered: {row:?}");
        if row[0] == 8.0 {
            // 0.3 s of eight clients keeps either server busy for many
            // clock ticks, so a zero is a reading that failed.
            assert!(
                row[13] > 0.0 && row[14] > 0.0,
                "both servers' CPU per round trip: {row:?}"
            );
        }
        assert!(
            row[2..6].windows(2).all(|w| w[0] <= w[1]) && row[7..11].windows(2).all(|w| w[0] <= w[1]),
            "p50 <= p99 <= p99.9 <= max: {row:?}"
        );
    }
    assert!(text.contains("target: at 8 clients hsmd's p99"), "{text}");
}

#[test]
fn key_benchmark_prints_in_process_and_socket_figures_for_each_operation() {
    let out = Command::new(env!("CARGO_BIN_EXE_hsmd-bench"))
        .args(["--quick", "--suite", "keys", "--clients", "1,2"])
        .output()
        .expect("run hsmd-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for op in ["ed25519 sign:", "ecdsa-p256 sign:", "aes256-gcm encrypt 4 KiB:"] {
        assert!(text.contains(op), "{op} missing: {text}");
    }
    let rows = hsmd_tests::table_rows(&text);
    assert_eq!(rows.len(), 6, "two client counts for each of three operations: {text}");
    // clients, in-process/s, 4 latencies, hsmd/s, 4 latencies, ratio,
    // p99/p50, CPU µs per operation in process and in hsmd
    assert!(
        rows.iter().all(|r| r.len() == 15 && r[1] > 0.0 && r[6] > 0.0),
        "{rows:?}"
    );
    // The signatures keep the signing process busy for the whole 0.3 s.
    assert!(
        rows.iter().filter(|r| r[0] == 2.0).all(|r| r[13] > 0.0 && r[14] > 0.0),
        "CPU per operation in process and in hsmd: {rows:?}"
    );
    assert!(text.contains("target: ed25519 p99 at 1 client"), "{text}");
    // The fairness row: the lone client alone and beside the load.
    let lone: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("idle daemon") || l.contains("beside 7 busy clients"))
        .collect();
    assert_eq!(lone.len(), 2, "{text}");
    assert!(text.contains("target: the lone client's p99 beside the load"), "{text}");
}

#[test]
fn key_benchmark_pipelines_and_batches_when_asked() {
    for mode in [["--depth", "4"], ["--batch", "4"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_hsmd-bench"))
            .args(["--quick", "--suite", "keys", "--clients", "2"])
            .args(mode)
            .output()
            .expect("run hsmd-bench");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        let per = if mode[0] == "--depth" {
            "requests in flight per client: 4, operations per request: 1"
        } else {
            "requests in flight per client: 1, operations per request: 4"
        };
        assert!(text.contains(per), "{text}");
        assert!(text.contains("not judged here"), "{text}");
        let rows = text.lines().filter(|l| l.trim_start().starts_with("2 |")).count();
        assert_eq!(rows, 3, "{text}");
    }
}

#[test]
fn security_benchmark_compares_policy_rate_limits_and_audit_on_against_off() {
    let out = Command::new(env!("CARGO_BIN_EXE_hsmd-bench"))
        .args(["--quick", "--suite", "security", "--clients", "1,8"])
        .output()
        .expect("run hsmd-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows = hsmd_tests::table_rows(&text);
    assert_eq!(rows.len(), 2, "{text}");
    assert!(
        rows.iter().all(|r| r.len() == 12 && r[1] > 0.0 && r[6] > 0.0),
        "{rows:?}"
    );
    assert!(text.contains("target: with policy, rate limits and audit on"), "{text}");
    // The "on" daemon really audited: its lines are counted.
    let audited: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("audit lines written by the \"on\" daemon so far: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("audit line count");
    assert!(audited > 100, "{text}");
}

#[test]
fn file_benchmark_prints_hsmd_beside_dd_age_and_in_process_aead() {
    let out = Command::new(env!("CARGO_BIN_EXE_hsmd-bench"))
        .args(["--quick", "--suite", "files", "--file-mib", "32"])
        .output()
        .expect("run hsmd-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for row in [
        "hsmctl file store (descriptor passed)",
        "hsmctl file store --via frames",
        "dd bs=1M, same filesystem",
        "hsmctl file retrieve -o - (descriptor)",
        "age -d to /dev/null",
        "AES-256-GCM open",
        "raw Unix socket",
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(row))
            .unwrap_or_else(|| panic!("{row} missing: {text}"));
        let mbps: f64 = line
            .split_whitespace()
            .last()
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("no MB/s figure (is age installed? scripts/install-test-deps): {line}"));
        assert!(mbps > 0.0, "{line}");
    }
    assert!(text.contains("targets: store >= 90% of dd"), "{text}");
}

#[test]
fn backend_benchmark_signs_with_soft_pkcs11_and_tpm_keys_beside_cryptoki_directly() {
    let out = Command::new(env!("CARGO_BIN_EXE_hsmd-bench"))
        .args(["--quick", "--suite", "backends", "--clients", "1,2"])
        .output()
        .expect("run hsmd-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for op in ["ecdsa-p256 sign:", "ed25519 sign:", "rsa-pss-2048 sign:"] {
        assert!(text.contains(op), "{op} missing: {text}");
    }
    let all = hsmd_tests::table_rows(&text);
    assert_eq!(all.len(), 6, "two client counts for each of three operations: {text}");
    // RSA: clients, pkcs11/s, 4 latencies, cryptoki/s, 4 latencies, ratio,
    // tpm/s, 4 latencies, openssl software sign/s, then the CPU per signature
    // of the token used directly and of hsmd with its helper; every figure
    // measured.
    assert!(
        all[4..]
            .iter()
            .all(|r| r.len() == 20 && r[1..].iter().all(|f| *f > 0.0)),
        "rsa figures: {all:?}"
    );
    let rows = &all[..4];
    // clients, soft/s, 4 latencies, pkcs11/s, 4, cryptoki/s, 4,
    // in-process/s, ratio, then tpm/s and 4 latencies for ecdsa-p256 only,
    // and the two CPU figures last
    assert!(
        rows.iter().all(|r| r.len() >= 20
            && r[1] > 0.0
            && r[6] > 0.0
            && r[11] > 0.0
            && r[16] > 0.0
            && r[r.len() - 2] > 0.0
            && r[r.len() - 1] > 0.0),
        "{rows:?}"
    );
    assert!(
        rows[..2].iter().all(|r| r.len() == 25 && r[18] > 0.0),
        "tpm figures: {rows:?}"
    );
    assert!(rows[2..].iter().all(|r| r.len() == 20), "ed25519 rows: {rows:?}");
}
