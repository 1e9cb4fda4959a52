//! The embedded store: one file per probe under a data directory.
//!
//! Layout: `probes/<module version>/<probe file name>` holds a 48-byte
//! header (magic, size, SHA-256) followed by the probe's bytes, so a probe
//! and its digest are committed together by a single rename; `tmp/` holds
//! files being written. A file is written to `tmp/`, verified, fsync'd,
//! renamed into place, and its directory fsync'd. A crash can leave files in
//! `tmp/` only; they are removed at start-up. An exclusive lock on `lock`
//! keeps a second Central off the same directory.
//!
//! The index of all probes (path, size, digest) is kept in memory, built at
//! start-up from the headers, so existence checks and listings never touch
//! the disk. Writes hash and write on a blocking thread fed through a
//! bounded channel; commits (fsync, rename) run on their own blocking tasks
//! so that the next file streams in while the previous one is made durable.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use probe_api::digest::{Sha256Digest, Sha256Hasher};
use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Code;
use tracing::{info, warn};

use super::{CommitGate, CommitOutcome, PendingCommit, ProbeReader, ProbeStore, ProbeWriter, StoredProbe};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"KPROBE01";
const HEADER_LEN: u64 = 48;
/// Size of the chunks a probe is read in for serving.
pub const READ_CHUNK: usize = 256 * 1024;
/// Chunks queued between the network and the writing thread of one file.
const WRITE_QUEUE: usize = 16;

/// Settings of the embedded store.
#[derive(Clone, Debug)]
pub struct FilesystemStoreConfig {
    pub data_dir: PathBuf,
    /// Writes are refused when they would leave less free space than this.
    pub min_free_bytes: u64,
}

/// The embedded store; cheap to clone.
#[derive(Clone)]
pub struct FilesystemStore {
    inner: Arc<Inner>,
}

struct Inner {
    probes_dir: PathBuf,
    tmp_dir: PathBuf,
    index: Mutex<BTreeMap<ProbePath, Entry>>,
    min_free_bytes: u64,
    /// Bytes of files being written: the disk will need them soon, although
    /// the free space does not show it yet.
    reserved: AtomicU64,
    next_temp: AtomicU64,
    /// Authenticates ListProbes page tokens; kept in the data directory so
    /// that tokens stay valid across restarts.
    page_token_key: [u8; 32],
    /// Held for the life of the store: the exclusive lock on the directory.
    _lock: File,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Entry {
    size: u64,
    sha256: Sha256Digest,
}

impl FilesystemStore {
    /// Opens (creating if needed) the store under `config.data_dir`: takes
    /// the directory lock, removes leftovers of interrupted writes and loads
    /// the index. Blocking.
    pub fn open(config: &FilesystemStoreConfig) -> Result<Self> {
        let data_dir = &config.data_dir;
        let probes_dir = data_dir.join("probes");
        let tmp_dir = data_dir.join("tmp");
        for dir in [data_dir, &probes_dir, &tmp_dir] {
            fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let lock = lock_data_dir(data_dir)?;
        let page_token_key = load_or_create_key(&data_dir.join("page-token.key"))?;
        let leftovers = remove_leftovers(&tmp_dir)?;
        if leftovers > 0 {
            info!(leftovers, "removed unfinished writes of an earlier run");
        }
        let index = load_index(&probes_dir)?;
        info!(probes = index.len(), data_dir = %data_dir.display(), "probe store opened");
        Ok(FilesystemStore {
            inner: Arc::new(Inner {
                probes_dir,
                tmp_dir,
                index: Mutex::new(index),
                min_free_bytes: config.min_free_bytes,
                reserved: AtomicU64::new(0),
                next_temp: AtomicU64::new(0),
                page_token_key,
                _lock: lock,
            }),
        })
    }

    /// Number of probes stored.
    pub fn len(&self) -> usize {
        self.inner.index().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every probe with its size, in path order.
    pub fn sizes(&self) -> Vec<(ProbePath, u64)> {
        self.inner.index().iter().map(|(path, entry)| (path.clone(), entry.size)).collect()
    }
}

impl Inner {
    fn index(&self) -> std::sync::MutexGuard<'_, BTreeMap<ProbePath, Entry>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (each change is one insert), so a poisoned lock is still usable.
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn final_path(&self, path: &ProbePath) -> PathBuf {
        self.probes_dir.join(path.module_version().as_str()).join(path.file_name().as_str())
    }

    fn entry(&self, path: &ProbePath) -> Option<Entry> {
        self.index().get(path).copied()
    }

    /// Reserves room for `size` more bytes, or fails with RESOURCE_EXHAUSTED
    /// if that would take free space below the floor.
    fn reserve(self: &Arc<Self>, size: u64) -> Result<Reservation> {
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

/// Room on disk held for a file being written; given back on drop.
struct Reservation {
    inner: Arc<Inner>,
    size: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.inner.reserved.fetch_sub(self.size, Ordering::SeqCst);
    }
}

/// A file in `tmp/`, removed on drop unless it was renamed into place.
struct TempFile {
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
struct Written {
    temp: TempFile,
    len: u64,
    sha256: Sha256Digest,
}

struct FsProbeWriter {
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

fn write_all_chunks(mut temp: TempFile, mut chunks: mpsc::Receiver<Bytes>) -> io::Result<Written> {
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

async fn verify_and_commit(
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
    if let Some(outcome) = inner.entry(&path).and_then(|old| outcome(old, new, overwrite).1) {
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

/// The overwrite rule: what storing `new` over `old` does. The second value
/// is `Some` when nothing is to be written.
fn outcome(old: Entry, new: Entry, overwrite: bool) -> (CommitOutcome, Option<CommitOutcome>) {
    if old == new {
        (CommitOutcome::Identical, Some(CommitOutcome::Identical))
    } else if overwrite {
        (CommitOutcome::Overwritten { previous: old.sha256 }, None)
    } else {
        let conflict = CommitOutcome::Conflict { existing: old.sha256 };
        (conflict, Some(conflict))
    }
}

fn commit(inner: &Inner, path: &ProbePath, mut written: Written, new: Entry, overwrite: bool) -> Result<CommitOutcome> {
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
        let outcome = match index.get(path) {
            None => CommitOutcome::Stored,
            Some(&old) => match self::outcome(old, new, overwrite) {
                (_, Some(nothing_to_write)) => return Ok(nothing_to_write),
                (overwritten, None) => overwritten,
            },
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

fn header(entry: Entry) -> [u8; HEADER_LEN as usize] {
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&entry.size.to_le_bytes());
    header[16..].copy_from_slice(&entry.sha256.0);
    header
}

/// Reads and checks the header of a stored probe file.
fn read_header(file: &File) -> io::Result<Entry> {
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut header, 0)?;
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    if &header[..8] != MAGIC {
        return Err(invalid("not a probe file of this store (bad magic)"));
    }
    let size = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let sha256 = Sha256Digest(header[16..].try_into().expect("32 bytes"));
    if file.metadata()?.len() != HEADER_LEN + size {
        return Err(invalid("the file length does not match its header"));
    }
    Ok(Entry { size, sha256 })
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn lock_data_dir(data_dir: &Path) -> Result<File> {
    let path = data_dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    file.try_lock().map_err(|_| {
        Error::new(Code::FailedPrecondition, format!("{} is in use by another Central", data_dir.display()))
    })?;
    Ok(file)
}

/// Reads the 32-byte key at `path`, or makes one: random, readable by
/// Central's user only, written whole or not at all.
fn load_or_create_key(path: &Path) -> Result<[u8; 32]> {
    use std::os::unix::fs::OpenOptionsExt;
    let io_error = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |e| Error::io(what, e)
    };
    match fs::read(path) {
        Ok(bytes) => {
            return bytes.try_into().map_err(|_| Error::internal(format!("{} is not a 32-byte key", path.display())));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("reading")(e)),
    }
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).map_err(|e| Error::internal(format!("making a page token key: {e}")))?;
    let temp = path.with_extension("new");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io_error("creating"))?;
    file.write_all(&key).and_then(|()| file.sync_all()).map_err(io_error("writing"))?;
    fs::rename(&temp, path).map_err(io_error("renaming"))?;
    Ok(key)
}

fn remove_leftovers(tmp_dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let entries = fs::read_dir(tmp_dir).map_err(|e| Error::io(format!("reading {}", tmp_dir.display()), e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io("reading tmp/", e))?.path();
        fs::remove_file(&path).map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
        removed += 1;
    }
    Ok(removed)
}

/// Threads reading headers at start-up. With a cold page cache the scan is
/// bound by I/O latency, not CPU: more reads in flight shorten it.
const INDEX_THREADS: usize = 16;

fn load_index(probes_dir: &Path) -> Result<BTreeMap<ProbePath, Entry>> {
    let read_dir = |dir: &Path| fs::read_dir(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e));
    let mut files = Vec::new();
    for module_dir in read_dir(probes_dir)? {
        let module_dir = module_dir.map_err(|e| Error::io("reading probes/", e))?.path();
        let name = module_dir.file_name().unwrap_or_default().to_string_lossy();
        let Ok(module_version) = ModuleVersion::parse(&name) else {
            warn!(path = %module_dir.display(), "ignoring an entry that is not a module version");
            continue;
        };
        for file in read_dir(&module_dir)? {
            let file = file.map_err(|e| Error::io("reading probes/", e))?.path();
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            let Ok(file_name) = ProbeFileName::parse(&name) else {
                warn!(path = %file.display(), "ignoring a file that is not a probe");
                continue;
            };
            files.push(ProbePath::new(module_version.clone(), file_name));
        }
    }
    let share = files.len().div_ceil(INDEX_THREADS).max(1);
    let entries: Vec<Vec<(ProbePath, Entry)>> = std::thread::scope(|scope| {
        let readers: Vec<_> = files
            .chunks(share)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .filter_map(|path| {
                            let file = probes_dir.join(path.module_version().as_str()).join(path.file_name().as_str());
                            match File::open(&file).and_then(|f| read_header(&f)) {
                                Ok(entry) => Some((path.clone(), entry)),
                                Err(error) => {
                                    warn!(path = %file.display(), %error, "ignoring an unreadable probe file");
                                    None
                                }
                            }
                        })
                        .collect()
                })
            })
            .collect();
        readers.into_iter().map(|reader| reader.join().expect("a header reader panicked")).collect()
    });
    Ok(entries.into_iter().flatten().collect())
}

/// Free bytes on the file system holding `dir`, as an unprivileged user sees it.
fn available_bytes(dir: &Path) -> Result<u64> {
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

#[tonic::async_trait]
impl ProbeStore for FilesystemStore {
    async fn stat(&self, path: &ProbePath) -> Result<Option<StoredProbe>> {
        Ok(self.inner.entry(path).map(|entry| stored(path.clone(), entry)))
    }

    async fn list(
        &self,
        module_version: Option<&ModuleVersion>,
        after: Option<&ProbePath>,
        limit: usize,
    ) -> Result<Vec<StoredProbe>> {
        let index = self.inner.index();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let in_module = |path: &ProbePath| module_version.is_none_or(|v| path.module_version() == v);
        // Paths order as strings, so one module version's paths are the
        // contiguous run of those starting with "<version>/".
        let prefix = module_version.map(|v| format!("{v}/"));
        Ok(index
            .range((start, Bound::Unbounded))
            .skip_while(|(path, _)| prefix.as_ref().is_some_and(|prefix| path.bytes().lt(prefix.bytes())))
            .take_while(|(path, _)| in_module(path))
            .take(limit)
            .map(|(path, &entry)| stored(path.clone(), entry))
            .collect())
    }

    async fn create(&self, path: ProbePath, size: u64) -> Result<Box<dyn ProbeWriter>> {
        let reservation = self.inner.reserve(size)?;
        let n = self.inner.next_temp.fetch_add(1, Ordering::Relaxed);
        let temp_path = self.inner.tmp_dir.join(format!("{}-{n}.part", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
            .map_err(|e| Error::io(format!("creating {}", temp_path.display()), e))?;
        let temp = TempFile { path: temp_path, file, renamed: false };
        let (chunks, receiver) = mpsc::channel(WRITE_QUEUE);
        let worker = tokio::task::spawn_blocking(move || write_all_chunks(temp, receiver));
        Ok(Box::new(FsProbeWriter { inner: self.inner.clone(), path, size, received: 0, chunks, worker, reservation }))
    }

    async fn open(&self, path: &ProbePath) -> Result<Option<ProbeReader>> {
        if self.inner.entry(path).is_none() {
            return Ok(None);
        }
        // Opened and first chunk read on the calling thread, as nginx does:
        // a probe is usually one chunk and in the page cache, and a hop to a
        // blocking thread cost a third of the requests/s of one client.
        let file_path = self.inner.final_path(path);
        open_probe(path.clone(), &file_path)
    }

    fn page_token_key(&self) -> &[u8] {
        &self.inner.page_token_key
    }

    async fn remove(&self, path: &ProbePath) -> Result<bool> {
        let inner = self.inner.clone();
        let path = path.clone();
        tokio::task::spawn_blocking(move || remove_probe(&inner, &path))
            .await
            .map_err(|e| Error::internal(format!("removing a probe: {e}")))?
    }
}

fn remove_probe(inner: &Inner, path: &ProbePath) -> Result<bool> {
    let file_path = inner.final_path(path);
    let mut index = inner.index();
    if index.remove(path).is_none() {
        return Ok(false);
    }
    match fs::remove_file(&file_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            drop(index);
            return Err(Error::io(format!("removing {path}"), e));
        }
    }
    drop(index);
    if let Some(dir) = file_path.parent() {
        sync_dir(dir).map_err(|e| Error::io(format!("syncing the directory of {path}"), e))?;
    }
    Ok(true)
}

fn stored(path: ProbePath, entry: Entry) -> StoredProbe {
    StoredProbe { path, size: entry.size, sha256: entry.sha256 }
}

/// Opens a stored probe and reads its first chunk; the rest is read a chunk
/// at a time as the stream is asked for it.
fn open_probe(path: ProbePath, file_path: &Path) -> Result<Option<ProbeReader>> {
    let file = match File::open(file_path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("opening {path}"), e)),
    };
    // The header, not the index, describes this file: it may have been
    // overwritten since the index was asked.
    let entry = read_header(&file).map_err(|e| Error::io(format!("reading {path}"), e))?;
    let mut reader = ProbeBytes { file, offset: HEADER_LEN, remaining: entry.size };
    let first = reader.next_chunk().map_err(|e| Error::io(format!("reading {path}"), e))?;
    let chunks = OnDemandChunks { first, reader: Some(reader), reading: None, path: path.clone() };
    Ok(Some(ProbeReader { probe: stored(path, entry), chunks: Box::pin(chunks) }))
}

/// The chunks of a probe, each read on a blocking thread only once the
/// stream is asked for it: a client that does not read holds one chunk and
/// its file, never a thread.
struct OnDemandChunks {
    first: Option<Bytes>,
    /// `None` while a read is in flight, and once the probe is read whole
    /// or failed.
    reader: Option<ProbeBytes>,
    reading: Option<JoinHandle<(ProbeBytes, io::Result<Option<Bytes>>)>>,
    path: ProbePath,
}

impl tokio_stream::Stream for OnDemandChunks {
    type Item = Result<Bytes>;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<Result<Bytes>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        if self.reading.is_none() {
            let Some(mut reader) = self.reader.take().filter(|reader| reader.remaining > 0) else {
                return Poll::Ready(None);
            };
            self.reading = Some(tokio::task::spawn_blocking(move || {
                let chunk = reader.next_chunk();
                (reader, chunk)
            }));
        }
        let reading = self.reading.as_mut().expect("a read in flight");
        let finished = std::task::ready!(std::pin::Pin::new(reading).poll(cx));
        self.reading = None;
        let path = &self.path;
        Poll::Ready(match finished {
            Ok((reader, Ok(chunk))) => {
                self.reader = Some(reader);
                chunk.map(Ok)
            }
            Ok((_, Err(e))) => Some(Err(Error::io(format!("reading {path}"), e))),
            Err(e) => Some(Err(Error::internal(format!("reading {path}: {e}")))),
        })
    }
}

struct ProbeBytes {
    file: File,
    offset: u64,
    remaining: u64,
}

impl ProbeBytes {
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let len = self.remaining.min(READ_CHUNK as u64) as usize;
        let mut buffer = BytesMut::zeroed(len);
        self.file.read_exact_at(&mut buffer, self.offset)?;
        self.offset += len as u64;
        self.remaining -= len as u64;
        Ok(Some(buffer.freeze()))
    }
}

/// Reads a whole stored probe file's content, for tests and tools.
pub fn read_probe_file(file_path: &Path) -> io::Result<(Sha256Digest, Vec<u8>)> {
    let mut file = File::open(file_path)?;
    let entry = read_header(&file)?;
    let mut content = Vec::new();
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact(&mut header)?;
    file.read_to_end(&mut content)?;
    Ok((entry.sha256, content))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn config(dir: &Path) -> FilesystemStoreConfig {
        FilesystemStoreConfig { data_dir: dir.to_owned(), min_free_bytes: 0 }
    }

    fn path(s: &str) -> ProbePath {
        ProbePath::parse(s).unwrap()
    }

    fn sha(bytes: &[u8]) -> Sha256Digest {
        Sha256Digest::of(bytes)
    }

    const P: &str = "2.5.0/collector-ebpf-5.4.0-42-generic.o.gz";

    async fn put(store: &FilesystemStore, p: &str, bytes: &[u8], overwrite: bool) -> Result<CommitOutcome> {
        let mut writer = store.create(path(p), bytes.len() as u64).await?;
        for chunk in bytes.chunks(1000) {
            writer.write(Bytes::copy_from_slice(chunk)).await?;
        }
        writer.finish(sha(bytes), overwrite).await?.await
    }

    async fn read_back(store: &FilesystemStore, p: &str) -> Option<(StoredProbe, Vec<u8>)> {
        let reader = store.open(&path(p)).await.unwrap()?;
        let chunks: Vec<Bytes> = reader.chunks.map(|c| c.unwrap()).collect().await;
        Some((reader.probe, chunks.concat()))
    }

    fn tmp_files(dir: &Path) -> usize {
        fs::read_dir(dir.join("tmp")).unwrap().count()
    }

    /// A dropped writer's thread removes its file once it sees the channel
    /// close, a moment later.
    async fn tmp_files_after_cleanup(dir: &Path) -> usize {
        for _ in 0..200 {
            if tmp_files(dir) == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tmp_files(dir)
    }

    #[tokio::test]
    async fn a_committed_probe_is_durable_and_reads_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..READ_CHUNK * 2 + 77).map(|i| (i % 251) as u8).collect();
        {
            let store = FilesystemStore::open(&config(dir.path())).unwrap();
            assert_eq!(put(&store, P, &bytes, false).await.unwrap(), CommitOutcome::Stored);
            let (probe, read) = read_back(&store, P).await.unwrap();
            assert_eq!((probe.size, probe.sha256), (bytes.len() as u64, sha(&bytes)));
            assert_eq!(read, bytes);
        }
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        assert_eq!(store.len(), 1);
        assert_eq!(read_back(&store, P).await.unwrap().1, bytes);
        assert_eq!(tmp_files(dir.path()), 0);
    }

    #[tokio::test]
    async fn identical_conflicting_and_overwriting_uploads_follow_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        put(&store, P, b"first", false).await.unwrap();
        assert_eq!(put(&store, P, b"first", false).await.unwrap(), CommitOutcome::Identical);
        assert_eq!(put(&store, P, b"first", true).await.unwrap(), CommitOutcome::Identical);
        assert_eq!(
            put(&store, P, b"second", false).await.unwrap(),
            CommitOutcome::Conflict { existing: sha(b"first") }
        );
        assert_eq!(read_back(&store, P).await.unwrap().1, b"first");
        assert_eq!(
            put(&store, P, b"second", true).await.unwrap(),
            CommitOutcome::Overwritten { previous: sha(b"first") }
        );
        assert_eq!(read_back(&store, P).await.unwrap().1, b"second");
        assert_eq!(tmp_files(dir.path()), 0);
    }

    #[tokio::test]
    async fn racing_writers_of_one_path_store_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        let mut first = store.create(path(P), 1).await.unwrap();
        let mut second = store.create(path(P), 1).await.unwrap();
        first.write(Bytes::from_static(b"a")).await.unwrap();
        second.write(Bytes::from_static(b"b")).await.unwrap();
        let first = first.finish(sha(b"a"), false).await.unwrap();
        let second = second.finish(sha(b"b"), false).await.unwrap();
        let (first, second) = tokio::join!(first, second);
        let outcomes = [first.unwrap(), second.unwrap()];
        let stored = outcomes.iter().filter(|o| **o == CommitOutcome::Stored).count();
        let conflicts = outcomes.iter().filter(|o| matches!(o, CommitOutcome::Conflict { .. })).count();
        assert_eq!((stored, conflicts), (1, 1), "{outcomes:?}");
    }

    #[tokio::test]
    async fn a_wrong_digest_or_size_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(&config(dir.path())).unwrap();

        let mut writer = store.create(path(P), 5).await.unwrap();
        writer.write(Bytes::from_static(b"hello")).await.unwrap();
        let error = writer.finish(sha(b"other"), false).await.unwrap().await.unwrap_err();
        assert_eq!(error.code, Code::DataLoss);

        let mut writer = store.create(path(P), 5).await.unwrap();
        writer.write(Bytes::from_static(b"hell")).await.unwrap();
        let error = writer.finish(sha(b"hell"), false).await.unwrap().await.unwrap_err();
        assert_eq!(error.code, Code::InvalidArgument);

        let mut writer = store.create(path(P), 5).await.unwrap();
        let error = writer.write(Bytes::from_static(b"hello!")).await.unwrap_err();
        assert_eq!(error.code, Code::InvalidArgument);
        drop(writer);

        assert!(store.stat(&path(P)).await.unwrap().is_none());
        assert!(store.open(&path(P)).await.unwrap().is_none());
        assert_eq!(tmp_files_after_cleanup(dir.path()).await, 0);
    }

    #[tokio::test]
    async fn an_abandoned_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        let mut writer = store.create(path(P), 10).await.unwrap();
        writer.write(Bytes::from_static(b"12345")).await.unwrap();
        assert_eq!(tmp_files(dir.path()), 1);
        drop(writer);
        assert_eq!(tmp_files_after_cleanup(dir.path()).await, 0);
        assert!(store.is_empty());
    }

    #[test]
    fn leftovers_of_a_crash_are_removed_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        drop(FilesystemStore::open(&config(dir.path())).unwrap());
        fs::write(dir.path().join("tmp/123-0.part"), b"half a probe").unwrap();
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        assert_eq!(tmp_files(dir.path()), 0);
        assert!(store.is_empty());
    }

    #[test]
    fn corrupt_and_foreign_files_are_not_served() {
        let dir = tempfile::tempdir().unwrap();
        drop(FilesystemStore::open(&config(dir.path())).unwrap());
        let module = dir.path().join("probes/2.5.0");
        fs::create_dir_all(&module).unwrap();
        fs::write(module.join("collector-ebpf-5.4.0.o.gz"), b"no header").unwrap();
        fs::write(module.join("notes.txt"), b"").unwrap();
        let mut truncated = header(Entry { size: 100, sha256: sha(b"") }).to_vec();
        truncated.extend_from_slice(b"short");
        fs::write(module.join("collector-ebpf-5.5.0.o.gz"), truncated).unwrap();
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        assert!(store.is_empty());
    }

    #[test]
    fn a_second_store_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = FilesystemStore::open(&config(dir.path())).unwrap();
        let error = FilesystemStore::open(&config(dir.path())).err().unwrap();
        assert_eq!(error.code, Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn writes_that_would_cross_the_free_space_floor_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = FilesystemStoreConfig { data_dir: dir.path().to_owned(), min_free_bytes: u64::MAX / 2 };
        let store = FilesystemStore::open(&config).unwrap();
        let error = store.create(path(P), 10).await.err().unwrap();
        assert_eq!(error.code, Code::ResourceExhausted);
        assert_eq!(tmp_files(dir.path()), 0);
        assert_eq!(store.inner.reserved.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_removed_probe_is_gone_also_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FilesystemStore::open(&config(dir.path())).unwrap();
            put(&store, P, b"bytes", false).await.unwrap();
            let reader = store.open(&path(P)).await.unwrap().unwrap();
            assert!(store.remove(&path(P)).await.unwrap());
            assert!(!store.remove(&path(P)).await.unwrap());
            assert!(store.open(&path(P)).await.unwrap().is_none());
            let chunks: Vec<Bytes> = reader.chunks.map(|c| c.unwrap()).collect().await;
            assert_eq!(chunks.concat(), b"bytes", "an open reader still reads it");
        }
        assert!(FilesystemStore::open(&config(dir.path())).unwrap().is_empty());
    }

    #[tokio::test]
    async fn listing_is_in_path_string_order_for_every_page_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        let mut paths = vec![
            "2.5.0/collector-ebpf-5.4.0.o.gz",
            "2.5.0/collector-5.4.0.ko.gz",
            "2.5.0-rc1/collector-ebpf-5.4.0.o.gz",
            "2.5.0-rc10/collector-ebpf-5.4.0.o.gz",
            "2.10.0/collector-ebpf-5.4.0.o.gz",
            "2.5.1/collector-ebpf-5.4.0.o.gz",
            "1123dde0458e72a49880b06922e135dbcd36fb784fed530ab84ddfa8924e5c05/collector-4.9.ko.gz",
        ];
        for p in &paths {
            put(&store, p, p.as_bytes(), false).await.unwrap();
        }
        paths.sort();
        for filter in [None, Some("2.5.0"), Some("2.5.0-rc1")] {
            let v = filter.map(|v| ModuleVersion::parse(v).unwrap());
            let expected: Vec<&str> =
                paths.iter().copied().filter(|p| filter.is_none_or(|v| p.starts_with(&format!("{v}/")))).collect();
            for page_size in 1..=paths.len() + 1 {
                let mut listed = Vec::new();
                let mut after: Option<ProbePath> = None;
                loop {
                    let page = store.list(v.as_ref(), after.as_ref(), page_size).await.unwrap();
                    listed.extend(page.iter().map(|p| p.path.to_string()));
                    if page.len() < page_size {
                        break;
                    }
                    after = page.last().map(|p| p.path.clone());
                }
                assert_eq!(listed, expected, "filter {filter:?}, page size {page_size}");
            }
        }
    }

    #[tokio::test]
    async fn listing_pages_through_one_module_version_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        for p in [
            "2.5.0/collector-ebpf-5.4.0.o.gz",
            "2.5.0/collector-5.4.0.ko.gz",
            "2.4.0/collector-ebpf-5.4.0.o.gz",
            "2.6.0/collector-ebpf-5.4.0.o.gz",
        ] {
            put(&store, p, p.as_bytes(), false).await.unwrap();
        }
        let v = ModuleVersion::parse("2.5.0").unwrap();
        let first = store.list(Some(&v), None, 1).await.unwrap();
        assert_eq!(first[0].path.to_string(), "2.5.0/collector-5.4.0.ko.gz");
        let second = store.list(Some(&v), Some(&first[0].path), 10).await.unwrap();
        let names: Vec<String> = second.iter().map(|p| p.path.to_string()).collect();
        assert_eq!(names, ["2.5.0/collector-ebpf-5.4.0.o.gz"]);
        assert_eq!(store.list(None, None, 10).await.unwrap().len(), 4);
    }
}
