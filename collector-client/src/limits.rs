//! The Collector's own bounds on what it receives, applied while bytes
//! arrive, whatever a source announces.

/// Largest probe file (gzip'd, as served) the Collector receives: a source
/// announcing more is refused before anything is read, and one sending more
/// is cut off there, before any signature check, so a hostile Central,
/// bucket or proxy cannot fill the node's memory. Real probes are at most a
/// few MiB.
pub const MAX_PROBE_FILE: u64 = probe_api::limits::COLLECTOR_MAX_PROBE_FILE;

/// Largest probe accepted after decompression: a gzip bomb stops here.
pub const MAX_PROBE_SIZE: u64 = 64 << 20;
