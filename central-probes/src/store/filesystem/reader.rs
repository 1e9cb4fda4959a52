//! Reading a stored probe: its header, then its bytes a chunk at a time
//! (`store::disk::read_on_demand`; a probe of one chunk, with its header and
//! signature, in one read).

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use probe_api::names::ProbePath;
use probe_api::signing::MAX_SIGNATURE_LEN;

use crate::error::{Error, Result};
use crate::store::ProbeReader;
use crate::store::disk::{READ_CHUNK, read_on_demand};

use super::entry::stored;
#[cfg(any(test, feature = "testing"))]
use super::format::read_header;
use super::format::{HEADER_LEN, read_probe_start};

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

/// Reads a whole stored probe file's content, for tests.
#[cfg(any(test, feature = "testing"))]
pub fn read_probe_file(file_path: &Path) -> io::Result<(probe_api::digest::Sha256Digest, Vec<u8>)> {
    use std::os::unix::fs::FileExt;
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
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(file_path)?;
    let (_, offset) = read_header(&file)?;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset + at)?;
    file.write_all_at(&[byte[0] ^ 0x10], offset + at)
}
