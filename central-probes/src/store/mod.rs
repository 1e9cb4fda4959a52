//! The probe store: where uploaded probes live. The services see only
//! `ProbeStore`. A store is composed: `VerifiedStore` (verified.rs: hashing
//! on a thread per core, `lanes` and `file_hashing`; size and digest checks,
//! the disk floor, commits that outlive their caller and wait for their
//! gate) over a `Backend` (backend.rs: batch lookup, listing, reading,
//! staging, and a compare-and-commit that applies the overwrite rule
//! atomically): `pack/`, `filesystem/` (both on `disk`) and `postgres/`,
//! all passing `conformance`. `read_through` keeps local copies of a shared
//! record, and `hot` keeps the most asked-for probes in memory. Beside the
//! probes, the store keeps what the server records: API tokens (`tokens`),
//! the misses (`misses`) and the clients they count (`client_id`).
//!
//! The store is the authority on the overwrite rule (`overwrite_rule`): it
//! decides, atomically with the commit, whether the new bytes are stored,
//! identical to what is there, a conflict, or an overwrite. Reads are
//! checked against the record (`check`); an upload repairs what fails.

pub mod backend;
pub mod check;
pub mod client_id;
#[cfg(any(test, feature = "testing"))]
pub mod conformance;
mod damage;
#[cfg(any(test, feature = "testing"))]
pub mod damage_suite;
mod disk;
mod file_hashing;
pub mod filesystem;
pub mod hot;
mod lanes;
pub(crate) mod lru;
pub mod misses;
pub mod pack;
pub mod postgres;
pub mod read_through;
pub mod tokens;
pub mod verified;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use probe_api::names::{ModuleVersion, ProbePath};
use probe_api::signing::ProbeSignature;
use tokio_stream::Stream;

use crate::error::Result;

/// What the store knows about one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredProbe {
    pub path: ProbePath,
    pub size: u64,
    pub sha256: Sha256Digest,
    /// `None` for probes stored before the store recorded CRC-32s.
    pub crc32: Option<u32>,
    /// The probe's minisign signature (its `.minisig` file's bytes, as
    /// uploaded), if it was uploaded with one.
    pub signature: Option<Bytes>,
}

impl StoredProbe {
    /// What the overwrite rule compares of this probe.
    pub fn content(&self) -> Content<'_> {
        (self.size, self.sha256, self.signature.as_deref())
    }
}

/// A probe as the API describes it (listings, lookups); exports add the
/// signature itself.
impl From<StoredProbe> for probe_api::v1::ProbeInfo {
    fn from(probe: StoredProbe) -> Self {
        let path = probe.path.to_string();
        probe_info(probe, path)
    }
}

/// `probe` as the API describes it, under `path`: its path as a string
/// the caller has already (a lookup's request), to save formatting it.
pub fn probe_info(probe: StoredProbe, path: String) -> probe_api::v1::ProbeInfo {
    let signed = probe.signature.as_deref().and_then(|signature| ProbeSignature::parse(signature).ok());
    probe_api::v1::ProbeInfo {
        path,
        size: probe.size,
        sha256: probe.sha256.to_hex(),
        crc32: probe.crc32,
        signature_key_id: signed.as_ref().map(|s| s.key_id().to_string()).unwrap_or_default(),
        signature_serial: signed.as_ref().map_or(0, |s| s.serial()),
        ..Default::default() // no signature bytes (exports add them), not prefetched
    }
}

/// The probes of one module version, in total.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSummary {
    pub module_version: ModuleVersion,
    pub probes: u64,
    pub bytes: u64,
    /// When the most recently stored of them was stored (Unix seconds);
    /// `None` if the store cannot tell.
    pub last_stored: Option<u64>,
}

/// What a writer is told its bytes must hash to: a SHA-256, a CRC-32, or
/// both. The store computes both in any case and checks each one given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpectedDigests {
    pub sha256: Option<Sha256Digest>,
    pub crc32: Option<u32>,
}

impl From<Sha256Digest> for ExpectedDigests {
    fn from(sha256: Sha256Digest) -> Self {
        ExpectedDigests { sha256: Some(sha256), crc32: None }
    }
}

/// A finished commit: what it did and the digest of the bytes it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    pub outcome: CommitOutcome,
    pub sha256: Sha256Digest,
}

/// What committing one file did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// No probe had this path; it is stored now.
    Stored,
    /// The same bytes were stored already; nothing changed.
    Identical,
    /// Other bytes are stored under this path and were kept.
    Conflict { existing: Sha256Digest },
    /// Other bytes were stored under this path and have been replaced.
    Overwritten { previous: Sha256Digest },
    /// The same bytes were recorded, but the stored copy was found
    /// damaged: it has been replaced by the new one.
    Repaired,
}

/// What the overwrite rule decides for one commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Make the new bytes visible; the commit's outcome is this.
    Write(CommitOutcome),
    /// Keep what is stored and drop the new bytes; the outcome is this.
    Keep(CommitOutcome),
}

/// What the overwrite rule compares: size, SHA-256 and signature.
pub type Content<'a> = (u64, Sha256Digest, Option<&'a [u8]>);

/// The overwrite rule, the same for every backend: what committing a probe
/// of size, digest and signature `new` over what is stored under its path
/// (`old`) does. Another signature over the same bytes is a change like
/// other bytes: replacing what Collectors check needs `overwrite` too. A
/// backend applies the rule atomically with its commit (under its lock, or
/// in its transaction), so racing uploads of one path agree.
///
/// `repair`: the stored copy of `new`'s content was found damaged, so the
/// same content is written again rather than skipped as identical. It
/// changes nothing when another content is stored by then.
pub fn overwrite_rule(old: Option<Content<'_>>, new: Content<'_>, overwrite: bool, repair: bool) -> Decision {
    match old {
        None => Decision::Write(CommitOutcome::Stored),
        Some(old) if old == new && repair => Decision::Write(CommitOutcome::Repaired),
        Some(old) if old == new => Decision::Keep(CommitOutcome::Identical),
        Some((_, previous, _)) if overwrite => Decision::Write(CommitOutcome::Overwritten { previous }),
        Some((_, existing, _)) => Decision::Keep(CommitOutcome::Conflict { existing }),
    }
}

/// The probes of an in-memory index in path order (the byte order of the
/// path strings), after `after` when given, only of `module_version` when
/// given: what `Backend::list` returns of a map.
pub(crate) fn list_range<'a, V>(
    index: &'a std::collections::BTreeMap<ProbePath, V>,
    module_version: Option<&'a ModuleVersion>,
    after: Option<&'a ProbePath>,
) -> impl Iterator<Item = (&'a ProbePath, &'a V)> + 'a {
    use std::ops::Bound;
    let start = after.map_or(Bound::Unbounded, Bound::Excluded);
    let in_module = move |path: &ProbePath| module_version.is_none_or(|v| path.module_version() == v);
    // Paths order as strings, so one module version's paths are the
    // contiguous run of those starting with "<version>/".
    let prefix = module_version.map(|v| format!("{v}/"));
    index
        .range((start, Bound::Unbounded))
        .skip_while(move |(path, _)| prefix.as_ref().is_some_and(|prefix| path.bytes().lt(prefix.bytes())))
        .take_while(move |(path, _)| in_module(path))
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// A commit that has been verified and is being made durable. It completes
/// even if whoever started it goes away.
pub type PendingCommit = Pin<Box<dyn Future<Output = Result<Committed>> + Send>>;

/// What a commit waits for after its bytes verified: `true` lets it take
/// effect, `false` drops it (the commit then fails with ABORTED). An upload
/// stream passes the outcome of the file before, so that files commit in
/// stream order and none after a failing one.
pub type CommitGate = Pin<Box<dyn Future<Output = bool> + Send>>;

/// A gate that lets the commit go ahead at once.
pub fn open_gate() -> CommitGate {
    Box::pin(std::future::ready(true))
}

/// Where a commit stands in its upload: it takes effect only after `after`
/// said the file before it did, and tells `taken` whether it took effect
/// (true) as soon as it is visible or decided, before its last fsync, so
/// that the durable parts of consecutive commits overlap while their
/// visibility keeps stream order.
pub struct CommitOrder {
    pub after: CommitGate,
    pub taken: Option<tokio::sync::oneshot::Sender<bool>>,
}

/// Tells whoever waits on `taken` that the commit took effect.
pub fn report_taken(taken: Option<tokio::sync::oneshot::Sender<bool>>) {
    if let Some(taken) = taken {
        // The waiter may be gone (its upload ended); nothing to tell then.
        let _ = taken.send(true);
    }
}

impl CommitOrder {
    /// A commit that waits for nothing and nobody waits for.
    pub fn unordered() -> Self {
        CommitOrder { after: open_gate(), taken: None }
    }
}

/// An open probe: its metadata, then its bytes.
pub struct ProbeReader {
    pub probe: StoredProbe,
    pub chunks: ChunkStream,
}

#[tonic::async_trait]
pub trait ProbeStore: Send + Sync + 'static {
    /// The probe stored under `path`, if any.
    async fn stat(&self, path: &ProbePath) -> Result<Option<StoredProbe>>;

    /// `stat` of many paths in one call (GetExistingProbes asks for up to
    /// 100,000): the answers in the order of `paths`.
    async fn stat_many(&self, paths: &[ProbePath]) -> Result<Vec<Option<StoredProbe>>> {
        let mut found = Vec::with_capacity(paths.len());
        for path in paths {
            found.push(self.stat(path).await?);
        }
        Ok(found)
    }

    /// Up to `limit` probes in path order, after `after` when given, only of
    /// `module_version` when given.
    async fn list(
        &self,
        module_version: Option<&ModuleVersion>,
        after: Option<&ProbePath>,
        limit: usize,
    ) -> Result<Vec<StoredProbe>>;

    /// Every module version with stored probes, in path order: how many,
    /// how many bytes, and when the last was stored.
    async fn summaries(&self) -> Result<Vec<ModuleSummary>>;

    /// Starts writing a probe of exactly `size` bytes. Nothing is visible
    /// until the writer's `finish` commits; a writer dropped before that
    /// leaves nothing behind.
    async fn create(&self, path: ProbePath, size: u64) -> Result<Box<dyn ProbeWriter>>;

    /// Opens the probe stored under `path`, if any. Its chunks are checked
    /// against its record as they are read (`check`): a damaged probe ends
    /// with DATA_LOSS before its last chunk.
    async fn open(&self, path: &ProbePath) -> Result<Option<ProbeReader>>;

    /// Reads the probe under `path` whole and says whether its bytes match
    /// its record; a store that can check both of its digests does.
    async fn check(&self, path: &ProbePath) -> Result<check::Checked> {
        match self.open(path).await? {
            None => Ok(check::Checked::Missing),
            Some(reader) => check::drain(reader.chunks).await,
        }
    }

    /// Whether a read found the probe under `path` damaged: an uploader is
    /// told it is not there, and its upload repairs it.
    fn is_damaged(&self, _path: &ProbePath) -> bool {
        false
    }

    /// The secret that authenticates ListProbes page tokens. Every Central
    /// on one store must see the same one.
    fn page_token_key(&self) -> &[u8];

    /// Bytes of live and of dead records, for a store that keeps dead ones
    /// until it compacts (the pack store); `None` for others.
    fn space(&self) -> Option<(u64, u64)> {
        None
    }

    /// Commits of one upload that may be in flight at once: enough to hide
    /// the store's commit latency behind the network, few enough for what
    /// each holds (an open file in the per-file store; in the pack store,
    /// only a place in the group commit's batch, which grows with them).
    fn max_pending_commits(&self) -> usize {
        32
    }

    /// Deletes the probe under `path`; false if there was none. Readers
    /// that opened it already still read it whole.
    async fn remove(&self, path: &ProbePath) -> Result<bool>;
}

#[tonic::async_trait]
pub trait ProbeWriter: Send {
    /// Appends the next bytes.
    async fn write(&mut self, chunk: Bytes) -> Result<()>;

    /// Appends one chunk that came in pieces (an upload's chunk as the
    /// HTTP/2 frames carried it), as `write` of the pieces joined would.
    /// A writer that hands bytes to another thread overrides it, to hand
    /// the chunk over once instead of piece by piece.
    async fn write_pieces(&mut self, pieces: Vec<Bytes>) -> Result<()> {
        for piece in pieces {
            self.write(piece).await?;
        }
        Ok(())
    }

    /// The probe's signature, committed with its bytes (an upload's trailer
    /// carries it, after the bytes). A store that checks signatures
    /// (`VerifiedStore::with_trusted_keys`) refuses a commit without one.
    fn set_signature(&mut self, signature: Bytes);

    /// Ends the file. The returned commit checks that exactly the declared
    /// size arrived and that it hashes to every digest of `expected`
    /// (INVALID_ARGUMENT or DATA_LOSS otherwise, keeping nothing; at least
    /// one digest is required), makes the bytes durable, waits
    /// for `order.after`, then commits under the overwrite rule. It runs on
    /// its own, so the caller may go on with the next file meanwhile, and it
    /// completes even if the caller goes away.
    async fn finish_in_order(
        self: Box<Self>,
        expected: ExpectedDigests,
        overwrite: bool,
        order: CommitOrder,
    ) -> Result<PendingCommit>;

    /// `finish_in_order` with nothing to wait for.
    async fn finish(self: Box<Self>, expected: ExpectedDigests, overwrite: bool) -> Result<PendingCommit> {
        self.finish_in_order(expected, overwrite, CommitOrder::unordered()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overwrite_rule_stores_skips_keeps_or_replaces() {
        let (a, b) = (Sha256Digest::of(b"a"), Sha256Digest::of(b"b"));
        assert_eq!(overwrite_rule(None, (1, a, None), false, false), Decision::Write(CommitOutcome::Stored));
        assert_eq!(
            overwrite_rule(Some((1, a, None)), (1, a, None), true, false),
            Decision::Keep(CommitOutcome::Identical)
        );
        assert_eq!(
            overwrite_rule(Some((1, a, None)), (1, b, None), false, false),
            Decision::Keep(CommitOutcome::Conflict { existing: a })
        );
        assert_eq!(
            overwrite_rule(Some((1, a, None)), (1, b, None), true, false),
            Decision::Write(CommitOutcome::Overwritten { previous: a })
        );
        // Same digest, other size: not the same probe.
        assert_eq!(
            overwrite_rule(Some((2, a, None)), (1, a, None), false, false),
            Decision::Keep(CommitOutcome::Conflict { existing: a })
        );
        // Same bytes, another signature (or none): a change.
        let signed = Some(&b"sig"[..]);
        assert_eq!(
            overwrite_rule(Some((1, a, signed)), (1, a, signed), false, false),
            Decision::Keep(CommitOutcome::Identical)
        );
        assert_eq!(
            overwrite_rule(Some((1, a, signed)), (1, a, None), false, false),
            Decision::Keep(CommitOutcome::Conflict { existing: a })
        );
        assert_eq!(
            overwrite_rule(Some((1, a, None)), (1, a, signed), true, false),
            Decision::Write(CommitOutcome::Overwritten { previous: a })
        );
    }
}
