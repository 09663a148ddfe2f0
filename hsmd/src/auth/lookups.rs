//! Identity lookups (the user and group databases, through NSS) on threads of
//! their own. A lookup may block (an LDAP server that does not answer), so it
//! cannot run on the reactor; on the shared blocking pool, requests that wait
//! on something else (a slow backend, a stalled pipe) could take every thread
//! and keep everyone, root included, from connecting. Here a few threads do
//! nothing else, behind a bounded queue.

use std::sync::{
    mpsc::{self, Receiver, SyncSender, TrySendError},
    Arc, Mutex, PoisonError,
};

use tokio::sync::oneshot;

use super::{Credentials, PeerIdentity};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Why a lookup was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    /// Every thread is busy and the queue is full (NSS is hanging).
    Busy,
    /// The lookup thread went away (it panicked).
    Failed,
}

/// The lookup threads and their queue.
#[derive(Debug)]
pub struct Lookups {
    queue: SyncSender<Job>,
}

impl Lookups {
    /// Starts `threads` lookup threads behind a queue of `queue` lookups.
    #[must_use]
    pub fn start(threads: usize, queue: usize) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            if let Err(e) = std::thread::Builder::new()
                .name(format!("hsmd-identity-{i}"))
                .stack_size(crate::secure_mem::THREAD_STACK)
                .spawn(move || work(&rx))
            {
                tracing::error!(error = %e, "cannot start an identity lookup thread");
            }
        }
        Self { queue: tx }
    }

    /// Looks up the peer's user and groups.
    ///
    /// # Errors
    /// [`LookupError::Busy`] at once when the queue is full.
    pub async fn resolve(&self, creds: Credentials) -> Result<PeerIdentity, LookupError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(PeerIdentity::resolve(creds));
        });
        match self.queue.try_send(job) {
            Ok(()) => rx.await.map_err(|_| LookupError::Failed),
            Err(TrySendError::Full(_)) => Err(LookupError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(LookupError::Failed),
        }
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job.
        let job = match rx.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
            tracing::error!("an identity lookup panicked");
        }
    }
}
