//! The shapes of the store's rows that the read path, the write path and
//! the change feed share: the chunk row's size, the columns a probe is
//! read back from, and the channel commits notify.

use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use tokio_postgres::Row;

use crate::error::{Error, Result};
use crate::store::StoredProbe;

/// Bytes per chunk row: what a writer buffers, and what a reader holds.
pub const CHUNK_ROW: usize = 256 * 1024;

/// The channel every commit and removal notifies with the probe's path.
pub(super) const CHANGES_CHANNEL: &str = "kprobes_changes";

/// Tells `$1` that `$2` changed, when the transaction commits.
pub(super) const NOTIFY: &str = "SELECT pg_notify($1, $2)";

pub(super) fn stored(row: &Row) -> Result<StoredProbe> {
    let bad = |what: &str| Error::internal(format!("the database holds a bad {what}"));
    let path: String = row.get("path");
    let size: i64 = row.get("size");
    let sha256: Vec<u8> = row.get("sha256");
    let crc32: Option<i64> = row.get("crc32");
    let signature: Option<Vec<u8>> = row.get("signature");
    Ok(StoredProbe {
        path: ProbePath::parse(&path).map_err(|_| bad("path"))?,
        size: u64::try_from(size).map_err(|_| bad("size"))?,
        sha256: Sha256Digest(sha256.try_into().map_err(|_| bad("SHA-256"))?),
        crc32: crc32.map(|crc| u32::try_from(crc).map_err(|_| bad("CRC-32"))).transpose()?,
        signature: signature.map(Bytes::from),
    })
}

pub(super) const COLUMNS: &str = "path, size, sha256, crc32, signature";
