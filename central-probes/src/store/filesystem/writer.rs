//! Writing a probe: bytes to a temporary file on a blocking thread that
//! hashes them, room on disk reserved first, then verification and the
//! commit (fsync, rename, directory fsync) under the overwrite rule.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use probe_api::digest::{Sha256Digest, Sha256Hasher};
use probe_api::names::ProbePath;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Code;
use tracing::warn;

use crate::error::{Error, Result};
use crate::store::{CommitGate, CommitOutcome, Decision, PendingCommit, ProbeWriter, overwrite_rule};

use super::format::{HEADER_LEN, header, sync_dir};
use super::{Entry, Inner};

/// Chunks queued between the network and the writing thread of one file.
pub(super) const WRITE_QUEUE: usize = 16;

/// Room on disk held for a file being written; given back on drop.
pub(super) struct Reservation {
    inner: Arc<Inner>,
    size: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.inner.reserved.fetch_sub(self.size, Ordering::SeqCst);
    }
}

/// A file in `tmp/`, removed on drop unless it was renamed into place.
pub(super) struct TempFile {
    path: PathBuf,
    file: File,
    renamed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.renamed
            && let Err(error) = fs::remove_file(&self.path)
        {
            warn!(path = %self.path.display(), %error, "could not remove a temporary file");
        }
    }
}

/// What the writing thread hands back once the channel closes.
pub(super) struct Written {
    temp: TempFile,
    len: u64,
    sha256: Sha256Digest,
}

pub(super) struct FsProbeWriter {
    inner: Arc<Inner>,
    path: ProbePath,
    size: u64,
    received: u64,
    chunks: mpsc::Sender<Bytes>,
    /// The writing thread. Dropping the writer closes `chunks`; the thread
    /// then ends and its `TempFile` removes the file.
    worker: JoinHandle<io::Result<Written>>,
    reservation: Reservation,
}

impl Inner {
    /// Reserves room for `size` more bytes, or fails with RESOURCE_EXHAUSTED
    /// if that would take free space below the floor.
    pub(super) fn reserve(self: &Arc<Self>, size: u64) -> Result<Reservation> {
        let available = available_bytes(&self.tmp_dir)?;
        let reserved = self.reserved.fetch_add(size, Ordering::SeqCst) + size;
        let reservation = Reservation { inner: self.clone(), size };
        let needed = reserved.saturating_add(self.min_free_bytes);
        if available < needed {
            return Err(Error::new(
                Code::ResourceExhausted,
                format!(
                    "not enough disk space: {available} bytes free, {reserved} bytes being written, \
                     and the store keeps at least {} bytes free",
                    self.min_free_bytes
                ),
            ));
        }
        Ok(reservation)
    }
}

impl FsProbeWriter {
    /// Reserves room for `size` bytes and starts the writing thread on a new
    /// temporary file.
    pub(super) fn start(inner: &Arc<Inner>, path: ProbePath, size: u64) -> Result<FsProbeWriter> {
        let reservation = inner.reserve(size)?;
        let n = inner.next_temp.fetch_add(1, Ordering::Relaxed);
        let temp_path = inner.tmp_dir.join(format!("{}-{n}.part", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
            .map_err(|e| Error::io(format!("creating {}", temp_path.display()), e))?;
        let temp = TempFile { path: temp_path, file, renamed: false };
        let (chunks, receiver) = mpsc::channel(WRITE_QUEUE);
        let worker = tokio::task::spawn_blocking(move || write_all_chunks(temp, receiver));
        Ok(FsProbeWriter { inner: inner.clone(), path, size, received: 0, chunks, worker, reservation })
    }
}

pub(super) fn write_all_chunks(mut temp: TempFile, mut chunks: mpsc::Receiver<Bytes>) -> io::Result<Written> {
    let mut hasher = Sha256Hasher::new();
    let mut len = 0u64;
    temp.file.write_all(&[0u8; HEADER_LEN as usize])?;
    while let Some(chunk) = chunks.blocking_recv() {
        hasher.update(&chunk);
        temp.file.write_all(&chunk)?;
        len += chunk.len() as u64;
    }
    Ok(Written { temp, len, sha256: hasher.finish() })
}

#[tonic::async_trait]
impl ProbeWriter for FsProbeWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        let received = self.received + chunk.len() as u64;
        if received > self.size {
            return Err(Error::invalid_argument(format!("{}: more bytes than the declared {}", self.path, self.size)));
        }
        self.received = received;
        if self.chunks.send(chunk).await.is_err() {
            // The thread stopped early: only a write error does that.
            let error = match (&mut self.worker).await {
                Ok(Err(error)) => Error::io(format!("writing {}", self.path), error),
                _ => Error::internal(format!("writing {}: the writer stopped", self.path)),
            };
            return Err(error);
        }
        Ok(())
    }

    async fn finish_after(
        self: Box<Self>,
        sha256: Sha256Digest,
        overwrite: bool,
        gate: CommitGate,
    ) -> Result<PendingCommit> {
        let FsProbeWriter { inner, path, size, chunks, worker, reservation, .. } = *self;
        drop(chunks);
        // The writing thread may still be hashing; the caller need not wait
        // for it to go on receiving the next file. The task runs to its end
        // even if the caller goes away, so a file whose last byte arrived is
        // never left half-committed.
        let task = tokio::spawn(async move {
            let written = worker
                .await
                .map_err(|e| Error::internal(format!("writing {path}: {e}")))?
                .map_err(|e| Error::io(format!("writing {path}"), e))?;
            verify_and_commit(inner, path, written, Entry { size, sha256 }, overwrite, gate, reservation).await
        });
        Ok(Box::pin(async move { task.await.map_err(|e| Error::internal(format!("commit task failed: {e}")))? }))
    }
}

pub(super) async fn verify_and_commit(
    inner: Arc<Inner>,
    path: ProbePath,
    written: Written,
    new: Entry,
    overwrite: bool,
    gate: CommitGate,
    reservation: Reservation,
) -> Result<CommitOutcome> {
    if written.len != new.size {
        return Err(Error::invalid_argument(format!(
            "{path}: {} bytes received but {} declared",
            written.len, new.size
        )));
    }
    if written.sha256 != new.sha256 {
        return Err(Error::new(
            Code::DataLoss,
            format!("{path}: the received bytes have SHA-256 {} but the uploader sent {}", written.sha256, new.sha256),
        ));
    }
    if !gate.await {
        // Dropping `written` removes the temporary file.
        return Err(Error::new(Code::Aborted, format!("{path}: not committed, an earlier file of the upload failed")));
    }
    // Decide early when nothing will be stored: no fsync is needed then.
    if let Some(old) = inner.entry(&path)
        && let Decision::Keep(outcome) = decide(Some(old), new, overwrite)
    {
        return Ok(outcome);
    }
    tokio::task::spawn_blocking(move || {
        let outcome = commit(&inner, &path, written, new, overwrite);
        drop(reservation);
        outcome
    })
    .await
    .map_err(|e| Error::internal(format!("commit task failed: {e}")))?
}

/// The store's overwrite rule on this store's index entries.
fn decide(old: Option<Entry>, new: Entry, overwrite: bool) -> Decision {
    overwrite_rule(old.map(|old| (old.size, old.sha256)), (new.size, new.sha256), overwrite)
}

pub(super) fn commit(
    inner: &Inner,
    path: &ProbePath,
    mut written: Written,
    new: Entry,
    overwrite: bool,
) -> Result<CommitOutcome> {
    let io_error = |what: &str| {
        let what = format!("{what} {path}");
        move |e| Error::io(what, e)
    };
    written.temp.file.write_all_at(&header(new), 0).map_err(io_error("writing the header of"))?;
    written.temp.file.sync_all().map_err(io_error("syncing"))?;
    let final_path = inner.final_path(path);
    let module_dir = final_path.parent().expect("a probe path has a directory");
    {
        // The check and the rename happen under one lock: concurrent uploads
        // of one path cannot both think they stored it first.
        let mut index = inner.index();
        let outcome = match decide(index.get(path).copied(), new, overwrite) {
            Decision::Keep(nothing_to_write) => return Ok(nothing_to_write),
            Decision::Write(outcome) => outcome,
        };
        if !module_dir.exists() {
            fs::create_dir(module_dir).map_err(io_error("creating the directory of"))?;
            sync_dir(&inner.probes_dir).map_err(io_error("syncing the directory of"))?;
        }
        fs::rename(&written.temp.path, &final_path).map_err(io_error("renaming"))?;
        written.temp.renamed = true;
        index.insert(path.clone(), new);
        drop(index);
        sync_dir(module_dir).map_err(io_error("syncing the directory of"))?;
        Ok(outcome)
    }
}

/// Free bytes on the file system holding `dir`, as an unprivileged user sees it.
pub(super) fn available_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::internal("data directory path holds a NUL byte"))?;
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid C string and `stats` a writable statvfs.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) } != 0 {
        return Err(Error::io("checking free disk space", io::Error::last_os_error()));
    }
    // The field types differ between platforms; u64 holds all of them.
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(stats.f_bavail).saturating_mul(u64::from(stats.f_frsize)))
}
