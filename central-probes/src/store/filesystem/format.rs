//! The on-disk layout: the header in front of every probe's bytes, and
//! leftovers of interrupted writes (the directory lock and the page token
//! key are `store::disk`'s).
//!
//! Headers: "KPROBE02" (56 bytes: magic, size, SHA-256, CRC-32, and the
//! length of the probe's signature as 4 bytes, 0 for none) is written, and
//! the signature follows the probe's bytes, so that probe and signature are
//! committed (and replaced) by one rename; "KPROBE01" (48 bytes: magic,
//! size, SHA-256), written before the store recorded CRC-32s, is still
//! read, its CRC-32 unknown.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use probe_api::digest::Sha256Digest;
use probe_api::signing::MAX_SIGNATURE_LEN;

use crate::error::{Error, Result};

use super::entry::Entry;

const MAGIC_V1: &[u8; 8] = b"KPROBE01";
const HEADER_LEN_V1: u64 = 48;
const MAGIC: &[u8; 8] = b"KPROBE02";
/// Length of the header this store writes; the bytes follow it.
pub(super) const HEADER_LEN: u64 = 56;

/// The header of a probe of `size` bytes with these digests, followed by a
/// signature of `signature_len` bytes.
pub(super) fn header(size: u64, sha256: &Sha256Digest, crc32: u32, signature_len: u32) -> [u8; HEADER_LEN as usize] {
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&size.to_le_bytes());
    header[16..48].copy_from_slice(&sha256.0);
    header[48..52].copy_from_slice(&crc32.to_le_bytes());
    header[52..56].copy_from_slice(&signature_len.to_le_bytes());
    header
}

/// Reads and checks the header of a stored probe file, and the signature
/// after its bytes: what it describes, and the offset of its first byte.
pub(in crate::store) fn read_header(file: &File) -> io::Result<(Entry, u64)> {
    read_header_of(file, file.metadata()?.len())
}

/// `read_header` of a file of `file_len` bytes.
fn read_header_of(file: &File, file_len: u64) -> io::Result<(Entry, u64)> {
    let mut header = [0u8; HEADER_LEN as usize];
    // A version 1 file may be shorter than a version 2 header.
    let readable = file_len.min(HEADER_LEN) as usize;
    file.read_exact_at(&mut header[..readable], 0)?;
    let (mut entry, header_len, signature_len) = parse_header(&header[..readable], file_len)?;
    if signature_len > 0 {
        let mut signature = vec![0u8; signature_len as usize];
        file.read_exact_at(&mut signature, header_len + entry.size)?;
        entry.signature = Some(Bytes::from(signature));
    }
    Ok((entry, header_len))
}

/// `read_header`, and when the whole file is at most `whole_up_to` bytes
/// (a probe of one chunk, the usual case), the probe's bytes too, all in
/// one read: a GetProbe of such a probe costs one `pread`, signed or not.
pub(super) fn read_probe_start(file: &File, whole_up_to: u64) -> io::Result<(Entry, u64, Option<Bytes>)> {
    let file_len = file.metadata()?.len();
    if file_len > whole_up_to {
        let (entry, offset) = read_header_of(file, file_len)?;
        return Ok((entry, offset, None));
    }
    let mut all = BytesMut::zeroed(file_len as usize);
    file.read_exact_at(&mut all, 0)?;
    let all = all.freeze();
    let (mut entry, header_len, signature_len) = parse_header(&all[..all.len().min(HEADER_LEN as usize)], file_len)?;
    let end = (header_len + entry.size) as usize;
    entry.signature = (signature_len > 0).then(|| all.slice(end..));
    Ok((entry, header_len, Some(all.slice(header_len as usize..end))))
}

/// Checks a header (the file's first bytes, up to `HEADER_LEN`) against the
/// file's length: what it describes (without the signature), its length
/// and the signature's.
fn parse_header(header: &[u8], file_len: u64) -> io::Result<(Entry, u64, u32)> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let (header_len, crc32, signature_len) = match header.first_chunk::<8>() {
        Some(magic) if magic == MAGIC && header.len() == HEADER_LEN as usize => (HEADER_LEN, Some(word(48)), word(52)),
        Some(magic) if magic == MAGIC_V1 && header.len() >= HEADER_LEN_V1 as usize => (HEADER_LEN_V1, None, 0),
        _ => return Err(invalid("not a probe file of this store (bad magic or too short)")),
    };
    let size = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let sha256 = Sha256Digest(header[16..48].try_into().expect("32 bytes"));
    if signature_len as usize > MAX_SIGNATURE_LEN
        || Some(file_len) != (header_len + u64::from(signature_len)).checked_add(size)
    {
        return Err(invalid("the file length does not match its header"));
    }
    Ok((Entry { size, sha256, crc32, signature: None }, header_len, signature_len))
}

pub(super) fn remove_leftovers(tmp_dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let entries = fs::read_dir(tmp_dir).map_err(|e| Error::io(format!("reading {}", tmp_dir.display()), e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io("reading tmp/", e))?.path();
        fs::remove_file(&path).map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
        removed += 1;
    }
    Ok(removed)
}
