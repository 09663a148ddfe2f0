//! The async client (feature `tokio`) against a real daemon: the same calls and
//! errors as the blocking one.

use std::time::Duration;

use hsmd_tests::Daemon;
use protocol::{AsyncClient, ClientOptions, ErrorCode, Operation, Reply};

#[tokio::test(flavor = "current_thread")]
async fn async_client_handshakes_calls_and_pipelines() {
    let d = Daemon::builder().dev().start();
    let mut c = AsyncClient::connect(&d.socket).await.expect("connect");
    assert_eq!(c.server().protocol_version, protocol::PROTOCOL_VERSION);
    assert!(c.server().features.iter().any(|f| f == "dev-mode"));

    assert_eq!(c.status().await.expect("status").pid, d.pid());
    assert_eq!(c.whoami().await.expect("whoami").uid, nix::unistd::getuid().as_raw());
    assert_eq!(c.ping(b"abc".to_vec()).await.expect("ping"), b"abc");

    let slow = c.send(Operation::DebugDelay { millis: 300 }).await.expect("send");
    let fast = c.send(Operation::Ping { payload: vec![9] }).await.expect("send");
    assert_eq!(c.recv().await.expect("recv").id, fast);
    let r = c.recv().await.expect("recv");
    assert_eq!((r.id, r.result), (slow, Ok(Reply::Delayed { millis: 300 })));

    c.call(Operation::KeyCreate {
        name: "a".into(),
        key_type: protocol::KeyType::HmacSha256,
        usages: vec![],
        options: protocol::KeyOptions::default(),
    })
    .await
    .expect("create");
    let results = c
        .batch(vec![
            protocol::BatchItem::Mac(protocol::MacArgs {
                name: "a".into(),
                data: b"x".to_vec(),
            }),
            protocol::BatchItem::Mac(protocol::MacArgs {
                name: "nope".into(),
                data: b"x".to_vec(),
            }),
        ])
        .await
        .expect("batch");
    assert!(matches!(results[0], Ok(Reply::MacTag { version: 1, .. })));
    assert_eq!(results[1].as_ref().expect_err("no such key").code, ErrorCode::NotFound);
}

#[tokio::test(flavor = "current_thread")]
async fn async_client_reports_refusals_and_timeouts() {
    let d = Daemon::builder().dev().start();
    let mut c = AsyncClient::connect_with(
        &d.socket,
        ClientOptions {
            client_name: "async-test".into(),
            timeout: Some(Duration::from_millis(200)),
        },
    )
    .await
    .expect("connect");
    let err = c
        .call(Operation::DebugDelay { millis: 20_000 })
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
    let err = c
        .call(Operation::DebugDelay { millis: 1000 })
        .await
        .expect_err("times out");
    assert!(matches!(err, protocol::ClientError::TimedOut(_)), "{err}");

    let err = AsyncClient::connect(d.dir().join("nothing.sock"))
        .await
        .expect_err("no socket");
    assert!(err.is_unreachable());
}

/// `call` while answers to earlier pipelined requests are still unread keeps
/// those answers for `recv`, in both clients, instead of failing on them.
#[tokio::test(flavor = "current_thread")]
async fn a_call_keeps_the_pipelined_answers_it_did_not_ask_for() {
    let d = Daemon::builder().dev().start();
    let mut sync = d.client();
    let first = sync.send(Operation::Ping { payload: vec![1] }).expect("send");
    let second = sync.send(Operation::Ping { payload: vec![2] }).expect("send");
    assert_eq!(sync.status().expect("a call with two answers unread").pid, d.pid());
    let r = sync.recv().expect("kept");
    assert_eq!((r.id, r.result), (first, Ok(Reply::Pong { payload: vec![1] })));
    assert_eq!(sync.recv().expect("kept").id, second);

    let mut c = AsyncClient::connect(&d.socket).await.expect("connect");
    let first = c.send(Operation::Ping { payload: vec![3] }).await.expect("send");
    assert_eq!(c.ping(b"x".to_vec()).await.expect("ping"), b"x");
    let r = c.recv().await.expect("kept");
    assert_eq!((r.id, r.result), (first, Ok(Reply::Pong { payload: vec![3] })));
}
