//! The file store's operations: whole-file transfers through a descriptor the
//! caller passed ([`Files::store_fd`], [`Files::retrieve_fd`], run by
//! [`super::pipeline`]), sessions that take a file's chunks in or give them out
//! one frame at a time, and listing, metadata and deletion. Every method may
//! block on disk: call them from the blocking pool. Memory per session is one
//! chunk; per descriptor transfer, a fixed pool of chunks.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::AsFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use protocol::{ErrorCode, FileInfo, WireError};
use zeroize::Zeroizing;

use super::{
    format::{self, Checksum, ChunkCipher, FormatError, Header},
    pipeline::{self, check_complete, TransferError, Tuning},
    store::{self, Chunks, Cursor, FileStore, Meta, ReadError, Reader, StoreError, Writer, RECORD_PREFIX},
};
use crate::{
    keystore::Keys,
    shares::{Names, Share, Shares},
};

/// A session nobody touched for this long is dropped (a store is abandoned);
/// a session also ends with the connection that opened it.
const IDLE: Duration = Duration::from_secs(120);
/// Longest original file name, in bytes.
const MAX_NAME: usize = 255;

/// How many transfers and sessions may run, in all and per uid.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Descriptor transfers at once (each runs its own threads).
    pub transfers: usize,
    /// … of which one uid may hold.
    pub transfers_per_uid: usize,
    /// Frame-path sessions open at once.
    pub sessions: usize,
    /// … of which one uid may hold.
    pub sessions_per_uid: usize,
}

struct Storing {
    uid: u32,
    info: FileInfo,
    cipher: ChunkCipher,
    writer: Option<Writer>,
    next: u64,
    checksum: Checksum,
    done: bool,
}

struct Reading {
    uid: u32,
    info: FileInfo,
    cipher: ChunkCipher,
    chunks: Chunks,
    cursor: Cursor,
    next: u64,
    checksum: Checksum,
}

enum Session {
    Store(Box<Storing>),
    Read(Box<Reading>),
}

struct Entry {
    session: Mutex<Session>,
    touched: Mutex<Instant>,
    /// The connection that opened it.
    connection: u64,
    /// Its owner's place among the sessions, given back with the entry.
    _share: Share,
}

/// The file store service.
pub struct Files {
    store: FileStore,
    sessions: Mutex<HashMap<u64, Arc<Entry>>>,
    session_shares: Shares,
    transfers: Shares,
    tuning: Tuning,
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files").finish_non_exhaustive()
    }
}

fn wire(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

fn store_err(e: StoreError) -> WireError {
    match e {
        StoreError::BadToken(_) => wire(ErrorCode::InvalidArgument, e.to_string()),
        StoreError::NotFound(_) => wire(ErrorCode::NotFound, e.to_string()),
        StoreError::Damaged { .. } => wire(ErrorCode::Tampered, e.to_string()),
        StoreError::Io { ref path, ref source } if storage_cause(path, source).is_some() => {
            let cause = storage_cause(path, source).unwrap_or_default();
            tracing::error!(error = %e, "file store I/O failed");
            wire(
                ErrorCode::StorageUnavailable,
                format!("{cause}: the file store cannot be written; nothing was kept, free space or fix the file system and try again"),
            )
        }
        StoreError::Io { .. } => {
            tracing::error!(error = %e, "file store I/O failed");
            wire(
                ErrorCode::Internal,
                "hsmd could not read or write its file store; see its log",
            )
        }
    }
}

/// What a disk that is full or read-only is called, naming the directory;
/// `None` for other I/O errors (those are hsmd's to explain in its log).
fn storage_cause(path: &std::path::Path, source: &std::io::Error) -> Option<String> {
    let dir = path.parent().unwrap_or(path).display();
    match source.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            Some(format!("no space left on device in {dir}"))
        }
        std::io::ErrorKind::ReadOnlyFilesystem => Some(format!("the file system of {dir} is read-only")),
        _ => None,
    }
}

fn read_err(token: &str, e: ReadError) -> WireError {
    match e {
        ReadError::Format(f) => format_err(token, &f),
        ReadError::Store(s) => store_err(s),
    }
}

fn transfer_err(token: &str, e: TransferError) -> WireError {
    match e {
        TransferError::Format(f) => format_err(token, &f),
        TransferError::Store(s) => store_err(s),
        e @ (TransferError::Input(_) | TransferError::Output(_) | TransferError::TooLarge) => {
            wire(ErrorCode::InvalidArgument, format!("file {token}: {e}"))
        }
        e @ TransferError::Stalled(..) => wire(ErrorCode::FrameTimeout, format!("file {token}: {e}")),
        e @ TransferError::Busy(_) => wire(ErrorCode::Busy, format!("file {token}: {e}")),
    }
}

/// Checks that a passed descriptor is open for what hsmd will do with it.
fn check_access(fd: &File, write: bool) -> Result<(), WireError> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL)
        .map(OFlag::from_bits_truncate)
        .map_err(|e| wire(ErrorCode::InvalidArgument, format!("the descriptor you passed: {e}")))?;
    let mode = flags & OFlag::O_ACCMODE;
    let ok = if write {
        mode == OFlag::O_WRONLY || mode == OFlag::O_RDWR
    } else {
        mode == OFlag::O_RDONLY || mode == OFlag::O_RDWR
    };
    if ok {
        Ok(())
    } else {
        Err(wire(
            ErrorCode::InvalidArgument,
            if write {
                "the descriptor you passed for the output is not open for writing"
            } else {
                "the descriptor you passed for the input is not open for reading"
            },
        ))
    }
}

fn format_err(token: &str, e: &FormatError) -> WireError {
    let code = match e {
        FormatError::Header(_) => ErrorCode::Tampered,
        _ => ErrorCode::DecryptFailed,
    };
    wire(code, format!("stored file {token}: {e}"))
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn check_name(name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(wire(
            ErrorCode::InvalidArgument,
            format!("{name:?} is not a file name hsmd keeps: 1 to {MAX_NAME} bytes, no '/', no control characters, not . or .."),
        ))
    }
}

fn random_id() -> Result<u64, WireError> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|_| wire(ErrorCode::Internal, "the random source failed"))?;
    Ok(u64::from_le_bytes(b) | 1)
}

impl Files {
    /// Opens the store under `state_dir`, removing debris of interrupted stores.
    ///
    /// # Errors
    /// The store directory cannot be prepared.
    pub fn open(state_dir: &std::path::Path, tuning: Tuning, capacity: Capacity) -> Result<Self, StoreError> {
        let (store, cleaned) = FileStore::open(state_dir)?;
        if cleaned > 0 {
            tracing::warn!(cleaned, "removed what interrupted file stores left behind");
        }
        Ok(Self {
            store,
            sessions: Mutex::new(HashMap::new()),
            session_shares: Shares::new(
                capacity.sessions,
                capacity.sessions_per_uid,
                Names {
                    what: "open file sessions (--via frames)",
                    total_key: "files.max_sessions",
                    per_uid_key: "files.max_sessions_per_uid",
                    code: ErrorCode::Busy,
                },
            ),
            transfers: Shares::new(
                capacity.transfers,
                capacity.transfers_per_uid,
                Names {
                    what: "file transfers through a passed descriptor",
                    total_key: "files.max_transfers",
                    per_uid_key: "files.max_transfers_per_uid",
                    code: ErrorCode::Busy,
                },
            ),
            tuning,
        })
    }

    /// A place for one descriptor transfer of `uid`'s, to be held while it
    /// runs and passed to [`Files::store_fd`] or [`Files::retrieve_fd`].
    /// Taken before the transfer is handed to a thread, so a refusal costs
    /// nothing.
    ///
    /// # Errors
    /// `busy`, naming the limit.
    pub fn transfer_place(&self, uid: u32) -> Result<Share, WireError> {
        self.transfers.take(uid)
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a new session of `uid`'s, after dropping idle sessions.
    fn session_place(&self, uid: u32) -> Result<Share, WireError> {
        let idle: Vec<Arc<Entry>> = {
            let mut map = self.sessions();
            let mut idle = Vec::new();
            map.retain(|_, e| {
                let live = e.touched.lock().map(|t| t.elapsed() < IDLE).unwrap_or(false);
                if !live {
                    idle.push(Arc::clone(e));
                }
                live
            });
            idle
        };
        // Dropped outside the map's lock: an abandoned store removes its files.
        drop(idle);
        self.session_shares.take(uid)
    }

    fn insert(&self, share: Share, connection: u64, session: Session) -> Result<u64, WireError> {
        let id = random_id()?;
        self.sessions().insert(
            id,
            Arc::new(Entry {
                session: Mutex::new(session),
                touched: Mutex::new(Instant::now()),
                connection,
                _share: share,
            }),
        );
        Ok(id)
    }

    /// Ends the sessions `connection` opened (it closed): their places come
    /// free, and unfinished stores leave nothing behind.
    pub fn end_connection(&self, connection: u64) {
        let ended: Vec<Arc<Entry>> = {
            let mut map = self.sessions();
            let mut ended = Vec::new();
            map.retain(|_, e| {
                if e.connection == connection {
                    ended.push(Arc::clone(e));
                    false
                } else {
                    true
                }
            });
            ended
        };
        if !ended.is_empty() {
            tracing::debug!(
                connection,
                sessions = ended.len(),
                "file sessions ended with their connection"
            );
        }
    }

    fn entry(&self, id: u64) -> Result<Arc<Entry>, WireError> {
        let e = self.sessions().get(&id).cloned().ok_or_else(|| {
            wire(
                ErrorCode::NotFound,
                format!("there is no file session {id} (a session ends with its connection, or after 2 minutes idle)"),
            )
        })?;
        if let Ok(mut t) = e.touched.lock() {
            *t = Instant::now();
        }
        Ok(e)
    }

    fn info_of(header: &Header, meta: Option<&Meta>) -> FileInfo {
        FileInfo {
            token: header.token.clone(),
            name: header.name.clone(),
            size: meta.map_or(0, |m| m.size),
            chunk_size: header.chunk_size,
            chunks: meta.map_or(0, |m| m.chunks),
            key: header.key.clone(),
            key_version: header.key_version,
            owner_uid: header.owner_uid,
            stored_unix: meta.map_or(header.created_unix, |m| m.stored_unix),
            checksum: meta.map(|m| m.checksum.clone()).unwrap_or_default(),
        }
    }

    /// Everything a store needs before its first chunk: a token, a data key
    /// wrapped by `key`, the header, the cipher and the temporary directory.
    fn prepare_store(
        &self,
        keys: Keys<'_>,
        uid: u32,
        name: &str,
        key: &str,
        chunk_size: u32,
    ) -> Result<(FileInfo, ChunkCipher, Writer), WireError> {
        check_name(name)?;
        format::check_chunk_size(chunk_size).map_err(|e| wire(ErrorCode::InvalidArgument, e))?;
        let token = store::new_token().map_err(|_| wire(ErrorCode::Internal, "the random source failed"))?;
        let dk = keys
            .internal_data_key(key, &format::data_key_aad(&token))
            .map_err(|e| e.to_wire())?;
        let (key_version, wrapped, data_key) = (dk.version, dk.sealed, dk.key);
        let mut prefix = [0u8; format::PREFIX_LEN];
        getrandom::fill(&mut prefix).map_err(|_| wire(ErrorCode::Internal, "the random source failed"))?;
        let header = Header {
            format: format::FORMAT,
            token: token.clone(),
            name: name.to_owned(),
            chunk_size,
            key: key.to_owned(),
            key_version,
            wrapped_data_key: hex::encode(wrapped),
            nonce_prefix: hex::encode(prefix),
            owner_uid: uid,
            created_unix: now_unix(),
        };
        let header_bytes = header.to_bytes().map_err(|e| format_err(&token, &e))?;
        let cipher = ChunkCipher::new(&data_key, &header, &header_bytes).map_err(|e| format_err(&token, &e))?;
        let writer = self
            .store
            .create(&token, &header_bytes, chunk_size)
            .map_err(store_err)?;
        Ok((Self::info_of(&header, None), cipher, writer))
    }

    /// Starts a store under a new token, its chunks to come one frame each.
    ///
    /// # Errors
    /// A bad name or chunk size, the key refusing (state, usage, locked), disk.
    pub fn begin_store(
        &self,
        keys: Keys<'_>,
        (uid, connection): (u32, u64),
        name: &str,
        key: &str,
        chunk_size: u32,
    ) -> Result<(u64, FileInfo), WireError> {
        let share = self.session_place(uid)?;
        let (info, cipher, writer) = self.prepare_store(keys, uid, name, key, chunk_size)?;
        let id = self.insert(
            share,
            connection,
            Session::Store(Box::new(Storing {
                uid,
                info: info.clone(),
                cipher,
                writer: Some(writer),
                next: 0,
                checksum: Checksum::default(),
                done: false,
            })),
        )?;
        Ok((id, info))
    }

    /// Stores everything `input` (a descriptor the caller passed) gives until
    /// its end, sealing chunks on the configured workers.
    ///
    /// # Errors
    /// As [`Files::begin_store`]; reading the input; disk. Nothing is stored then.
    pub fn store_fd(
        &self,
        keys: Keys<'_>,
        uid: u32,
        (name, key, chunk_size): (&str, &str, u32),
        input: &File,
        _place: Share,
    ) -> Result<FileInfo, WireError> {
        check_access(input, false)?;
        let (mut info, cipher, mut writer) = self.prepare_store(keys, uid, name, key, chunk_size)?;
        let started = Instant::now();
        let (size, checksum) = pipeline::store_from(input, &cipher, &mut writer, chunk_size, &self.tuning, uid)
            .map_err(|e| transfer_err(&info.token, e))?;
        let (chunks, segments) = writer.counts();
        let meta = Meta {
            size,
            chunks,
            segments,
            checksum,
            stored_unix: now_unix(),
        };
        writer.finish(&meta).map_err(store_err)?;
        info.size = size;
        info.chunks = chunks;
        info.checksum = meta.checksum;
        info.stored_unix = meta.stored_unix;
        tracing::info!(token = %info.token, size, chunks, elapsed = ?started.elapsed(), "file stored from a passed descriptor");
        Ok(info)
    }

    /// Seals and appends the next chunk.
    ///
    /// # Errors
    /// Out-of-order or mis-sized chunks, another uid's session, disk.
    pub fn store_chunk(&self, uid: u32, id: u64, index: u64, last: bool, bytes: &[u8]) -> Result<u64, WireError> {
        self.storing(uid, id, |s| Self::seal_chunk(s, index, last, bytes))
    }

    /// Runs `f` on the caller's store session `id`.
    fn storing<R>(
        &self,
        uid: u32,
        id: u64,
        f: impl FnOnce(&mut Storing) -> Result<R, WireError>,
    ) -> Result<R, WireError> {
        let entry = self.entry(id)?;
        let mut guard = entry.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Session::Store(s) = &mut *guard else {
            return Err(wire(
                ErrorCode::InvalidArgument,
                format!("file session {id} is reading, not storing"),
            ));
        };
        if s.uid != uid {
            return Err(wire(
                ErrorCode::NotFound,
                format!("there is no file session {id} of yours"),
            ));
        }
        f(s)
    }

    fn seal_chunk(s: &mut Storing, index: u64, last: bool, bytes: &[u8]) -> Result<u64, WireError> {
        if s.done || index != s.next {
            return Err(wire(
                ErrorCode::InvalidArgument,
                format!("expected chunk {} of file {}, got chunk {index}", s.next, s.info.token),
            ));
        }
        let size = bytes.len() as u64;
        let full = u64::from(s.info.chunk_size);
        if size > full || (!last && size != full) || (index > 0 && size == 0) {
            return Err(wire(
                ErrorCode::InvalidArgument,
                format!(
                    "chunk {index} has {size} bytes; every chunk but the last has exactly {full}, \
                     and only an empty file's one chunk is empty"
                ),
            ));
        }
        let mut slot = Zeroizing::new(vec![0u8; RECORD_PREFIX + bytes.len() + format::TAG_LEN]);
        slot[RECORD_PREFIX..RECORD_PREFIX + bytes.len()].copy_from_slice(bytes);
        let (record, hash) = pipeline::seal_record(&s.cipher, s.info.chunk_size, index, last, &mut slot, bytes.len())
            .map_err(|e| format_err(&s.info.token, &e))?;
        s.checksum.push(hash);
        if let Some(w) = s.writer.as_mut() {
            w.append_record(&slot[..record]).map_err(store_err)?;
        }
        s.info.size += size;
        s.info.chunks += 1;
        s.next += 1;
        s.done = last;
        Ok(index)
    }

    /// Completes a store: the token exists from here on.
    ///
    /// # Errors
    /// The last chunk has not arrived; disk.
    pub fn finish_store(&self, uid: u32, id: u64) -> Result<FileInfo, WireError> {
        let info = self.storing(uid, id, Self::complete)?;
        self.sessions().remove(&id);
        tracing::info!(token = %info.token, size = info.size, chunks = info.chunks, "file stored");
        Ok(info)
    }

    fn complete(s: &mut Storing) -> Result<FileInfo, WireError> {
        if !s.done {
            return Err(wire(
                ErrorCode::FailedPrecondition,
                format!("file {} has {} chunks and no last one yet", s.info.token, s.next),
            ));
        }
        let Some(writer) = s.writer.take() else {
            return Err(wire(ErrorCode::FailedPrecondition, "this store was finished already"));
        };
        let (chunks, segments) = writer.counts();
        let checksum = std::mem::take(&mut s.checksum)
            .finish()
            .ok_or_else(|| wire(ErrorCode::Internal, "the file's checksum could not be assembled"))?;
        let meta = Meta {
            size: s.info.size,
            chunks,
            segments,
            checksum,
            stored_unix: now_unix(),
        };
        writer.finish(&meta).map_err(store_err)?;
        s.info.checksum.clone_from(&meta.checksum);
        s.info.stored_unix = meta.stored_unix;
        Ok(s.info.clone())
    }

    fn header_meta(&self, token: &str) -> Result<(Header, Reader), WireError> {
        let reader = self.store.open_file(token).map_err(store_err)?;
        let header = Header::parse(&reader.header).map_err(|e| format_err(token, &e))?;
        if header.token != token {
            return Err(wire(
                ErrorCode::Tampered,
                format!("stored file {token}: its header names another token"),
            ));
        }
        Ok((header, reader))
    }

    /// Another user's file is answered as if there were none: the answer
    /// must not confirm that a token exists, or whose it is.
    fn may(owner: u32, uid: u32, any: bool, token: &str) -> Result<(), WireError> {
        if owner == uid || any {
            Ok(())
        } else {
            Err(store_err(StoreError::NotFound(token.to_owned())))
        }
    }

    /// What reading a file needs: its info, its cipher (the data key
    /// unwrapped) and its chunks, after checking the caller may read it.
    fn prepare_read(
        &self,
        keys: Keys<'_>,
        uid: u32,
        token: &str,
        any: bool,
    ) -> Result<(FileInfo, ChunkCipher, Chunks), WireError> {
        let (header, reader) = self.header_meta(token)?;
        Self::may(header.owner_uid, uid, any, token)?;
        let wrapped = hex::decode(&header.wrapped_data_key).map_err(|_| {
            wire(
                ErrorCode::Tampered,
                format!("stored file {token}: its data key is not hex"),
            )
        })?;
        let key = keys
            .find(&header.key, Some(header.key_version))
            .and_then(|key| keys.decrypt(&key, &wrapped, &format::data_key_aad(token), false))
            .map_err(|e| e.to_wire())?;
        let key: Zeroizing<[u8; 32]> = Zeroizing::new(<[u8; 32]>::try_from(key.as_slice()).map_err(|_| {
            wire(
                ErrorCode::Tampered,
                format!("stored file {token}: its data key has the wrong size"),
            )
        })?);
        let cipher = ChunkCipher::new(&key, &header, &reader.header).map_err(|e| format_err(token, &e))?;
        let chunks = reader.chunks(header.chunk_size).map_err(|e| read_err(token, e))?;
        Ok((Self::info_of(&header, Some(&reader.meta)), cipher, chunks))
    }

    /// Starts reading a stored file one chunk per request.
    ///
    /// # Errors
    /// Unknown or malformed token, not the owner, the key refusing, damage.
    pub fn begin_retrieve(
        &self,
        keys: Keys<'_>,
        (uid, connection): (u32, u64),
        token: &str,
        any: bool,
    ) -> Result<(u64, FileInfo), WireError> {
        let share = self.session_place(uid)?;
        let (info, cipher, chunks) = self.prepare_read(keys, uid, token, any)?;
        let id = self.insert(
            share,
            connection,
            Session::Read(Box::new(Reading {
                uid,
                info: info.clone(),
                cipher,
                chunks,
                cursor: Cursor::default(),
                next: 0,
                checksum: Checksum::default(),
            })),
        )?;
        Ok((id, info))
    }

    /// Writes a stored file's plaintext to `output` (a descriptor the caller
    /// passed), opening chunks on the configured workers; the last chunk is
    /// written only once the whole file has checked out.
    ///
    /// # Errors
    /// As [`Files::begin_retrieve`]; the first chunk that fails, named; the
    /// output failing.
    pub fn retrieve_fd(
        &self,
        keys: Keys<'_>,
        uid: u32,
        token: &str,
        any: bool,
        output: &File,
        _place: Share,
    ) -> Result<FileInfo, WireError> {
        check_access(output, true)?;
        let (info, cipher, chunks) = self.prepare_read(keys, uid, token, any)?;
        let started = Instant::now();
        pipeline::retrieve_into(
            &chunks,
            &cipher,
            output,
            info.chunk_size,
            &info.checksum,
            &self.tuning,
            uid,
        )
        .map_err(|e| transfer_err(token, e))?;
        tracing::info!(token, size = info.size, elapsed = ?started.elapsed(), "file retrieved to a passed descriptor");
        Ok(info)
    }

    /// The next chunk's plaintext; the last comes only if the checksum matches.
    ///
    /// # Errors
    /// A chunk that fails (named), missing or extra chunks, a checksum mismatch.
    pub fn retrieve_next(&self, uid: u32, id: u64) -> Result<(u64, bool, Zeroizing<Vec<u8>>), WireError> {
        let entry = self.entry(id)?;
        let mut guard = entry.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Session::Read(s) = &mut *guard else {
            return Err(wire(
                ErrorCode::InvalidArgument,
                format!("file session {id} is storing, not reading"),
            ));
        };
        if s.uid != uid {
            return Err(wire(
                ErrorCode::NotFound,
                format!("there is no file session {id} of yours"),
            ));
        }
        let token = s.info.token.clone();
        let total = s.chunks.total();
        let index = s.next;
        let result = (|| {
            if index >= total {
                return Err(wire(
                    ErrorCode::FailedPrecondition,
                    format!("file {token} was read to its end"),
                ));
            }
            let mut slot = Zeroizing::new(vec![0u8; RECORD_PREFIX + s.chunks.sealed_len(index)]);
            let (len, hash) =
                pipeline::open_record(&s.chunks, &s.cipher, s.info.chunk_size, index, &mut slot, &mut s.cursor)
                    .map_err(|e| transfer_err(&token, e))?;
            s.checksum.push(hash);
            let plain = Zeroizing::new(slot[RECORD_PREFIX..RECORD_PREFIX + len].to_vec());
            let last = index + 1 == total;
            if last {
                check_complete(&s.chunks, std::mem::take(&mut s.checksum), &s.info.checksum)
                    .map_err(|e| transfer_err(&token, e))?;
            }
            s.next += 1;
            Ok((index, last, plain))
        })();
        let finished = matches!(result, Ok((_, true, _)) | Err(_));
        drop(guard);
        if finished {
            self.sessions().remove(&id);
        }
        result
    }

    /// Stored files: the caller's own, or every one with `any`.
    ///
    /// # Errors
    /// Disk.
    pub fn list(&self, uid: u32, any: bool) -> Result<Vec<FileInfo>, WireError> {
        let mut out = Vec::new();
        for token in self.store.tokens().map_err(store_err)? {
            match self.header_meta(&token) {
                Ok((h, r)) if h.owner_uid == uid || any => out.push(Self::info_of(&h, Some(&r.meta))),
                Ok(_) => {}
                Err(e) => tracing::warn!(token, error = %e.message, "stored file unreadable; skipped in the list"),
            }
        }
        Ok(out)
    }

    /// One file's metadata.
    ///
    /// # Errors
    /// Unknown token, not the owner.
    pub fn info(&self, uid: u32, token: &str, any: bool) -> Result<FileInfo, WireError> {
        let (h, r) = self.header_meta(token)?;
        Self::may(h.owner_uid, uid, any, token)?;
        Ok(Self::info_of(&h, Some(&r.meta)))
    }

    /// The store's files on disk, for a restore to put others in their place.
    #[must_use]
    pub fn store(&self) -> &FileStore {
        &self.store
    }

    /// The store's files for a backup: see [`FileStore::backup_copy`].
    ///
    /// # Errors
    /// As [`FileStore::backup_copy`].
    pub fn backup_copy(&self) -> Result<super::store::Copy<'_>, super::store::StoreError> {
        self.store.backup_copy()
    }

    /// Wipes and removes a file.
    ///
    /// # Errors
    /// Unknown token, not the owner, disk.
    pub fn delete(&self, uid: u32, token: &str, any: bool) -> Result<(), WireError> {
        match self.header_meta(token) {
            Ok((h, _)) => Self::may(h.owner_uid, uid, any, token)?,
            // A damaged file's owner cannot be known: only files:admin removes it.
            Err(e) if e.code == ErrorCode::Tampered && any => {}
            Err(e) => return Err(e),
        }
        self.store.delete(token).map_err(store_err)?;
        tracing::info!(token, "file deleted (wiped)");
        Ok(())
    }
}
