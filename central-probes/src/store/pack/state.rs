//! What the pack store's parts share: the index, the packs, the fault
//! counter, the queue to the group commit and its limits, and the
//! directory lock.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::error::{Error, Result};

use super::appender::Appenders;
use super::faults::Faults;
use super::index::{Change, Index};
use super::packs::Packs;

/// Changes to make durable, in their order, and whom to tell.
pub(super) struct Request {
    pub(super) changes: Vec<Change>,
    /// Each pack written, and the end of what was written to it.
    pub(super) packs: Vec<(u32, u64)>,
    /// Bytes written to packs, for the batch bound.
    pub(super) bytes: u64,
    pub(super) done: oneshot::Sender<io::Result<()>>,
}

/// How batches are bounded: a batch takes what arrives within `max_delay`
/// of its first commit, up to `max_bytes` written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchLimits {
    pub max_bytes: u64,
    pub max_delay: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits { max_bytes: 64 << 20, max_delay: Duration::from_millis(2) }
    }
}

pub(super) struct Inner {
    pub(super) index_dir: PathBuf,
    pub(super) index: Mutex<Index>,
    pub(super) packs: Arc<Packs>,
    /// Where records are appended back to back, one per lane.
    pub(super) appenders: Appenders,
    pub(super) faults: Arc<Faults>,
    /// To the group commit; `None` once the store closed.
    pub(super) queue: Mutex<Option<Sender<Request>>>,
    /// Set when a batch could not be made durable: no more writes.
    pub(super) failed: AtomicBool,
    pub(super) batch_limits: BatchLimits,
    pub(super) page_token_key: [u8; 32],
    pub(super) data_dir: PathBuf,
    pub(super) _lock: fs::File,
}

impl Inner {
    pub(super) fn index(&self) -> MutexGuard<'_, Index> {
        // Each change to the index is applied whole under the lock.
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands changes to the group commit; the receiver tells when they are
    /// durable and applied.
    pub(super) fn submit(
        &self,
        changes: Vec<Change>,
        packs: Vec<(u32, u64)>,
        bytes: u64,
    ) -> Result<oneshot::Receiver<std::io::Result<()>>> {
        let (done, receiver) = oneshot::channel();
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let sent = queue.as_ref().is_some_and(|queue| queue.send(Request { changes, packs, bytes, done }).is_ok());
        if !sent {
            return Err(Error::new(tonic::Code::Unavailable, "the probe store is closed"));
        }
        Ok(receiver)
    }

    pub(super) fn failed(&self) -> Result<()> {
        if self.failed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::internal(
                "the probe store could not make a write durable and takes no more; restart Central",
            ));
        }
        Ok(())
    }
}

/// Waits for the group commit to make a submitted change durable.
pub(super) async fn durable(receiver: oneshot::Receiver<std::io::Result<()>>, what: &str) -> Result<()> {
    match receiver.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::io(format!("making {what} durable"), e)),
        Err(_) => Err(Error::internal(format!("making {what} durable: the group commit stopped"))),
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
