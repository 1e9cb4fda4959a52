//! The index on disk: a snapshot (`index/snapshot`) and the logs written
//! after it (`index/log-<generation>`), each a file of framed changes.
//!
//! A frame is its body's length (4 bytes), the body's CRC-32 (4 bytes) and
//! the body: a tag and the change's fields (`encode`). A log starts with
//! `KPLOG001` and its generation; a snapshot with `KPSNAP01` and the last
//! generation it covers, and ends with a frame counting its changes, so a
//! snapshot is whole or is not used. A log's torn last frame (the process
//! died appending it) ends the log: it was never made durable, so no probe
//! it names was reported stored.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;

use super::faults::Faults;
use super::index::{Change, Loc};

const LOG_MAGIC: &[u8; 8] = b"KPLOG001";
const SNAPSHOT_MAGIC: &[u8; 8] = b"KPSNAP01";
pub(super) const SNAPSHOT: &str = "snapshot";
const END_TAG: u8 = 9;

pub(super) fn log_path(index_dir: &Path, generation: u64) -> PathBuf {
    index_dir.join(format!("log-{generation:010}"))
}

/// The generations of the logs in `index_dir`, oldest first.
pub(super) fn log_generations(index_dir: &Path) -> io::Result<Vec<u64>> {
    let mut generations = Vec::new();
    for entry in fs::read_dir(index_dir)? {
        let name = entry?.file_name();
        if let Some(generation) = name.to_str().and_then(|n| n.strip_prefix("log-")).and_then(|g| g.parse().ok()) {
            generations.push(generation);
        }
    }
    generations.sort_unstable();
    Ok(generations)
}

/// Appends `change` as a frame to `out`.
pub(super) fn encode(change: &Change, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    let put_path = |out: &mut Vec<u8>, path: &ProbePath| {
        out.extend_from_slice(&(path.byte_len() as u16).to_le_bytes());
        out.extend(path.bytes());
    };
    match change {
        Change::Put(path, loc) | Change::Move(path, loc) => {
            out.push(if matches!(change, Change::Put(..)) { 1 } else { 5 });
            put_path(out, path);
            out.extend_from_slice(&loc.pack.to_le_bytes());
            for n in [loc.offset, loc.seq, loc.size] {
                out.extend_from_slice(&n.to_le_bytes());
            }
            out.extend_from_slice(&loc.sha256.0);
            out.extend_from_slice(&loc.crc32.to_le_bytes());
            out.extend_from_slice(&loc.stored_at.to_le_bytes());
            let signature = loc.signature.as_deref().unwrap_or_default();
            out.extend_from_slice(&(signature.len() as u16).to_le_bytes());
            out.extend_from_slice(signature);
        }
        Change::Remove(path, seq) => {
            out.push(2);
            put_path(out, path);
            out.extend_from_slice(&seq.to_le_bytes());
        }
        Change::PackEnd(pack, end) => {
            out.push(3);
            out.extend_from_slice(&pack.to_le_bytes());
            out.extend_from_slice(&end.to_le_bytes());
        }
        Change::PackGone(pack) => {
            out.push(4);
            out.extend_from_slice(&pack.to_le_bytes());
        }
    }
    seal(out, start);
}

/// Fills in the length and checksum of the frame starting at `start`.
fn seal(out: &mut [u8], start: usize) {
    let body_len = (out.len() - start - 8) as u32;
    let checksum = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&checksum.to_le_bytes());
}

/// Reads fields off a frame's body.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn path(&mut self) -> Option<ProbePath> {
        let len = self.u16()?;
        ProbePath::parse(std::str::from_utf8(self.take(usize::from(len))?).ok()?).ok()
    }
}

enum Frame {
    Change(Change),
    End(u64),
}

fn decode(body: &[u8]) -> Option<Frame> {
    let mut fields = Fields(body);
    let change = match fields.take(1)?[0] {
        tag @ (1 | 5) => {
            let path = fields.path()?;
            let pack = fields.u32()?;
            let (offset, seq, size) = (fields.u64()?, fields.u64()?, fields.u64()?);
            let sha256 = Sha256Digest(fields.take(32)?.try_into().ok()?);
            let (crc32, stored_at) = (fields.u32()?, fields.u64()?);
            let signature_len = fields.u16()?;
            let signature = fields.take(usize::from(signature_len))?;
            let signature = (!signature.is_empty()).then(|| Bytes::copy_from_slice(signature));
            let loc = Loc { pack, offset, seq, size, sha256, crc32, stored_at, signature };
            if tag == 1 { Change::Put(path, loc) } else { Change::Move(path, loc) }
        }
        2 => Change::Remove(fields.path()?, fields.u64()?),
        3 => Change::PackEnd(fields.u32()?, fields.u64()?),
        4 => Change::PackGone(fields.u32()?),
        END_TAG => return Some(Frame::End(fields.u64()?)),
        _ => return None,
    };
    fields.0.is_empty().then_some(Frame::Change(change))
}

/// The frames of `bytes` up to the first one that is torn or damaged, and
/// the length of that whole prefix.
fn frames(bytes: &[u8]) -> (Vec<Frame>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some(head) = bytes.get(at..at + 8) {
        let body_len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let checksum = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        let Some(body) = bytes.get(at + 8..at + 8 + body_len) else { break };
        if crc32fast::hash(body) != checksum {
            break;
        }
        let Some(frame) = decode(body) else { break };
        frames.push(frame);
        at += 8 + body_len;
    }
    (frames, at)
}

/// What a log holds: its changes, and whether it ended in a torn frame.
pub(super) struct LogContent {
    pub(super) changes: Vec<Change>,
    pub(super) torn: bool,
}

/// Reads the log of `generation`; `None` if its start is not a log's.
pub(super) fn read_log(index_dir: &Path, generation: u64) -> io::Result<Option<LogContent>> {
    let bytes = fs::read(log_path(index_dir, generation))?;
    let Some(body) = bytes.strip_prefix(LOG_MAGIC.as_slice()).and_then(|rest| rest.get(8..)) else {
        return Ok(None);
    };
    if bytes[8..16] != generation.to_le_bytes() {
        return Ok(None);
    }
    let (frames, whole) = frames(body);
    let changes = frames
        .into_iter()
        .filter_map(|frame| match frame {
            Frame::Change(change) => Some(change),
            Frame::End(_) => None,
        })
        .collect();
    Ok(Some(LogContent { changes, torn: whole < body.len() }))
}

/// An index log being appended to, by the group commit only.
pub(super) struct Log {
    pub(super) generation: u64,
    file: File,
    len: u64,
}

impl Log {
    /// Starts the log of `generation` (its directory entry made durable).
    pub(super) fn create(faults: &Faults, index_dir: &Path, generation: u64) -> io::Result<Log> {
        let file = faults.create(&log_path(index_dir, generation))?;
        let mut start = LOG_MAGIC.to_vec();
        start.extend_from_slice(&generation.to_le_bytes());
        faults.write_at(&file, &start, 0)?;
        faults.sync(&file)?;
        faults.sync_dir(index_dir)?;
        Ok(Log { generation, file, len: start.len() as u64 })
    }

    /// Appends framed changes and makes them durable.
    pub(super) fn append(&mut self, faults: &Faults, frames: &[u8]) -> io::Result<()> {
        faults.write_at(&self.file, frames, self.len)?;
        self.len += frames.len() as u64;
        faults.sync(&self.file)
    }
}

/// What a snapshot holds.
pub(super) struct SnapshotContent {
    pub(super) covers: u64,
    pub(super) changes: Vec<Change>,
}

/// Reads the snapshot; `None` if there is none or it is not whole.
pub(super) fn read_snapshot(index_dir: &Path) -> io::Result<Option<SnapshotContent>> {
    let bytes = match fs::read(index_dir.join(SNAPSHOT)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(rest) = bytes.strip_prefix(SNAPSHOT_MAGIC.as_slice()) else { return Ok(None) };
    let Some((covers, body)) = rest.split_first_chunk::<8>() else { return Ok(None) };
    let (frames, whole) = frames(body);
    let mut changes = Vec::with_capacity(frames.len());
    for frame in frames {
        match frame {
            Frame::Change(change) => changes.push(change),
            Frame::End(count) if count == changes.len() as u64 && whole == body.len() => {
                return Ok(Some(SnapshotContent { covers: u64::from_le_bytes(*covers), changes }));
            }
            Frame::End(_) => return Ok(None),
        }
    }
    Ok(None)
}

/// Writes a snapshot of `changes` covering the logs up to `covers`, whole
/// or not at all (a temporary file, fsync'd, renamed into place).
pub(super) fn write_snapshot(
    faults: &Faults,
    index_dir: &Path,
    covers: u64,
    changes: impl Iterator<Item = Change>,
) -> io::Result<()> {
    let temp = index_dir.join(format!("{SNAPSHOT}.new"));
    let _ = fs::remove_file(&temp);
    let file = faults.create(&temp)?;
    let mut out = BufWriter::with_capacity(1 << 20, SnapshotFile { faults, file: &file, len: 0 });
    out.write_all(SNAPSHOT_MAGIC)?;
    out.write_all(&covers.to_le_bytes())?;
    let mut count = 0u64;
    let mut frame = Vec::with_capacity(512);
    for change in changes {
        frame.clear();
        encode(&change, &mut frame);
        out.write_all(&frame)?;
        count += 1;
    }
    frame.clear();
    frame.extend_from_slice(&[0u8; 8]);
    frame.push(END_TAG);
    frame.extend_from_slice(&count.to_le_bytes());
    seal(&mut frame, 0);
    out.write_all(&frame)?;
    out.flush()?;
    drop(out);
    faults.sync(&file)?;
    faults.rename(&temp, &index_dir.join(SNAPSHOT))?;
    faults.sync_dir(index_dir)
}

/// A `Write` over a file through `Faults`.
struct SnapshotFile<'a> {
    faults: &'a Faults,
    file: &'a File,
    len: u64,
}

impl Write for SnapshotFile<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.faults.write_at(self.file, bytes, self.len)?;
        self.len += bytes.len() as u64;
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
