//! One file's hashing on its lane (`lanes.rs`): the digests so far and the
//! blocking staging the lane writes, shared by the file's writer and the
//! jobs it queues; the writer learns of a failed write at its next chunk
//! and gets the digests from the last job.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use probe_api::digest::{Sha256Digest, Sha256Hasher};
use probe_api::signing::Prehasher;
use tokio::sync::oneshot;

use super::backend::{BlockingStaging, FileEnd, Staged};
use super::lanes::Lane;
use crate::error::{Error, Result};

/// What the lane found: the length and the digests.
pub(super) struct Received {
    pub(super) len: u64,
    pub(super) sha256: Sha256Digest,
    pub(super) crc32: u32,
    /// What a minisign signature signs; computed only for a store that
    /// checks signatures.
    pub(super) prehash: Option<[u8; 64]>,
}

/// What the lane did: the digests, and the staging it wrote (if it was
/// given one), or the error that stopped it.
pub(super) struct Hashed {
    pub(super) received: Received,
    pub(super) staged: Option<Result<Box<dyn Staged>>>,
}

/// One file as its lane sees it; the writer holds it too.
pub(super) struct FileHashing {
    state: Mutex<Option<Hashing>>,
    /// Set when a write of the staging failed: nothing more is taken. A
    /// flag beside `state`, so that the writer checks it at each chunk
    /// without waiting for the lock, which the lane holds while it hashes.
    pub(super) failed: AtomicBool,
}

/// The digests so far, and the staging the lane writes.
struct Hashing {
    sha256: Sha256Hasher,
    crc32: crc32fast::Hasher,
    blake2b: Option<Prehasher>,
    len: u64,
    staging: Option<Box<dyn BlockingStaging>>,
    error: Option<Error>,
}

impl FileHashing {
    pub(super) fn new(prehash: bool, staging: Option<Box<dyn BlockingStaging>>) -> FileHashing {
        let hashing = Hashing {
            sha256: Sha256Hasher::new(),
            crc32: crc32fast::Hasher::new(),
            blake2b: prehash.then(Prehasher::new),
            len: 0,
            staging,
            error: None,
        };
        FileHashing { state: Mutex::new(Some(hashing)), failed: AtomicBool::new(false) }
    }

    fn state(&self) -> MutexGuard<'_, Option<Hashing>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On the lane: hashes the pieces of a chunk, and writes them to the
    /// staging if there is one. The CRC-32 costs a few percent of the
    /// SHA-256 (crc32fast runs at memory speed).
    pub(super) fn take(&self, pieces: &[Bytes]) {
        let mut state = self.state();
        for piece in pieces {
            let Some(hashing) = state.as_mut().filter(|hashing| hashing.error.is_none()) else { return };
            hashing.take(piece, &self.failed);
        }
    }

    /// On the lane: the digests and the finished staging (given the file's
    /// signature).
    pub(super) fn finish(&self, signature: Option<Bytes>) -> Option<Hashed> {
        let hashing = self.state().take()?;
        let received = Received {
            len: hashing.len,
            sha256: hashing.sha256.finish(),
            crc32: hashing.crc32.finalize(),
            prehash: hashing.blake2b.map(Prehasher::finish),
        };
        let staged = match hashing.error {
            Some(error) => Some(Err(error)),
            None => hashing.staging.map(|staging| {
                staging.finish(FileEnd { len: received.len, sha256: received.sha256, crc32: received.crc32, signature })
            }),
        };
        Some(Hashed { received, staged })
    }

    /// The error that stopped the lane taking this file's chunks.
    pub(super) fn error(&self) -> Option<Error> {
        self.state().as_ref().and_then(|hashing| hashing.error.clone())
    }
}

/// A file on the lane that hashes its chunks. Dropped unfinished, it drops
/// the file's staging on the lane, after the chunks queued before (the pack
/// store cuts its record off there).
pub(super) struct OnLane {
    pub(super) lane: Lane,
    /// Handed to the lane's last job by `finish`.
    pub(super) hashing: Option<Arc<FileHashing>>,
}

impl OnLane {
    /// Queues the file's last job: what the lane did, once it has.
    pub(super) fn finish(mut self, signature: Option<Bytes>) -> Option<oneshot::Receiver<Hashed>> {
        let hashing = self.hashing.take()?;
        let (done, hashed) = oneshot::channel();
        let queued = self.lane.run_now(0, move || {
            if let Some(result) = hashing.finish(signature) {
                let _ = done.send(result);
            }
        });
        queued.then_some(hashed)
    }
}

impl Drop for OnLane {
    fn drop(&mut self) {
        if let Some(hashing) = self.hashing.take() {
            self.lane.run_now(0, move || drop(hashing.state().take()));
        }
    }
}

impl Hashing {
    /// Hashes `chunk` and writes it to the staging; a failed write is kept
    /// and raises `failed`.
    fn take(&mut self, chunk: &[u8], failed: &AtomicBool) {
        self.sha256.update(chunk);
        self.crc32.update(chunk);
        if let Some(blake2b) = &mut self.blake2b {
            blake2b.update(chunk);
        }
        self.len += chunk.len() as u64;
        if let Some(Err(error)) = self.staging.as_mut().map(|staging| staging.write(chunk)) {
            self.error = Some(error);
            // The writer stops at its next chunk.
            failed.store(true, Ordering::SeqCst);
        }
    }
}
