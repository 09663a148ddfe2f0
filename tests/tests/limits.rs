//! Must show 4: with the connection limit full of idle or one-byte-a-second
//! clients, a new client gets a clear "too many connections" error, and once they
//! time out, service resumes.

use std::{
    thread,
    time::{Duration, Instant},
};

use hsmd_tests::{error_code, Daemon, Raw};
use protocol::{ErrorCode, CONNECTION_ERROR_ID};

#[test]
fn full_connection_table_refuses_clearly_and_recovers_after_timeouts() {
    let d = Daemon::builder()
        .limit("max_connections", "3")
        .limit("frame_timeout", "\"1s\"")
        .limit("idle_timeout", "\"2s\"")
        .start();

    // Two idle clients that said hello and then nothing.
    let mut idle: Vec<Raw> = (0..2)
        .map(|_| {
            let mut r = Raw::connect(&d.socket);
            r.hello();
            r
        })
        .collect();
    // One client that trickles a frame one byte every 300 ms, for ever.
    let mut slow = Raw::connect(&d.socket);
    slow.hello();
    let mut slow_writer = slow.0.try_clone().expect("clone");
    let trickle = thread::spawn(move || {
        use std::io::Write;
        for b in [0u8, 0, 0, 50].iter().chain(&[0u8; 50]) {
            if slow_writer.write_all(&[*b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(300));
        }
    });
    thread::sleep(Duration::from_millis(100));

    let started = Instant::now();
    let err = protocol::Client::connect(&d.socket).expect_err("the table is full");
    assert_eq!(err.code(), Some(ErrorCode::TooManyConnections), "{err}");
    assert!(err.to_string().contains("maximum of 3 connections"), "{err}");
    let out = d.hsmctl(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("too-many-connections"));

    // The slow client is cut off by the frame timeout, with a reason.
    let r = slow.read_response().expect("frame timeout error");
    assert_eq!((r.id, error_code(&r)), (CONNECTION_ERROR_ID, ErrorCode::FrameTimeout));
    assert!(r.result.unwrap_err().message.contains("not completed within 1s"));
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "frame timeout is not reset by each byte"
    );

    // The idle ones by the idle timeout.
    for r in &mut idle {
        let resp = r.read_response().expect("idle timeout error");
        assert_eq!(error_code(&resp), ErrorCode::IdleTimeout);
        assert!(r.is_closed());
    }

    // Service resumes.
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        match protocol::Client::connect(&d.socket) {
            Ok(mut c) => break c.status().expect("status"),
            Err(e) if e.code() == Some(ErrorCode::TooManyConnections) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("service did not resume: {e}"),
        }
    };
    assert_eq!(status.max_connections, 3);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    trickle.join().expect("trickle thread");
}

#[test]
fn a_connection_waiting_on_its_own_slow_request_is_not_idle() {
    let d = Daemon::builder().dev().limit("idle_timeout", "\"1s\"").start();
    let mut c = d.client();
    let reply = c
        .call(protocol::Operation::DebugDelay { millis: 2500 })
        .expect("answered, not timed out");
    assert_eq!(reply, protocol::Reply::Delayed { millis: 2500 });
}

#[test]
fn in_flight_limit_holds_back_reading_without_timing_the_client_out() {
    let d = Daemon::builder()
        .dev()
        .limit("max_requests_in_flight", "1")
        .limit("frame_timeout", "\"1s\"")
        .start();
    let mut raw = Raw::connect(&d.socket);
    raw.hello();
    let body = |id, op| protocol::codec::encode_frame(&protocol::Request { id, op }, u32::MAX).expect("encode");
    let slow = body(2, protocol::Operation::DebugDelay { millis: 1500 });
    let ping = body(3, protocol::Operation::Ping { payload: vec![7; 64] });
    // One write: the slow request and the first half of a ping. hsmd is at its
    // in-flight limit while the half frame sits in its buffer.
    let mut first = slow.clone();
    first.extend_from_slice(&ping[..20]);
    raw.write(&first).expect("write");
    thread::sleep(Duration::from_millis(1300));
    raw.write(&ping[20..]).expect("write rest");

    let a = raw.read_response().expect("answer");
    let b = raw.read_response().expect("answer");
    assert_eq!((a.id, b.id), (2, 3), "{a:?} {b:?}");
    assert!(a.result.is_ok() && b.result.is_ok(), "{a:?} {b:?}");
}

#[test]
fn pipelined_requests_beyond_the_in_flight_limit_wait_and_are_all_answered() {
    let d = Daemon::builder().dev().limit("max_requests_in_flight", "2").start();
    let mut c = d.client();
    let ids: Vec<u64> = (0..6)
        .map(|_| c.send(protocol::Operation::DebugDelay { millis: 200 }).expect("send"))
        .collect();
    let mut watcher = d.client();
    let mut peak = 0;
    let mut answered = Vec::new();
    let t = Instant::now();
    while answered.len() < ids.len() {
        peak = peak.max(watcher.status().expect("status").requests_in_flight);
        if let Ok(r) = c.recv() {
            answered.push(r.id);
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, ids);
    assert!(peak <= 2, "at most 2 in flight, saw {peak}");
    assert!(
        t.elapsed() >= Duration::from_millis(550),
        "6 x 200 ms, 2 at a time: {:?}",
        t.elapsed()
    );
}
