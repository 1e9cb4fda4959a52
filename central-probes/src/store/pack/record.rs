//! A record in a pack: a fixed header, the probe's path, its bytes and its
//! signature, one after another; records follow each other with no gap.
//!
//! Header (88 bytes, little-endian):
//!
//! | at | len | field |
//! |----|-----|-------|
//! | 0  | 4   | magic `KPK1` |
//! | 4  | 1   | kind: 1 a probe, 2 a tombstone (a removal) |
//! | 5  | 1   | 0 |
//! | 6  | 2   | path length |
//! | 8  | 8   | probe size |
//! | 16 | 4   | signature length |
//! | 20 | 4   | the probe's CRC-32 (checks its bytes) |
//! | 24 | 32  | the probe's SHA-256 |
//! | 56 | 8   | when it was stored (Unix seconds) |
//! | 64 | 4   | CRC-32 of bytes 0..64, the path and the signature |
//! | 68 | 4   | 0 |
//! | 72 | 8   | the commit stamp: a sequence number, 0 until committed |
//! | 80 | 4   | CRC-32 of the record's offset and the sequence number |
//! | 84 | 4   | 0 |
//!
//! A probe's record is written whole with a zero stamp; the commit writes
//! the stamp, so a record whose commit never happened (the overwrite rule
//! kept the old probe, an earlier file of the upload failed, the process
//! died first) is skipped by a scan of the pack. The sequence numbers order
//! every commit of the store: a scan takes the newest record of each path.

use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;

pub(super) const HEADER_LEN: u64 = 88;
const MAGIC: &[u8; 4] = b"KPK1";
const STAMP_AT: u64 = 72;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Probe = 1,
    Tombstone = 2,
}

/// What a record's header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) kind: Kind,
    pub(super) path_len: u16,
    pub(super) size: u64,
    pub(super) signature_len: u32,
    pub(super) crc32: u32,
    pub(super) sha256: Sha256Digest,
    pub(super) stored_at: u64,
}

impl Header {
    /// Length of the whole record. A damaged header's lengths can add up
    /// past `u64::MAX`: the sum then stays there, so that no pack holds
    /// the record, rather than wrapping to one that seems to fit.
    pub(super) fn record_len(&self) -> u64 {
        (HEADER_LEN + u64::from(self.path_len) + u64::from(self.signature_len)).saturating_add(self.size)
    }

    /// Offset of the probe's first byte from the record's start.
    pub(super) fn bytes_at(&self) -> u64 {
        HEADER_LEN + u64::from(self.path_len)
    }

    /// The header's bytes, with a zero stamp; `path` and `signature` are
    /// covered by its checksum.
    pub(super) fn encode(&self, path: &[u8], signature: &[u8]) -> [u8; HEADER_LEN as usize] {
        let mut out = [0u8; HEADER_LEN as usize];
        out[..4].copy_from_slice(MAGIC);
        out[4] = self.kind as u8;
        out[6..8].copy_from_slice(&self.path_len.to_le_bytes());
        out[8..16].copy_from_slice(&self.size.to_le_bytes());
        out[16..20].copy_from_slice(&self.signature_len.to_le_bytes());
        out[20..24].copy_from_slice(&self.crc32.to_le_bytes());
        out[24..56].copy_from_slice(&self.sha256.0);
        out[56..64].copy_from_slice(&self.stored_at.to_le_bytes());
        let checksum = header_checksum(&out[..64], path, signature);
        out[64..68].copy_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Parses a header; `None` if it is not one (zeros, a torn write).
    pub(super) fn parse(bytes: &[u8]) -> Option<Header> {
        let bytes: &[u8; HEADER_LEN as usize] = bytes.get(..HEADER_LEN as usize)?.try_into().ok()?;
        if &bytes[..4] != MAGIC {
            return None;
        }
        let kind = match bytes[4] {
            1 => Kind::Probe,
            2 => Kind::Tombstone,
            _ => return None,
        };
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Some(Header {
            kind,
            path_len: u16::from_le_bytes([bytes[6], bytes[7]]),
            size: u64_at(8),
            signature_len: u32_at(16),
            crc32: u32_at(20),
            sha256: Sha256Digest(bytes[24..56].try_into().expect("32 bytes")),
            stored_at: u64_at(56),
        })
    }
}

fn header_checksum(fields: &[u8], path: &[u8], signature: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(fields);
    crc.update(path);
    crc.update(signature);
    crc.finalize()
}

/// Whether the header bytes (with their stamp), path and signature are
/// what `Header::encode` wrote.
pub(super) fn header_checks(bytes: &[u8], path: &[u8], signature: &[u8]) -> bool {
    let stored = u32::from_le_bytes(bytes[64..68].try_into().expect("4 bytes"));
    stored == header_checksum(&bytes[..64], path, signature)
}

/// The stamp committing the record at `offset` with sequence number `seq`,
/// and where in the record it goes.
pub(super) fn stamp(offset: u64, seq: u64) -> ([u8; 12], u64) {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&seq.to_le_bytes());
    out[8..].copy_from_slice(&stamp_checksum(offset, seq).to_le_bytes());
    (out, STAMP_AT)
}

/// Stamps a record (its bytes from the start, header first) that goes at
/// `offset` with sequence number `seq`.
pub(super) fn stamp_into(record: &mut [u8], offset: u64, seq: u64) {
    let (stamp, at) = stamp(offset, seq);
    record[at as usize..at as usize + stamp.len()].copy_from_slice(&stamp);
}

/// The sequence number of a committed record's header bytes, or `None`
/// if it was never committed (or its stamp is torn).
pub(super) fn committed_seq(header: &[u8], offset: u64) -> Option<u64> {
    let seq = u64::from_le_bytes(header[72..80].try_into().expect("8 bytes"));
    let checksum = u32::from_le_bytes(header[80..84].try_into().expect("4 bytes"));
    (seq != 0 && checksum == stamp_checksum(offset, seq)).then_some(seq)
}

fn stamp_checksum(offset: u64, seq: u64) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&offset.to_le_bytes());
    crc.update(&seq.to_le_bytes());
    crc.finalize()
}

/// A tombstone record for `path`, stamped with `seq` at `offset`.
pub(super) fn tombstone(path: &ProbePath, offset: u64, seq: u64, stored_at: u64) -> Vec<u8> {
    let path_string = path.to_string();
    let path_bytes = path_string.as_bytes();
    let header = Header {
        kind: Kind::Tombstone,
        path_len: path_bytes.len() as u16,
        size: 0,
        signature_len: 0,
        crc32: 0,
        sha256: Sha256Digest([0; 32]),
        stored_at,
    };
    let mut record = header.encode(path_bytes, &[]).to_vec();
    stamp_into(&mut record, offset, seq);
    record.extend_from_slice(path_bytes);
    record
}

/// A record a scan of a pack found whole.
pub(super) struct Found {
    pub(super) offset: u64,
    pub(super) header: Header,
    pub(super) path: ProbePath,
    pub(super) signature: Option<Bytes>,
    /// `None` for a record never committed.
    pub(super) seq: Option<u64>,
    /// Whether the probe's bytes match the record's CRC-32. A record whose
    /// header holds but whose bytes do not, and that is committed or has
    /// more of the pack after it, is one the disk damaged later (a torn
    /// record is the pack's last, never committed): it is still a record,
    /// so that a scan neither stops at it nor drops what follows, and a
    /// read of it refuses the bytes.
    pub(super) bytes_intact: bool,
}

/// Reads the record at `offset` of a pack of `len` bytes: `Ok(None)` where
/// no whole record starts (the pack's end, or a torn last record).
pub(super) fn read_record(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<Option<Found>> {
    use std::os::unix::fs::FileExt;
    if len < offset + HEADER_LEN {
        return Ok(None);
    }
    let mut head = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut head, offset)?;
    let Some(header) = Header::parse(&head) else { return Ok(None) };
    let Some(end) = offset.checked_add(header.record_len()).filter(|&end| end <= len) else { return Ok(None) };
    let mut path = vec![0u8; usize::from(header.path_len)];
    file.read_exact_at(&mut path, offset + HEADER_LEN)?;
    let mut signature = vec![0u8; header.signature_len as usize];
    file.read_exact_at(&mut signature, end - u64::from(header.signature_len))?;
    if !header_checks(&head, &path, &signature) {
        return Ok(None);
    }
    let Some(path) = std::str::from_utf8(&path).ok().and_then(|p| ProbePath::parse(p).ok()) else {
        return Ok(None);
    };
    // The bytes must be whole too: a record is torn only when the process
    // died writing it, as the pack's last, and then its CRC-32 tells.
    let mut bytes_intact = true;
    if header.kind == Kind::Probe {
        let mut crc = crc32fast::Hasher::new();
        let mut at = offset + header.bytes_at();
        let mut buffer = vec![0u8; header.size.min(1 << 20) as usize];
        let mut left = header.size;
        while left > 0 {
            let n = left.min(buffer.len() as u64) as usize;
            file.read_exact_at(&mut buffer[..n], at)?;
            crc.update(&buffer[..n]);
            at += n as u64;
            left -= n as u64;
        }
        // A torn record was never committed: a stamped one whose bytes do
        // not match was damaged after its commit, wherever it stands.
        if crc.finalize() != header.crc32 {
            if end == len && committed_seq(&head, offset).is_none() {
                return Ok(None);
            }
            bytes_intact = false;
        }
    }
    let seq = committed_seq(&head, offset);
    let signature = (!signature.is_empty()).then(|| Bytes::from(signature));
    Ok(Some(Found { offset, header, path, signature, seq, bytes_intact }))
}
