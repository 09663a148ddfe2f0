//! The async client over `tokio::net::UnixStream` (feature `tokio`).

use std::path::{Path, PathBuf};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

use crate::{
    client::ClientOptions,
    codec,
    error::ClientError,
    frame::MAX_FRAME_CEILING,
    message::{Operation, Reply, Request, Response, ServerHello},
    recv::RecvBuf,
};

/// The async twin of [`crate::Client`]; same calls, same errors.
#[derive(Debug)]
pub struct AsyncClient {
    stream: UnixStream,
    server: ServerHello,
    next_id: u64,
    recv: RecvBuf,
    /// Reused for every outgoing frame.
    send_buf: Vec<u8>,
    options: ClientOptions,
    /// Answers to pipelined requests that arrived while [`AsyncClient::call`]
    /// waited for its own; [`AsyncClient::recv`] hands them out first.
    early: std::collections::VecDeque<Response>,
}

impl AsyncClient {
    /// Connects to the socket at `path` and says hello.
    ///
    /// # Errors
    /// As [`crate::Client::connect`].
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::connect_with(path, ClientOptions::default()).await
    }

    /// Connects with explicit options.
    ///
    /// # Errors
    /// As [`crate::Client::connect`].
    pub async fn connect_with(path: impl AsRef<Path>, options: ClientOptions) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).await.map_err(|source| ClientError::Connect {
            path: PathBuf::from(path),
            source,
        })?;
        let mut client = Self {
            stream,
            server: crate::before_hello(),
            next_id: 1,
            recv: RecvBuf::default(),
            send_buf: Vec::new(),
            options,
            early: std::collections::VecDeque::new(),
        };
        let sent = client.send(crate::hello(&client.options.client_name)).await;
        let response = match client.recv().await {
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
    /// As [`crate::Client::send`].
    pub async fn send(&mut self, op: Operation) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send_buf.clear();
        codec::encode_frame_into(&Request { id, op }, self.server.max_frame_bytes, &mut self.send_buf)?;
        self.stream.write_all(&self.send_buf).await.map_err(ClientError::Io)?;
        Ok(id)
    }

    /// Receives the next response, whichever request it answers.
    ///
    /// # Errors
    /// As [`crate::Client::recv`].
    pub async fn recv(&mut self) -> Result<Response, ClientError> {
        if let Some(r) = self.early.pop_front() {
            return Ok(r);
        }
        self.read_response().await
    }

    /// The answer to request `id`, keeping others that come first for
    /// [`AsyncClient::recv`] (as the blocking client does).
    async fn wait_for(&mut self, id: u64) -> Result<Response, ClientError> {
        if let Some(i) = self.early.iter().position(|r| r.id == id) {
            if let Some(r) = self.early.remove(i) {
                return Ok(r);
            }
        }
        loop {
            let r = self.read_response().await?;
            if r.id == id || r.id == crate::CONNECTION_ERROR_ID {
                return Ok(r);
            }
            self.early.push_back(r);
        }
    }

    async fn read_response(&mut self) -> Result<Response, ClientError> {
        let read = async {
            loop {
                if let Some(body) = self.recv.next_frame(MAX_FRAME_CEILING)? {
                    return Ok(codec::decode_body(body)?);
                }
                match self.stream.read(self.recv.spare()).await {
                    Ok(0) => return Err(ClientError::Closed),
                    Ok(n) => self.recv.filled(n),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Err(ClientError::Closed),
                    Err(e) => return Err(ClientError::Io(e)),
                }
            }
        };
        match self.options.timeout {
            Some(t) => tokio::time::timeout(t, read)
                .await
                .map_err(|_| ClientError::TimedOut(t))?,
            None => read.await,
        }
    }

    /// Sends `op` and waits for its answer.
    ///
    /// # Errors
    /// As [`crate::Client::call`].
    pub async fn call(&mut self, op: Operation) -> Result<Reply, ClientError> {
        let id = self.send(op).await?;
        crate::expect_id(self.wait_for(id).await?, id)
    }

    /// Several key operations in one frame; one result per item, in order.
    ///
    /// # Errors
    /// As [`crate::Client::call`]; an item's own failure is in its result.
    pub async fn batch(
        &mut self,
        items: Vec<crate::BatchItem>,
    ) -> Result<Vec<Result<Reply, crate::WireError>>, ClientError> {
        match self.call(Operation::Batch { items }).await? {
            Reply::Batch(results) => Ok(results),
            other => Err(crate::unexpected("batch", &other)),
        }
    }
}
