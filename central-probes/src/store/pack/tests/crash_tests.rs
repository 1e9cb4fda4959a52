//! A stop at every step: for each N, the store is stopped at its Nth write,
//! fsync, truncation, rename or removal during an upload (concurrent new
//! probes, an overwrite and a removal), as if the process were killed
//! there; then it is reopened, and every change it reported done must be
//! there whole, nothing torn may be visible, and a re-upload completes.

use std::path::Path;

use crate::store::disk::READ_CHUNK;

use super::*;

const EXISTING: usize = 5;
const NEW: std::ops::Range<usize> = 5..17;

/// What the workload was told was done.
#[derive(Debug)]
enum Done {
    Stored(usize, u8),
    Removed(usize),
}

async fn workload(store: &PackStore) -> Vec<Done> {
    let mut tasks = Vec::new();
    for n in NEW {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            put(&store, &path(n), &content(n, 0), false).await.ok().map(|_| Done::Stored(n, 0))
        }));
    }
    let store_ = store.clone();
    tasks.push(tokio::spawn(async move {
        put(&store_, &path(0), &content(0, 1), true).await.ok().map(|_| Done::Stored(0, 1))
    }));
    let store_ = store.clone();
    tasks.push(tokio::spawn(async move { store_.remove(&path(1)).await.ok().map(|_| Done::Removed(1)) }));
    let mut done = Vec::new();
    for task in tasks {
        done.extend(task.await.unwrap());
    }
    done
}

/// Everything visible is whole: its bytes are one of the versions written
/// of its path, and hash to what the index says.
async fn nothing_torn(store: &PackStore) {
    for probe in store.list(None, None, 1000).await.unwrap() {
        let bytes = read(store, &probe.path).await.unwrap();
        assert_eq!(Sha256Digest::of(&bytes), probe.sha256, "{} reads as it was stored", probe.path);
        let n = (0..NEW.end).find(|&n| path(n) == probe.path).expect("a path the test wrote");
        assert!(bytes == content(n, 0) || bytes == content(n, 1), "{} is a version that was written", probe.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_at_any_step_of_an_upload_loses_nothing_reported_stored() {
    let mut stops = 0;
    for n in 1.. {
        let dir = tempfile::tempdir().unwrap();
        let store = PackStore::open(&config(dir.path())).unwrap();
        for k in 0..EXISTING {
            put(&store, &path(k), &content(k, 0), false).await.unwrap();
        }
        drop(store);

        let faults = Arc::new(Faults::stop_at(n));
        let done = match PackStore::open_with(&config(dir.path()), faults.clone()) {
            Ok(store) => {
                let done = workload(&store).await;
                drop(store);
                done
            }
            Err(_) => Vec::new(),
        };
        if !faults.stopped() {
            assert!(n > 20, "the workload took only {n} steps");
            break;
        }
        stops += 1;

        let store = PackStore::open(&config(dir.path())).unwrap_or_else(|e| panic!("stop at {n}: {e}"));
        for done in &done {
            match *done {
                Done::Stored(k, round) => {
                    assert_eq!(read(&store, &path(k)).await, Some(content(k, round)), "stop at {n}: {done:?}")
                }
                Done::Removed(k) => assert_eq!(read(&store, &path(k)).await, None, "stop at {n}: {done:?}"),
            }
        }
        for k in (0..EXISTING).filter(|&k| k > 1) {
            assert_eq!(read(&store, &path(k)).await, Some(content(k, 0)), "stop at {n}: untouched probes stay");
        }
        nothing_torn(&store).await;
        for k in NEW {
            put(&store, &path(k), &content(k, 0), false)
                .await
                .unwrap_or_else(|e| panic!("stop at {n}: re-upload: {e}"));
        }
        drop(store);
        let store = PackStore::open(&config(dir.path())).unwrap();
        nothing_torn(&store).await;
        for k in NEW {
            assert_eq!(read(&store, &path(k)).await, Some(content(k, 0)), "stop at {n}: re-uploaded");
        }
    }
    assert!(stops > 20, "only {stops} stops");
}

/// A per-file data directory of `count` probes, closed.
async fn per_file_store(dir: &Path, count: usize) {
    use crate::store::filesystem::{FilesystemStore, FilesystemStoreConfig};
    let store = FilesystemStore::open(&FilesystemStoreConfig { data_dir: dir.to_owned(), min_free_bytes: 0 }).unwrap();
    for k in 0..count {
        let bytes = content(k, 0);
        let mut writer = store.create(path(k), bytes.len() as u64).await.unwrap();
        writer.write(Bytes::from(bytes.clone())).await.unwrap();
        writer.finish(Sha256Digest::of(&bytes).into(), false).await.unwrap().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_file_store_is_converted_and_a_stop_at_any_step_of_it_loses_nothing() {
    const PROBES: usize = 12;
    let mut stops = 0;
    for n in 1.. {
        let dir = tempfile::tempdir().unwrap();
        per_file_store(dir.path(), PROBES).await;
        let faults = Arc::new(Faults::stop_at(n));
        let opened = PackStore::open_with(&config(dir.path()), faults.clone());
        drop(opened);
        if !faults.stopped() {
            assert!(n > 5, "the conversion took only {n} steps");
            break;
        }
        stops += 1;
        let store = PackStore::open(&config(dir.path())).unwrap_or_else(|e| panic!("stop at {n}: {e}"));
        assert_eq!(store.len(), PROBES, "stop at {n}");
        for k in 0..PROBES {
            assert_eq!(read(&store, &path(k)).await, Some(content(k, 0)), "stop at {n}");
        }
        assert!(!dir.path().join("probes").exists(), "stop at {n}: the old layout is gone once converted");
        drop(store);
        assert_eq!(PackStore::open(&config(dir.path())).unwrap().len(), PROBES, "stop at {n}: and stays converted");
    }
    assert!(stops > 5, "only {stops} stops");
}

/// A store of small packs (sealed after about 8 KiB) holding 30 probes, of
/// which every other one was removed; closed.
async fn half_removed(dir: &Path) -> PackStoreConfig {
    let mut config = config(dir);
    config.pack_len = 8 << 10;
    let store = PackStore::open(&config).unwrap();
    for k in 0..30 {
        put(&store, &path(k), &content(k, 0), false).await.unwrap();
    }
    for k in (0..30).step_by(2) {
        assert!(store.remove(&path(k)).await.unwrap());
    }
    config
}

async fn only_odd_probes(store: &PackStore, what: &str) {
    assert_eq!(store.len(), 15, "{what}");
    for k in 0..30 {
        let expected = (k % 2 == 1).then(|| content(k, 0));
        assert_eq!(read(store, &path(k)).await, expected, "{what}: probe {k}");
    }
}

fn pack_dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir.join("packs")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_returns_the_space_of_removed_probes_and_a_reader_of_the_old_pack_reads_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = half_removed(dir.path()).await;
    let store = PackStore::open(&config).unwrap();
    // A probe of several chunks, opened before compaction, read after it.
    let big = path(100);
    let big_bytes: Vec<u8> = (0..(3 * READ_CHUNK + 5)).map(|i| (i % 251) as u8).collect();
    put(&store, &big, &big_bytes, false).await.unwrap();
    put(&store, &path(101), &content(101, 0), false).await.unwrap();
    assert!(store.remove(&path(101)).await.unwrap());
    drop(store);
    let store = PackStore::open(&config).unwrap();
    let (live, dead) = store.space().unwrap();
    assert!(dead > 20_000, "removals leave dead bytes ({live} live, {dead} dead)");
    let before = pack_dir_bytes(dir.path());
    let mut reader = store.open(&big).await.unwrap().unwrap();
    use tokio_stream::StreamExt;
    let mut read_back = reader.chunks.next().await.unwrap().unwrap().to_vec();
    let freed = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.compact_now()).await.unwrap().unwrap()
    };
    assert!(freed > 0);
    while let Some(chunk) = reader.chunks.next().await {
        read_back.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(read_back, big_bytes, "a reader of a compacted pack reads it whole");
    assert!(pack_dir_bytes(dir.path()) < before, "the space came back");
    let (_, dead_after) = store.space().unwrap();
    assert!(dead_after < dead, "{dead_after} dead bytes after compaction, {dead} before");
    assert_eq!(read(&store, &big).await.unwrap(), big_bytes);
    drop(store);
    let store = PackStore::open(&config).unwrap();
    assert_eq!(read(&store, &path(101)).await, None);
    assert_eq!(read(&store, &big).await.unwrap(), big_bytes);
    assert_eq!(store.len(), 16);
    drop(store);
    // The removals stay removed when the index is rebuilt from the packs.
    fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = PackStore::open(&config).unwrap();
    assert_eq!(store.len(), 16);
    assert_eq!(read(&store, &path(0)).await, None);
    assert_eq!(read(&store, &path(101)).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_at_any_step_of_a_compaction_loses_nothing() {
    let mut stops = 0;
    for n in 1.. {
        let dir = tempfile::tempdir().unwrap();
        let config = half_removed(dir.path()).await;
        let faults = Arc::new(Faults::stop_at(n));
        if let Ok(store) = PackStore::open_with(&config, faults.clone()) {
            let _ = tokio::task::spawn_blocking(move || store.compact_now()).await.unwrap();
        }
        if !faults.stopped() {
            assert!(n > 20, "the compaction took only {n} steps");
            break;
        }
        stops += 1;
        let store = PackStore::open(&config).unwrap_or_else(|e| panic!("stop at {n}: {e}"));
        only_odd_probes(&store, &format!("stop at {n}")).await;
        let compacted = store.clone();
        tokio::task::spawn_blocking(move || compacted.compact_now()).await.unwrap().unwrap();
        only_odd_probes(&store, &format!("stop at {n}, compacted again")).await;
        drop(store);
        fs::remove_dir_all(dir.path().join("index")).unwrap();
        only_odd_probes(&PackStore::open(&config).unwrap(), &format!("stop at {n}, rebuilt")).await;
    }
    assert!(stops > 20, "only {stops} stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_also_rewrites_a_pack_that_never_grew_to_the_target_length() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let store = PackStore::open(&config).unwrap();
    for k in 0..30 {
        put(&store, &path(k), &content(k, 0), false).await.unwrap();
    }
    for k in (0..30).step_by(2) {
        assert!(store.remove(&path(k)).await.unwrap());
    }
    let (_, dead) = store.space().unwrap();
    let compacted = store.clone();
    let freed = tokio::task::spawn_blocking(move || compacted.compact_now()).await.unwrap().unwrap();
    assert!(freed > 0 && store.space().unwrap().1 < dead, "freed {freed} of {dead} dead bytes");
    only_odd_probes(&store, "compacted").await;
    put(&store, &path(40), &content(40, 0), false).await.unwrap();
    drop(store);
    let store = PackStore::open(&config).unwrap();
    only_odd_probes_and(&store, 40).await;
}

async fn only_odd_probes_and(store: &PackStore, extra: usize) {
    assert_eq!(read(store, &path(extra)).await, Some(content(extra, 0)));
    for k in 0..30 {
        assert_eq!(read(store, &path(k)).await, (k % 2 == 1).then(|| content(k, 0)), "probe {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_leaves_a_pack_alone_while_a_record_in_it_waits_for_its_commit() {
    use crate::store::CommitOrder;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.compaction.below_live_fraction = 0.9;
    let store = PackStore::open(&config).unwrap();
    for k in 0..30 {
        put(&store, &path(k), &content(k, 0), false).await.unwrap();
    }
    for k in (0..30).step_by(2) {
        assert!(store.remove(&path(k)).await.unwrap());
    }
    // A file appended to the same pack, held before its commit by the file
    // before it in its upload.
    let bytes = content(40, 0);
    let mut writer = store.create(path(40), bytes.len() as u64).await.unwrap();
    writer.write(Bytes::from(bytes.clone())).await.unwrap();
    let (open_gate, gate) = tokio::sync::oneshot::channel::<bool>();
    let order = CommitOrder { after: Box::pin(async move { gate.await.unwrap_or(false) }), taken: None };
    let commit = writer.finish_in_order(Sha256Digest::of(&bytes).into(), false, order).await.unwrap();
    let packs = store.backend().inner.packs.clone();
    for _ in 0..500 {
        if packs.records_in_flight() > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(packs.records_in_flight(), 1, "the record is written whole and waits");
    let compact = |store: &PackStore| {
        let store = store.clone();
        async move { tokio::task::spawn_blocking(move || store.compact_now()).await.unwrap().unwrap() }
    };
    assert_eq!(compact(&store).await, 0, "the pack of a record in flight is not rewritten");
    open_gate.send(true).unwrap();
    assert_eq!(commit.await.unwrap().outcome, CommitOutcome::Stored);
    assert!(compact(&store).await > 0, "once committed, the pack is rewritten");
    only_odd_probes_and(&store, 40).await;
    drop(store);
    only_odd_probes_and(&PackStore::open(&config).unwrap(), 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_compaction_runs_every_compaction_every() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = half_removed(dir.path()).await;
    let (_, dead) = PackStore::open(&config).unwrap().space().unwrap();
    assert!(dead > 0);
    // Nothing compacts in the first interval (a minute by default) ...
    let store = PackStore::open(&config).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(store.space().unwrap().1, dead, "no compaction before its interval");
    drop(store);
    // ... and with an interval of 50 ms, the dead bytes go without a call.
    config.compaction.every = std::time::Duration::from_millis(50);
    let store = PackStore::open(&config).unwrap();
    let mut left = dead;
    for _ in 0..200 {
        left = store.space().unwrap().1;
        if left < dead {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(left < dead, "{left} dead bytes after the background compaction, {dead} before");
    only_odd_probes(&store, "after the background compaction").await;
}
