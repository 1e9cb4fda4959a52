//! Reading support packages (zip files) without extracting them.
//!
//! `Package::index` reads the central directory only: which entries are
//! probes (with the size and CRC-32 the directory records for each), which
//! are ignored (directories, LICENSE files, anything outside
//! `kernel-modules/`) and which look wrong. `Package::read_entry` then reads
//! one probe's bytes (stored or deflated), refusing an entry that inflates
//! to more or fewer bytes than it declares or whose bytes do not match its
//! CRC-32. Every byte read from the package file is counted
//! (`PackageReads`), so that an upload can tell how much it read. Reading
//! is blocking: callers run it on a blocking thread.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use probe_api::names::{PackageEntry, ProbePath, classify_package_entry};
use zip::ZipArchive;

use super::chunk_pool::{Chunk, ChunkPool};
use super::package_file::PackageFile;
pub use super::package_file::PackageReads;

use probe_api::limits::MAX_FILE_SIZE;

pub use crate::admin::error::PackageError;

/// A probe file inside the package.
#[derive(Clone, Debug)]
pub struct PackageProbe {
    /// Position in the zip's central directory.
    pub index: usize,
    pub path: ProbePath,
    /// Uncompressed size, as declared by the zip.
    pub size: u64,
    /// CRC-32 of the uncompressed bytes, as the central directory records it.
    pub crc32: u32,
    /// Its `.minisig` entry, once `signatures::read_signatures` read it.
    pub signature: Option<bytes::Bytes>,
}

/// What a package holds, from its central directory.
#[derive(Debug, Default)]
pub struct PackageIndex {
    /// In archive order, which is the order to read them in.
    pub probes: Vec<PackageProbe>,
    pub ignored: usize,
    /// Entries under `kernel-modules/` that are not probes, with the reason.
    pub unrecognised: Vec<String>,
    /// `kernel-modules/<probe path>.minisig` entries: the probe's path,
    /// the entry's position and its declared size.
    pub signatures: Vec<(ProbePath, usize, u64)>,
}

pub struct Package {
    archive: ZipArchive<PackageFile>,
}

/// Most entries a package may have: a real one has about 16,500 (two
/// probes per kernel, directories, LICENSE files). Far more is a hostile or
/// broken package, refused before anything is sent.
pub const MAX_ENTRIES: usize = 65_536;

impl Package {
    /// Opens a package, counting what it reads into `reads`.
    pub fn open(path: &Path, reads: &PackageReads) -> Result<Self, PackageError> {
        let file = File::open(path).map_err(|source| PackageError::Open { path: path.to_owned(), source })?;
        let archive = ZipArchive::new(PackageFile::new(file, reads.clone()))
            .map_err(|source| PackageError::NotZip { path: path.to_owned(), source })?;
        // The zip crate keeps one entry per name; the end record still counts
        // them all. Which of two same-named entries is meant cannot be known.
        if let Some(declared) = declared_entries(path, reads)
            && declared != archive.len()
        {
            return Err(PackageError::DuplicateNames { path: path.to_owned(), declared, distinct: archive.len() });
        }

        Ok(Package { archive })
    }

    /// Classifies every entry. Two entries with the same probe path are an
    /// error: which one is meant cannot be known.
    pub fn index(&mut self) -> Result<PackageIndex, PackageError> {
        if self.archive.len() > MAX_ENTRIES {
            return Err(PackageError::TooManyEntries { entries: self.archive.len(), max: MAX_ENTRIES });
        }
        let mut index = PackageIndex::default();
        let mut seen = HashSet::new();
        for i in 0..self.archive.len() {
            let unreadable = |source| PackageError::UnreadableEntry { index: i, source };
            // The central directory only: no seek to the entry's local header.
            let entry = self.archive.by_index_data(i).map_err(unreadable)?;
            let name = entry.name().map_err(unreadable)?.into_owned();
            // `../x` or `/x` is no mistake of a packaging tool: refuse the
            // whole package rather than skip the entry.
            let raw = entry.name_raw();
            if raw.starts_with(b"/") || raw.split(|&b| b == b'/' || b == b'\\').any(|part| part == b"..") {
                return Err(PackageError::UnsafeName { name });
            }
            match classify_package_entry(&name) {
                PackageEntry::Probe(_) | PackageEntry::Unrecognised(_) if entry.is_dir() => index.ignored += 1,
                PackageEntry::Probe(_) if entry.size() > MAX_FILE_SIZE => {
                    return Err(PackageError::TooLarge { name, size: entry.size(), max: MAX_FILE_SIZE });
                }
                PackageEntry::Probe(path) => {
                    if !seen.insert(path.clone()) {
                        return Err(PackageError::Twice { name });
                    }
                    let (size, crc32) = (entry.size(), entry.crc32());
                    index.probes.push(PackageProbe { index: i, path, size, crc32, signature: None });
                }
                PackageEntry::Signature(path) => index.signatures.push((path, i, entry.size())),
                PackageEntry::Ignored => index.ignored += 1,
                PackageEntry::Unrecognised(reason) => index.unrecognised.push(format!("{name}: {reason}")),
            }
        }
        Ok(index)
    }

    /// Reads a small entry whole (a signature): at most `limit` bytes, else
    /// `None`.
    pub fn read_small_entry(&mut self, index: usize, limit: usize) -> io::Result<Option<Vec<u8>>> {
        let entry = self.archive.by_index(index).map_err(io::Error::other)?;
        let mut bytes = Vec::new();
        entry.take(limit as u64 + 1).read_to_end(&mut bytes)?;
        Ok((bytes.len() <= limit).then_some(bytes))
    }

    /// Reads a probe entry into buffers of the pool and hands them to
    /// `consume` (each at most the pool's buffer size). Fails if the entry
    /// yields a byte count other than the one it declares, or its CRC-32
    /// does not match (the zip reader checks it as the bytes go by; the last
    /// piece fails, not the first).
    pub fn read_entry(
        &mut self,
        probe: &PackageProbe,
        pool: &mut ChunkPool,
        mut consume: impl FnMut(Chunk) -> io::Result<()>,
    ) -> io::Result<()> {
        let entry = self.archive.by_index(probe.index).map_err(io::Error::other)?;
        // One byte more than declared is enough to catch a lying entry
        // (a zip bomb) without reading what it inflates to.
        let mut reader = entry.take(probe.size + 1);
        let mut total = 0u64;
        loop {
            let mut chunk = pool.take();
            let want = pool.size().min((probe.size - total) as usize + 1);
            let n =
                read_full(&mut reader, &mut chunk.space()[..want]).map_err(|error| explain_crc_error(error, probe))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > probe.size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: the entry holds more bytes than its declared {}", probe.path, probe.size),
                ));
            }
            chunk.set_len(n);
            consume(chunk)?;
        }
        if total != probe.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: the entry holds {total} bytes but declares {}", probe.path, probe.size),
            ));
        }
        Ok(())
    }
}

/// The zip reader's CRC-32 error ("Invalid checksum") in words an admin can
/// act on; any other error as it is.
fn explain_crc_error(error: io::Error, probe: &PackageProbe) -> io::Error {
    if error.kind() == io::ErrorKind::InvalidData && error.to_string() == "Invalid checksum" {
        return io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "its bytes do not match the CRC-32 {:08x} the package records: the package is corrupt",
                probe.crc32
            ),
        );
    }
    error
}

/// The entry count of the end-of-central-directory record, when it is not
/// deferred to a zip64 record (65,535 entries or more).
fn declared_entries(path: &Path, reads: &PackageReads) -> Option<usize> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    // The record is 22 bytes plus a comment of at most 65,535 bytes.
    let tail_len = len.min(22 + 65_535);
    file.seek(SeekFrom::Start(len - tail_len)).ok()?;
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact(&mut tail).ok()?;
    reads.add(tail.len());
    let at = (0..tail.len().checked_sub(21)?).rev().find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])?;
    let total = u16::from_le_bytes([tail[at + 10], tail[at + 11]]);
    (total != u16::MAX).then_some(usize::from(total))
}

/// Fills `buffer` as far as the reader allows; 0 only at the end.
fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    fn write_zip(path: &Path, entries: &[(&str, &[u8], bool)]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        for (name, bytes, deflate) in entries {
            let method = if *deflate { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
            if name.ends_with('/') {
                zip.add_directory(*name, SimpleFileOptions::default()).unwrap();
            } else {
                zip.start_file(*name, SimpleFileOptions::default().compression_method(method)).unwrap();
                zip.write_all(bytes).unwrap();
            }
        }
        zip.finish().unwrap();
    }

    fn read_all(package: &mut Package, probe: &PackageProbe) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        // Pieces of 7 bytes: they end anywhere in the entry.
        let mut pool = ChunkPool::new(7, 1);
        package.read_entry(probe, &mut pool, |chunk| {
            out.extend_from_slice(&chunk);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn stored_and_deflated_probes_are_read_and_the_rest_classified() {
        let dir = tempfile::tempdir().unwrap();
        let zip_path = dir.path().join("pkg.zip");
        let deflated = vec![7u8; 10_000];
        write_zip(
            &zip_path,
            &[
                ("kernel-modules/", b"", false),
                ("kernel-modules/2.5.0/", b"", false),
                ("kernel-modules/2.5.0/LICENSE", b"license", false),
                ("kernel-modules/2.5.0/collector-ebpf-5.4.0.o.gz", b"stored probe", false),
                ("kernel-modules/2.5.0/collector-5.4.0.ko.gz", &deflated, true),
                ("kernel-modules/2.5.0/README", b"?", false),
                ("other.txt", b"", false),
            ],
        );
        let mut package = Package::open(&zip_path, &PackageReads::default()).unwrap();
        let index = package.index().unwrap();
        assert_eq!(index.probes.len(), 2);
        assert_eq!(index.ignored, 4);
        assert_eq!(index.unrecognised.len(), 1);
        assert!(index.unrecognised[0].contains("README"));
        assert_eq!(read_all(&mut package, &index.probes[0]).unwrap(), b"stored probe");
        assert_eq!(read_all(&mut package, &index.probes[1]).unwrap(), deflated);
    }

    /// Writes a zip of one-byte entries, then patches `from` to `to` in its
    /// bytes: the writer refuses or rewrites the names a hostile tool makes.
    fn write_hostile_zip(path: &Path, entries: &[&str], from: &[u8], to: &[u8]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        for entry in entries {
            zip.start_file(*entry, SimpleFileOptions::default()).unwrap();
            zip.write_all(b"x").unwrap();
        }
        zip.finish().unwrap();
        let mut bytes = std::fs::read(path).unwrap();
        for i in 0..=bytes.len() - from.len() {
            if &bytes[i..i + from.len()] == from {
                bytes[i..i + to.len()].copy_from_slice(to);
            }
        }
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn duplicate_entry_names_refuse_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pkg.zip");
        let entries = ["kernel-modules/2.5.0/collector-5.4.0.ko.gz", "kernel-modules/2.5.0/collector-5.4.1.ko.gz"];
        write_hostile_zip(&path, &entries, b"collector-5.4.1", b"collector-5.4.0");
        let error = Package::open(&path, &PackageReads::default()).err().unwrap();
        assert!(matches!(error, PackageError::DuplicateNames { .. }), "{error}");
    }

    #[test]
    fn unsafe_entry_names_refuse_the_package() {
        let dir = tempfile::tempdir().unwrap();
        // (case, entry written, bytes patched from, to)
        let cases: [(&str, &str, &[u8], &[u8]); 2] = [
            ("traversal", "kernel-modules/xx/xx/etc/passwd", b"xx/xx", b"../.."),
            ("absolute", "_kernel-modules/2.5.0/collector-5.4.0.ko.gz", b"_kernel", b"/kernel"),
        ];
        for (name, entry, from, to) in cases {
            let path = dir.path().join(format!("{name}.zip"));
            write_hostile_zip(&path, &[entry], from, to);
            let result = Package::open(&path, &PackageReads::default()).and_then(|mut p| p.index().map(drop));
            let error = result.expect_err(name);
            assert!(matches!(error, PackageError::UnsafeName { .. }), "{name}: {error}");
        }
    }

    #[test]
    fn too_many_entries_refuse_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pkg.zip");
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(File::create(&path).unwrap()));
        for i in 0..100_000 {
            zip.start_file(format!("kernel-modules/2.5.0/collector-5.4.{i}.ko.gz"), SimpleFileOptions::default())
                .unwrap();
        }
        zip.finish().unwrap();
        let error = Package::open(&path, &PackageReads::default()).and_then(|mut p| p.index().map(drop)).unwrap_err();
        assert!(matches!(error, PackageError::TooManyEntries { entries: 100_000, max: 65_536 }), "{error}");
    }

    #[test]
    fn a_zip64_entry_over_4_gib_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pkg.zip");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let options = SimpleFileOptions::default().large_file(true);
        zip.start_file("kernel-modules/2.5.0/collector-5.4.0.ko.gz", options).unwrap();
        zip.write_all(b"x").unwrap();
        zip.finish().unwrap();
        // The zip64 extra field (id 1, 16 bytes: uncompressed and compressed
        // size) of the central directory declares 5 GiB instead of 1 byte.
        let mut bytes = std::fs::read(&path).unwrap();
        let tag = [1u8, 0, 16, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        let at = (0..bytes.len() - tag.len()).rev().find(|&i| bytes[i..i + tag.len()] == tag).expect("a zip64 field");
        bytes[at + 4..at + 12].copy_from_slice(&(5u64 << 30).to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
        let error = Package::open(&path, &PackageReads::default()).and_then(|mut p| p.index().map(drop)).unwrap_err();
        assert!(matches!(error, PackageError::TooLarge { max: MAX_FILE_SIZE, .. }), "{error}");
    }

    #[test]
    fn a_truncated_zip_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pkg.zip");
        write_zip(&path, &[("kernel-modules/2.5.0/collector-5.4.0.ko.gz", &[1u8; 4000], false)]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let error = Package::open(&path, &PackageReads::default()).err().unwrap();
        assert!(matches!(error, PackageError::NotZip { .. }), "{error}");
    }

    #[test]
    fn a_file_that_is_no_zip_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pkg.zip");
        std::fs::write(&path, b"not a zip at all").unwrap();
        let error = Package::open(&path, &PackageReads::default()).err().unwrap();
        assert!(matches!(error, PackageError::NotZip { .. }), "{error}");
        let error = Package::open(&dir.path().join("missing.zip"), &PackageReads::default()).err().unwrap();
        assert!(matches!(error, PackageError::Open { .. }), "{error}");
        assert!(crate::admin::error::chain(&error).contains("No such file"), "the cause is kept: {error}");
    }

    #[test]
    fn an_entry_that_inflates_beyond_its_declared_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pkg.zip");
        write_zip(&path, &[("kernel-modules/2.5.0/collector-5.4.0.ko.gz", &[0u8; 5000], true)]);
        let mut package = Package::open(&path, &PackageReads::default()).unwrap();
        let mut probe = package.index().unwrap().probes.remove(0);
        probe.size = 100; // what a lying header would declare
        let error = read_all(&mut package, &probe).unwrap_err();
        assert!(error.to_string().contains("more bytes than its declared"), "{error}");
    }
}
