//! The data directory and the file reads the two on-disk backends (the
//! per-file store, `filesystem/`, and the pack store, `pack/`) share: the
//! directory lock, the page token key, the file of damaged probes, free
//! space, directory fsyncs, and a probe's bytes read from a file a chunk at
//! a time as a client asks for them.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use probe_api::names::ProbePath;
use tokio::task::JoinHandle;
use tonic::Code;

use crate::error::{Error, Result};
use crate::store::ChunkStream;

/// Where the damaged probes reads found are kept (`store::damage`).
pub(in crate::store) const DAMAGE_FILE: &str = "damaged-probes";

/// Takes the exclusive lock on `data_dir`'s `lock` file, held as long as
/// the file returned is open: a second Central on the same directory is
/// refused.
pub(in crate::store) fn lock_data_dir(data_dir: &Path) -> Result<File> {
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
pub(in crate::store) fn load_or_create_key(path: &Path) -> Result<[u8; 32]> {
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
    crate::private_file::replace(path, &key).map_err(io_error("writing"))?;
    Ok(key)
}

/// Makes the entries of `dir` (files created, renamed or removed in it)
/// durable.
pub(in crate::store) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
/// Free bytes on the file system holding `dir`, as an unprivileged user sees it.
pub(in crate::store) fn available_bytes(dir: &Path) -> Result<u64> {
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

/// Size of the chunks a probe is read in for serving.
pub(in crate::store) const READ_CHUNK: usize = 256 * 1024;

/// The chunks of the `size` bytes at `offset` of `file`, after `first`
/// (bytes read already, that precede them); without `first`, the first
/// chunk is read now, on the calling thread.
pub(in crate::store) fn read_on_demand(
    path: ProbePath,
    file: Arc<File>,
    offset: u64,
    size: u64,
    first: Option<Bytes>,
) -> Result<ChunkStream> {
    let mut reader = ProbeBytes { file, offset, remaining: size };
    let first = match first {
        Some(bytes) => Some(bytes),
        None => reader.next_chunk().map_err(|e| Error::io(format!("reading {path}"), e))?,
    };
    let first = first.filter(|bytes| !bytes.is_empty());
    Ok(Box::pin(OnDemandChunks { first, reader: Some(reader), reading: None, path }))
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
    file: Arc<File>,
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
