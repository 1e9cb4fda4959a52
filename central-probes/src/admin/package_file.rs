//! The package file as the zip reader reads it: through a buffer that
//! survives the reader's seeks to the next entry, counting every byte read
//! from the file (`PackageReads`), so that an upload can tell how much of
//! the package it read.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Read buffer for the package file: header reads are cheap, and reads of
/// a probe's bytes larger than it bypass it.
const READ_BUFFER: usize = 64 << 10;

/// Bytes read from package files, shared by every `Package` opened with it.
#[derive(Clone, Debug, Default)]
pub struct PackageReads(Arc<AtomicU64>);

impl PackageReads {
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub(super) fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The package file, read through a buffer, counting what is read from it.
///
/// The zip reader seeks to every entry's local header, which usually lies
/// right after the entry it just read. `BufReader::seek` would throw the
/// buffer away each time, and with it the read-ahead past the entry end
/// (half the bytes again, for probes of 130 KB); a seek that lands inside
/// the buffer keeps it here.
pub(super) struct PackageFile {
    buffer: BufReader<CountedFile>,
}

impl PackageFile {
    pub(super) fn new(file: File, reads: PackageReads) -> Self {
        PackageFile { buffer: BufReader::with_capacity(READ_BUFFER, CountedFile { file, reads, position: 0 }) }
    }
}

impl Read for PackageFile {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        self.buffer.read(buffer)
    }
}

impl Seek for PackageFile {
    fn seek(&mut self, target: SeekFrom) -> io::Result<u64> {
        // Where the reader is: the file position less what is buffered.
        let current = self.buffer.get_ref().position - self.buffer.buffer().len() as u64;
        let offset = match target {
            SeekFrom::Start(to) => to as i128 - current as i128,
            SeekFrom::Current(by) => i128::from(by),
            SeekFrom::End(_) => return self.buffer.seek(target),
        };
        let offset = i64::try_from(offset).map_err(|_| io::Error::other("seek out of range"))?;
        // Keeps the buffer when the target is inside it.
        self.buffer.seek_relative(offset)?;
        current.checked_add_signed(offset).ok_or_else(|| io::Error::other("seek before the start"))
    }
}

/// The package file, counting what is read from it and knowing where it is.
struct CountedFile {
    file: File,
    reads: PackageReads,
    position: u64,
}

impl Read for CountedFile {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buffer)?;
        self.reads.add(n);
        self.position += n as u64;
        Ok(n)
    }
}

impl Seek for CountedFile {
    fn seek(&mut self, target: SeekFrom) -> io::Result<u64> {
        self.position = self.file.seek(target)?;
        Ok(self.position)
    }
}
