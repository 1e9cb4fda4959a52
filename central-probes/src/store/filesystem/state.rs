//! The state a filesystem store shares with its writers: its directories,
//! the index of every probe (in memory, under one lock), the page token
//! key and the directory lock; and the snapshot of the index it leaves
//! when it closes.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use probe_api::names::ProbePath;
use tracing::warn;

use super::entry::Entry;
use super::snapshot;

pub(super) struct Inner {
    pub(super) data_dir: PathBuf,
    pub(super) probes_dir: PathBuf,
    pub(super) tmp_dir: PathBuf,
    pub(super) index: Mutex<BTreeMap<ProbePath, Entry>>,
    pub(super) next_temp: AtomicU64,
    /// Authenticates ListProbes page tokens; kept in the data directory so
    /// that tokens stay valid across restarts.
    pub(super) page_token_key: [u8; 32],
    /// Whether commits are fsync'd and a snapshot left on close (false for
    /// a cache that starts empty, `open_cache`).
    pub(super) durable: bool,
    /// Held for the life of the store: the exclusive lock on the directory.
    pub(super) _lock: File,
}

/// A closing store leaves a snapshot of its index, so that the next start
/// reads no probe headers: after an upload that ended less than a second
/// before, it first waits out the rest of that second (see `snapshot`).
impl Drop for Inner {
    fn drop(&mut self) {
        if !self.durable {
            return;
        }
        let index = self.index.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        std::thread::sleep(snapshot::quiet_wait(&self.probes_dir, index));
        if let Err(error) = snapshot::write(&self.data_dir, &self.probes_dir, index) {
            warn!(%error, "could not write the index snapshot; the next start reads every probe");
        }
    }
}

impl Inner {
    pub(super) fn index(&self) -> std::sync::MutexGuard<'_, BTreeMap<ProbePath, Entry>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (each change is one insert), so a poisoned lock is still usable.
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn final_path(&self, path: &ProbePath) -> PathBuf {
        self.probes_dir.join(path.module_version().as_str()).join(path.file_name().as_str())
    }

    pub(super) fn entry(&self, path: &ProbePath) -> Option<Entry> {
        self.index().get(path).cloned()
    }
}
