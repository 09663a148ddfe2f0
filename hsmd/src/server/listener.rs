//! Getting a listening socket: inherited from systemd, or bound by us with the
//! configured mode and group, never stealing a live daemon's socket.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{
            fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt},
            net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream},
        },
    },
    path::{Path, PathBuf},
};

use nix::{
    sys::{
        socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr},
        stat::{umask, Mode},
    },
    unistd::{chown, Group},
};
use thiserror::Error;
use tokio::net::UnixListener;

use crate::config::SocketConfig;

/// Why the daemon could not get a socket to listen on.
#[derive(Debug, Error)]
pub enum ListenError {
    /// A live daemon answers on the path, or holds its lock.
    #[error("another hsmd is running on {}; stop it first, or give this one another socket path", path.display())]
    AnotherDaemon {
        /// The socket path.
        path: PathBuf,
    },
    /// Something that is not a socket sits at the path; we will not delete it.
    #[error("{} exists and is not a socket; refusing to replace it (move it away, or choose another socket.path)", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The configured socket group does not exist.
    #[error("socket.group {group:?} does not exist; create it (systemd-sysusers, groupadd) or change socket.group")]
    NoSuchGroup {
        /// The group name.
        group: String,
    },
    /// A system call on the socket or its directory failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What we were doing.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// systemd passed descriptors we cannot use.
    #[error("socket activation: {0}")]
    Activation(String),
}

/// A listening socket and what we must do with it at exit.
#[derive(Debug)]
pub struct Listener {
    /// The socket, registered with the reactor.
    pub socket: UnixListener,
    /// Where it listens (for messages).
    pub path: PathBuf,
    origin: Origin,
}

#[derive(Debug)]
enum Origin {
    /// systemd owns the socket file; we leave it alone.
    Activated,
    /// We created the file; we remove it at exit if it is still ours.
    Bound { inode: u64, _lock: File },
}

impl Listener {
    /// Whether the socket came from systemd.
    #[must_use]
    pub fn is_activated(&self) -> bool {
        matches!(self.origin, Origin::Activated)
    }

    /// Stops listening, and removes the socket file if we created it and it is
    /// still the same file (a successor may have replaced it).
    pub fn close(self) {
        let Self { socket, path, origin } = self;
        drop(socket);
        if let Origin::Bound { inode, _lock } = origin {
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.ino() == inode => {
                    if let Err(e) = fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove socket file");
                    }
                }
                _ => tracing::debug!(path = %path.display(), "socket file already gone or replaced"),
            }
            // `_lock` is released here, after the file is gone.
        }
    }
}

/// The sockets systemd passed (LISTEN_FDS).
#[derive(Debug, Default)]
pub struct Activated {
    /// The hsmd socket: the one named `hsmd`, or the only one.
    pub hsmd: Option<Listener>,
    /// The SSH agent socket: the one named `ssh-agent`
    /// (`FileDescriptorName=ssh-agent` in hsmd-ssh-agent.socket).
    pub ssh_agent: Option<Listener>,
}

/// Takes the sockets systemd passed, if any.
///
/// # Errors
/// [`ListenError::Activation`] if the descriptors are not what hsmd.socket
/// and hsmd-ssh-agent.socket pass.
pub fn from_systemd() -> Result<Activated, ListenError> {
    let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()
        .map_err(|e| ListenError::Activation(format!("invalid LISTEN_* environment: {e}")))?
        .collect();
    let mut activated = Activated::default();
    match fds.as_slice() {
        [] => {}
        [(fd, name)] if name != "ssh-agent" => activated.hsmd = Some(adopt(*fd)?),
        many => {
            for (fd, name) in many {
                match name.as_str() {
                    "hsmd" => activated.hsmd = Some(adopt(*fd)?),
                    "ssh-agent" => activated.ssh_agent = Some(adopt(*fd)?),
                    other => tracing::warn!(fd, name = other, "ignoring a passed socket hsmd has no use for"),
                }
            }
            if activated.hsmd.is_none() && activated.ssh_agent.is_none() {
                return Err(ListenError::Activation(format!(
                    "{} sockets were passed and none is named \"hsmd\" (FileDescriptorName=hsmd in hsmd.socket)",
                    many.len()
                )));
            }
        }
    }
    Ok(activated)
}

/// Owns a descriptor systemd passed, once it is checked to be a listening
/// Unix stream socket.
fn adopt(fd: RawFd) -> Result<Listener, ListenError> {
    // SAFETY: systemd (or systemd-socket-activate) passed this descriptor to this
    // process (LISTEN_PID matched) for us to own; nothing else in hsmd uses it.
    #[allow(unsafe_code)]
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let kind = getsockopt(&owned, sockopt::SockType)
        .map_err(|e| ListenError::Activation(format!("descriptor {fd} is not a socket: {e}")))?;
    let listening = getsockopt(&owned, sockopt::AcceptConn).unwrap_or(false);
    let addr: UnixAddr = getsockname(owned.as_raw_fd())
        .map_err(|e| ListenError::Activation(format!("descriptor {fd} is not a Unix socket: {e}")))?;
    if kind != SockType::Stream || !listening {
        return Err(ListenError::Activation(format!(
            "descriptor {fd} is not a listening stream socket (ListenStream= in the .socket unit)"
        )));
    }
    let path = addr.path().map_or_else(|| PathBuf::from("<abstract>"), Path::to_owned);
    let std = StdUnixListener::from(owned);
    let socket = into_tokio(std, &path)?;
    Ok(Listener {
        socket,
        path,
        origin: Origin::Activated,
    })
}

/// Binds the configured socket path.
///
/// # Errors
/// [`ListenError::AnotherDaemon`] if a live daemon has it; other variants for
/// what the system refused.
pub fn bind(config: &SocketConfig) -> Result<Listener, ListenError> {
    let path = config.path.clone();
    let io_err = |action, source| ListenError::Io {
        action,
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|e| io_err("create the socket's directory for", e))?;
        }
    }
    let gid = match &config.group {
        Some(name) => Some(
            Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| ListenError::NoSuchGroup { group: name.clone() })?
                .gid,
        ),
        None => None,
    };

    // The lock file serializes daemons that start at the same moment; the
    // connect probe below catches a live daemon that predates lock files.
    let mut lock_path = path.clone().into_os_string();
    lock_path.push(".lock");
    let lock = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| io_err("open the lock file beside", e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => return Err(ListenError::AnotherDaemon { path }),
        Err(fs::TryLockError::Error(e)) => return Err(io_err("lock the lock file beside", e)),
    }

    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => match StdUnixStream::connect(&path) {
            Ok(_) => return Err(ListenError::AnotherDaemon { path }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing stale socket left by a daemon that is gone");
                fs::remove_file(&path).map_err(|e| io_err("remove the stale socket", e))?;
            }
            Err(e) => return Err(io_err("probe the existing socket", e)),
        },
        Ok(_) => return Err(ListenError::NotASocket { path }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect", e)),
    }

    // Bind under a tight umask so the socket is never reachable with looser
    // permissions than configured, not even between bind and chmod.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = StdUnixListener::bind(&path);
    umask(old);
    let std = bound.map_err(|e| io_err("bind", e))?;
    if let Some(gid) = gid {
        chown(&path, None, Some(gid)).map_err(|e| io_err("set the group of", e.into()))?;
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(config.mode.0)).map_err(|e| io_err("set the mode of", e))?;
    let inode = fs::symlink_metadata(&path).map_err(|e| io_err("inspect", e))?.ino();
    let socket = into_tokio(std, &path)?;
    Ok(Listener {
        socket,
        path,
        origin: Origin::Bound { inode, _lock: lock },
    })
}

fn into_tokio(std: StdUnixListener, path: &Path) -> Result<UnixListener, ListenError> {
    let io_err = |source| ListenError::Io {
        action: "listen on",
        path: path.to_owned(),
        source,
    };
    std.set_nonblocking(true).map_err(io_err)?;
    UnixListener::from_std(std).map_err(io_err)
}
