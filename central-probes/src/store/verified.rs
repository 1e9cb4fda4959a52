//! The store every backend is used through: it hashes what is written (on
//! its lanes, `lanes.rs`), and commits it only when size and SHA-256 match
//! what the writer promised, in a task that outlives its caller, after the
//! caller's gate (the file before it in an upload) and never below the disk
//! floor. A backend only stages and compare-and-commits (`backend.rs`).
//! Reads are checked against the record (`check.rs`); a damaged probe is
//! logged, told to the server's metrics and remembered, so that an upload
//! of the same bytes repairs it instead of skipping it as identical.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use probe_api::names::{ModuleVersion, ProbePath};
use probe_api::signing::{SignatureError, TrustedKeys};
use tonic::Code;

use super::backend::{Backend, Stage, Staging};
use super::check::{self, Checked, OnDamaged};
use super::damage::Damage;
use super::file_hashing::{FileHashing, OnLane, Received};
use super::lanes::Lanes;
use super::{
    CommitOrder, CommitOutcome, Committed, Decision, ExpectedDigests, ModuleSummary, PendingCommit, ProbeReader,
    ProbeStore, ProbeWriter, StoredProbe, overwrite_rule, report_taken,
};
use crate::error::{Error, Result};

/// Told of each probe a store with trusted keys refuses, and why.
pub type OnRefused = Arc<dyn Fn(&SignatureError) + Send + Sync>;

/// A backend behind verification and the disk floor; cheap to clone.
pub struct VerifiedStore<B> {
    backend: Arc<B>,
    shared: Arc<Shared>,
}

impl<B> Clone for VerifiedStore<B> {
    fn clone(&self) -> Self {
        VerifiedStore { backend: self.backend.clone(), shared: self.shared.clone() }
    }
}

struct Shared {
    /// Writes are refused when they would leave less than this free.
    min_free_bytes: u64,
    /// With keys, a commit needs a signature that verifies by one of them;
    /// each refusal is told to the callback (the server's metrics).
    trusted_keys: Option<(TrustedKeys, OnRefused)>,
    /// Bytes of files being written: the backend will need them soon,
    /// although its free space does not show it yet.
    reserved: AtomicU64,
    /// The threads that hash (and, for blocking stagings, write) chunks.
    lanes: Lanes,
    /// Apart, so that readers hold it and not the lanes.
    damage: Arc<Damage>,
}

impl<B: Backend> VerifiedStore<B> {
    pub fn new(backend: B, min_free_bytes: u64) -> Self {
        let damage = Arc::new(Damage::open(backend.damage_file()));
        VerifiedStore {
            backend: Arc::new(backend),
            shared: Arc::new(Shared {
                min_free_bytes,
                trusted_keys: None,
                reserved: AtomicU64::new(0),
                lanes: Lanes::new(),
                damage,
            }),
        }
    }

    /// The store, telling `on_damaged` of each damaged probe its reads
    /// find. For a store just opened, before any clone of it.
    pub fn reporting_damage(mut self, on_damaged: OnDamaged) -> Self {
        let shared = Arc::get_mut(&mut self.shared).expect("a store not cloned yet");
        Arc::get_mut(&mut shared.damage).expect("a store not cloned yet").on_damaged = Some(on_damaged);
        self
    }

    /// What a read calls on finding a probe damaged.
    fn damage_reporter(&self) -> OnDamaged {
        // A reader must not keep the store open (its lock, its threads).
        self.shared.damage.reporter(Arc::downgrade(&self.backend))
    }

    /// The store, refusing from now on to commit a probe whose signature is
    /// missing or does not verify by one of `keys` (FAILED_PRECONDITION),
    /// checked from a BLAKE2b-512 computed as the bytes stream in. For a
    /// store just opened, before any clone of it.
    pub fn checking_signatures(mut self, keys: TrustedKeys, on_refused: OnRefused) -> Self {
        let shared = Arc::get_mut(&mut self.shared).expect("a store not cloned yet");
        shared.trusted_keys = Some((keys, on_refused));
        self
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Bytes reserved by writes in progress.
    pub fn reserved(&self) -> u64 {
        self.shared.reserved.load(Ordering::SeqCst)
    }

    /// Room for `size` more bytes, or RESOURCE_EXHAUSTED if that would take
    /// the backend below the floor.
    fn reserve(&self, size: u64) -> Result<Reservation> {
        let available = self.backend.available_bytes()?;
        let reserved = self.shared.reserved.fetch_add(size, Ordering::SeqCst) + size;
        let reservation = Reservation { shared: self.shared.clone(), size };
        let floor = self.shared.min_free_bytes;
        if available < reserved.saturating_add(floor) {
            return Err(Error::new(
                Code::ResourceExhausted,
                format!(
                    "not enough disk space: {available} bytes free, {reserved} bytes being written, \
                     and the store keeps at least {floor} bytes free"
                ),
            ));
        }
        Ok(reservation)
    }
}

/// Room held for a file being written; given back on drop.
struct Reservation {
    shared: Arc<Shared>,
    size: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shared.reserved.fetch_sub(self.size, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl<B: Backend> ProbeStore for VerifiedStore<B> {
    async fn stat(&self, path: &ProbePath) -> Result<Option<StoredProbe>> {
        Ok(self.backend.stat_many(std::slice::from_ref(path)).await?.pop().flatten())
    }

    async fn stat_many(&self, paths: &[ProbePath]) -> Result<Vec<Option<StoredProbe>>> {
        self.backend.stat_many(paths).await
    }

    async fn list(
        &self,
        module_version: Option<&ModuleVersion>,
        after: Option<&ProbePath>,
        limit: usize,
    ) -> Result<Vec<StoredProbe>> {
        self.backend.list(module_version, after, limit).await
    }

    async fn summaries(&self) -> Result<Vec<ModuleSummary>> {
        self.backend.summaries().await
    }

    async fn create(&self, path: ProbePath, size: u64) -> Result<Box<dyn ProbeWriter>> {
        let reservation = self.reserve(size)?;
        // A staging of blocking writes is written on the lane that hashes.
        let (on_lane, staging) = match self.backend.stage(&path, size).await? {
            Stage::Blocking(staging) => (Some(staging), None),
            Stage::Async(staging) => (None, Some(staging)),
        };
        let prehash = self.shared.trusted_keys.is_some();
        Ok(Box::new(VerifiedWriter {
            path,
            size,
            received: 0,
            staging,
            on_lane: OnLane {
                lane: self.shared.lanes.pick(),
                hashing: Some(Arc::new(FileHashing::new(prehash, on_lane))),
            },
            reservation,
            signature: None,
            shared: self.shared.clone(),
        }))
    }

    async fn open(&self, path: &ProbePath) -> Result<Option<ProbeReader>> {
        let Some(ProbeReader { probe, chunks }) = self.backend.open(path).await? else { return Ok(None) };
        let chunks = check::checked(probe.clone(), chunks, false, self.damage_reporter());
        Ok(Some(ProbeReader { probe, chunks }))
    }

    async fn check(&self, path: &ProbePath) -> Result<Checked> {
        let Some(ProbeReader { probe, chunks }) = self.backend.open(path).await? else { return Ok(Checked::Missing) };
        check::check_whole(&probe, chunks, self.damage_reporter()).await
    }

    fn is_damaged(&self, path: &ProbePath) -> bool {
        self.shared.damage.get(path).is_some()
    }

    fn page_token_key(&self) -> &[u8] {
        self.backend.page_token_key()
    }

    fn space(&self) -> Option<(u64, u64)> {
        self.backend.space()
    }

    fn max_pending_commits(&self) -> usize {
        self.backend.max_pending_commits()
    }

    async fn remove(&self, path: &ProbePath) -> Result<bool> {
        let removed = self.backend.remove(path).await?;
        self.shared.damage.clear(path);
        Ok(removed)
    }
}

/// With trusted keys, the signature must verify for these bytes.
fn check_signature(shared: &Shared, path: &ProbePath, received: &Received, signature: Option<&[u8]>) -> Result<()> {
    let (Some((keys, on_refused)), Some(prehash)) = (&shared.trusted_keys, &received.prehash) else { return Ok(()) };
    keys.verify_prehashed(path, prehash, signature).map(drop).map_err(|why| {
        on_refused(&why);
        Error::new(Code::FailedPrecondition, format!("{path}: {why}"))
    })
}

/// Checks the received bytes against what the writer was promised.
fn verify(path: &ProbePath, size: u64, received: &Received, expected: ExpectedDigests) -> Result<()> {
    if received.len != size {
        return Err(Error::invalid_argument(format!("{path}: {} bytes received but {size} declared", received.len)));
    }
    if let Some(sha256) = expected.sha256
        && sha256 != received.sha256
    {
        return Err(Error::new(
            Code::DataLoss,
            format!("{path}: the received bytes have SHA-256 {} but the uploader sent {sha256}", received.sha256),
        ));
    }
    if let Some(crc32) = expected.crc32
        && crc32 != received.crc32
    {
        return Err(Error::new(
            Code::DataLoss,
            format!("{path}: the received bytes have CRC-32 {:08x} but the uploader sent {crc32:08x}", received.crc32),
        ));
    }
    Ok(())
}

struct VerifiedWriter {
    path: ProbePath,
    size: u64,
    received: u64,
    /// A staging written here; `None` when the lane writes it.
    staging: Option<Box<dyn Staging>>,
    on_lane: OnLane,
    reservation: Reservation,
    signature: Option<Bytes>,
    shared: Arc<Shared>,
}

/// The error when a file's lane took no more jobs (its thread ended).
fn lane_gone(path: &ProbePath) -> Error {
    Error::internal(format!("hashing {path}: the hashing thread is gone"))
}

#[tonic::async_trait]
impl ProbeWriter for VerifiedWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        self.write_pieces(vec![chunk]).await
    }

    async fn write_pieces(&mut self, pieces: Vec<Bytes>) -> Result<()> {
        let len: u64 = pieces.iter().map(|piece| piece.len() as u64).sum();
        let received = self.received + len;
        if received > self.size {
            return Err(Error::invalid_argument(format!("{}: more bytes than the declared {}", self.path, self.size)));
        }
        self.received = received;
        let hashing = self.on_lane.hashing.clone().ok_or_else(|| lane_gone(&self.path))?;
        if hashing.failed.load(Ordering::SeqCst) {
            return Err(hashing.error().unwrap_or_else(|| lane_gone(&self.path)));
        }
        // Hashing and an async staging run side by side. An async staging
        // (a database's rows) gets the chunk whole, as it came before pieces.
        let for_staging = self.staging.is_some().then(|| match pieces.as_slice() {
            [one] => one.clone(),
            _ => pieces.concat().into(),
        });
        if !self.on_lane.lane.run(len, move || hashing.take(&pieces)).await {
            return Err(lane_gone(&self.path));
        }
        match (&mut self.staging, for_staging) {
            (Some(staging), Some(chunk)) => staging.write(chunk).await,
            _ => Ok(()),
        }
    }

    fn set_signature(&mut self, signature: Bytes) {
        self.signature = Some(signature);
    }

    async fn finish_in_order(
        self: Box<Self>,
        expected: ExpectedDigests,
        overwrite: bool,
        order: CommitOrder,
    ) -> Result<PendingCommit> {
        let VerifiedWriter { path, size, staging, on_lane, reservation, signature, shared, .. } = *self;
        if expected == ExpectedDigests::default() {
            return Err(Error::invalid_argument(format!("{path}: the trailer carries neither a SHA-256 nor a CRC-32")));
        }
        let hashed = on_lane.finish(signature.clone()).ok_or_else(|| lane_gone(&path))?;
        // The commit runs to its end even if the caller goes away, so a file
        // whose last byte arrived is never left half-committed; the caller
        // goes on with the next file meanwhile.
        let task = tokio::spawn(async move {
            let CommitOrder { after, taken } = order;
            let hashed = hashed.await.map_err(|_| lane_gone(&path))?;
            let received = hashed.received;
            let mut staged = match (hashed.staged, staging) {
                (Some(staged), _) => staged?,
                (None, Some(staging)) => staging.finish().await?,
                (None, None) => return Err(Error::internal(format!("{path}: staged nowhere"))),
            };
            verify(&path, size, &received, expected)?;
            check_signature(&shared, &path, &received, signature.as_deref())?;
            let sha256 = received.sha256;
            let committed = |outcome| Committed { outcome, sha256 };
            let aborted = |path: &ProbePath| {
                Error::new(Code::Aborted, format!("{path}: not committed, an earlier file of the upload failed"))
            };
            // Decide early when nothing will be stored: no durable write then.
            let old = staged.existing().await?;
            // The same content again repairs a copy a read found damaged; a
            // mark of other content than is stored now is stale.
            let marked = shared.damage.get(&path);
            let repair = old.as_ref().is_some_and(|old| marked == Some(old.sha256));
            if marked.is_some() && !repair {
                shared.damage.clear(&path);
            }
            let new = (size, sha256, signature.as_deref());
            let decision = overwrite_rule(old.as_ref().map(StoredProbe::content), new, overwrite, repair);
            if let Decision::Keep(outcome) = decision {
                if !after.await {
                    return Err(aborted(&path));
                }
                report_taken(taken);
                return Ok(committed(outcome));
            }
            // Durable before the wait, so that consecutive files overlap their
            // fsyncs; only visibility waits for the file before.
            let probe = StoredProbe { path, size, sha256, crc32: Some(received.crc32), signature };
            staged.prepare(&probe).await?;
            if !after.await {
                return Err(aborted(&probe.path));
            }
            let path = probe.path.clone();
            let outcome = staged.commit(probe, overwrite, repair, taken).await;
            drop(reservation);
            if let Ok(CommitOutcome::Stored | CommitOutcome::Overwritten { .. } | CommitOutcome::Repaired) = &outcome {
                shared.damage.clear(&path);
            }
            outcome.map(committed)
        });
        Ok(Box::pin(async move { task.await.map_err(|e| Error::internal(format!("commit task failed: {e}")))? }))
    }
}
