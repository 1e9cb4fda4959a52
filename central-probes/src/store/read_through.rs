//! A shared record with a local, verified, bounded copy: how a replica
//! serves probes from PostgreSQL at disk speed. Everything but reading goes
//! to the record. A checked read asks the record what the probe is now
//! (size and SHA-256: one small query), and serves the local copy when it
//! is that probe; otherwise it copies the probe from the record into the
//! local store first, which verifies size and digest as it writes, then
//! serves the copy. The local store keeps at most its budget, least
//! recently used probes evicted first.
//!
//! With a feed of the record's changes (`RecordChange`: PostgreSQL's
//! LISTEN/NOTIFY, sent by every commit and removal), a copy that a checked
//! read found current stays trusted, and is served without asking the
//! record, until the feed says its path changed. While the feed is lost,
//! nothing is trusted and every read is checked again. A check that began
//! before any change arrived trusts nothing, so a copy is never trusted on
//! a stale check. A change through another replica is therefore seen once
//! its notification arrives (milliseconds after its commit), and never as a
//! mixed probe.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::mpsc;

use probe_api::names::{ModuleVersion, ProbePath};
use tokio_stream::StreamExt;
use tracing::warn;

use super::lru::Lru;
use super::{ExpectedDigests, ModuleSummary, ProbeReader, ProbeStore, ProbeWriter, StoredProbe};
use crate::error::Result;

/// What the record's change feed says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordChange {
    /// Listening: every change from now on will be told.
    Live,
    /// The probe under this path was stored, replaced or removed.
    Changed(ProbePath),
    /// Not listening any more: changes may go untold.
    Lost,
}

/// The record, with local copies of what was read from it.
pub struct ReadThrough {
    record: Arc<dyn ProbeStore>,
    local: Arc<dyn ProbeStore>,
    budget: u64,
    lru: Mutex<Lru>,
    trust: Arc<Mutex<Trust>>,
}

/// Which local copies may be served without asking the record.
#[derive(Default)]
struct Trust {
    live: bool,
    /// Bumped by every change, loss and return of the feed.
    generation: u64,
    current: HashSet<ProbePath>,
}

impl ReadThrough {
    /// `local` holds copies of `record`'s probes, at most `budget` bytes;
    /// with `changes`, copies are trusted between changes (see above).
    pub async fn new(
        record: Arc<dyn ProbeStore>,
        local: Arc<dyn ProbeStore>,
        budget: u64,
        changes: Option<mpsc::Receiver<RecordChange>>,
    ) -> Result<Self> {
        let lru = Lru::of(local.as_ref()).await?;
        let trust = Arc::new(Mutex::new(Trust::default()));
        if let Some(changes) = changes {
            tokio::spawn(follow(changes, Arc::downgrade(&trust)));
        }
        Ok(ReadThrough { record, local, budget, lru: Mutex::new(lru), trust })
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn trust(&self) -> std::sync::MutexGuard<'_, Trust> {
        self.trust.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Trusts the copy of `path` if nothing changed since `generation`.
    fn trust_if_unchanged(&self, path: &ProbePath, generation: u64) {
        let mut trust = self.trust();
        if trust.live && trust.generation == generation {
            trust.current.insert(path.clone());
        }
    }

    fn distrust(&self, path: &ProbePath) {
        self.trust().current.remove(path);
    }

    /// Copies `probe` from the record into the local store; false when the
    /// record no longer has it.
    async fn copy(&self, probe: &StoredProbe) -> Result<bool> {
        let Some(mut reader) = self.record.open(&probe.path).await? else { return Ok(false) };
        let mut writer = self.local.create(probe.path.clone(), reader.probe.size).await?;
        if let Some(signature) = reader.probe.signature.clone() {
            writer.set_signature(signature);
        }
        while let Some(chunk) = reader.chunks.next().await {
            writer.write(chunk?).await?;
        }
        let expected = ExpectedDigests { sha256: Some(reader.probe.sha256), crc32: reader.probe.crc32 };
        writer.finish(expected, true).await?.await?;
        let evicted = {
            let mut lru = self.lru();
            lru.insert(probe.path.clone(), reader.probe.size);
            lru.evict_beyond(self.budget, &probe.path)
        };
        for old in evicted {
            self.distrust(&old);
            if let Err(error) = self.local.remove(&old).await {
                warn!(path = %old, %error, "could not evict a local copy");
            }
        }
        Ok(true)
    }

    async fn forget(&self, path: &ProbePath) {
        self.distrust(path);
        self.lru().remove(path);
        if let Err(error) = self.local.remove(path).await {
            warn!(%path, %error, "could not remove a stale local copy");
        }
    }
}

#[tonic::async_trait]
impl ProbeStore for ReadThrough {
    async fn stat(&self, path: &ProbePath) -> Result<Option<StoredProbe>> {
        self.record.stat(path).await
    }

    async fn stat_many(&self, paths: &[ProbePath]) -> Result<Vec<Option<StoredProbe>>> {
        self.record.stat_many(paths).await
    }

    async fn list(
        &self,
        module_version: Option<&ModuleVersion>,
        after: Option<&ProbePath>,
        limit: usize,
    ) -> Result<Vec<StoredProbe>> {
        self.record.list(module_version, after, limit).await
    }

    async fn summaries(&self) -> Result<Vec<ModuleSummary>> {
        self.record.summaries().await
    }

    async fn create(&self, path: ProbePath, size: u64) -> Result<Box<dyn ProbeWriter>> {
        self.record.create(path, size).await
    }

    async fn open(&self, path: &ProbePath) -> Result<Option<ProbeReader>> {
        // A local copy a read found damaged is copied again from the record.
        if self.local.is_damaged(path) {
            self.forget(path).await;
        }
        let (trusted, generation) = {
            let trust = self.trust();
            (trust.live && trust.current.contains(path), trust.generation)
        };
        if trusted && let Some(local) = self.local.open(path).await? {
            self.lru().touch(path);
            return Ok(Some(local));
        }
        let Some(now) = self.record.stat(path).await? else {
            self.forget(path).await;
            return Ok(None);
        };
        // Two tries: a copy evicted or replaced between the copy and the
        // open is copied once more.
        for _ in 0..2 {
            if let Some(local) = self.local.open(path).await?
                && local.probe.content() == now.content()
            {
                self.lru().touch(path);
                self.trust_if_unchanged(path, generation);
                return Ok(Some(local));
            }
            if !self.copy(&now).await? {
                self.forget(path).await;
                return Ok(None);
            }
        }
        // The record changed under us twice: serve from the record itself.
        self.record.open(path).await
    }

    /// The record's copy: the local ones are copied again when damaged.
    async fn check(&self, path: &ProbePath) -> Result<super::check::Checked> {
        self.record.check(path).await
    }

    fn is_damaged(&self, path: &ProbePath) -> bool {
        self.record.is_damaged(path)
    }

    fn page_token_key(&self) -> &[u8] {
        self.record.page_token_key()
    }

    async fn remove(&self, path: &ProbePath) -> Result<bool> {
        let removed = self.record.remove(path).await?;
        self.forget(path).await;
        Ok(removed)
    }
}

/// Applies the record's changes to `trust` until the feed or the store ends.
async fn follow(mut changes: mpsc::Receiver<RecordChange>, trust: Weak<Mutex<Trust>>) {
    while let Some(change) = changes.recv().await {
        let Some(trust) = trust.upgrade() else { return };
        let mut trust = trust.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        trust.generation += 1;
        match change {
            RecordChange::Live => trust.live = true,
            RecordChange::Changed(path) => {
                trust.current.remove(&path);
            }
            RecordChange::Lost => {
                trust.live = false;
                trust.current.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::filesystem::{FilesystemStore, FilesystemStoreConfig};
    use bytes::Bytes;
    use probe_api::digest::Sha256Digest;

    fn fs(dir: &std::path::Path) -> Arc<dyn ProbeStore> {
        Arc::new(FilesystemStore::open(&FilesystemStoreConfig { data_dir: dir.to_owned(), min_free_bytes: 0 }).unwrap())
    }

    fn path(kernel: u32) -> ProbePath {
        ProbePath::parse(&format!("2.5.0/collector-ebpf-5.{kernel}.0.o.gz")).unwrap()
    }

    async fn put(store: &dyn ProbeStore, p: &ProbePath, bytes: &[u8]) {
        let mut writer = store.create(p.clone(), bytes.len() as u64).await.unwrap();
        writer.write(Bytes::copy_from_slice(bytes)).await.unwrap();
        writer.finish(Sha256Digest::of(bytes).into(), true).await.unwrap().await.unwrap();
    }

    async fn read(store: &dyn ProbeStore, p: &ProbePath) -> Option<Vec<u8>> {
        let reader = store.open(p).await.unwrap()?;
        let chunks: Vec<Bytes> = reader.chunks.map(|chunk| chunk.unwrap()).collect().await;
        Some(chunks.concat())
    }

    #[tokio::test]
    async fn reads_are_served_from_a_local_copy_that_follows_the_record() {
        let (record_dir, local_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (record, local) = (fs(record_dir.path()), fs(local_dir.path()));
        let store = ReadThrough::new(record.clone(), local.clone(), 1 << 20, None).await.unwrap();
        put(&store, &path(1), b"first").await;
        assert!(local.stat(&path(1)).await.unwrap().is_none(), "writes go to the record only");
        assert_eq!(read(&store, &path(1)).await.unwrap(), b"first");
        assert_eq!(read(local.as_ref(), &path(1)).await.unwrap(), b"first", "a verified local copy");

        // Another replica replaces it in the record: never served stale.
        put(record.as_ref(), &path(1), b"second").await;
        assert_eq!(read(&store, &path(1)).await.unwrap(), b"second");
        assert_eq!(read(local.as_ref(), &path(1)).await.unwrap(), b"second");
        // ...or removes it.
        assert!(record.remove(&path(1)).await.unwrap());
        assert!(read(&store, &path(1)).await.is_none());
        assert!(local.stat(&path(1)).await.unwrap().is_none(), "the stale copy is gone");
    }

    #[tokio::test]
    async fn the_local_copies_keep_within_their_budget() {
        let (record_dir, local_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (record, local) = (fs(record_dir.path()), fs(local_dir.path()));
        let store = ReadThrough::new(record, local.clone(), 2500, None).await.unwrap();
        for kernel in 0..4 {
            put(&store, &path(kernel), &vec![kernel as u8; 1000]).await;
            assert_eq!(read(&store, &path(kernel)).await.unwrap(), vec![kernel as u8; 1000]);
        }
        let held: u64 = local.list(None, None, 100).await.unwrap().iter().map(|p| p.size).sum();
        assert!(held <= 2500, "{held}");
        assert!(local.stat(&path(3)).await.unwrap().is_some(), "the latest stays");
    }

    /// Waits until the follower task has applied what was sent.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_a_change_feed_a_checked_copy_is_trusted_until_its_path_changes_or_the_feed_is_lost() {
        let (record_dir, local_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (record, local) = (fs(record_dir.path()), fs(local_dir.path()));
        let (feed, changes) = mpsc::channel(16);
        let store = ReadThrough::new(record.clone(), local, 1 << 20, Some(changes)).await.unwrap();
        feed.send(RecordChange::Live).await.unwrap();
        settle().await;
        put(record.as_ref(), &path(1), b"first").await;
        assert_eq!(read(&store, &path(1)).await.unwrap(), b"first");

        // Changed in the record without a notification (as if it were still
        // on its way): the trusted copy is served, no question asked.
        put(record.as_ref(), &path(1), b"second").await;
        assert_eq!(read(&store, &path(1)).await.unwrap(), b"first");
        feed.send(RecordChange::Changed(path(1))).await.unwrap();
        settle().await;
        assert_eq!(read(&store, &path(1)).await.unwrap(), b"second", "the notification ends the trust");

        // Lost feed: every read is checked.
        feed.send(RecordChange::Lost).await.unwrap();
        settle().await;
        put(record.as_ref(), &path(1), b"third").await;
        assert_eq!(read(&store, &path(1)).await.unwrap(), b"third");
        put(record.as_ref(), &path(1), b"fourth").await;
        assert_eq!(read(&store, &path(1)).await.unwrap(), b"fourth", "nothing is trusted while the feed is lost");
    }

    struct Fixture {
        record: tempfile::TempDir,
        local: tempfile::TempDir,
    }

    #[tonic::async_trait]
    impl crate::store::conformance::StoreFixture for Fixture {
        async fn open(&self) -> Arc<dyn ProbeStore> {
            Arc::new(ReadThrough::new(fs(self.record.path()), fs(self.local.path()), 1 << 30, None).await.unwrap())
        }

        async fn leave_a_crashed_write(&self) {
            std::fs::write(self.record.path().join("tmp/4242-0.part"), b"half a probe").unwrap();
        }

        async fn leftovers(&self) -> usize {
            std::fs::read_dir(self.record.path().join("tmp")).unwrap().count()
        }
    }

    fn fixture() -> Fixture {
        Fixture { record: tempfile::tempdir().unwrap(), local: tempfile::tempdir().unwrap() }
    }

    crate::store_conformance_tests!(fixture());

    /// The record's copy damaged: never served, nor copied.
    #[tonic::async_trait]
    impl crate::store::damage_suite::DamageFixture for Fixture {
        async fn flip_a_byte(&self, path: &ProbePath, at: u64) {
            let file = self.record.path().join("probes").join(path.to_string());
            crate::store::filesystem::flip_a_byte(&file, at).unwrap();
        }
    }

    crate::store_damage_tests!(fixture());
}
