//! What the index knows of one probe file, and the `StoredProbe` it
//! describes: shared by the header format, the snapshot, the index and
//! the writer.

use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;

use crate::store::StoredProbe;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) size: u64,
    pub(super) sha256: Sha256Digest,
    /// `None` for probes written before the store recorded CRC-32s.
    pub(super) crc32: Option<u32>,
}

pub(super) fn stored(path: ProbePath, entry: Entry) -> StoredProbe {
    StoredProbe { path, size: entry.size, sha256: entry.sha256, crc32: entry.crc32 }
}
