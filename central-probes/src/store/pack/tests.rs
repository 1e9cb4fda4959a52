//! The pack store against its guarantees: the conformance suite, restarts
//! with and without a clean close, an index rebuilt from the packs, a file
//! left halfway, and a stop at every step of an upload (`crash_tests.rs`).

use std::fs;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;

use super::*;
use crate::store::{CommitOutcome, ProbeStore};

mod appender_tests;
mod crash_tests;

pub(super) fn config(dir: &Path) -> PackStoreConfig {
    PackStoreConfig::new(dir)
}

pub(super) fn path(n: usize) -> ProbePath {
    ProbePath::parse(&format!("2.5.0/collector-ebpf-5.4.0-{n}-generic.o.gz")).unwrap()
}

pub(super) fn content(n: usize, round: u8) -> Vec<u8> {
    (0..1000 + n * 37).map(|i| (i as u8).wrapping_mul(31).wrapping_add(n as u8).wrapping_add(round)).collect()
}

pub(super) async fn put(store: &PackStore, p: &ProbePath, bytes: &[u8], overwrite: bool) -> Result<CommitOutcome> {
    let mut writer = store.create(p.clone(), bytes.len() as u64).await?;
    for chunk in bytes.chunks(700) {
        writer.write(Bytes::copy_from_slice(chunk)).await?;
    }
    writer.finish(Sha256Digest::of(bytes).into(), overwrite).await?.await.map(|c| c.outcome)
}

pub(super) async fn read(store: &PackStore, p: &ProbePath) -> Option<Vec<u8>> {
    use tokio_stream::StreamExt;
    let reader = store.open(p).await.unwrap()?;
    let chunks: Vec<Bytes> = reader.chunks.map(|c| c.unwrap()).collect().await;
    Some(chunks.concat())
}

struct PackFixture {
    dir: tempfile::TempDir,
}

fn pack_fixture() -> PackFixture {
    PackFixture { dir: tempfile::tempdir().unwrap() }
}

#[tonic::async_trait]
impl crate::store::conformance::StoreFixture for PackFixture {
    async fn open(&self) -> Arc<dyn ProbeStore> {
        Arc::new(PackStore::open(&config(self.dir.path())).unwrap())
    }

    async fn leave_a_crashed_write(&self) {
        // Half a record at the end of a pack, as a process killed while
        // appending leaves it.
        let packs = self.dir.path().join("packs");
        let newest = fs::read_dir(&packs).unwrap().map(|e| e.unwrap().path()).max().unwrap();
        let mut bytes = fs::read(&newest).unwrap();
        bytes.extend_from_slice(b"KPK1\x01\0half a probe");
        fs::write(&newest, bytes).unwrap();
    }

    async fn leftovers(&self) -> usize {
        inspect::unfinished_packs(self.dir.path()).unwrap()
    }
}

crate::store_conformance_tests!(pack_fixture());

#[tonic::async_trait]
impl crate::store::damage_suite::DamageFixture for PackFixture {
    async fn flip_a_byte(&self, path: &ProbePath, at: u64) {
        inspect::flip_a_byte(self.dir.path(), path, at).unwrap();
    }
}

crate::store_damage_tests!(pack_fixture());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_survive_a_clean_close_and_a_crash_and_the_index_is_rebuilt_from_the_packs() {
    let dir = tempfile::tempdir().unwrap();
    let store = PackStore::open(&config(dir.path())).unwrap();
    for n in 0..20 {
        assert_eq!(put(&store, &path(n), &content(n, 0), false).await.unwrap(), CommitOutcome::Stored);
    }
    assert!(store.remove(&path(3)).await.unwrap());
    put(&store, &path(4), &content(4, 1), true).await.unwrap();
    drop(store);
    let check = |store: &PackStore| {
        assert_eq!(store.len(), 19);
        let store = store.clone();
        async move {
            assert_eq!(read(&store, &path(3)).await, None, "removed");
            assert_eq!(read(&store, &path(4)).await.unwrap(), content(4, 1), "overwritten");
            for n in (0..20).filter(|&n| n != 3 && n != 4) {
                assert_eq!(read(&store, &path(n)).await.unwrap(), content(n, 0));
            }
        }
    };
    // From the snapshot a clean close left.
    let store = PackStore::open(&config(dir.path())).unwrap();
    check(&store).await;
    put(&store, &path(30), &content(30, 0), false).await.unwrap();
    // A crash: nothing more reaches the disk, not even the snapshot a
    // close writes; the next start replays the log.
    store.faults().stop_now();
    drop(store);
    let store = PackStore::open(&config(dir.path())).unwrap();
    assert_eq!(read(&store, &path(30)).await.unwrap(), content(30, 0));
    assert!(store.remove(&path(30)).await.unwrap());
    check(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_damaged_index_is_rebuilt_from_the_packs_and_removals_stay_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = PackStore::open(&config(dir.path())).unwrap();
    for n in 0..10 {
        put(&store, &path(n), &content(n, 0), false).await.unwrap();
    }
    assert!(store.remove(&path(2)).await.unwrap());
    put(&store, &path(5), &content(5, 9), true).await.unwrap();
    // An upload the overwrite rule refused leaves a dead, unstamped record.
    assert!(matches!(put(&store, &path(6), &content(6, 9), false).await.unwrap(), CommitOutcome::Conflict { .. }));
    drop(store);
    let expect = |store: PackStore| async move {
        assert_eq!(store.len(), 9);
        assert_eq!(read(&store, &path(2)).await, None);
        assert_eq!(read(&store, &path(5)).await.unwrap(), content(5, 9));
        assert_eq!(read(&store, &path(6)).await.unwrap(), content(6, 0));
        assert_eq!(read(&store, &path(7)).await.unwrap(), content(7, 0));
    };
    fs::remove_dir_all(dir.path().join("index")).unwrap();
    expect(PackStore::open(&config(dir.path())).unwrap()).await;
    // A damaged snapshot (one byte flipped) is not trusted either.
    let snapshot = dir.path().join("index").join(journal::SNAPSHOT);
    let mut bytes = fs::read(&snapshot).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&snapshot, bytes).unwrap();
    expect(PackStore::open(&config(dir.path())).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_record_is_dropped_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = PackStore::open(&config(dir.path())).unwrap();
    put(&store, &path(1), &content(1, 0), false).await.unwrap();
    drop(store);
    fs::remove_dir_all(dir.path().join("index")).unwrap();
    // A whole record of a second probe, then its bytes cut short.
    let pack = fs::read_dir(dir.path().join("packs")).unwrap().next().unwrap().unwrap().path();
    let whole = fs::read(&pack).unwrap();
    let mut torn = whole.clone();
    torn.extend_from_slice(&whole[..whole.len() - 10]);
    fs::write(&pack, &torn).unwrap();
    let store = PackStore::open(&config(dir.path())).unwrap();
    assert_eq!(store.len(), 1);
    assert_eq!(read(&store, &path(1)).await.unwrap(), content(1, 0));
    drop(store);
    assert_eq!(fs::read(&pack).unwrap(), whole, "cut back to the last whole record");
}

#[tokio::test]
async fn a_header_whose_lengths_overflow_is_a_torn_end_not_a_huge_read() {
    // A header whose probe size and signature length add up past 2^64 to
    // a record that would seem to fit in the pack (the fuzz target
    // pack_store found it: a 4 GiB signature buffer).
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("packs")).unwrap();
    let pack = dir.path().join("packs").join("0000000001.pack");
    let (path_len, fits) = (41u16, 300u64);
    let size = fits.wrapping_sub(record::HEADER_LEN + u64::from(path_len) + u64::from(u32::MAX));
    let mut damaged = vec![0u8; fits as usize];
    damaged[..4].copy_from_slice(b"KPK1");
    damaged[4] = 1;
    damaged[6..8].copy_from_slice(&path_len.to_le_bytes());
    damaged[8..16].copy_from_slice(&size.to_le_bytes());
    damaged[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    fs::write(&pack, &damaged).unwrap();
    let store = PackStore::open(&config(dir.path())).unwrap();
    assert!(store.is_empty());
    drop(store);
    assert_eq!(fs::read(&pack).unwrap(), b"", "cut back to the last whole record");
}

/// An upload's files as the upload session commits them: each after the
/// one before it took effect, the next streaming in meanwhile.
pub(super) async fn upload_in_order(store: &PackStore, files: &[(ProbePath, Vec<u8>)]) -> Vec<Result<CommitOutcome>> {
    use crate::store::{CommitOrder, open_gate};
    let mut after = open_gate();
    let mut pending = Vec::new();
    for (p, bytes) in files {
        let mut writer = store.create(p.clone(), bytes.len() as u64).await.unwrap();
        writer.write(Bytes::copy_from_slice(bytes)).await.unwrap();
        let (taken, next) = tokio::sync::oneshot::channel();
        let order = CommitOrder { after, taken: Some(taken) };
        pending.push(writer.finish_in_order(Sha256Digest::of(bytes).into(), false, order).await.unwrap());
        after = Box::pin(async move { next.await.unwrap_or(false) });
    }
    let mut outcomes = Vec::new();
    for commit in pending {
        outcomes.push(commit.await.map(|c| c.outcome));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_shares_fsyncs_among_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.batch.max_delay = std::time::Duration::from_millis(20);
    let store = PackStore::open_with(&config, Arc::new(Faults::stop_at(u64::MAX))).unwrap();
    let before = store.faults().syncs();
    let files: Vec<_> = (0..64).map(|n| (path(n), content(n, 0))).collect();
    for outcome in upload_in_order(&store, &files).await {
        assert_eq!(outcome.unwrap(), CommitOutcome::Stored);
    }
    let syncs = store.faults().syncs() - before;
    // One batch per file would be 128 fsyncs (its pack and the log).
    assert!(syncs <= 32, "{syncs} fsyncs for an upload of 64 files");
    for (p, bytes) in &files {
        assert_eq!(read(&store, p).await.as_ref(), Some(bytes));
    }
}

/// Files share a few lanes; one whose uploader stopped halfway (its chunks
/// queued, the rest never coming) holds up none of them, and dropped, it
/// leaves nothing in its pack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_left_halfway_holds_up_no_other_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = PackStore::open(&config(dir.path())).unwrap();
    let stalled_bytes = content(1, 0);
    let mut stalled: Vec<_> = Vec::new();
    for n in 0..8 {
        let mut writer = store.create(path(100 + n), stalled_bytes.len() as u64 * 2).await.unwrap();
        writer.write(Bytes::copy_from_slice(&stalled_bytes)).await.unwrap();
        stalled.push(writer);
    }
    let others: Vec<_> = (0..32).map(|n| (path(n), content(n, 0))).collect();
    let uploaded = tokio::time::timeout(std::time::Duration::from_secs(20), upload_in_order(&store, &others)).await;
    for outcome in uploaded.expect("the other files are not held up") {
        assert_eq!(outcome.unwrap(), CommitOutcome::Stored);
    }
    let (live, dead) = store.backend().space().unwrap();
    drop(stalled);
    // Closed, the store has run the stalled files' clean-up on their lanes.
    drop(store);
    let on_disk: u64 =
        fs::read_dir(dir.path().join("packs")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert_eq!(on_disk, live + dead, "the stalled files' bytes were not cut off their packs");
    let store = PackStore::open(&config(dir.path())).unwrap();
    for (p, bytes) in &others {
        assert_eq!(read(&store, p).await.as_ref(), Some(bytes));
    }
    for n in 0..8 {
        assert_eq!(read(&store, &path(100 + n)).await, None);
    }
}

/// Records follow each other in a lane's pack whatever becomes of them: a
/// file that fails its digest and the files after it (never committed),
/// and identical re-uploads (never stamped), stay whole between committed
/// records, so the records after them are found also by a scan of the
/// packs with no index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_never_committed_between_others_leave_a_pack_whole_for_a_rebuild() {
    use crate::store::{CommitOrder, open_gate};
    let dir = tempfile::tempdir().unwrap();
    let store = PackStore::open(&config(dir.path())).unwrap();
    let mut stored = Vec::new();
    for round in 0..4u8 {
        let files: Vec<_> = (0..12).map(|n| (path(n + 20 * usize::from(round)), content(n, round))).collect();
        let failing = 3 + usize::from(round);
        let mut after = open_gate();
        let mut pending = Vec::new();
        for (i, (p, bytes)) in files.iter().enumerate() {
            let mut writer = store.create(p.clone(), bytes.len() as u64).await.unwrap();
            writer.write(Bytes::copy_from_slice(bytes)).await.unwrap();
            let digest = if i == failing { Sha256Digest::of(b"other bytes") } else { Sha256Digest::of(bytes) };
            let (taken, next) = tokio::sync::oneshot::channel();
            let order = CommitOrder { after, taken: Some(taken) };
            pending.push(writer.finish_in_order(digest.into(), false, order).await.unwrap());
            after = Box::pin(async move { next.await.unwrap_or(false) });
        }
        for (i, commit) in pending.into_iter().enumerate() {
            let outcome = commit.await.map(|c| c.outcome);
            assert_eq!(outcome.is_ok(), i < failing, "file {i} of round {round}: {outcome:?}");
        }
        stored.extend(files[..failing].iter().cloned());
        // Already stored: identical, never stamped.
        let again = upload_in_order(&store, &stored[..2]).await;
        assert!(again.into_iter().all(|outcome| outcome.unwrap() == CommitOutcome::Identical));
    }
    drop(store);
    fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = PackStore::open(&config(dir.path())).unwrap();
    assert_eq!(store.len(), stored.len());
    for (p, bytes) in &stored {
        assert_eq!(read(&store, p).await.as_ref(), Some(bytes), "{p}");
    }
}

/// A probe's bytes read back, or the error a damaged one ends with.
async fn read_checked(store: &PackStore, p: &ProbePath) -> std::result::Result<Vec<u8>, crate::error::Error> {
    use tokio_stream::StreamExt;
    let mut reader = store.open(p).await?.expect("stored");
    let mut bytes = Vec::new();
    while let Some(chunk) = reader.chunks.next().await {
        bytes.extend_from_slice(&chunk?);
    }
    Ok(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_loses_no_other_probe_to_compaction_or_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let store = PackStore::open(&config(dir.path())).unwrap();
    for n in 0..30 {
        put(&store, &path(n), &content(n, 0), false).await.unwrap();
    }
    for n in (0..30).filter(|n| ![5, 7, 9, 25].contains(n)) {
        assert!(store.remove(&path(n)).await.unwrap());
    }
    drop(store);
    // Rot in the middle of the pack: the bytes of probe 5, before 7, 9, 25.
    inspect::flip_a_byte(dir.path(), &path(5), 100).unwrap();
    let store = PackStore::open(&config(dir.path())).unwrap();
    let compacted = store.clone();
    tokio::task::spawn_blocking(move || compacted.compact_now()).await.unwrap().unwrap();
    let intact = |store: PackStore| async move {
        for n in [7, 9, 25] {
            assert_eq!(read_checked(&store, &path(n)).await.unwrap(), content(n, 0), "probe {n}");
        }
        let damaged = read_checked(&store, &path(5)).await.unwrap_err();
        assert_eq!(damaged.code, tonic::Code::DataLoss, "{damaged}");
    };
    intact(store).await;
    // The index rebuilt from the packs: the damaged record is still the
    // newest of its path, and nothing after it is cut off.
    fs::remove_dir_all(dir.path().join("index")).unwrap();
    intact(PackStore::open(&config(dir.path())).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_never_serves_an_older_version_in_place_of_a_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = PackStore::open(&config(dir.path())).unwrap();
    put(&store, &path(1), &content(1, 0), false).await.unwrap();
    put(&store, &path(1), &content(1, 9), true).await.unwrap();
    put(&store, &path(2), &content(2, 0), false).await.unwrap();
    drop(store);
    inspect::flip_a_byte(dir.path(), &path(1), 10).unwrap();
    fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = PackStore::open(&config(dir.path())).unwrap();
    let damaged = read_checked(&store, &path(1)).await.unwrap_err();
    assert_eq!(damaged.code, tonic::Code::DataLoss, "not the older bytes: {damaged}");
    assert_eq!(read_checked(&store, &path(2)).await.unwrap(), content(2, 0));
}
