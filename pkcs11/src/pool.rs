//! Connections to hsmd, shared by every session and thread of the process.
//!
//! A call takes an idle connection (or opens one), makes its request and
//! gives the connection back, so as many requests run at once as the host
//! program has threads calling, whatever its sessions. Each connection is the
//! process's own: hsmd identifies it by the kernel's peer credentials.

use std::{
    path::PathBuf,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use protocol::{Client, ClientError, ClientOptions};

/// Idle connections kept open; more are closed when returned.
const MAX_IDLE: usize = 16;

/// How long one request may take before the module gives up on hsmd.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The process's connections to one hsmd.
#[derive(Debug)]
pub struct Pool {
    socket: PathBuf,
    options: ClientOptions,
    idle: Mutex<Vec<Client>>,
    /// The process that opened the idle connections: a forked child must not
    /// share its parent's (their requests' answers would interleave).
    pid: u32,
}

impl Pool {
    /// A pool for the daemon listening at `socket`; connects lazily.
    #[must_use]
    pub fn new(socket: PathBuf) -> Self {
        let program = std::env::args_os()
            .next()
            .and_then(|a| PathBuf::from(a).file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        Self {
            socket,
            options: ClientOptions {
                client_name: format!("hsmd-pkcs11/{} ({program})", env!("CARGO_PKG_VERSION")),
                timeout: Some(TIMEOUT),
            },
            idle: Mutex::new(Vec::new()),
            pid: std::process::id(),
        }
    }

    /// The socket this pool connects to.
    #[must_use]
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Runs `f` on a connection. A pooled connection that turns out to be
    /// closed (hsmd restarted, or closed it for idling) is replaced by a new
    /// one and `f` tried once more; a daemon's refusal is returned as it is.
    ///
    /// # Errors
    /// What `f` or connecting returns.
    pub fn call<T>(&self, mut f: impl FnMut(&mut Client) -> Result<T, ClientError>) -> Result<T, ClientError> {
        if let Some(mut client) = self.take_idle() {
            match f(&mut client) {
                Err(e) if is_stale(&e) => {}
                result => {
                    self.give_back(client, &result);
                    return result;
                }
            }
        }
        let mut client = Client::connect_with(&self.socket, &self.options)?;
        let result = f(&mut client);
        self.give_back(client, &result);
        result
    }

    fn take_idle(&self) -> Option<Client> {
        if std::process::id() != self.pid {
            return None;
        }
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop()
    }

    fn give_back<T>(&self, client: Client, result: &Result<T, ClientError>) {
        let reusable = match result {
            Ok(_) => true,
            Err(ClientError::Daemon(w)) => !matches!(
                w.code,
                protocol::ErrorCode::ShuttingDown | protocol::ErrorCode::IdleTimeout
            ),
            Err(_) => false,
        };
        if !reusable || std::process::id() != self.pid {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(client);
        }
    }

    /// Closes the idle connections (at `C_Finalize`).
    pub fn clear(&self) {
        if std::process::id() == self.pid {
            self.idle.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }
}

/// Whether an error means the connection was dead before the request (so a
/// fresh connection may succeed), not that hsmd refused it.
fn is_stale(e: &ClientError) -> bool {
    match e {
        ClientError::Io(_) | ClientError::Closed => true,
        ClientError::Daemon(w) => matches!(w.code, protocol::ErrorCode::IdleTimeout),
        _ => false,
    }
}
