//! Harness for end-to-end tests: each test starts its own real `hsmd` process in
//! a fresh temp dir (own socket, state and config), so tests run in parallel and
//! talk to the daemon only through its public surfaces: the socket (via the
//! `protocol` client or raw bytes) and the `hsmctl` binary.

pub mod agent_bench;
pub mod backup_bench;
pub mod file_bench;
pub mod measure;
pub mod openssh;
pub mod pkcs11_bench;
pub mod soak;

use std::{
    fs,
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use protocol::{codec, frame::HEADER_LEN, Client, ClientOptions, Response};
use tempfile::TempDir;

mod checkers;
mod daemon;
mod devices;

pub use checkers::*;
pub use daemon::*;
pub use devices::*;

/// Checks shared by the end-to-end tests.
pub mod check {
    use std::{path::Path, process::Output};

    /// The standard output of a command that must have succeeded; fails the
    /// test with its whole output otherwise.
    pub fn ok(out: &Output) -> String {
        assert!(out.status.success(), "command failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The standard error of an hsmctl run that hsmd refused with `code`
    /// (exit 1, the code in parentheses).
    pub fn refused(out: &Output, code: &str) -> String {
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains(&format!("({code})")), "expected {code}: {err}");
        err
    }

    /// The JSON document a successful command printed.
    #[must_use]
    pub fn json(out: &Output) -> serde_json::Value {
        serde_json::from_str(&ok(out)).expect("one JSON document")
    }

    /// A path as the `&str` an argument list takes.
    #[must_use]
    pub fn p(path: &Path) -> &str {
        path.to_str().expect("a UTF-8 path")
    }
}
