//! A hostile local user, for the tests that check one user cannot lock out
//! the others. The tests run it as another uid (`setpriv`); it does one thing,
//! prints one line saying how hsmd answered, and then holds on to everything
//! it opened until it is killed.
//!
//! ```text
//! hsmd-hostile silent-pipes SOCKET N   N connections, each storing from a pipe nobody writes to
//! hsmd-hostile connections SOCKET N    N connections that say hello and nothing more
//! hsmd-hostile sessions SOCKET N       one connection opening N frame-path store sessions
//! ```
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(what), Some(socket), Some(n)) = (
        args.get(1),
        args.get(2),
        args.get(3).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: hsmd-hostile silent-pipes|connections|sessions SOCKET N");
        return ExitCode::from(2);
    };
    match what.as_str() {
        "silent-pipes" => silent_pipes(socket, n),
        "connections" => connections(socket, n),
        "sessions" => sessions(socket, n),
        _ => {
            eprintln!("unknown action {what:?}");
            ExitCode::from(2)
        }
    }
}
