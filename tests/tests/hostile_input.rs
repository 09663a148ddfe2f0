//! Must show 3: hostile frames get an error and a close, nothing is allocated on
//! a length prefix's word, and the daemon keeps serving everyone else.

use hsmd_tests::{error_code, Daemon, Raw};
use protocol::{codec, ClientHello, ErrorCode, Operation, Request, CONNECTION_ERROR_ID};

fn body(id: u64, op: Operation) -> Vec<u8> {
    codec::encode_body(&Request { id, op }).expect("encode")
}

fn assert_still_serving(d: &Daemon) {
    let status = d.client().status().expect("status still answers");
    assert_eq!(status.pid, d.pid());
}

#[test]
fn four_gib_length_prefix_is_refused_without_allocating() {
    let d = Daemon::start();
    let before = d.vm_peak_kib();
    for greeted in [false, true] {
        let mut raw = Raw::connect(&d.socket);
        if greeted {
            raw.hello();
        }
        raw.write(&u32::MAX.to_be_bytes()).expect("write header");
        let r = raw.read_response().expect("an error response");
        assert_eq!(r.id, CONNECTION_ERROR_ID);
        assert_eq!(error_code(&r), ErrorCode::FrameTooLarge);
        let msg = r.result.unwrap_err().message;
        assert!(msg.contains("4294967295") && msg.contains("1048576"), "{msg}");
        assert!(raw.is_closed(), "connection closed after the error");
    }
    let after = d.vm_peak_kib();
    // A 4 GiB reservation would show in VmPeak even untouched.
    assert!(
        after < before + 256 * 1024,
        "VmPeak grew from {before} KiB to {after} KiB"
    );
    assert_still_serving(&d);
}

#[test]
fn one_byte_over_the_configured_limit_is_refused() {
    let d = Daemon::builder().limit("max_frame_bytes", "4096").start();
    let mut c = d.client();
    assert_eq!(c.server().max_frame_bytes, 4096);
    let mut raw = Raw::connect(&d.socket);
    raw.hello();
    raw.write(&4097u32.to_be_bytes()).expect("write");
    assert_eq!(
        error_code(&raw.read_response().expect("error")),
        ErrorCode::FrameTooLarge
    );
    assert!(raw.is_closed());
    // The client library refuses to send what the daemon would refuse.
    let err = c.ping(vec![0; 5000]).expect_err("client-side limit");
    assert!(err.to_string().contains("exceeds the maximum of 4096"), "{err}");
    assert_still_serving(&d);
}

#[test]
fn http_request_and_random_garbage_get_an_error_and_a_close() {
    let d = Daemon::start();
    // Someone points an HTTP client at the socket: "GET " reads as a 1.2 GB length.
    let mut raw = Raw::connect(&d.socket);
    raw.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    assert_eq!(
        error_code(&raw.read_response().expect("error")),
        ErrorCode::FrameTooLarge
    );
    assert!(raw.is_closed());

    // A well-sized frame full of noise, before and after the hello.
    let mut noise = vec![0u8; 200];
    let mut x: u32 = 0x9e37_79b9;
    for b in &mut noise {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    for greeted in [false, true] {
        let mut raw = Raw::connect(&d.socket);
        if greeted {
            raw.hello();
        }
        raw.write_frame(&noise);
        let r = raw.read_response().expect("error");
        assert!(
            matches!(error_code(&r), ErrorCode::MalformedFrame | ErrorCode::UnknownRequest),
            "{r:?}"
        );
        assert!(raw.is_closed());
    }

    // An empty frame.
    let mut raw = Raw::connect(&d.socket);
    raw.write_frame(&[]);
    assert_eq!(
        error_code(&raw.read_response().expect("error")),
        ErrorCode::MalformedFrame
    );
    assert!(raw.is_closed());
    assert_still_serving(&d);
    assert!(d.log().contains("malformed frame"), "the daemon logs it");
}

#[test]
fn truncated_frame_then_disconnect_is_logged_and_harmless() {
    let d = Daemon::start();
    let mut raw = Raw::connect(&d.socket);
    raw.hello();
    let full = body(2, Operation::Ping { payload: vec![1; 100] });
    let mut frame = (full.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&full[..10]);
    raw.write(&frame).expect("write");
    drop(raw);
    assert_still_serving(&d);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !d.log().contains("in the middle of a frame") {
        assert!(std::time::Instant::now() < deadline, "log: {}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn wrong_protocol_version_is_refused_with_both_versions_named() {
    let d = Daemon::start();
    let mut raw = Raw::connect(&d.socket);
    raw.write_frame(&body(
        1,
        Operation::Hello(ClientHello {
            protocol_version: 999,
            client: "future/9".into(),
        }),
    ));
    let r = raw.read_response().expect("error");
    assert_eq!(r.id, 1, "the error answers the hello's id");
    assert_eq!(error_code(&r), ErrorCode::UnsupportedVersion);
    let msg = r.result.unwrap_err().message;
    assert!(msg.contains("protocol 999") && msg.contains("protocol 1"), "{msg}");
    assert!(raw.is_closed());
    assert_still_serving(&d);
}

#[test]
fn unknown_operation_is_answered_under_its_id_then_closed() {
    let d = Daemon::start();
    let mut raw = Raw::connect(&d.socket);
    raw.hello();
    // A request from a newer client: id 7, operation #200, some fields.
    let mut b = 7u64.to_le_bytes().to_vec();
    b.extend_from_slice(&200u32.to_le_bytes());
    b.extend_from_slice(&[1, 2, 3, 4]);
    raw.write_frame(&b);
    let r = raw.read_response().expect("error");
    assert_eq!(r.id, 7);
    assert_eq!(error_code(&r), ErrorCode::UnknownRequest);
    assert!(raw.is_closed());
    assert_still_serving(&d);
}

#[test]
fn requests_out_of_order_are_protocol_violations() {
    let d = Daemon::start();
    // Anything before the hello.
    let mut raw = Raw::connect(&d.socket);
    raw.write_frame(&body(1, Operation::Status));
    let r = raw.read_response().expect("error");
    assert_eq!(error_code(&r), ErrorCode::ProtocolViolation);
    assert!(r.result.unwrap_err().message.contains("first request must be hello"));
    assert!(raw.is_closed());

    // A second hello.
    let mut raw = Raw::connect(&d.socket);
    raw.hello();
    raw.write_frame(&body(
        2,
        Operation::Hello(ClientHello {
            protocol_version: 1,
            client: "again".into(),
        }),
    ));
    assert_eq!(
        error_code(&raw.read_response().expect("error")),
        ErrorCode::ProtocolViolation
    );
    assert!(raw.is_closed());
    assert_still_serving(&d);
}

#[test]
fn a_hostile_client_does_not_disturb_a_connected_one() {
    let d = Daemon::start();
    let mut good = d.client();
    good.ping(b"before".to_vec()).expect("ping");
    for _ in 0..20 {
        let mut raw = Raw::connect(&d.socket);
        raw.write(&u32::MAX.to_be_bytes()).expect("write");
        let _ = raw.read_response();
    }
    assert_eq!(good.ping(b"after".to_vec()).expect("ping"), b"after");
}
