//! Must show 5 (SIGTERM with requests in flight: they complete, the socket file
//! is gone, exit 0), and that one slow request never stalls anyone else.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use hsmd_tests::Daemon;
use nix::sys::signal::Signal;
use protocol::{ErrorCode, Operation, Reply, CONNECTION_ERROR_ID};

fn wait_for_in_flight(d: &Daemon, n: u32) {
    let mut c = d.client();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.status().expect("status").requests_in_flight < n {
        assert!(Instant::now() < deadline, "requests never got in flight");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigterm_finishes_requests_in_flight_removes_the_socket_and_exits_0() {
    let mut d = Daemon::builder().dev().start();
    let mut a = d.client();
    let mut b = d.client();
    let ids: Vec<u64> = (0..3)
        .map(|_| a.send(Operation::DebugDelay { millis: 1000 }).expect("send"))
        .collect();
    let b_id = b.send(Operation::DebugDelay { millis: 1200 }).expect("send");
    wait_for_in_flight(&d, 4);

    d.signal(Signal::SIGTERM);
    let signalled = Instant::now();

    // Every request in flight is answered; the connection then says why it closes.
    let mut answers = BTreeMap::new();
    loop {
        match a.recv() {
            Ok(r) if r.id == CONNECTION_ERROR_ID => {
                assert_eq!(r.result.expect_err("an error").code, ErrorCode::ShuttingDown);
            }
            Ok(r) => {
                answers.insert(r.id, r.result);
            }
            Err(protocol::ClientError::Closed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(answers.keys().copied().collect::<Vec<_>>(), ids);
    for result in answers.values() {
        assert_eq!(result, &Ok(Reply::Delayed { millis: 1000 }));
    }
    let r = loop {
        let r = b.recv().expect("b's answer");
        if r.id == b_id {
            break r;
        }
    };
    assert_eq!(r.result, Ok(Reply::Delayed { millis: 1200 }));

    let status = d.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "it waited for the work"
    );
    assert!(!d.socket.exists(), "socket file removed");
    assert!(protocol::Client::connect(&d.socket)
        .expect_err("no daemon")
        .is_unreachable());
}

#[test]
fn sigterm_stops_accepting_new_connections_at_once() {
    let mut d = Daemon::builder().dev().start();
    let mut a = d.client();
    a.send(Operation::DebugDelay { millis: 1500 }).expect("send");
    wait_for_in_flight(&d, 1);
    d.signal(Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(1);
    while d.socket.exists() {
        assert!(Instant::now() < deadline, "socket still there after SIGINT");
        thread::sleep(Duration::from_millis(10));
    }
    assert!(protocol::Client::connect(&d.socket).is_err());
    assert!(d.is_running(), "still finishing the request in flight");
    assert!(d.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn shutdown_grace_bounds_how_long_stragglers_are_waited_for() {
    let mut d = Daemon::builder().dev().limit("shutdown_grace", "\"500ms\"").start();
    let mut a = d.client();
    a.send(Operation::DebugDelay { millis: 8000 }).expect("send");
    wait_for_in_flight(&d, 1);
    let t = Instant::now();
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(5)).success());
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    assert!(d.log().contains("abandoned"), "{}", d.log());
}

#[test]
fn a_slow_request_does_not_stall_its_own_connection_or_others() {
    let d = Daemon::builder().dev().start();
    let mut a = d.client();
    let slow = a.send(Operation::DebugDelay { millis: 1500 }).expect("send");
    // Pipelined behind the slow one on the same connection: answered first.
    let t = Instant::now();
    let fast = a.send(Operation::Ping { payload: b"x".to_vec() }).expect("send");
    let first = a.recv().expect("recv");
    assert_eq!(first.id, fast, "responses come as work completes, not in request order");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "ping waited {:?}",
        t.elapsed()
    );
    // Another connection meanwhile.
    let t = Instant::now();
    let mut b = d.client();
    for _ in 0..50 {
        b.ping(vec![1; 16]).expect("ping");
    }
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "other client waited {:?}",
        t.elapsed()
    );
    assert_eq!(a.recv().expect("slow answer").id, slow);
}

#[test]
fn many_connections_pipelining_at_once_get_every_answer_under_its_id() {
    let d = Daemon::builder().dev().start();
    let handles: Vec<_> = (0..8u8)
        .map(|t| {
            let mut c = d.client();
            thread::spawn(move || {
                let mut expected = BTreeMap::new();
                for i in 0..200u32 {
                    let payload = [t, (i % 256) as u8, (i / 256) as u8].to_vec();
                    let op = if i % 50 == 0 {
                        Operation::DebugDelay { millis: 20 }
                    } else {
                        Operation::Ping {
                            payload: payload.clone(),
                        }
                    };
                    let id = c.send(op).expect("send");
                    expected.insert(id, payload);
                    // Keep at most 16 outstanding.
                    if expected.len() >= 16 {
                        check(&mut c, &mut expected);
                    }
                }
                while !expected.is_empty() {
                    check(&mut c, &mut expected);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }

    fn check(c: &mut protocol::Client, expected: &mut BTreeMap<u64, Vec<u8>>) {
        let r = c.recv().expect("recv");
        let want = expected.remove(&r.id).expect("answer to an outstanding id");
        match r.result.expect("ok") {
            Reply::Pong { payload } => assert_eq!(payload, want),
            Reply::Delayed { millis } => assert_eq!(millis, 20),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn send_many_pipelines_requests_in_one_write_and_each_is_answered_under_its_id() {
    let d = Daemon::builder().dev().start();
    let mut c = d.client();
    let ops = (0..40u8).map(|i| {
        if i == 3 {
            Operation::DebugDelay { millis: 30 }
        } else {
            Operation::Ping {
                payload: vec![i; 1 + usize::from(i)],
            }
        }
    });
    let ids = c.send_many(ops).expect("send_many");
    assert_eq!(ids.len(), 40);
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "consecutive ids: {ids:?}");
    let mut seen = BTreeMap::new();
    for _ in 0..40 {
        let r = c.recv().expect("recv");
        seen.insert(r.id, r.result.expect("ok"));
    }
    for (i, id) in ids.iter().enumerate() {
        let i = u8::try_from(i).expect("small");
        match &seen[id] {
            Reply::Pong { payload } => assert_eq!(payload, &vec![i; 1 + usize::from(i)]),
            Reply::Delayed { millis } => assert_eq!((i, *millis), (3, 30)),
            other => panic!("{other:?}"),
        }
    }
    // The next single call continues the id sequence.
    assert_eq!(c.send(Operation::Ping { payload: vec![] }).expect("send"), ids[39] + 1);
}

#[test]
fn debug_delay_is_refused_outside_dev_mode() {
    let d = Daemon::start();
    let err = d
        .client()
        .call(Operation::DebugDelay { millis: 1 })
        .expect_err("refused");
    assert_eq!(err.code(), Some(ErrorCode::NotAvailable));
}
