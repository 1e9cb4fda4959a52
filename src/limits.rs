//! The limits the API documents, in one place: Central enforces them and
//! clients size their messages by them. Each one is written in the proto
//! comment of the RPC that enforces it.

/// Largest request or response message of `ProbeUploadService`: a
/// GetExistingProbes call for 100,000 paths. A larger message is refused
/// with RESOURCE_EXHAUSTED.
pub const MAX_REQUEST_MESSAGE: usize = 64 << 20;

/// Largest `chunk` of one UploadProbes message; a larger one is refused with
/// RESOURCE_EXHAUSTED.
pub const MAX_UPLOAD_CHUNK: usize = 4 << 20;

/// Largest probe file accepted in one upload.
pub const MAX_FILE_SIZE: u64 = 4 << 30;

/// Largest probe file (gzip'd, as served) a Collector receives. Central
/// stores larger files, but no Collector loads one, so the uploader warns
/// of them. Real probes are at most a few MiB.
pub const COLLECTOR_MAX_PROBE_FILE: u64 = 32 << 20;

/// Most paths one GetExistingProbes call may ask for.
pub const MAX_EXISTING_PATHS: usize = 100_000;

/// Most module versions, and most probes matched, of one DeleteProbes call.
pub const MAX_DELETE_MODULE_VERSIONS: usize = 1_000;
pub const MAX_DELETED_PROBES: usize = 100_000;

/// Default and largest ListProbes page.
pub const DEFAULT_PAGE_SIZE: u32 = 1_000;
pub const MAX_PAGE_SIZE: u32 = 10_000;

/// Largest GetProbe request message; a request is two names.
pub const MAX_GET_PROBE_REQUEST: usize = 4 << 10;

/// Most module versions one ExportProbes call may name.
pub const MAX_EXPORT_MODULE_VERSIONS: usize = 1_000;

/// Exports Central runs at once; one more is refused with RESOURCE_EXHAUSTED.
pub const MAX_EXPORTS: usize = 4;

/// Largest `chunk` of an ExportProbes stream.
pub const MAX_EXPORT_CHUNK: usize = 1 << 20;

/// Misses Central keeps (ListMisses); beyond it, the one seen longest ago
/// is forgotten.
pub const MAX_MISSES: usize = 1_000;

/// Distinct clients counted per miss; more are not told apart.
pub const MAX_MISS_CLIENTS: usize = 1_000;

/// Bytes of the manifest that starts a product-style upload
/// (`/api/extensions/probeupload`): 16,256 files take about 1.3 MB.
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;
/// Files one product-style upload may list: a real package has about
/// 16,500 entries.
pub const MAX_MANIFEST_FILES: usize = 65_536;

/// Most nodes one CheckCoverage call may check: a fleet's distinct kernels
/// several times over (a support package covers about 8,000).
pub const MAX_COVERAGE_NODES: usize = 20_000;
/// Most candidates of one node; the Collector derives at most three.
pub const MAX_NODE_CANDIDATES: usize = 16;
/// Most `builtin_files` of one CheckCoverage call.
pub const MAX_BUILTIN_FILES: usize = 100_000;
/// Paths per GetExistingProbes call that CheckCoverage makes to an
/// upstream Central.
pub const COVERAGE_UPSTREAM_BATCH: usize = 10_000;
/// HEAD requests CheckCoverage has under way at once on a bucket upstream.
pub const COVERAGE_BUCKET_REQUESTS: usize = 16;
