//! The blocking client over `std::os::unix::net::UnixStream`.

use std::{
    collections::VecDeque,
    io::{self, IoSlice, Read},
    os::{
        fd::{AsRawFd, BorrowedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    codec,
    error::{ClientError, ErrorCode},
    frame::MAX_FRAME_CEILING,
    message::{Operation, Reply, Request, Response, ServerHello, CONNECTION_ERROR_ID},
    recv::RecvBuf,
};

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/hsmd/hsmd.sock";

/// The socket a client uses when it is given none: `$HSMD_SOCKET` if set and
/// not empty; else the caller's own daemon's (`hsmd --user`),
/// `$XDG_RUNTIME_DIR/hsmd/hsmd.sock`, if that exists; else [`DEFAULT_SOCKET`].
#[must_use]
pub fn default_socket() -> PathBuf {
    if let Some(socket) = std::env::var_os("HSMD_SOCKET").filter(|s| !s.is_empty()) {
        return PathBuf::from(socket);
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|s| !s.is_empty())
        .map(|dir| PathBuf::from(dir).join("hsmd/hsmd.sock"))
        .filter(|own| own.is_absolute() && own.exists())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Name and version sent in the hello, for the daemon's logs.
    pub client_name: String,
    /// How long to wait for any one response; `None` waits forever.
    pub timeout: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            client_name: concat!("hsmd-protocol/", env!("CARGO_PKG_VERSION")).to_owned(),
            timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// A connection to hsmd that has completed the hello.
///
/// Calls are synchronous; for pipelining, [`Client::send`] several requests and
/// then [`Client::recv`] their responses, matching them by id.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    server: ServerHello,
    next_id: u64,
    recv: RecvBuf,
    /// Reused for every outgoing frame.
    send_buf: Vec<u8>,
    timeout: Option<Duration>,
    /// Answers to pipelined requests that arrived while [`Client::call`]
    /// waited for its own; [`Client::recv`] hands them out first, in order.
    early: VecDeque<Response>,
}

impl Client {
    /// Connects to the socket `$HSMD_SOCKET` names, or else to
    /// [`DEFAULT_SOCKET`], with default options, as hsmctl does.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub fn connect_default() -> Result<Self, ClientError> {
        Self::connect(default_socket())
    }

    /// Connects to the socket at `path` with default options and says hello.
    ///
    /// # Errors
    /// [`ClientError::Connect`] if the socket cannot be reached;
    /// [`ClientError::Daemon`] if the daemon refuses the connection (permission,
    /// connection limit, protocol version).
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::connect_with(path, &ClientOptions::default())
    }

    /// Connects with explicit options.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub fn connect_with(path: impl AsRef<Path>, options: &ClientOptions) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: PathBuf::from(path),
            source,
        })?;
        stream.set_read_timeout(options.timeout).map_err(ClientError::Io)?;
        stream.set_write_timeout(options.timeout).map_err(ClientError::Io)?;
        let mut client = Self {
            stream,
            server: crate::before_hello(),
            next_id: 1,
            recv: RecvBuf::default(),
            send_buf: Vec::new(),
            timeout: options.timeout,
            early: VecDeque::new(),
        };
        // A daemon that refuses the connection writes its error and closes, possibly
        // before our hello lands; the error is still there to read.
        let sent = client.send(crate::hello(&options.client_name));
        let response = match client.recv() {
            Ok(r) => r,
            Err(e) => return Err(sent.err().unwrap_or(e)),
        };
        client.server = crate::expect_hello(response)?;
        Ok(client)
    }

    /// What the daemon said in its hello.
    #[must_use]
    pub fn server(&self) -> &ServerHello {
        &self.server
    }

    /// Sends one request without waiting; returns its id.
    ///
    /// # Errors
    /// [`ClientError::Frame`] if the request exceeds the daemon's frame limit;
    /// [`ClientError::Io`] if the write fails.
    pub fn send(&mut self, op: Operation) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send_buf.clear();
        codec::encode_frame_into(&Request { id, op }, self.server.max_frame_bytes, &mut self.send_buf)?;
        send_all(&self.stream, &self.send_buf).map_err(ClientError::Io)?;
        Ok(id)
    }

    /// Sends several requests in one write without waiting, and returns their
    /// ids in order. Pipelining this way costs one system call for the lot,
    /// where [`Client::send`] costs one each; the daemon answers each request
    /// on its own, possibly out of order.
    ///
    /// # Errors
    /// As [`Client::send`]. If one request cannot be encoded, none is sent.
    pub fn send_many(&mut self, ops: impl IntoIterator<Item = Operation>) -> Result<Vec<u64>, ClientError> {
        self.send_buf.clear();
        let first = self.next_id;
        let mut ids = Vec::new();
        for op in ops {
            let id = first + ids.len() as u64;
            codec::encode_frame_into(&Request { id, op }, self.server.max_frame_bytes, &mut self.send_buf)?;
            ids.push(id);
        }
        self.next_id = first + ids.len() as u64;
        send_all(&self.stream, &self.send_buf).map_err(ClientError::Io)?;
        Ok(ids)
    }

    /// Receives the next response, whichever request it answers.
    ///
    /// # Errors
    /// [`ClientError::Closed`] if the daemon closed the connection,
    /// [`ClientError::TimedOut`] after the configured timeout.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        if let Some(r) = self.early.pop_front() {
            return Ok(r);
        }
        self.read_response()
    }

    /// The answer to request `id`, keeping any other answer that comes first
    /// (to requests sent with [`Client::send`] and not yet received) for
    /// [`Client::recv`]. A connection-level error answers every request.
    fn wait_for(&mut self, id: u64) -> Result<Response, ClientError> {
        if let Some(i) = self.early.iter().position(|r| r.id == id) {
            if let Some(r) = self.early.remove(i) {
                return Ok(r);
            }
        }
        loop {
            let r = self.read_response()?;
            if r.id == id || r.id == CONNECTION_ERROR_ID {
                return Ok(r);
            }
            self.early.push_back(r);
        }
    }

    fn read_response(&mut self) -> Result<Response, ClientError> {
        loop {
            if let Some(body) = self.recv.next_frame(MAX_FRAME_CEILING)? {
                return Ok(codec::decode_body(body)?);
            }
            match self.stream.read(self.recv.spare()) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.recv.filled(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(ClientError::TimedOut(self.timeout.unwrap_or_default()));
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ClientError::Closed),
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
    }

    /// Several key operations (`Sign`, `Verify`, `Encrypt`, `Decrypt`, `Mac`,
    /// `MacVerify`) in one frame, at most [`crate::MAX_BATCH_ITEMS`]; returns
    /// one result per item, in order. One round trip for many operations is
    /// how a busy client gets the most signatures per second out of hsmd.
    ///
    /// # Errors
    /// As [`Client::call`]; an item's own failure is in its result.
    pub fn batch(&mut self, items: Vec<crate::BatchItem>) -> Result<Vec<Result<Reply, crate::WireError>>, ClientError> {
        match self.call(Operation::Batch { items })? {
            Reply::Batch(results) => Ok(results),
            other => Err(crate::unexpected("batch", &other)),
        }
    }

    /// Sends `op` and waits for its answer.
    ///
    /// # Errors
    /// [`ClientError::Daemon`] with the daemon's code if it refused; transport
    /// errors as for [`Client::send`] and [`Client::recv`].
    pub fn call(&mut self, op: Operation) -> Result<Reply, ClientError> {
        let id = self.send(op)?;
        crate::expect_id(self.wait_for(id)?, id)
    }

    /// Sends `op` with the open file `fd` attached (`SCM_RIGHTS`), for the
    /// requests that carry one ([`Operation::carries_fd`]), and waits for the
    /// answer with no response timeout: a whole-file transfer takes as long as
    /// the file needs. The daemon gets its own copy of the descriptor, so it
    /// reads or writes with the access the caller opened it with, and nothing
    /// more.
    ///
    /// # Errors
    /// [`ClientError::Io`] if the request cannot be sent; otherwise as
    /// [`Client::call`].
    pub fn call_with_fd(&mut self, op: Operation, fd: BorrowedFd<'_>) -> Result<Reply, ClientError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let id = self.next_id;
        self.next_id += 1;
        self.send_buf.clear();
        codec::encode_frame_into(&Request { id, op }, self.server.max_frame_bytes, &mut self.send_buf)?;
        let fds = [fd.as_raw_fd()];
        let sent = loop {
            match sendmsg::<()>(
                self.stream.as_raw_fd(),
                &[IoSlice::new(&self.send_buf)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(ClientError::Io(e.into())),
            }
        };
        // The descriptor travelled with the first byte; the rest of a long
        // frame follows as plain bytes.
        if let Some(rest) = self.send_buf.get(sent..) {
            send_all(&self.stream, rest).map_err(ClientError::Io)?;
        }
        self.stream.set_read_timeout(None).map_err(ClientError::Io)?;
        let response = self.wait_for(id);
        self.stream.set_read_timeout(self.timeout).map_err(ClientError::Io)?;
        crate::expect_id(response?, id)
    }
}

/// Whether `e` is the daemon refusing with `code`.
#[must_use]
pub fn is_code(e: &ClientError, code: ErrorCode) -> bool {
    e.code() == Some(code)
}

/// Writes all of `buf` with send(2) and `MSG_NOSIGNAL`: a daemon that has
/// closed the connection is an error here, never a SIGPIPE, whatever the
/// calling program does with that signal (hsmctl restores its default, so
/// that `hsmctl … | head` ends quietly).
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    while !buf.is_empty() {
        match send(stream.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
