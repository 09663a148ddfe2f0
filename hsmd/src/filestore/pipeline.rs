//! Moving a whole file between a caller's descriptor and the store, with its
//! chunks sealed or opened by several workers at once.
//!
//! Store: this thread reads the caller's descriptor in order with read(2)
//! (so the descriptor's shared offset is the progress `hsmctl` shows),
//! workers hash and seal chunks in place, and one writer appends the records
//! in order. Retrieve: workers read records at their known positions
//! (`pread`), open and hash them, and this thread writes the plaintext to the
//! caller's descriptor in order, the last chunk only once the checksum and the
//! file's end have been checked.
//!
//! Memory is a fixed pool of chunk buffers, whatever the file's size: a stage
//! that runs ahead waits for a buffer. Any stage that fails stops the others
//! (channels close behind it) and its error, the first, is the answer.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, Read as _, Write as _},
    os::fd::AsFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{sync_channel, Receiver, SyncSender},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::budget::Budget;

use super::{
    format::{self, Checksum, ChunkCipher, ChunkHash, FormatError},
    store::{Chunks, Cursor, ReadError, StoreError, Writer, RECORD_PREFIX},
};

/// How a transfer runs.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Worker threads of all transfers together (`files.workers`); a transfer
    /// gets those not in use by others, and always one.
    pub workers: usize,
    /// Worker threads in use by transfers now.
    pub workers_busy: Arc<AtomicUsize>,
    /// How long a pipe may neither give nor take bytes.
    pub io_timeout: Duration,
    /// The chunk buffers all transfers may hold (`files.transfer_memory`).
    pub memory: Arc<Budget>,
}

/// Bytes of chunk buffers a transfer aims to keep at most (the pool never
/// has fewer than workers + 2 batches, so 8 MiB chunks use more).
const POOL_BYTES: usize = 16 << 20;
/// Chunks travel between the stages in batches of about this many bytes, so
/// that a hand-over (a thread waking another) is paid per batch, not per
/// 64 KiB chunk, and a batch of records is written with one system call.
const BATCH_BYTES: usize = 1 << 20;

/// Why a transfer failed.
#[derive(Debug, Error)]
pub enum TransferError {
    /// The stored file is wrong (retrieve) or a chunk could not be sealed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The store's own files.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller's descriptor could not be read.
    #[error("reading the file you passed failed: {0}")]
    Input(#[source] io::Error),
    /// The caller's descriptor could not be written.
    #[error("writing to the file you passed failed: {0}")]
    Output(#[source] io::Error),
    /// A pipe stalled.
    #[error("the {0} you passed neither gave nor took bytes for {1:?}; the transfer was abandoned")]
    Stalled(&'static str, Duration),
    /// The file has more chunks than nonces allow (2^32).
    #[error("the file is too large: more than 2^32 chunks; use a larger --chunk-size")]
    TooLarge,
    /// Not even the transfer's first buffers fit in `files.transfer_memory`.
    #[error(
        "hsmd's transfer buffers are in use by other transfers ({0} bytes are needed; see \
         files.transfer_memory and files.transfer_memory_per_uid); retry shortly"
    )]
    Busy(usize),
}

impl From<ReadError> for TransferError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Format(f) => Self::Format(f),
            ReadError::Store(s) => Self::Store(s),
        }
    }
}

type Buf = Zeroizing<Vec<u8>>;

/// The first error any stage hit.
#[derive(Default)]
struct FirstError(Mutex<Option<TransferError>>);

impl FirstError {
    fn set(&self, e: TransferError) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    fn take(&self) -> Option<TransferError> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// A transfer's chunk buffers: made as they are needed, up to `max`, while
/// the daemon's transfer memory has room; after that, reused as they come
/// back. A transfer that does not keep its consumer busy (a slow pipe) never
/// makes more than the few it starts with.
struct Pool<'a> {
    free_tx: SyncSender<Buf>,
    free_rx: Mutex<Receiver<Buf>>,
    len: usize,
    max: usize,
    made: AtomicUsize,
    memory: &'a Budget,
    uid: u32,
}

impl<'a> Pool<'a> {
    /// Makes the first `least` buffers of `len` bytes, all charged to `uid`.
    fn new(len: usize, max: usize, least: usize, memory: &'a Budget, uid: u32) -> Result<Self, TransferError> {
        let (free_tx, free_rx) = sync_channel(max);
        if !memory.try_charge(uid, least * len) {
            return Err(TransferError::Busy(least * len));
        }
        for _ in 0..least {
            // The channel holds `max` >= `least`: these sends never block or fail.
            let _ = free_tx.send(Zeroizing::new(vec![0u8; len]));
        }
        Ok(Self {
            free_tx,
            free_rx: Mutex::new(free_rx),
            len,
            max,
            made: AtomicUsize::new(least),
            memory,
            uid,
        })
    }

    /// A free buffer, a new one if there is room, or the next given back;
    /// `None` once `stop` is set (a stage failed or finished: nothing may
    /// come back).
    fn take(&self, stop: &AtomicBool) -> Option<Buf> {
        let rx = self.free_rx.lock().unwrap_or_else(PoisonError::into_inner);
        if let Ok(buf) = rx.try_recv() {
            return Some(buf);
        }
        if self.made.load(Ordering::Relaxed) < self.max && self.memory.try_charge_extra(self.uid, self.len) {
            self.made.fetch_add(1, Ordering::Relaxed);
            return Some(Zeroizing::new(vec![0u8; self.len]));
        }
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(buf) => return Some(buf),
                Err(_) if stop.load(Ordering::Relaxed) => return None,
                Err(_) => {}
            }
        }
    }

    /// Gives a buffer back for reuse.
    fn give(&self, buf: Buf) {
        // The channel has room for every buffer made: never blocks.
        let _ = self.free_tx.send(buf);
    }
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        // The buffers themselves are wiped as they drop, wherever they are.
        self.memory
            .release(self.uid, self.made.load(Ordering::Relaxed) * self.len);
    }
}

/// Starts a thread of the transfer with hsmd's small stack. Like
/// `Scope::spawn`, panics if the system cannot start it (the transfer's own
/// thread catches that and answers with an internal error).
fn spawn<'scope, T: Send + 'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    match std::thread::Builder::new()
        .name("hsmd-transfer-worker".into())
        // Sealing and opening chunks needs little stack.
        .stack_size(crate::secure_mem::THREAD_STACK / 2)
        .spawn_scoped(s, f)
    {
        Ok(handle) => handle,
        Err(e) => panic!("cannot start a transfer worker thread: {e}"),
    }
}

/// The worker threads a transfer claimed, given back when it ends. Transfers
/// share `files.workers` threads' worth rather than each starting that many:
/// every thread's stack is locked memory, and more threads than cores only
/// take turns.
struct Workers<'a> {
    count: usize,
    busy: &'a AtomicUsize,
}

impl<'a> Workers<'a> {
    fn claim(tuning: &'a Tuning) -> Self {
        let total = tuning.workers.max(1);
        let busy = &*tuning.workers_busy;
        let mut count = 1;
        // Infallible: the closure always returns Some.
        let _ = busy.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |in_use| {
            count = total.saturating_sub(in_use).max(1);
            Some(in_use + count)
        });
        Self { count, busy }
    }
}

impl Drop for Workers<'_> {
    fn drop(&mut self) {
        self.busy.fetch_sub(self.count, Ordering::Relaxed);
    }
}

/// Chunks per batch.
fn per_batch(chunk_size: u32) -> usize {
    (BATCH_BYTES / chunk_size as usize).max(1)
}

/// Batches in the pool.
fn pool_size(workers: usize, batch_bytes: usize) -> usize {
    (POOL_BYTES / batch_bytes).clamp(workers + 2, 4 * workers + 4)
}

/// Waits until `file` is ready for `flags`, for pipes and sockets set
/// non-blocking by their owner.
fn wait_ready(file: &File, flags: PollFlags, timeout: Duration, what: &'static str) -> Result<(), TransferError> {
    let mut fds = [PollFd::new(file.as_fd(), flags)];
    let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, t) {
        Ok(0) => Err(TransferError::Stalled(what, timeout)),
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(if what == "input" {
            TransferError::Input(e.into())
        } else {
            TransferError::Output(e.into())
        }),
    }
}

/// Whether reads and writes on `file` can wait forever (a pipe, socket or
/// terminal, as opposed to a regular file or a block device).
fn can_stall(file: &File) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    file.metadata()
        .map(|m| {
            let t = m.file_type();
            t.is_fifo() || t.is_socket() || t.is_char_device()
        })
        .unwrap_or(true)
}

/// Reads until `buf` is full or the input ends; returns how much was read.
/// A descriptor that can stall is polled first, so a caller that holds a pipe
/// open without writing costs a worker at most `timeout`.
fn read_full(input: &File, stalls: bool, buf: &mut [u8], timeout: Duration) -> Result<usize, TransferError> {
    let mut got = 0;
    while got < buf.len() {
        if stalls {
            wait_ready(input, PollFlags::POLLIN, timeout, "input")?;
        }
        match (&*input).read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_ready(input, PollFlags::POLLIN, timeout, "input")?,
            Err(e) => return Err(TransferError::Input(e)),
        }
    }
    Ok(got)
}

/// Seals chunk `index`, whose plaintext is `slot[RECORD_PREFIX..][..len]`,
/// into the record that then fills the front of `slot` (length prefix,
/// ciphertext, tag); returns the record's length and the chunk's hash. The
/// one way a record is made, for transfers and for chunks sent in frames.
///
/// # Errors
/// [`FormatError::Header`] for an impossible index.
pub fn seal_record(
    cipher: &ChunkCipher,
    chunk_size: u32,
    index: u64,
    last: bool,
    slot: &mut [u8],
    len: usize,
) -> Result<(usize, ChunkHash), FormatError> {
    let body = &mut slot[RECORD_PREFIX..RECORD_PREFIX + len];
    let hash = format::chunk_hash(index, chunk_size, index == 0 && last, body);
    let total = index * u64::from(chunk_size) + len as u64;
    let tag = cipher.seal_detached(index, last, total, body)?;
    let end = RECORD_PREFIX + len;
    slot[end..end + format::TAG_LEN].copy_from_slice(&tag);
    // At most 8 MiB + 16: fits a u32.
    let sealed = (len + format::TAG_LEN) as u32;
    slot[..RECORD_PREFIX].copy_from_slice(&sealed.to_be_bytes());
    Ok((end + format::TAG_LEN, hash))
}

/// Reads chunk `index`'s record into `slot` and opens it in place; returns
/// the plaintext's length (it starts at `slot[RECORD_PREFIX]`) and the
/// chunk's hash. The one way a chunk is read, for transfers and frames.
///
/// # Errors
/// A missing, mis-sized or unauthentic chunk, named.
pub fn open_record(
    chunks: &Chunks,
    cipher: &ChunkCipher,
    chunk_size: u32,
    index: u64,
    slot: &mut [u8],
    cursor: &mut Cursor,
) -> Result<(usize, ChunkHash), TransferError> {
    let total = chunks.total();
    let sealed = chunks.read_record(index, slot, cursor)?;
    let body = &mut slot[RECORD_PREFIX..RECORD_PREFIX + sealed];
    let len = cipher.open_in_place(index, total, chunks.size(), body)?;
    Ok((len, format::chunk_hash(index, chunk_size, total == 1, &body[..len])))
}

/// What must hold before a file's last chunk is released: nothing follows it
/// and the whole file's hash is the one recorded.
///
/// # Errors
/// [`FormatError::Extra`] or [`FormatError::Checksum`].
pub fn check_complete(chunks: &Chunks, sum: Checksum, checksum: &str) -> Result<(), TransferError> {
    chunks.check_end()?;
    if sum.finish().as_deref() == Some(checksum) {
        Ok(())
    } else {
        Err(FormatError::Checksum.into())
    }
}

/// Consecutive chunks on their way through a store. Chunk `j` of the batch
/// sits in slot `j` of `buf` (slots of `RECORD_PREFIX + chunk + tag` bytes),
/// plaintext first, then its whole record, so that the batch's records lie
/// end to end.
struct Batch {
    first: u64,
    /// Plaintext bytes of each chunk.
    lens: Vec<usize>,
    /// Whether its last chunk is the file's last.
    last: bool,
    buf: Buf,
    /// Filled in by the worker.
    hashes: Vec<ChunkHash>,
}

/// Reads up to `per` chunks into the slots of `buf`; returns their lengths
/// and whether the input ended.
fn fill_batch(
    input: &File,
    stalls: bool,
    buf: &mut [u8],
    per: usize,
    cs: usize,
    timeout: Duration,
) -> Result<(Vec<usize>, bool), TransferError> {
    let slot = RECORD_PREFIX + cs + format::TAG_LEN;
    let mut lens = Vec::with_capacity(per);
    for j in 0..per {
        let at = j * slot + RECORD_PREFIX;
        let n = read_full(input, stalls, &mut buf[at..at + cs], timeout)?;
        if n == 0 {
            return Ok((lens, true));
        }
        lens.push(n);
        if n < cs {
            return Ok((lens, true));
        }
    }
    Ok((lens, false))
}

/// Reads `input` to its end and stores it through `writer`: returns the
/// plaintext size and checksum.
///
/// # Errors
/// The first failure of any stage: reading the input, sealing, the disk.
pub fn store_from(
    input: &File,
    cipher: &ChunkCipher,
    writer: &mut Writer,
    chunk_size: u32,
    tuning: &Tuning,
    uid: u32,
) -> Result<(u64, String), TransferError> {
    let cs = chunk_size as usize;
    let claim = Workers::claim(tuning);
    let workers = claim.count;
    let per = per_batch(chunk_size);
    let slot = RECORD_PREFIX + cs + format::TAG_LEN;
    let stalls = can_stall(input);
    if stalls {
        // A pipe that never gives a byte costs no buffer.
        wait_ready(input, PollFlags::POLLIN, tuning.io_timeout, "input")?;
    }
    // The reader keeps one batch back (to know the last chunk): two at least.
    let pool = Pool::new(per * slot, pool_size(workers, per * slot), 2, &tuning.memory, uid)?;
    let (work_tx, work_rx) = sync_channel::<Batch>(workers);
    let work_rx = Arc::new(Mutex::new(work_rx));
    let (done_tx, done_rx) = sync_channel::<Batch>(workers);
    let failed = FirstError::default();
    let stop = AtomicBool::new(false);

    let outcome = std::thread::scope(|s| {
        for _ in 0..workers {
            let rx = Arc::clone(&work_rx);
            let tx = done_tx.clone();
            let (failed, stop) = (&failed, &stop);
            spawn(s, move || loop {
                let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                let Ok(mut batch) = next else { break };
                let count = batch.lens.len();
                let sealed = (|| {
                    for (j, &len) in batch.lens.iter().enumerate() {
                        let index = batch.first + j as u64;
                        let last = batch.last && j + 1 == count;
                        let slot_bytes = &mut batch.buf[j * slot..(j + 1) * slot];
                        let (_, hash) = seal_record(cipher, chunk_size, index, last, slot_bytes, len)?;
                        batch.hashes.push(hash);
                    }
                    Ok::<_, FormatError>(())
                })();
                if let Err(e) = sealed {
                    failed.set(e.into());
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                if tx.send(batch).is_err() {
                    break;
                }
            });
        }
        drop(done_tx);

        let pool = &pool;
        let writing = spawn(s, || {
            let done_rx = done_rx;
            let mut waiting = BTreeMap::new();
            let mut next = 0u64;
            let mut size = 0u64;
            let mut checksum = Checksum::default();
            while let Ok(batch) = done_rx.recv() {
                waiting.insert(batch.first, batch);
                while let Some(mut batch) = waiting.remove(&next) {
                    let records: Vec<usize> = batch.lens.iter().map(|l| RECORD_PREFIX + l + format::TAG_LEN).collect();
                    let bytes: usize = records.iter().sum();
                    if let Err(e) = writer.append_records(&batch.buf[..bytes], &records) {
                        failed.set(e.into());
                        stop.store(true, Ordering::Relaxed);
                        return None;
                    }
                    for h in batch.hashes.drain(..) {
                        checksum.push(h);
                    }
                    size += batch.lens.iter().map(|&l| l as u64).sum::<u64>();
                    next += batch.lens.len() as u64;
                    if batch.last {
                        return checksum.finish().map(|c| (size, c));
                    }
                    pool.give(batch.buf);
                }
            }
            None
        });

        // Reading, one batch ahead so the file's last chunk is known as such.
        let read = (|| {
            let work_tx = work_tx;
            let mut held: Option<Batch> = None;
            let mut first = 0u64;
            loop {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                if first > u64::from(u32::MAX) {
                    return Err(TransferError::TooLarge);
                }
                let Some(mut buf) = pool.take(&stop) else { return Ok(()) };
                let (lens, ended) = fill_batch(input, stalls, &mut buf, per, cs, tuning.io_timeout)?;
                if let Some(mut prev) = held.take() {
                    // Full chunks followed by nothing: the held batch ends the file.
                    prev.last = lens.is_empty();
                    if work_tx.send(prev).is_err() || lens.is_empty() {
                        return Ok(());
                    }
                } else if lens.is_empty() {
                    // An empty file is one empty chunk.
                    let _ = work_tx.send(Batch {
                        first: 0,
                        lens: vec![0],
                        last: true,
                        buf,
                        hashes: Vec::with_capacity(1),
                    });
                    return Ok(());
                }
                let count = lens.len();
                let batch = Batch {
                    first,
                    lens,
                    last: ended,
                    buf,
                    hashes: Vec::with_capacity(count),
                };
                first += count as u64;
                if ended {
                    let _ = work_tx.send(batch);
                    return Ok(());
                }
                held = Some(batch);
            }
        })();
        if let Err(e) = read {
            failed.set(e);
            stop.store(true, Ordering::Relaxed);
        }
        let outcome = writing.join().ok().flatten();
        // The writer is done, so nothing more comes back.
        stop.store(true, Ordering::Relaxed);
        outcome
    });
    match (failed.take(), outcome) {
        (Some(e), _) => Err(e),
        (None, Some(done)) => Ok(done),
        (None, None) => Err(StoreError::Damaged {
            token: String::new(),
            why: "the store ended without its last chunk".into(),
        }
        .into()),
    }
}

/// A batch of chunks opened: chunk `j`'s plaintext is in slot `j` of `buf`
/// at `RECORD_PREFIX`, `lens[j]` bytes long.
struct Opened {
    first: u64,
    result: Result<(Buf, Vec<usize>, Vec<ChunkHash>), TransferError>,
}

/// Writes every slice of `parts` to `output`, in order (writev).
fn write_parts(
    output: &File,
    stalls: bool,
    parts: &mut [io::IoSlice<'_>],
    timeout: Duration,
) -> Result<(), TransferError> {
    let mut parts = parts;
    while !parts.is_empty() {
        if stalls {
            wait_ready(output, PollFlags::POLLOUT, timeout, "output")?;
        }
        match (&*output).write_vectored(parts) {
            Ok(0) => return Err(TransferError::Output(io::ErrorKind::WriteZero.into())),
            Ok(n) => io::IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_ready(output, PollFlags::POLLOUT, timeout, "output")?;
            }
            Err(e) => return Err(TransferError::Output(e)),
        }
    }
    Ok(())
}

/// Writes a stored file's plaintext to `output`, in order. The last batch is
/// written only after every chunk opened, the checksum matched `checksum`, and
/// nothing follows the last chunk.
///
/// # Errors
/// The first chunk (in file order) that fails, a checksum mismatch, extra
/// chunks, the output failing.
pub fn retrieve_into(
    chunks: &Chunks,
    cipher: &ChunkCipher,
    output: &File,
    chunk_size: u32,
    checksum: &str,
    tuning: &Tuning,
    uid: u32,
) -> Result<(), TransferError> {
    let claim = Workers::claim(tuning);
    let workers = claim.count;
    let total = chunks.total();
    let per = per_batch(chunk_size);
    let slot = RECORD_PREFIX + chunk_size as usize + format::TAG_LEN;
    let pool = Pool::new(per * slot, pool_size(workers, per * slot), 1, &tuning.memory, uid)?;
    let (done_tx, done_rx) = sync_channel::<Opened>(workers);
    let next_batch = AtomicU64::new(0);
    let stop = AtomicBool::new(false);

    std::thread::scope(|s| {
        for _ in 0..workers {
            let tx = done_tx.clone();
            let (pool, next_batch, stop) = (&pool, &next_batch, &stop);
            let mut cursor = Cursor::default();
            spawn(s, move || loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // A buffer first, then a batch: every batch handed out has a
                // buffer, so the writer never waits for one that cannot come.
                let Some(mut buf) = pool.take(stop) else {
                    break;
                };
                let first = next_batch.fetch_add(1, Ordering::Relaxed) * per as u64;
                if first >= total {
                    break;
                }
                let count = (total - first).min(per as u64) as usize;
                let opened = (|| {
                    let mut lens = Vec::with_capacity(count);
                    let mut hashes = Vec::with_capacity(count);
                    for j in 0..count {
                        let index = first + j as u64;
                        let slot_bytes = &mut buf[j * slot..(j + 1) * slot];
                        let (len, hash) = open_record(chunks, cipher, chunk_size, index, slot_bytes, &mut cursor)?;
                        hashes.push(hash);
                        lens.push(len);
                    }
                    Ok::<_, TransferError>((lens, hashes))
                })();
                let result = opened.map(|(lens, hashes)| (buf, lens, hashes));
                if tx.send(Opened { first, result }).is_err() {
                    break;
                }
            });
        }
        drop(done_tx);

        let stalls = can_stall(output);
        let result = (|| {
            let done_rx = done_rx;
            let mut waiting = BTreeMap::new();
            let mut next = 0u64;
            let mut sum = Checksum::default();
            while next < total {
                let Ok(opened) = done_rx.recv() else {
                    return Err(StoreError::Damaged {
                        token: String::new(),
                        why: "the readers stopped before the last chunk".into(),
                    }
                    .into());
                };
                waiting.insert(opened.first, opened.result);
                while let Some(result) = waiting.remove(&next) {
                    let (buf, lens, hashes) = result?;
                    for h in hashes {
                        sum.push(h);
                    }
                    let count = lens.len() as u64;
                    if next + count == total {
                        check_complete(chunks, std::mem::take(&mut sum), checksum)?;
                    }
                    let mut parts: Vec<io::IoSlice<'_>> = lens
                        .iter()
                        .enumerate()
                        .filter(|(_, &len)| len > 0)
                        .map(|(j, &len)| {
                            io::IoSlice::new(&buf[j * slot + RECORD_PREFIX..j * slot + RECORD_PREFIX + len])
                        })
                        .collect();
                    write_parts(output, stalls, &mut parts, tuning.io_timeout)?;
                    drop(parts);
                    pool.give(buf);
                    next += count;
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })
}
