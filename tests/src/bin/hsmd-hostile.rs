//! A hostile local user, for the tests that check one user cannot lock out
//! the others. The tests run it as another uid (`setpriv`); it does one thing,
//! prints one line saying how hsmd answered, and then holds on to everything
//! it opened until it is killed.
//!
//! ```text
//! hsmd-hostile silent-pipes SOCKET N   N connections, each storing from a pipe nobody writes to
//! hsmd-hostile connections SOCKET N    N connections that say hello and nothing more
//! hsmd-hostile sessions SOCKET N       one connection opening N frame-path store sessions
//! hsmd-hostile half-frames SOCKET N    N connections, each sending the header of a 1 MiB
//!                                      frame and 4 KiB of it, then nothing
//! hsmd-hostile flood SOCKET N          N rounds of mixed hostile traffic, then exits
//! hsmd-hostile soak SOCKET SECONDS     flood rounds for that long, then exits
//! ```
//!
//! A flood round: a `key info` and a `sign` for a key name never seen before,
//! a connection that sends a malformed frame, one that sends half a header and
//! leaves, one that says hello and leaves, a few pings.
//!
//! The line is `ok=K refused=M first_refusal=<message>`; for `silent-pipes`,
//! `ok` counts stores still waiting on their pipes after two seconds.

use std::{
    io::Write as _,
    os::fd::AsFd as _,
    process::ExitCode,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use protocol::{Client, ClientError, Operation};

fn report(ok: usize, refused: &[String]) {
    let first = refused.first().map_or("", String::as_str);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ok={ok} refused={} first_refusal={first}", refused.len());
    let _ = out.flush();
}

fn hold_forever() -> ! {
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

fn message(e: &ClientError) -> String {
    format!("({}) {e}", e.code().map_or("none", protocol::ErrorCode::as_str))
}

fn silent_pipes(socket: &str, n: usize) -> ! {
    let (tx, rx) = mpsc::channel();
    let mut writers = Vec::new();
    for i in 0..n {
        let Ok((rd, wr)) = nix::unistd::pipe() else {
            eprintln!("cannot make a pipe");
            std::process::exit(2);
        };
        // Kept open and never written: the store waits on it.
        writers.push(wr);
        let tx = tx.clone();
        let socket = socket.to_owned();
        thread::spawn(move || {
            let result = Client::connect(&socket).and_then(|mut c| {
                c.call_with_fd(
                    Operation::FileStoreFd {
                        name: format!("silent-{i}"),
                        key: "files".into(),
                        chunk_size: 65536,
                    },
                    rd.as_fd(),
                )
            });
            let _ = tx.send(result.map(drop).map_err(|e| message(&e)));
            hold_forever();
        });
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut refused = Vec::new();
    let mut answered = 0;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(Err(why)) => {
                answered += 1;
                refused.push(why);
            }
            Ok(Ok(())) => answered += 1,
            Err(_) => break,
        }
    }
    // Those not answered yet are stores held open by their silent pipes.
    report(n - answered, &refused);
    let _keep = writers;
    hold_forever();
}

fn connections(socket: &str, n: usize) -> ! {
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..n {
        match Client::connect(socket) {
            Ok(c) => open.push(c),
            Err(e) => refused.push(message(&e)),
        }
    }
    report(open.len(), &refused);
    hold_forever();
}

fn sessions(socket: &str, n: usize) -> ! {
    let mut c = match Client::connect(socket) {
        Ok(c) => c,
        Err(e) => {
            report(0, &[message(&e)]);
            hold_forever();
        }
    };
    let mut ok = 0;
    let mut refused = Vec::new();
    for i in 0..n {
        match c.call(Operation::FileStoreBegin {
            name: format!("held-{i}"),
            key: "files".into(),
            chunk_size: 65536,
        }) {
            Ok(_) => ok += 1,
            Err(e) => refused.push(message(&e)),
        }
    }
    report(ok, &refused);
    hold_forever();
}

fn half_frames(socket: &str, n: usize) -> ! {
    use std::io::Write as _;
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for i in 0..n {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(mut raw) => {
                // Under the default limits.max_frame_bytes (1 MiB).
                let mut frame = (1024 * 1024 - 64u32).to_be_bytes().to_vec();
                frame.extend(std::iter::repeat_n(i as u8, 4096));
                match raw.write_all(&frame) {
                    Ok(()) => open.push(raw),
                    Err(e) => refused.push(e.to_string()),
                }
            }
            Err(e) => refused.push(e.to_string()),
        }
    }
    report(open.len(), &refused);
    hold_forever();
}

/// One round of hostile traffic per call; `round` makes the names unique.
fn flood_round(socket: &str, c: &mut Client, round: usize) {
    use std::io::Write as _;
    let name = format!("no-such-key-{round}-{}", std::process::id());
    let _ = c.call(Operation::KeyInfo { name: name.clone() });
    let _ = c.call(Operation::Sign(protocol::SignArgs {
        name,
        digest: vec![0; 32],
    }));
    let _ = c.ping(vec![round as u8; 512]);
    // Raw connections: garbage after a valid header, half a header, hello and leave.
    if let Ok(mut raw) = std::os::unix::net::UnixStream::connect(socket) {
        let mut frame = 64u32.to_be_bytes().to_vec();
        frame.extend((0..64).map(|i| (i * 7 + round) as u8));
        let _ = raw.write_all(&frame);
        let _ = raw.shutdown(std::net::Shutdown::Write);
        let _ = std::io::copy(&mut raw, &mut std::io::sink());
    }
    if let Ok(mut raw) = std::os::unix::net::UnixStream::connect(socket) {
        let _ = raw.write_all(&[0, 0]);
    }
    if round.is_multiple_of(4) {
        let _ = Client::connect(socket).map(|mut c| c.ping(Vec::new()));
    }
    // A large frame's header and part of its body, then gone: the daemon
    // made room for all of it.
    if round.is_multiple_of(8) {
        if let Ok(mut raw) = std::os::unix::net::UnixStream::connect(socket) {
            let len = 1000 * 1024 - (round % 1000) as u32;
            let mut frame = len.to_be_bytes().to_vec();
            frame.extend(std::iter::repeat_n(round as u8, 300 * 1024));
            let _ = raw.write_all(&frame);
        }
    }
    // A large request answered in full (a 512 KiB ping and its echo).
    if round.is_multiple_of(16) {
        let _ = c.ping(vec![1; 512 * 1024]);
    }
    // A small file stored and read back one frame at a time (needs a key
    // named `files`).
    if round.is_multiple_of(32) {
        store_and_retrieve(c, round);
    }
}

fn store_and_retrieve(c: &mut Client, round: usize) {
    use protocol::{Reply, SecretBytes};
    let Ok(Reply::FileSession { session, .. }) = c.call(Operation::FileStoreBegin {
        name: format!("soak-{round}"),
        key: "files".into(),
        chunk_size: 65536,
    }) else {
        return;
    };
    let _ = c.call(Operation::FileStoreChunk {
        session,
        index: 0,
        last: true,
        bytes: SecretBytes::new(vec![round as u8; 20_000]),
    });
    let Ok(Reply::File(info)) = c.call(Operation::FileStoreFinish { session }) else {
        return;
    };
    if let Ok(Reply::FileSession { session, .. }) = c.call(Operation::FileRetrieveBegin {
        token: info.token.clone(),
    }) {
        let _ = c.call(Operation::FileRetrieveNext { session });
    }
    let _ = c.call(Operation::FileDelete { token: info.token });
}

fn flood(socket: &str, n: usize) -> ExitCode {
    let mut c = match Client::connect(socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot connect: {e}");
            return ExitCode::from(1);
        }
    };
    for round in 0..n {
        flood_round(socket, &mut c, round);
    }
    ExitCode::SUCCESS
}

fn soak(socket: &str, length: Duration) -> ExitCode {
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < length {
        match Client::connect(socket) {
            Ok(mut c) => {
                // A fresh connection now and then: churn.
                for _ in 0..64 {
                    flood_round(socket, &mut c, round);
                    round += 1;
                }
            }
            Err(e) => {
                eprintln!("cannot connect: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
    println!("{round} rounds in {:?}", started.elapsed());
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(what), Some(socket), Some(n)) = (
        args.get(1),
        args.get(2),
        args.get(3).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: hsmd-hostile silent-pipes|connections|sessions|half-frames|flood|soak SOCKET N");
        return ExitCode::from(2);
    };
    match what.as_str() {
        "silent-pipes" => silent_pipes(socket, n),
        "connections" => connections(socket, n),
        "sessions" => sessions(socket, n),
        "half-frames" => half_frames(socket, n),
        "flood" => flood(socket, n),
        "soak" => soak(socket, Duration::from_secs(n as u64)),
        _ => {
            eprintln!("unknown action {what:?}");
            ExitCode::from(2)
        }
    }
}
