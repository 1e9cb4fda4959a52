//! The filesystem store against its guarantees.

use std::fs;
use std::path::Path;

use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use probe_api::names::{ModuleVersion, ProbePath};
use tonic::Code;

use super::entry::Entry;
use super::format::header;
use super::*;
use crate::error::Result;
use crate::store::disk::READ_CHUNK;
use crate::store::{CommitOutcome, ProbeStore, StoredProbe};

use tokio_stream::StreamExt;

fn config(dir: &Path) -> FilesystemStoreConfig {
    FilesystemStoreConfig { data_dir: dir.to_owned(), min_free_bytes: 0 }
}

fn path(s: &str) -> ProbePath {
    ProbePath::parse(s).unwrap()
}

fn sha(bytes: &[u8]) -> Sha256Digest {
    Sha256Digest::of(bytes)
}

const P: &str = "2.5.0/collector-ebpf-5.4.0-42-generic.o.gz";

async fn put(store: &FilesystemStore, p: &str, bytes: &[u8], overwrite: bool) -> Result<CommitOutcome> {
    let mut writer = store.create(path(p), bytes.len() as u64).await?;
    for chunk in bytes.chunks(1000) {
        writer.write(Bytes::copy_from_slice(chunk)).await?;
    }
    writer.finish(sha(bytes).into(), overwrite).await?.await.map(|c| c.outcome)
}

async fn read_back(store: &FilesystemStore, p: &str) -> Option<(StoredProbe, Vec<u8>)> {
    let reader = store.open(&path(p)).await.unwrap()?;
    let chunks: Vec<Bytes> = reader.chunks.map(|c| c.unwrap()).collect().await;
    Some((reader.probe, chunks.concat()))
}

fn tmp_files(dir: &Path) -> usize {
    fs::read_dir(dir.join("tmp")).unwrap().count()
}

/// A dropped writer's thread removes its file once it sees the channel
/// close, a moment later.
async fn tmp_files_after_cleanup(dir: &Path) -> usize {
    for _ in 0..200 {
        if tmp_files(dir) == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tmp_files(dir)
}

#[tokio::test]
async fn a_committed_probe_is_durable_and_reads_back_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..READ_CHUNK * 2 + 77).map(|i| (i % 251) as u8).collect();
    {
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        assert_eq!(put(&store, P, &bytes, false).await.unwrap(), CommitOutcome::Stored);
        let (probe, read) = read_back(&store, P).await.unwrap();
        assert_eq!((probe.size, probe.sha256), (bytes.len() as u64, sha(&bytes)));
        assert_eq!(read, bytes);
    }
    let store = FilesystemStore::open(&config(dir.path())).unwrap();
    assert_eq!(store.len(), 1);
    assert_eq!(read_back(&store, P).await.unwrap().1, bytes);
    assert_eq!(tmp_files(dir.path()), 0);
}

#[tokio::test]
async fn an_abandoned_write_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = FilesystemStore::open(&config(dir.path())).unwrap();
    let mut writer = store.create(path(P), 10).await.unwrap();
    writer.write(Bytes::from_static(b"12345")).await.unwrap();
    assert_eq!(tmp_files(dir.path()), 1);
    drop(writer);
    assert_eq!(tmp_files_after_cleanup(dir.path()).await, 0);
    assert!(store.is_empty());
}

#[test]
fn leftovers_of_a_crash_are_removed_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    drop(FilesystemStore::open(&config(dir.path())).unwrap());
    fs::write(dir.path().join("tmp/123-0.part"), b"half a probe").unwrap();
    let store = FilesystemStore::open(&config(dir.path())).unwrap();
    assert_eq!(tmp_files(dir.path()), 0);
    assert!(store.is_empty());
}

#[test]
fn corrupt_and_foreign_files_are_not_served() {
    let dir = tempfile::tempdir().unwrap();
    drop(FilesystemStore::open(&config(dir.path())).unwrap());
    let module = dir.path().join("probes/2.5.0");
    fs::create_dir_all(&module).unwrap();
    fs::write(module.join("collector-ebpf-5.4.0.o.gz"), b"no header").unwrap();
    fs::write(module.join("notes.txt"), b"").unwrap();
    let mut truncated = header(100, &sha(b""), 0, 0).to_vec();
    truncated.extend_from_slice(b"short");
    fs::write(module.join("collector-ebpf-5.5.0.o.gz"), truncated).unwrap();
    let store = FilesystemStore::open(&config(dir.path())).unwrap();
    assert!(store.is_empty());
}

#[test]
fn a_second_store_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = FilesystemStore::open(&config(dir.path())).unwrap();
    let error = FilesystemStore::open(&config(dir.path())).err().unwrap();
    assert_eq!(error.code, Code::FailedPrecondition);
}

#[tokio::test]
async fn writes_that_would_cross_the_free_space_floor_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = FilesystemStoreConfig { data_dir: dir.path().to_owned(), min_free_bytes: u64::MAX / 2 };
    let store = FilesystemStore::open(&config).unwrap();
    let error = store.create(path(P), 10).await.err().unwrap();
    assert_eq!(error.code, Code::ResourceExhausted);
    assert_eq!(tmp_files(dir.path()), 0);
    assert_eq!(store.reserved(), 0);
}

#[tokio::test]
async fn a_removed_probe_is_gone_also_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        put(&store, P, b"bytes", false).await.unwrap();
        let reader = store.open(&path(P)).await.unwrap().unwrap();
        assert!(store.remove(&path(P)).await.unwrap());
        assert!(!store.remove(&path(P)).await.unwrap());
        assert!(store.open(&path(P)).await.unwrap().is_none());
        let chunks: Vec<Bytes> = reader.chunks.map(|c| c.unwrap()).collect().await;
        assert_eq!(chunks.concat(), b"bytes", "an open reader still reads it");
    }
    assert!(FilesystemStore::open(&config(dir.path())).unwrap().is_empty());
}

#[tokio::test]
async fn listing_pages_through_one_module_version_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = FilesystemStore::open(&config(dir.path())).unwrap();
    for p in [
        "2.5.0/collector-ebpf-5.4.0.o.gz",
        "2.5.0/collector-5.4.0.ko.gz",
        "2.4.0/collector-ebpf-5.4.0.o.gz",
        "2.6.0/collector-ebpf-5.4.0.o.gz",
    ] {
        put(&store, p, p.as_bytes(), false).await.unwrap();
    }
    let v = ModuleVersion::parse("2.5.0").unwrap();
    let first = store.list(Some(&v), None, 1).await.unwrap();
    assert_eq!(first[0].path.to_string(), "2.5.0/collector-5.4.0.ko.gz");
    let second = store.list(Some(&v), Some(&first[0].path), 10).await.unwrap();
    let names: Vec<String> = second.iter().map(|p| p.path.to_string()).collect();
    assert_eq!(names, ["2.5.0/collector-ebpf-5.4.0.o.gz"]);
    assert_eq!(store.list(None, None, 10).await.unwrap().len(), 4);
}

/// The filesystem store as the conformance suite sees it.
struct FsFixture {
    dir: tempfile::TempDir,
}

fn fs_fixture() -> FsFixture {
    FsFixture { dir: tempfile::tempdir().unwrap() }
}

#[tonic::async_trait]
impl crate::store::conformance::StoreFixture for FsFixture {
    async fn open(&self) -> std::sync::Arc<dyn ProbeStore> {
        std::sync::Arc::new(FilesystemStore::open(&config(self.dir.path())).unwrap())
    }

    async fn leave_a_crashed_write(&self) {
        fs::write(self.dir.path().join("tmp/4242-0.part"), b"half a probe").unwrap();
    }

    async fn leftovers(&self) -> usize {
        tmp_files(self.dir.path())
    }
}

crate::store_conformance_tests!(fs_fixture());

#[tonic::async_trait]
impl crate::store::damage_suite::DamageFixture for FsFixture {
    async fn flip_a_byte(&self, path: &ProbePath, at: u64) {
        super::flip_a_byte(&self.dir.path().join("probes").join(path.to_string()), at).unwrap();
    }
}

crate::store_damage_tests!(fs_fixture());

/// Moves a directory's modification time an hour back, as if it had been
/// quiet since.
fn age(dir: &Path) {
    let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    fs::File::open(dir).unwrap().set_modified(an_hour_ago).unwrap();
}

fn load(dir: &Path) -> (std::collections::BTreeMap<ProbePath, Entry>, index::LoadStats) {
    index::load_index(&dir.join("probes"), snapshot::read(dir)).unwrap()
}

#[tokio::test]
async fn a_snapshot_spares_reading_headers_and_a_stale_damaged_or_missing_one_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let paths = ["2.5.0/collector-ebpf-5.4.0.o.gz", "2.5.0/collector-5.4.0.ko.gz", "2.6.0/collector-ebpf-5.4.0.o.gz"];
    {
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        for p in paths {
            put(&store, p, p.as_bytes(), false).await.unwrap();
        }
        age(&dir.path().join("probes/2.5.0"));
        age(&dir.path().join("probes/2.6.0"));
    }
    // Closing wrote the snapshot; both directories have been quiet since.
    let (full, stats) = load(dir.path());
    assert_eq!(full.len(), 3);
    assert_eq!(stats, index::LoadStats { from_snapshot: 2, from_disk: 0 });
    let snapshot = fs::read(dir.path().join("index.snapshot")).unwrap();

    // A probe added after the snapshot, and a crash before the next one.
    {
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        put(&store, "2.6.0/collector-ebpf-5.5.0.o.gz", b"new", false).await.unwrap();
    }
    fs::write(dir.path().join("index.snapshot"), &snapshot).unwrap();
    let (index, stats) = load(dir.path());
    assert_eq!(stats, index::LoadStats { from_snapshot: 1, from_disk: 1 }, "only the changed directory is read");
    assert!(index.contains_key(&path("2.6.0/collector-ebpf-5.5.0.o.gz")));
    assert_eq!(index.len(), 4);

    // A damaged or a missing snapshot: everything is read.
    fs::write(dir.path().join("index.snapshot"), &snapshot[..snapshot.len() / 2]).unwrap();
    let (damaged, stats) = load(dir.path());
    assert_eq!((damaged.len(), stats.from_snapshot), (4, 0));
    fs::remove_file(dir.path().join("index.snapshot")).unwrap();
    let (missing, stats) = load(dir.path());
    assert_eq!((missing.len(), stats.from_snapshot), (4, 0));
    assert!(damaged == index && missing == index, "every way to the index gives the same one");

    // Opening the store without a snapshot writes one.
    drop(FilesystemStore::open(&config(dir.path())).unwrap());
    assert!(dir.path().join("index.snapshot").exists());
}

#[tokio::test]
async fn probes_stored_before_crc32s_were_recorded_are_still_read_listed_and_snapshotted() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = ("2.5.0/collector-ebpf-5.4.0.o.gz", "2.5.0/collector-ebpf-5.5.0.o.gz");
    {
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        put(&store, new, b"written now", false).await.unwrap();
    }
    // The version 1 header: magic, size, SHA-256; no CRC-32.
    let content = b"written by an older Central";
    let mut file = b"KPROBE01".to_vec();
    file.extend_from_slice(&(content.len() as u64).to_le_bytes());
    file.extend_from_slice(&sha(content).0);
    file.extend_from_slice(content);
    fs::write(dir.path().join("probes").join(old), file).unwrap();
    age(&dir.path().join("probes/2.5.0"));
    for start in ["headers read", "snapshot taken"] {
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        let (probe, bytes) = read_back(&store, old).await.unwrap();
        assert_eq!((probe.sha256, probe.crc32, bytes.as_slice()), (sha(content), None, &content[..]), "{start}");
        let listed = store.list(None, None, 10).await.unwrap();
        let crcs: Vec<Option<u32>> = listed.iter().map(|p| p.crc32).collect();
        assert_eq!(crcs, [None, Some(crc32fast::hash(b"written now"))], "{start}");
    }
    assert_eq!(load(dir.path()).1.from_snapshot, 1, "the second start took the snapshot");
}

#[tokio::test]
async fn a_store_closed_right_after_an_upload_leaves_a_snapshot_that_vouches_for_every_directory() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FilesystemStore::open(&config(dir.path())).unwrap();
        put(&store, "2.5.0/collector-ebpf-5.4.0.o.gz", b"just uploaded", false).await.unwrap();
        let index = store.backend().inner.index().clone();
        let wait = snapshot::quiet_wait(&dir.path().join("probes"), &index);
        assert!(wait > std::time::Duration::ZERO && wait <= std::time::Duration::from_secs(1), "{wait:?}");
    }
    let (index, stats) = load(dir.path());
    assert_eq!(index.len(), 1);
    assert_eq!(stats, index::LoadStats { from_snapshot: 1, from_disk: 0 }, "no header read at the next start");
}

#[tokio::test]
async fn a_cache_store_starts_empty_and_still_commits_whole_probes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FilesystemStore::open_cache(&config(dir.path())).unwrap();
        assert_eq!(put(&store, P, b"a copy", false).await.unwrap(), CommitOutcome::Stored);
        assert_eq!(read_back(&store, P).await.unwrap().1, b"a copy");
    }
    assert!(!dir.path().join("index.snapshot").exists(), "a cache leaves no snapshot");
    let store = FilesystemStore::open_cache(&config(dir.path())).unwrap();
    assert!(store.is_empty(), "copies of an earlier run, possibly torn by a crash, are gone");
    assert_eq!(tmp_files(dir.path()), 0);
    put(&store, P, b"a copy again", false).await.unwrap();
    assert_eq!(read_back(&store, P).await.unwrap().1, b"a copy again");
}
