//! Small edges found by trying hsmd as a careless operator would: an
//! `audit show` asking for more than one answer can carry, and the dev clock
//! pushed past the year 9999.

use std::time::Duration;

use hsmd_tests::Daemon;
use protocol::{BatchItem, ErrorCode, KeyOptions, KeyType, Operation, Reply};

#[test]
fn audit_show_with_a_huge_limit_answers_the_newest_lines_that_fit() {
    let d = Daemon::builder().dev().start();
    let mut c = d.client();
    c.call(Operation::KeyCreate {
        name: "k".into(),
        key_type: KeyType::HmacSha256,
        usages: Vec::new(),
        options: KeyOptions::default(),
    })
    .expect("create");
    // Over 16 MiB of audit lines: more than any one answer may carry.
    let mut made = 0;
    while made < 60_000 {
        let items = (0..1024)
            .map(|i| {
                BatchItem::Mac(protocol::MacArgs {
                    name: "k".into(),
                    data: vec![i as u8; 8],
                })
            })
            .collect();
        c.batch(items).expect("batch");
        made += 1024;
    }
    let log = std::fs::metadata(d.dir().join("state/audit.log")).expect("log").len();
    assert!(log > 16 << 20, "only {log} bytes of audit lines");
    let Reply::AuditLines(lines) = c
        .call(Operation::AuditShow {
            since_secs: None,
            event_type: None,
            user: None,
            key: None,
            result: None,
            limit: 100_000,
        })
        .expect("audit show answers")
    else {
        panic!("audit show answer")
    };
    let bytes: usize = lines.iter().map(String::len).sum();
    println!("{} lines, {bytes} bytes, of a {log}-byte log", lines.len());
    assert!(
        lines.len() > 10_000 && bytes <= 8 << 20,
        "{} lines, {bytes} bytes",
        lines.len()
    );
    // The newest: the last line shown is the last MAC made.
    let last: serde_json::Value = serde_json::from_str(lines.last().expect("a line")).expect("json");
    assert_eq!(last["event_type"], "MAC", "{last}");
    let seqs: Vec<u64> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "not a contiguous run of the newest lines"
    );
}

#[test]
fn the_dev_clock_stops_short_of_the_year_ten_thousand_and_hsmd_keeps_running() {
    const LAST: u64 = 253_402_300_799;
    let d = Daemon::builder()
        .dev()
        .keys("maintenance_interval", "\"200ms\"")
        .start();
    let mut c = d.client();
    let Reply::Clock { now_unix } = c.call(Operation::DebugClock { advance_secs: 0 }).expect("clock") else {
        panic!("clock answer")
    };
    let err = c
        .call(Operation::DebugClock {
            advance_secs: u64::MAX / 2,
        })
        .expect_err("past 9999");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    assert!(err.to_string().contains("year 9999"), "{err}");
    // Up to the last second of 9999 is allowed, and maintenance runs there.
    let Reply::Clock { now_unix: at } = c
        .call(Operation::DebugClock {
            advance_secs: LAST - now_unix - 5,
        })
        .expect("to the end of 9999")
    else {
        panic!("clock answer")
    };
    assert!(at <= LAST);
    std::thread::sleep(Duration::from_secs(2));
    let err = c
        .call(Operation::DebugClock { advance_secs: 3600 })
        .expect_err("an hour later is year 10000");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
    c.status().expect("still serving");
    assert!(!d.log().contains("panicked"), "{}", d.log());
}
