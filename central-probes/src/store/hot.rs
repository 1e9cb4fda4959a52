//! Hot probes: a bounded in-memory cache of whole probes in front of a
//! store. In a cluster most nodes run a handful of kernels, so a few probes
//! take most GetProbe calls; serving those from memory spares the open, the
//! header read and the copy out of the page cache.
//!
//! A probe enters the cache when it is opened a second time while it is
//! among the last `RECENT_MISSES` misses, and its first chunk is the whole
//! probe (the store hands that chunk out anyway, so a miss costs nothing
//! extra); larger probes are always read from the store. Admitting only
//! what is asked for again keeps requests spread over many probes from
//! churning the cache (each insertion evicts, and fresh buffers of 130 KB
//! cost page faults). Entries are evicted least recently used beyond the
//! byte budget. A commit that
//! stores or replaces a probe, and a removal, drop its entry twice: before
//! (so that no read in flight puts old bytes back: each insertion checks
//! that no invalidation happened since its read began) and after (so that
//! nothing read in between stays). Until the commit returns, a reader may
//! still get the old bytes, whole and with their own digest, as it could
//! from the store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use probe_api::names::{ModuleVersion, ProbePath};
use tokio_stream::StreamExt;

use super::lru::Lru;
use super::{
    CommitOrder, CommitOutcome, ExpectedDigests, ModuleSummary, PendingCommit, ProbeReader, ProbeStore, ProbeWriter,
    StoredProbe,
};
use crate::error::Result;

/// A store with its hot probes in memory.
pub struct HotProbes {
    store: Arc<dyn ProbeStore>,
    cache: Arc<Cache>,
}

struct Cache {
    budget: u64,
    /// Bumped by every invalidation: an insertion whose read began before
    /// an invalidation is dropped.
    generation: AtomicU64,
    entries: Mutex<Entries>,
    hits: AtomicU64,
}

/// Misses remembered for admission: a probe asked for again within this
/// many misses is hot.
const RECENT_MISSES: usize = 1024;

#[derive(Default)]
struct Entries {
    probes: HashMap<ProbePath, (StoredProbe, Bytes)>,
    lru: Lru,
    recent_misses: HashSet<ProbePath>,
    miss_order: VecDeque<ProbePath>,
}

impl Entries {
    /// Records a miss of `path`; true if it missed recently already.
    fn missed_again(&mut self, path: &ProbePath) -> bool {
        if self.recent_misses.contains(path) {
            return true;
        }
        if self.miss_order.len() == RECENT_MISSES
            && let Some(oldest) = self.miss_order.pop_front()
        {
            self.recent_misses.remove(&oldest);
        }
        self.miss_order.push_back(path.clone());
        self.recent_misses.insert(path.clone());
        false
    }
}

impl HotProbes {
    /// `store` with up to `budget` bytes of its probes kept in memory.
    pub fn new(store: Arc<dyn ProbeStore>, budget: u64) -> Self {
        let cache = Cache { budget, generation: AtomicU64::new(0), entries: Mutex::default(), hits: AtomicU64::new(0) };
        HotProbes { store, cache: Arc::new(cache) }
    }

    /// Opens served from memory so far.
    pub fn hits(&self) -> u64 {
        self.cache.hits.load(Ordering::Relaxed)
    }

    /// Bytes of probes held in memory.
    pub fn held_bytes(&self) -> u64 {
        self.cache.entries().probes.values().map(|(_, bytes)| bytes.len() as u64).sum()
    }
}

impl Cache {
    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        // Each change leaves both maps consistent before any call that
        // could panic, so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The cached probe, or on a miss whether it is hot enough to admit.
    fn get(&self, path: &ProbePath) -> Result<(StoredProbe, Bytes), bool> {
        let mut entries = self.entries();
        let Some(found) = entries.probes.get(path).cloned() else {
            return Err(entries.missed_again(path));
        };
        entries.lru.touch(path);
        self.hits.fetch_add(1, Ordering::Relaxed);
        Ok(found)
    }

    fn insert(&self, read_began: u64, probe: StoredProbe, bytes: Bytes) {
        let mut entries = self.entries();
        // Checked under the lock that `invalidate` takes after bumping it.
        if self.generation.load(Ordering::SeqCst) != read_began {
            return;
        }
        let path = probe.path.clone();
        entries.lru.insert(path.clone(), bytes.len() as u64);
        entries.probes.insert(path.clone(), (probe, bytes));
        for evicted in entries.lru.evict_beyond(self.budget, &path) {
            entries.probes.remove(&evicted);
        }
    }

    fn invalidate(&self, path: &ProbePath) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut entries = self.entries();
        entries.lru.remove(path);
        entries.probes.remove(path);
    }
}

fn whole(probe: StoredProbe, bytes: Bytes) -> ProbeReader {
    ProbeReader { probe, chunks: Box::pin(tokio_stream::once(Ok(bytes))) }
}

#[tonic::async_trait]
impl ProbeStore for HotProbes {
    async fn stat(&self, path: &ProbePath) -> Result<Option<StoredProbe>> {
        self.store.stat(path).await
    }

    async fn stat_many(&self, paths: &[ProbePath]) -> Result<Vec<Option<StoredProbe>>> {
        self.store.stat_many(paths).await
    }

    async fn list(
        &self,
        module_version: Option<&ModuleVersion>,
        after: Option<&ProbePath>,
        limit: usize,
    ) -> Result<Vec<StoredProbe>> {
        self.store.list(module_version, after, limit).await
    }

    async fn summaries(&self) -> Result<Vec<ModuleSummary>> {
        self.store.summaries().await
    }

    async fn create(&self, path: ProbePath, size: u64) -> Result<Box<dyn ProbeWriter>> {
        let writer = self.store.create(path.clone(), size).await?;
        Ok(Box::new(HotWriter { writer, path, cache: self.cache.clone() }))
    }

    async fn open(&self, path: &ProbePath) -> Result<Option<ProbeReader>> {
        let read_began = self.cache.generation.load(Ordering::SeqCst);
        let admit = match self.cache.get(path) {
            Ok((probe, bytes)) => return Ok(Some(whole(probe, bytes))),
            Err(admit) => admit,
        };
        let Some(mut reader) = self.store.open(path).await? else { return Ok(None) };
        if !admit || reader.probe.size > self.cache.budget {
            return Ok(Some(reader));
        }
        // The first chunk is read already; if it is the whole probe, keep it.
        match reader.chunks.next().await {
            Some(Ok(first)) if first.len() as u64 == reader.probe.size => {
                self.cache.insert(read_began, reader.probe.clone(), first.clone());
                Ok(Some(whole(reader.probe, first)))
            }
            first => {
                let rest = reader.chunks;
                let chunks = tokio_stream::iter(first).chain(rest);
                Ok(Some(ProbeReader { probe: reader.probe, chunks: Box::pin(chunks) }))
            }
        }
    }

    /// The cache holds only what a checked read handed out whole.
    fn is_damaged(&self, path: &ProbePath) -> bool {
        self.store.is_damaged(path)
    }

    fn page_token_key(&self) -> &[u8] {
        self.store.page_token_key()
    }

    fn space(&self) -> Option<(u64, u64)> {
        self.store.space()
    }

    fn max_pending_commits(&self) -> usize {
        self.store.max_pending_commits()
    }

    async fn remove(&self, path: &ProbePath) -> Result<bool> {
        self.cache.invalidate(path);
        let removed = self.store.remove(path).await;
        self.cache.invalidate(path);
        removed
    }
}

/// A writer whose commit drops the probe's entry before and after it.
struct HotWriter {
    writer: Box<dyn ProbeWriter>,
    path: ProbePath,
    cache: Arc<Cache>,
}

#[tonic::async_trait]
impl ProbeWriter for HotWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        self.writer.write(chunk).await
    }

    async fn write_pieces(&mut self, pieces: Vec<Bytes>) -> Result<()> {
        self.writer.write_pieces(pieces).await
    }

    fn set_signature(&mut self, signature: Bytes) {
        self.writer.set_signature(signature);
    }

    async fn finish_in_order(
        self: Box<Self>,
        expected: ExpectedDigests,
        overwrite: bool,
        order: CommitOrder,
    ) -> Result<PendingCommit> {
        let HotWriter { writer, path, cache } = *self;
        cache.invalidate(&path);
        let commit = writer.finish_in_order(expected, overwrite, order).await?;
        Ok(Box::pin(async move {
            let committed = commit.await;
            if let Ok(done) = &committed
                && matches!(
                    done.outcome,
                    CommitOutcome::Stored | CommitOutcome::Overwritten { .. } | CommitOutcome::Repaired
                )
            {
                cache.invalidate(&path);
            }
            committed
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::filesystem::{FilesystemStore, FilesystemStoreConfig};
    use probe_api::digest::Sha256Digest;

    fn path(kernel: u32) -> ProbePath {
        ProbePath::parse(&format!("2.5.0/collector-ebpf-5.{kernel}.0.o.gz")).unwrap()
    }

    fn hot(dir: &std::path::Path, budget: u64) -> HotProbes {
        let config = FilesystemStoreConfig { data_dir: dir.to_owned(), min_free_bytes: 0 };
        HotProbes::new(Arc::new(FilesystemStore::open(&config).unwrap()), budget)
    }

    async fn put(store: &dyn ProbeStore, p: &ProbePath, bytes: &[u8], overwrite: bool) {
        let mut writer = store.create(p.clone(), bytes.len() as u64).await.unwrap();
        writer.write(Bytes::copy_from_slice(bytes)).await.unwrap();
        writer.finish(Sha256Digest::of(bytes).into(), overwrite).await.unwrap().await.unwrap();
    }

    async fn read(store: &dyn ProbeStore, p: &ProbePath) -> (StoredProbe, Vec<u8>) {
        let reader = store.open(p).await.unwrap().unwrap();
        let chunks: Vec<Bytes> = reader.chunks.map(|chunk| chunk.unwrap()).collect().await;
        (reader.probe, chunks.concat())
    }

    #[tokio::test]
    async fn a_hot_probe_is_served_from_memory_until_it_is_overwritten_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = hot(dir.path(), 1 << 20);
        put(&store, &path(1), b"first", false).await;
        for _ in 0..2 {
            assert_eq!(read(&store, &path(1)).await.1, b"first");
        }
        assert_eq!(store.hits(), 0, "the first two opens read the store; the second admits the probe");
        // Gone from disk behind the cache's back: still served, from memory.
        let file = dir.path().join("probes/2.5.0/collector-ebpf-5.1.0.o.gz");
        let on_disk = std::fs::read(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert_eq!(read(&store, &path(1)).await.1, b"first");
        assert_eq!(store.hits(), 1);
        std::fs::write(&file, on_disk).unwrap();

        put(&store, &path(1), b"second", true).await;
        let (probe, bytes) = read(&store, &path(1)).await;
        assert_eq!((probe.sha256, bytes.as_slice()), (Sha256Digest::of(b"second"), &b"second"[..]));
        assert_eq!(store.hits(), 1, "an overwrite drops the entry");
        assert_eq!(read(&store, &path(1)).await.1, b"second");
        assert_eq!(store.hits(), 2, "still hot: readmitted at once");

        assert!(store.remove(&path(1)).await.unwrap());
        assert!(store.open(&path(1)).await.unwrap().is_none(), "a removed probe is not served from memory");
    }

    #[tokio::test]
    async fn the_cache_keeps_within_its_budget_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = hot(dir.path(), 2500);
        for kernel in 0..4 {
            put(&store, &path(kernel), &vec![kernel as u8; 1000], false).await;
        }
        for kernel in [0, 1, 0, 1, 0, 2, 2] {
            read(&store, &path(kernel)).await;
        }
        assert!(store.held_bytes() <= 2500, "{}", store.held_bytes());
        let hits = store.hits();
        read(&store, &path(0)).await;
        assert_eq!(store.hits(), hits + 1, "the most recently used stays");
        read(&store, &path(1)).await;
        assert_eq!(store.hits(), hits + 1, "the least recently used went");
        // A probe larger than the budget is never held.
        put(&store, &path(9), &[9u8; 3000], false).await;
        read(&store, &path(9)).await;
        read(&store, &path(9)).await;
        assert!(store.held_bytes() <= 2500);
    }

    #[tokio::test]
    async fn probes_asked_for_once_do_not_enter_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = hot(dir.path(), 1 << 20);
        for kernel in 0..100 {
            put(&store, &path(kernel), b"cold", false).await;
            read(&store, &path(kernel)).await;
        }
        assert_eq!(store.held_bytes(), 0);
    }

    #[tokio::test]
    async fn a_read_that_began_before_an_overwrite_does_not_put_old_bytes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = hot(dir.path(), 1 << 20);
        put(&store, &path(1), b"old", false).await;
        let read_began = store.cache.generation.load(Ordering::SeqCst);
        let old = store.store.stat(&path(1)).await.unwrap().unwrap();
        put(&store, &path(1), b"new", true).await;
        store.cache.insert(read_began, old, Bytes::from_static(b"old"));
        assert_eq!(read(&store, &path(1)).await.1, b"new");
    }

    /// The hot cache over the filesystem store passes the store suite.
    struct HotFixture {
        dir: tempfile::TempDir,
    }

    #[tonic::async_trait]
    impl crate::store::conformance::StoreFixture for HotFixture {
        async fn open(&self) -> Arc<dyn ProbeStore> {
            Arc::new(hot(self.dir.path(), 1 << 20))
        }

        async fn leave_a_crashed_write(&self) {
            std::fs::write(self.dir.path().join("tmp/4242-0.part"), b"half a probe").unwrap();
        }

        async fn leftovers(&self) -> usize {
            std::fs::read_dir(self.dir.path().join("tmp")).unwrap().count()
        }
    }

    fn hot_fixture() -> HotFixture {
        HotFixture { dir: tempfile::tempdir().unwrap() }
    }

    crate::store_conformance_tests!(hot_fixture());

    #[tonic::async_trait]
    impl crate::store::damage_suite::DamageFixture for HotFixture {
        async fn flip_a_byte(&self, p: &ProbePath, at: u64) {
            crate::store::filesystem::flip_a_byte(&self.dir.path().join("probes").join(p.to_string()), at).unwrap();
        }
    }

    crate::store_damage_tests!(hot_fixture());
}
