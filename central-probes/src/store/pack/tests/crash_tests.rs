//! A stop at every step: for each N, the store is stopped at its Nth write,
//! fsync, truncation, rename or removal during an upload (concurrent new
//! probes, an overwrite and a removal), as if the process were killed
//! there; then it is reopened, and every change it reported done must be
//! there whole, nothing torn may be visible, and a re-upload completes.

use std::path::Path;

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
