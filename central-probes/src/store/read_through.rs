//! A shared record with a local, verified, bounded copy: how a replica
//! serves probes from PostgreSQL at disk speed. Everything but reading goes
//! to the record. Reading asks the record what the probe is now (size and
//! SHA-256: one small query), and serves the local copy when it is that
//! probe; otherwise it copies the probe from the record into the local
//! store first, which verifies size and digest as it writes, then serves
//! the copy. A probe replaced or removed through any replica is therefore
//! never served stale once the record says so. The local store keeps at
//! most its budget, least recently used probes evicted first.

use std::sync::{Arc, Mutex};

use probe_api::names::{ModuleVersion, ProbePath};
use tokio_stream::StreamExt;
use tracing::warn;

use super::lru::Lru;
use super::{ExpectedDigests, ProbeReader, ProbeStore, ProbeWriter, StoredProbe};
use crate::error::Result;

/// The record, with local copies of what was read from it.
pub struct ReadThrough {
    record: Arc<dyn ProbeStore>,
    local: Arc<dyn ProbeStore>,
    budget: u64,
    lru: Mutex<Lru>,
}

impl ReadThrough {
    /// `local` holds copies of `record`'s probes, at most `budget` bytes.
    pub async fn new(record: Arc<dyn ProbeStore>, local: Arc<dyn ProbeStore>, budget: u64) -> Result<Self> {
        let lru = Lru::of(local.as_ref()).await?;
        Ok(ReadThrough { record, local, budget, lru: Mutex::new(lru) })
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Copies `probe` from the record into the local store; false when the
    /// record no longer has it.
    async fn copy(&self, probe: &StoredProbe) -> Result<bool> {
        let Some(mut reader) = self.record.open(&probe.path).await? else { return Ok(false) };
        let mut writer = self.local.create(probe.path.clone(), reader.probe.size).await?;
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
            if let Err(error) = self.local.remove(&old).await {
                warn!(path = %old, %error, "could not evict a local copy");
            }
        }
        Ok(true)
    }

    async fn forget(&self, path: &ProbePath) {
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

    async fn create(&self, path: ProbePath, size: u64) -> Result<Box<dyn ProbeWriter>> {
        self.record.create(path, size).await
    }

    async fn open(&self, path: &ProbePath) -> Result<Option<ProbeReader>> {
        let Some(now) = self.record.stat(path).await? else {
            self.forget(path).await;
            return Ok(None);
        };
        // Two tries: a copy evicted or replaced between the copy and the
        // open is copied once more.
        for _ in 0..2 {
            if let Some(local) = self.local.open(path).await?
                && (local.probe.size, local.probe.sha256) == (now.size, now.sha256)
            {
                self.lru().touch(path);
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

    fn page_token_key(&self) -> &[u8] {
        self.record.page_token_key()
    }

    async fn remove(&self, path: &ProbePath) -> Result<bool> {
        let removed = self.record.remove(path).await?;
        self.forget(path).await;
        Ok(removed)
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
        let store = ReadThrough::new(record.clone(), local.clone(), 1 << 20).await.unwrap();
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
        let store = ReadThrough::new(record, local.clone(), 2500).await.unwrap();
        for kernel in 0..4 {
            put(&store, &path(kernel), &vec![kernel as u8; 1000]).await;
            assert_eq!(read(&store, &path(kernel)).await.unwrap(), vec![kernel as u8; 1000]);
        }
        let held: u64 = local.list(None, None, 100).await.unwrap().iter().map(|p| p.size).sum();
        assert!(held <= 2500, "{held}");
        assert!(local.stat(&path(3)).await.unwrap().is_some(), "the latest stays");
    }

    struct Fixture {
        record: tempfile::TempDir,
        local: tempfile::TempDir,
    }

    #[tonic::async_trait]
    impl crate::store::conformance::StoreFixture for Fixture {
        async fn open(&self) -> Arc<dyn ProbeStore> {
            Arc::new(ReadThrough::new(fs(self.record.path()), fs(self.local.path()), 1 << 30).await.unwrap())
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
}
