//! What the index knows of one probe file, and the `StoredProbe` it
//! describes: shared by the header format, the snapshot, the index and
//! the writer.

use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;

use crate::store::StoredProbe;

#[derive(Clone, PartialEq, Eq)]
pub(in crate::store) struct Entry {
    pub(in crate::store) size: u64,
    pub(in crate::store) sha256: Sha256Digest,
    /// `None` for probes written before the store recorded CRC-32s.
    pub(in crate::store) crc32: Option<u32>,
    /// The probe's minisign signature, if it was uploaded with one.
    pub(in crate::store) signature: Option<Bytes>,
}

impl Entry {
    pub(super) fn of(probe: &StoredProbe) -> Entry {
        Entry { size: probe.size, sha256: probe.sha256, crc32: probe.crc32, signature: probe.signature.clone() }
    }
}

pub(super) fn stored(path: ProbePath, entry: Entry) -> StoredProbe {
    StoredProbe { path, size: entry.size, sha256: entry.sha256, crc32: entry.crc32, signature: entry.signature }
}
