//! Many requests in flight on one connection: send them all, then read the
//! answers, matching them to their requests by id (answers may come in any
//! order). One round trip's latency is paid once, not per request.
//!
//! `cargo run -p hsmd-protocol --example pipelined [COUNT]`

use std::collections::HashMap;

use protocol::{Client, Operation, Reply};

fn main() -> Result<(), protocol::ClientError> {
    let count: u8 = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(16);
    let mut hsmd = Client::connect_default()?;
    let started = std::time::Instant::now();
    let ids = hsmd.send_many((0..count).map(|i| Operation::Ping { payload: vec![i] }))?;
    let mut sent: HashMap<u64, u8> = ids.into_iter().zip(0..count).collect();
    while !sent.is_empty() {
        let answer = hsmd.recv()?;
        let Some(i) = sent.remove(&answer.id) else {
            eprintln!("an answer to request {} that was not asked", answer.id);
            continue;
        };
        match answer.result {
            Ok(Reply::Pong { payload }) if payload == [i] => {}
            Ok(other) => eprintln!("request {i}: unexpected answer {}", other.name()),
            Err(e) => eprintln!("request {i}: {e}"),
        }
    }
    println!("{count} pings answered in {:?}", started.elapsed());
    Ok(())
}
