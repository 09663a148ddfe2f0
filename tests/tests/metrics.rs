//! Metrics (issue 5, must-show 6): `/metrics` on the loopback listener parses
//! as Prometheus text and its counters match the workload this test ran;
//! `hsmctl metrics` serves the same; a non-loopback listener is refused; the
//! shipped alert rules pass `promtool check rules` where promtool exists.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
};

use hsmd_tests::check::ok;
use hsmd_tests::Daemon;
use prometheus_parse::{Sample, Scrape, Value};

/// The metrics the shipped alert rules use.
const RULE_METRICS: [&str; 8] = [
    "hsmd_requests_total",
    "hsmd_auth_failures_total",
    "hsmd_backend_up",
    "hsmd_rate_limited_total",
    "hsmd_unlocked",
    "hsmd_initialized",
    "hsmd_audit_up",
    "hsmd_keys",
];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics listener");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    text
}

fn value(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[test]
fn the_loopback_listener_serves_prometheus_text_that_counts_the_workload() {
    let port = free_port();
    let d = Daemon::builder()
        .dev()
        .extra(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"))
        .start();
    let data = d.dir().join("data");
    std::fs::write(&data, b"x").expect("write");
    let data = data.to_str().expect("utf-8");
    ok(&d.hsmctl(&["key", "create", "a", "--type", "ed25519"]));
    ok(&d.hsmctl(&["key", "create", "b", "--type", "ed25519"]));
    ok(&d.hsmctl(&["key", "create", "c", "--type", "aes256-gcm"]));
    ok(&d.hsmctl(&["key", "disable", "b"]));
    for i in 0..5 {
        let sig = d.dir().join(format!("s{i}"));
        ok(&d.hsmctl(&["sign", "--force", "a", "-i", data, "-o", sig.to_str().expect("utf-8")]));
    }
    for _ in 0..2 {
        // Refused by state: counted under its error code.
        assert!(!d
            .hsmctl(&["sign", "--force", "b", "-i", data, "-o", "/dev/null"])
            .status
            .success());
    }

    let response = get(port, "/metrics");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    let body = response.split("\r\n\r\n").nth(1).expect("body");
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text");
    let s = &scrape.samples;
    assert!(s.len() > 10, "{body}");
    assert_eq!(
        value(s, "hsmd_requests_total", &[("operation", "sign"), ("result", "ok")]),
        5.0,
        "{body}"
    );
    assert_eq!(
        value(
            s,
            "hsmd_requests_total",
            &[("operation", "sign"), ("result", "key-state")]
        ),
        2.0,
        "{body}"
    );
    assert_eq!(
        value(
            s,
            "hsmd_requests_total",
            &[("operation", "key-create"), ("result", "ok")]
        ),
        3.0
    );
    assert_eq!(
        value(s, "hsmd_keys", &[("key_type", "ed25519"), ("state", "active")]),
        1.0,
        "{body}"
    );
    assert_eq!(
        value(s, "hsmd_keys", &[("key_type", "ed25519"), ("state", "suspended")]),
        1.0
    );
    assert_eq!(
        value(s, "hsmd_keys", &[("key_type", "aes256-gcm"), ("state", "active")]),
        1.0
    );
    assert_eq!(value(s, "hsmd_backend_up", &[("backend", "soft")]), 1.0);
    assert_eq!(value(s, "hsmd_unlocked", &[]), 1.0);
    // Latency histograms for what ran.
    assert!(body.contains("hsmd_request_duration_seconds_bucket{le=\""), "{body}");
    assert!(
        body.contains("hsmd_request_duration_seconds_count{operation=\"sign\"} 7"),
        "{body}"
    );
    assert_eq!(value(s, "hsmd_audit_buffer_events", &[]).min(0.0), 0.0);

    // hsmd exports every metric the alert rules use.
    ok(&d.hsmctl(&["ping"]));
    let prefixes: Vec<String> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_owned())
        .collect();
    for metric in RULE_METRICS.iter().filter(|m| **m != "hsmd_auth_failures_total") {
        assert!(prefixes.iter().any(|p| p == metric), "{metric} not exported: {body}");
    }
    // hsmd_auth_failures_total appears with its first refusal (tests/policy.rs
    // workloads have them; this dev daemon refuses no one).

    // The same through the socket.
    let via_cli = ok(&d.hsmctl(&["metrics"]));
    assert!(
        via_cli.contains("hsmd_requests_total{operation=\"sign\",result=\"ok\"} 5"),
        "{via_cli}"
    );
    // Anything but GET /metrics is not served.
    assert!(get(port, "/").starts_with("HTTP/1.1 404"));

    if let Ok(out) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(body.as_bytes())?;
            c.wait_with_output()
        })
    {
        assert!(
            out.status.success(),
            "promtool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("promtool not installed: parsed with the prometheus-parse crate only");
    }
}

#[test]
fn a_metrics_listener_off_loopback_is_refused() {
    let prepared = Daemon::builder()
        .extra("[metrics]\nlisten = \"0.0.0.0:9091\"\n")
        .prepare();
    let out = prepared.command().output().expect("run hsmd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics.listen") && err.contains("loopback"), "{err}");
}

#[test]
fn the_shipped_alert_rules_pass_promtool_where_it_exists() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/prometheus/hsmd-alerts.yml");
    let text = std::fs::read_to_string(rules).expect("alert rules");
    // The rules use the metrics the live scrape above is checked to export.
    for metric in RULE_METRICS {
        assert!(text.contains(metric), "{metric}");
    }
    match Command::new("promtool").args(["check", "rules", rules]).output() {
        Ok(out) => assert!(
            out.status.success(),
            "promtool: {}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => eprintln!("promtool not installed: rules not checked by it"),
    }
}
