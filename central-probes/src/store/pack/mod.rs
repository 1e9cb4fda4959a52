//! The pack store: probes as records appended to a few large files, so
//! that an upload of thousands of probes is written sequentially and made
//! durable a batch at a time (one fsync of each pack written and one of the
//! index log per batch, `group_commit.rs`) rather than a file, an fsync and
//! a rename per probe.
//!
//! Layout of the data directory: `packs/<id>.pack` (records, `record.rs`),
//! `index/` (a snapshot and the logs after it, `journal.rs`), `lock` and
//! `page-token.key` as in the per-file store (both `store::disk`'s). A
//! data directory in the per-file layout (`probes/`) is converted at start
//! (`migrate.rs`).
//!
//! The index is in memory; each commit is decided under its lock by the
//! overwrite rule against the newest decision on the path, and becomes
//! visible once its batch is durable. Overwrites and removals append a new
//! record or a tombstone; compaction (`compact.rs`) rewrites the packs they
//! left mostly dead.

mod appender;
mod compact;
mod direct_io;
mod faults;
mod group_commit;
mod index;
#[cfg(any(test, feature = "testing"))]
pub mod inspect;
mod journal;
mod migrate;
mod open;
mod packs;
mod record;
mod side_pages;
mod staging;
mod state;
#[cfg(test)]
mod tests;

pub use compact::CompactionLimits;
pub use faults::Faults;
pub use state::BatchLimits;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use probe_api::names::{ModuleVersion, ProbePath};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::store::backend::{Backend, Stage};
use crate::store::disk::{DAMAGE_FILE, READ_CHUNK, available_bytes, load_or_create_key, lock_data_dir, read_on_demand};
use crate::store::verified::VerifiedStore;
use crate::store::{ModuleSummary, ProbeReader, StoredProbe, list_range};

use appender::Appenders;
use journal::Log;
use packs::Packs;
use state::{Inner, durable};

/// Settings of the pack store.
#[derive(Clone, Debug)]
pub struct PackStoreConfig {
    pub data_dir: PathBuf,
    /// Writes are refused when they would leave less free space than this.
    pub min_free_bytes: u64,
    pub batch: BatchLimits,
    /// A pack this long takes no more records.
    pub pack_len: u64,
    pub compaction: CompactionLimits,
}

impl PackStoreConfig {
    pub fn new(data_dir: &Path) -> PackStoreConfig {
        PackStoreConfig {
            data_dir: data_dir.to_owned(),
            min_free_bytes: 0,
            batch: BatchLimits::default(),
            pack_len: 1 << 30,
            compaction: CompactionLimits::default(),
        }
    }
}

/// The pack store behind verification.
pub type PackStore = VerifiedStore<PackBackend>;

pub struct PackBackend {
    inner: Arc<Inner>,
    group_commit: Option<JoinHandle<Log>>,
    /// Closed to stop the compaction thread.
    stop_compaction: Option<mpsc::Sender<()>>,
    compaction: Option<JoinHandle<()>>,
    compaction_limits: CompactionLimits,
}

impl PackStore {
    /// Opens (creating if needed) the store: takes the directory lock,
    /// loads the index (rebuilding it from the packs if it must), and
    /// converts a per-file data directory. Blocking.
    pub fn open(config: &PackStoreConfig) -> Result<Self> {
        Self::open_with(config, Arc::default())
    }

    /// `open`, stopping at the step `faults` says (test builds).
    pub fn open_with(config: &PackStoreConfig, faults: Arc<Faults>) -> Result<Self> {
        Ok(VerifiedStore::new(PackBackend::open(config, faults)?, config.min_free_bytes))
    }

    /// Number of probes stored.
    pub fn len(&self) -> usize {
        self.backend().inner.index().visible.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rewrites now every pack below the live fraction that is not being
    /// appended to (what the
    /// compaction thread does every `CompactionLimits::every`); the bytes freed.
    /// Blocking.
    pub fn compact_now(&self) -> Result<u64> {
        let backend = self.backend();
        compact::compact(&backend.inner, backend.compaction_limits).map_err(|e| Error::io("compacting the packs", e))
    }

    /// The store's steps so far and whether it stopped (test builds).
    pub fn faults(&self) -> &Faults {
        &self.backend().inner.faults
    }
}

impl PackBackend {
    fn open(config: &PackStoreConfig, faults: Arc<Faults>) -> Result<Self> {
        let data_dir = &config.data_dir;
        let packs_dir = data_dir.join("packs");
        let index_dir = data_dir.join("index");
        for dir in [data_dir, &packs_dir, &index_dir] {
            fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let lock = lock_data_dir(data_dir)?;
        let page_token_key = load_or_create_key(&data_dir.join("page-token.key"))?;
        let loaded = open::load(&faults, &index_dir, &packs_dir)
            .map_err(|e| Error::io(format!("loading the index of {}", data_dir.display()), e))?;
        let packs = Arc::new(Packs::new(packs_dir, faults.clone(), config.pack_len));
        for (id, file, len) in loaded.packs {
            packs.add_existing(id, file, len);
        }
        let index = loaded.index;
        info!(probes = index.visible.len(), packs = index.packs.len(), data_dir = %data_dir.display(), "probe store opened");
        let covers = loaded.next_generation - 1;
        if loaded.wants_snapshot {
            journal::write_snapshot(&faults, &index_dir, covers, index.durable_changes())
                .map_err(|e| Error::io("writing the index snapshot", e))?;
        }
        let known = if loaded.wants_snapshot { loaded.old_generations } else { Vec::new() };
        remove_logs(&faults, &index_dir, &known);
        let mut log = Log::create(&faults, &index_dir, loaded.next_generation)
            .map_err(|e| Error::io("starting the index log", e))?;
        let (queue, requests) = mpsc::channel();
        let inner = Arc::new(Inner {
            index_dir,
            index: Mutex::new(index),
            appenders: Appenders::new(packs.clone(), crate::store::lanes::count()),
            packs,
            faults,
            queue: Mutex::new(Some(queue)),
            failed: AtomicBool::new(false),
            batch_limits: config.batch,
            page_token_key,
            data_dir: data_dir.clone(),
            _lock: lock,
        });
        migrate::migrate(&inner, &mut log, data_dir)
            .map_err(|e| Error::io(format!("converting the per-file probes of {}", data_dir.display()), e))?;
        let group_commit = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("group-commit".into())
                .spawn(move || group_commit::run(inner, requests, log))
                .map_err(|e| Error::io("starting the group commit", e))?
        };
        let (stop_compaction, stop) = mpsc::channel::<()>();
        let compaction = {
            let (inner, limits, every) = (inner.clone(), config.compaction, config.compaction.every);
            std::thread::Builder::new()
                .name("compaction".into())
                .spawn(move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
                        if limits.below_live_fraction > 0.0
                            && let Err(error) = compact::compact(&inner, limits)
                        {
                            warn!(%error, "compaction failed; it tries again later");
                        }
                    }
                })
                .map_err(|e| Error::io("starting compaction", e))?
        };
        Ok(PackBackend {
            inner,
            group_commit: Some(group_commit),
            stop_compaction: Some(stop_compaction),
            compaction: Some(compaction),
            compaction_limits: config.compaction,
        })
    }
}

fn remove_logs(faults: &Faults, index_dir: &Path, generations: &[u64]) {
    for &generation in generations {
        if let Err(error) = faults.remove_file(&journal::log_path(index_dir, generation)) {
            warn!(generation, %error, "could not remove an index log a snapshot covers");
        }
    }
}

/// A closing store lets its group commit finish what was submitted, then
/// leaves a snapshot of its index, so that the next start replays no log.
impl Drop for PackBackend {
    fn drop(&mut self) {
        // Compaction first: it needs the group commit to finish a pass.
        self.stop_compaction.take();
        if let Some(thread) = self.compaction.take() {
            let _ = thread.join();
        }
        self.inner.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(log) = self.group_commit.take().and_then(|thread| thread.join().ok()) else { return };
        let inner = &self.inner;
        let index = inner.index();
        let written = journal::write_snapshot(&inner.faults, &inner.index_dir, log.generation, index.durable_changes());
        drop(index);
        match written {
            Ok(()) => remove_logs(&inner.faults, &inner.index_dir, &[log.generation]),
            Err(error) => warn!(%error, "could not write the index snapshot; the next start replays the log"),
        }
    }
}

#[tonic::async_trait]
impl Backend for PackBackend {
    async fn stat_many(&self, paths: &[ProbePath]) -> Result<Vec<Option<StoredProbe>>> {
        let index = self.inner.index();
        Ok(paths.iter().map(|path| index.visible.get(path).map(|loc| loc.stored(path))).collect())
    }

    async fn list(
        &self,
        module_version: Option<&ModuleVersion>,
        after: Option<&ProbePath>,
        limit: usize,
    ) -> Result<Vec<StoredProbe>> {
        let index = self.inner.index();
        Ok(list_range(&index.visible, module_version, after).take(limit).map(|(path, loc)| loc.stored(path)).collect())
    }

    async fn summaries(&self) -> Result<Vec<ModuleSummary>> {
        let mut summaries: Vec<ModuleSummary> = Vec::new();
        for (path, loc) in &self.inner.index().visible {
            if summaries.last().is_none_or(|summary| &summary.module_version != path.module_version()) {
                summaries.push(ModuleSummary {
                    module_version: path.module_version().clone(),
                    probes: 0,
                    bytes: 0,
                    last_stored: None,
                });
            }
            let summary = summaries.last_mut().expect("just pushed");
            summary.probes += 1;
            summary.bytes += loc.size;
            summary.last_stored = summary.last_stored.max(Some(loc.stored_at));
        }
        Ok(summaries)
    }

    async fn open(&self, path: &ProbePath) -> Result<Option<ProbeReader>> {
        // The pack's handle is taken under the index lock: compaction
        // forgets a pack only after the index stopped pointing into it.
        let (loc, file) = {
            let index = self.inner.index();
            let Some(loc) = index.visible.get(path).cloned() else { return Ok(None) };
            let file = self.inner.packs.file(loc.pack);
            let file = file.ok_or_else(|| Error::internal(format!("{path}: its pack {} is gone", loc.pack)))?;
            (loc, file)
        };
        // Read on the calling thread, as the per-file store does: a probe
        // is usually one chunk, in the page cache, read by one pread.
        let probe = loc.stored(path);
        let first = if loc.size <= READ_CHUNK as u64 {
            let mut bytes = bytes::BytesMut::zeroed(loc.size as usize);
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut bytes, loc.bytes_at(path))
                .map_err(|e| Error::io(format!("reading {path}"), e))?;
            Some(bytes.freeze())
        } else {
            None
        };
        let remaining = if first.is_some() { 0 } else { loc.size };
        let chunks = read_on_demand(path.clone(), file, loc.bytes_at(path), remaining, first)?;
        Ok(Some(ProbeReader { probe, chunks }))
    }

    async fn stage(&self, path: &ProbePath, _size: u64) -> Result<Stage> {
        self.inner.failed()?;
        Ok(Stage::Blocking(Box::new(staging::PackStaging::new(&self.inner, path))))
    }

    async fn remove(&self, path: &ProbePath) -> Result<bool> {
        let inner = self.inner.clone();
        let path = path.clone();
        let submitted = tokio::task::spawn_blocking(move || staging::remove(&inner, &path))
            .await
            .map_err(|e| Error::internal(format!("removing a probe: {e}")))??;
        let Some((receiver, _in_flight)) = submitted else { return Ok(false) };
        durable(receiver, "a removal").await?;
        Ok(true)
    }

    fn page_token_key(&self) -> &[u8] {
        &self.inner.page_token_key
    }

    fn damage_file(&self) -> Option<PathBuf> {
        Some(self.inner.data_dir.join(DAMAGE_FILE))
    }

    /// The newest record of the path: the one a read that just failed read,
    /// unless the path was written since.
    async fn location(&self, path: &ProbePath) -> String {
        let dir = self.inner.data_dir.join("packs");
        match self.inner.index().visible.get(path) {
            Some(loc) => format!(
                "{}, the record at offset {} (its bytes from offset {})",
                packs::pack_path(&dir, loc.pack).display(),
                loc.offset,
                loc.bytes_at(path)
            ),
            None => format!("{} (no record of it any more)", dir.display()),
        }
    }

    fn available_bytes(&self) -> Result<u64> {
        available_bytes(&self.inner.data_dir)
    }

    /// A batch holds what is pending: 512 probes of 130 KB are 64 MiB, the
    /// batch's bound, so that one fsync of the pack and one of the log
    /// cover that much.
    fn max_pending_commits(&self) -> usize {
        512
    }

    /// Live and dead bytes of the packs: what the index points to, and the
    /// rest (old versions, removed probes, refused uploads).
    fn space(&self) -> Option<(u64, u64)> {
        let index = self.inner.index();
        let live: u64 = index.packs.values().map(|used| used.live).sum();
        let all: u64 = index.packs.values().map(|used| used.durable_end).sum();
        Some((live, all.saturating_sub(live)))
    }
}
