//! What the packs of a data directory hold, read without opening the store
//! (it may be running, or killed): for tests that check what a crash left.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;

use super::record::{Found, Kind, read_record};

/// A probe's SHA-256 and bytes, `None` for a removal.
type Version = Option<(Sha256Digest, Vec<u8>)>;

/// The newest committed version of each probe in the packs (removed ones
/// left out), each read whole and checked against its CRC-32: its path,
/// SHA-256 and bytes.
pub fn probes_on_disk(data_dir: &Path) -> io::Result<Vec<(ProbePath, Sha256Digest, Vec<u8>)>> {
    let mut newest: std::collections::BTreeMap<ProbePath, (u64, Version)> = Default::default();
    for pack in packs(data_dir)? {
        let file = File::open(&pack)?;
        for found in whole_records(&file)?.0.into_iter().filter(|found| found.bytes_intact) {
            let Some(seq) = found.seq else { continue };
            if newest.get(&found.path).is_some_and(|(newer, _)| *newer > seq) {
                continue;
            }
            let probe = match found.header.kind {
                Kind::Tombstone => None,
                Kind::Probe => {
                    let mut bytes = vec![0u8; found.header.size as usize];
                    file.read_exact_at(&mut bytes, found.offset + found.header.bytes_at())?;
                    Some((found.header.sha256, bytes))
                }
            };
            newest.insert(found.path, (seq, probe));
        }
    }
    Ok(newest.into_iter().filter_map(|(path, (_, probe))| probe.map(|(sha256, bytes)| (path, sha256, bytes))).collect())
}

/// Flips one bit of byte `at` of the probe `path`'s bytes in its newest
/// committed record, as rot on the disk would: what the tests of damaged
/// probes do to a store (running or not).
pub fn flip_a_byte(data_dir: &Path, path: &ProbePath, at: u64) -> io::Result<()> {
    let mut newest: Option<(u64, std::path::PathBuf, u64)> = None;
    for pack in packs(data_dir)? {
        for found in whole_records(&File::open(&pack)?)?.0 {
            if let (Some(seq), Kind::Probe) = (found.seq, found.header.kind)
                && found.path == *path
                && newest.as_ref().is_none_or(|(newer, _, _)| *newer < seq)
            {
                newest = Some((seq, pack.clone(), found.offset + found.header.bytes_at() + at));
            }
        }
    }
    let (_, pack, offset) =
        newest.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no record of {path}")))?;
    let file = fs::OpenOptions::new().read(true).write(true).open(pack)?;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset)?;
    file.write_all_at(&[byte[0] ^ 0x10], offset)
}

/// Packs whose bytes do not end with a whole record: a write under way, or
/// what a crash left.
pub fn unfinished_packs(data_dir: &Path) -> io::Result<usize> {
    let mut unfinished = 0;
    for pack in packs(data_dir)? {
        let file = File::open(&pack)?;
        let (_, whole_len) = whole_records(&file)?;
        unfinished += usize::from(whole_len != file.metadata()?.len());
    }
    Ok(unfinished)
}

/// The whole records from the pack's start, and where they end. A running
/// store may cut the pack back (a record given up) while it is read: the
/// end is then where the read ran short.
fn whole_records(file: &File) -> io::Result<(Vec<Found>, u64)> {
    let len = file.metadata()?.len();
    let (mut records, mut offset) = (Vec::new(), 0);
    loop {
        match read_record(file, offset, len) {
            Ok(Some(found)) => {
                offset += found.header.record_len();
                records.push(found);
            }
            Ok(None) => break,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    Ok((records, offset))
}

fn packs(data_dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    match fs::read_dir(data_dir.join("packs")) {
        Ok(entries) => entries.map(|entry| entry.map(|e| e.path())).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}
