//! What differs between stores: where the bytes are kept. A backend stages
//! new bytes out of sight and makes them visible with one compare-and-commit
//! that applies the overwrite rule atomically (a filesystem under its lock,
//! a database in one transaction). Everything else a store does (verifying
//! size and digest, the disk floor, commits that outlive their caller, the
//! order of an upload's commits) is `VerifiedStore`, the same over every
//! backend.

use bytes::Bytes;
use probe_api::names::{ModuleVersion, ProbePath};
use tokio::sync::oneshot;

use super::{CommitOutcome, ModuleSummary, ProbeReader, StoredProbe};
use crate::error::Result;

#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// What is stored under each of `paths`, in their order.
    async fn stat_many(&self, paths: &[ProbePath]) -> Result<Vec<Option<StoredProbe>>>;

    /// Up to `limit` probes in path order (the byte order of the path
    /// strings), after `after` when given, only of `module_version` when
    /// given.
    async fn list(
        &self,
        module_version: Option<&ModuleVersion>,
        after: Option<&ProbePath>,
        limit: usize,
    ) -> Result<Vec<StoredProbe>>;

    /// `ProbeStore::summaries`.
    async fn summaries(&self) -> Result<Vec<ModuleSummary>>;

    /// The probe under `path` as it is now, streamed in chunks of at most
    /// 1 MiB. A reader keeps reading what it opened even if the probe is
    /// overwritten or removed meanwhile.
    async fn open(&self, path: &ProbePath) -> Result<Option<ProbeReader>>;

    /// Starts staging the bytes of a probe of `size` bytes for `path`.
    /// Nothing is visible until `Staged::commit`; dropping either leaves
    /// nothing behind.
    async fn stage(&self, path: &ProbePath, size: u64) -> Result<Stage>;

    /// Removes the probe under `path`; false if there was none.
    async fn remove(&self, path: &ProbePath) -> Result<bool>;

    /// The secret that authenticates ListProbes page tokens, the same for
    /// every Central on this backend.
    fn page_token_key(&self) -> &[u8];

    /// Bytes the backend can still take (free disk, for a filesystem).
    fn available_bytes(&self) -> Result<u64>;

    /// `ProbeStore::space`.
    fn space(&self) -> Option<(u64, u64)> {
        None
    }

    /// `ProbeStore::max_pending_commits`.
    fn max_pending_commits(&self) -> usize {
        32
    }

    /// Where the probe under `path` is kept (a file, a pack and offset, a
    /// database blob), for the log line about a damaged probe.
    async fn location(&self, path: &ProbePath) -> String;

    /// The file that keeps the damaged probes reads found across restarts
    /// (`damage.rs`); `None` to keep them in memory only.
    fn damage_file(&self) -> Option<std::path::PathBuf> {
        None
    }
}

/// How a backend stages a probe's bytes.
pub enum Stage {
    /// By async writes (a database's rows).
    Async(Box<dyn Staging>),
    /// By plain file writes that never wait long: `VerifiedStore` makes
    /// them on the thread that hashes the bytes, which saves a thread and a
    /// hand-off per chunk.
    Blocking(Box<dyn BlockingStaging>),
}

/// Bytes being staged.
#[tonic::async_trait]
pub trait Staging: Send {
    /// Appends the next bytes.
    async fn write(&mut self, chunk: Bytes) -> Result<()>;

    /// All bytes are written. (`VerifiedStore` counts and hashes them.)
    async fn finish(self: Box<Self>) -> Result<Box<dyn Staged>>;
}

/// Bytes being staged by blocking writes, on the caller's thread.
pub trait BlockingStaging: Send {
    /// Appends the next bytes.
    fn write(&mut self, chunk: &[u8]) -> Result<()>;

    /// All bytes are written, with these digests (as received, before any
    /// check) and this signature: a staging that lays the whole record out
    /// here needs nothing later.
    fn finish(self: Box<Self>, end: FileEnd) -> Result<Box<dyn Staged>>;
}

/// What a blocking staging learns at the end of its file.
pub struct FileEnd {
    /// The bytes written.
    pub len: u64,
    pub sha256: probe_api::digest::Sha256Digest,
    pub crc32: u32,
    pub signature: Option<Bytes>,
}

/// Staged bytes, ready to be committed.
#[tonic::async_trait]
pub trait Staged: Send {
    /// What is stored under this file's path now (the commit decides again,
    /// atomically). Looked up with what the staging holds already: a
    /// backend of pooled connections must not wait for a second one while
    /// holding one, or uploads filling the pool wait for each other forever.
    async fn existing(&self) -> Result<Option<StoredProbe>>;

    /// Makes the staged bytes of `probe` durable, still invisible. Runs in
    /// parallel with the commits of other files.
    async fn prepare(&mut self, probe: &StoredProbe) -> Result<()>;

    /// Makes the prepared bytes the probe `probe` if the overwrite rule
    /// (`store::overwrite_rule` with `overwrite` and `repair`) says so,
    /// deciding and committing atomically with respect to other commits of
    /// the path.
    /// Sends true on `taken` as soon as the outcome is visible or decided
    /// (before any last fsync); dropping it unsent means it did not.
    async fn commit(
        self: Box<Self>,
        probe: StoredProbe,
        overwrite: bool,
        repair: bool,
        taken: Option<oneshot::Sender<bool>>,
    ) -> Result<CommitOutcome>;
}
