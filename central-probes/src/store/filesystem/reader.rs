//! Reading a stored probe: its header, then its bytes a chunk at a time (a
//! probe of one chunk, with its header and signature, in one read).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use probe_api::names::ProbePath;
use probe_api::signing::MAX_SIGNATURE_LEN;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::store::{ChunkStream, ProbeReader};

use super::entry::stored;
#[cfg(any(test, feature = "testing"))]
use super::format::read_header;
use super::format::{HEADER_LEN, read_probe_start};

/// Size of the chunks a probe is read in for serving.
pub const READ_CHUNK: usize = 256 * 1024;

/// Opens a stored probe and reads its first chunk; the rest is read a chunk
/// at a time as the stream is asked for it.
pub(super) fn open_probe(path: ProbePath, file_path: &Path) -> Result<Option<ProbeReader>> {
    let file = match File::open(file_path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("opening {path}"), e)),
    };
    // The header, not the index, describes this file: it may have been
    // overwritten since the index was asked. A probe of one chunk comes
    // with it, in the same read.
    let whole_up_to = HEADER_LEN + READ_CHUNK as u64 + MAX_SIGNATURE_LEN as u64;
    let (entry, offset, whole) =
        read_probe_start(&file, whole_up_to).map_err(|e| Error::io(format!("reading {path}"), e))?;
    let remaining = if whole.is_some() { 0 } else { entry.size };
    let chunks = read_on_demand(path.clone(), Arc::new(file), offset, remaining, whole)?;
    Ok(Some(ProbeReader { probe: stored(path, entry), chunks }))
}

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

/// Reads a whole stored probe file's content, for tests.
#[cfg(any(test, feature = "testing"))]
pub fn read_probe_file(file_path: &Path) -> io::Result<(probe_api::digest::Sha256Digest, Vec<u8>)> {
    let file = File::open(file_path)?;
    let (entry, offset) = read_header(&file)?;
    let mut content = vec![0u8; entry.size as usize];
    file.read_exact_at(&mut content, offset)?;
    Ok((entry.sha256, content))
}

/// Flips one bit of byte `at` of the bytes of the stored probe file
/// `file_path`, as rot on the disk would (tests of damaged probes).
#[cfg(any(test, feature = "testing"))]
pub fn flip_a_byte(file_path: &Path, at: u64) -> io::Result<()> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(file_path)?;
    let (_, offset) = read_header(&file)?;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset + at)?;
    file.write_all_at(&[byte[0] ^ 0x10], offset + at)
}
