//! Writing the bytes of a record in a pack leased for it alone (when every
//! appender, `appender.rs`, is busy) past the page cache. A buffered write
//! costs far more CPU than the copy it makes (BENCHMARKS.md, "Hashing and
//! writing an upload"), so the whole pages of a record, those it
//! shares with no other record and no later write, go through a second
//! handle of the pack opened with `O_DIRECT`, from a page-aligned buffer.
//!
//! The rest of the record is written buffered: the pages at its two ends,
//! which it shares with its neighbours, and its header and signature,
//! written later. A page is never written both ways, so the two never race
//! in the page cache. Where `O_DIRECT` is refused (tmpfs), every byte is
//! written buffered. Durability is unchanged: the group commit's
//! `fdatasync` covers both.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use super::faults::Faults;

/// The alignment `O_DIRECT` needs of offsets, lengths and memory: the
/// page size, which covers any block size of the file system.
const PAGE: u64 = 4096;

/// What a record writer buffers before writing it out.
const BUFFER: usize = 256 * 1024;

/// The pack opened for `O_DIRECT` writes; `None` where the file system
/// refuses them.
pub(super) fn open(path: &Path) -> Option<File> {
    std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()
}

/// Page-aligned buffers, kept for the next record: a fresh one would cost
/// page faults on every record.
#[derive(Default)]
pub(super) struct Buffers(Mutex<Vec<Vec<u8>>>);

impl Buffers {
    fn take(&self) -> Vec<u8> {
        let kept = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
        kept.unwrap_or_else(|| vec![0; BUFFER + PAGE as usize])
    }

    fn give_back(&self, buffer: Vec<u8>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(buffer);
    }
}

/// Where a record writer writes: a pack's two handles.
pub(super) struct Target<'a> {
    pub(super) faults: &'a Faults,
    pub(super) file: &'a File,
    pub(super) direct: Option<&'a File>,
    pub(super) buffers: &'a Buffers,
}

/// Appends bytes at `at` onward: buffered up to the first page boundary
/// at or after `at`, then whole pages direct, and the last partial page
/// buffered again.
pub(super) struct RecordWriter {
    /// Where the next byte goes.
    at: u64,
    /// Where the direct pages start (a page boundary).
    direct_start: u64,
    /// Holds the aligned buffer (empty when not writing direct) ...
    buffer: Vec<u8>,
    /// ... of which this many bytes wait, the last of them at `at - 1`.
    buffered: usize,
}

impl RecordWriter {
    /// A writer from `at`: the page of `at` holds what comes before it (the
    /// header, written later), so it is written buffered.
    pub(super) fn new(target: &Target, at: u64) -> Self {
        let direct_start = at.div_ceil(PAGE) * PAGE;
        let buffer = if target.direct.is_some() { target.buffers.take() } else { Vec::new() };
        RecordWriter { at, direct_start, buffer, buffered: 0 }
    }

    pub(super) fn write(&mut self, target: &Target, mut bytes: &[u8]) -> io::Result<()> {
        if self.buffer.is_empty() {
            target.faults.write_at(target.file, bytes, self.at)?;
            self.at += bytes.len() as u64;
            return Ok(());
        }
        if self.at < self.direct_start {
            let n = bytes.len().min((self.direct_start - self.at) as usize);
            target.faults.write_at(target.file, &bytes[..n], self.at)?;
            self.at += n as u64;
            bytes = &bytes[n..];
        }
        while !bytes.is_empty() {
            let n = bytes.len().min(BUFFER - self.buffered);
            let start = self.buffered;
            self.aligned()[start..start + n].copy_from_slice(&bytes[..n]);
            self.buffered += n;
            self.at += n as u64;
            bytes = &bytes[n..];
            if self.buffered == BUFFER {
                self.flush_pages(target)?;
            }
        }
        Ok(())
    }

    /// Writes what is buffered; the end of what was written.
    pub(super) fn finish(mut self, target: &Target) -> io::Result<u64> {
        self.flush_pages(target)?;
        if self.buffered > 0 {
            // The last partial page: its page holds the next record's start.
            let (buffered, tail_at) = (self.buffered, self.at - self.buffered as u64);
            target.faults.write_at(target.file, &self.aligned()[..buffered], tail_at)?;
        }
        if !self.buffer.is_empty() {
            target.buffers.give_back(std::mem::take(&mut self.buffer));
        }
        Ok(self.at)
    }

    /// The buffer's page-aligned part.
    fn aligned(&mut self) -> &mut [u8] {
        let skip = self.buffer.as_ptr().align_offset(PAGE as usize);
        &mut self.buffer[skip..skip + BUFFER]
    }

    /// Writes the whole pages buffered, direct, and keeps the rest.
    fn flush_pages(&mut self, target: &Target) -> io::Result<()> {
        let whole = self.buffered / PAGE as usize * PAGE as usize;
        let Some(direct) = target.direct.filter(|_| whole > 0) else { return Ok(()) };
        let (offset, rest) = (self.at - self.buffered as u64, self.buffered - whole);
        let aligned = self.aligned();
        target.faults.write_at(direct, &aligned[..whole], offset)?;
        aligned.copy_within(whole..whole + rest, 0);
        self.buffered = rest;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn write_pieces(dir: &Path, start: u64, pieces: &[usize]) -> (Vec<u8>, u64) {
        let path = dir.join("pack");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let direct = open(&path);
        let (faults, buffers) = (Faults::default(), Buffers::default());
        let target = Target { faults: &faults, file: &file, direct: direct.as_ref(), buffers: &buffers };
        file.write_all_at(&vec![0xEE; start as usize], 0).unwrap();
        let mut writer = RecordWriter::new(&target, start);
        let mut expected = Vec::new();
        for (i, &len) in pieces.iter().enumerate() {
            let piece: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8).collect();
            writer.write(&target, &piece).unwrap();
            expected.extend_from_slice(&piece);
        }
        let end = writer.finish(&target).unwrap();
        let mut read = vec![0; expected.len()];
        file.read_exact_at(&mut read, start).unwrap();
        assert_eq!(read, expected, "start {start}, pieces {pieces:?}");
        let mut before = vec![0; start as usize];
        file.read_exact_at(&mut before, 0).unwrap();
        assert!(before.iter().all(|&b| b == 0xEE), "the bytes before are untouched");
        (read, end)
    }

    #[test]
    fn bytes_written_in_any_pieces_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        for start in [0u64, 1, 88, 4095, 4096, 5000] {
            for pieces in [&[0usize][..], &[1], &[4096], &[100_000], &[BUFFER, 1], &[3, BUFFER * 2 + 5, 4096, 17]] {
                let len: usize = pieces.iter().sum();
                let (_, end) = write_pieces(dir.path(), start, pieces);
                assert_eq!(end, start + len as u64);
            }
        }
    }
}
