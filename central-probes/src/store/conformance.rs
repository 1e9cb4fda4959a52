//! The suite every store backend must pass: what the services rely on,
//! written once against the `ProbeStore` trait. A backend provides a
//! `StoreFixture` and expands `store_conformance_tests!` in its tests; the
//! filesystem store does so in `store/filesystem/tests.rs`.

use std::sync::Arc;

use bytes::Bytes;
use probe_api::digest::{Sha256Digest, Sha256Hasher};
use probe_api::names::{ModuleVersion, ProbePath};
use tokio_stream::StreamExt;
use tonic::Code;

use super::{CommitOutcome, ExpectedDigests, ProbeStore, StoredProbe};
use crate::error::Result;

/// One backend's store, opened as often as a test needs.
#[tonic::async_trait]
pub trait StoreFixture: Send + Sync {
    /// Opens the store; a second call after the first one was dropped is
    /// a restart.
    async fn open(&self) -> Arc<dyn ProbeStore>;
    /// Leaves behind, while the store is closed, what a crash in the middle
    /// of a write leaves in this backend (files in `tmp/` for a filesystem,
    /// an uncommitted transaction on a lost connection for a database).
    async fn leave_a_crashed_write(&self);
    /// Unfinished writes the backend holds once `open` returned: none.
    async fn leftovers(&self) -> usize;
}

/// Generates one test per conformance case for the fixture `$make`.
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        mod conformance {
            use super::*;
            use $crate::store::conformance as suite;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_probe_is_visible_only_whole() {
                suite::a_probe_is_visible_only_whole(&$make).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn racing_writers_of_one_path_store_it_once() {
                suite::racing_writers_of_one_path_store_it_once(&$make).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_overwrite_rule_holds() {
                suite::the_overwrite_rule_holds(&$make).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn wrong_sizes_and_digests_store_nothing() {
                suite::wrong_sizes_and_digests_store_nothing(&$make).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_crc32_alone_verifies_and_both_digests_are_kept() {
                suite::a_crc32_alone_verifies_and_both_digests_are_kept(&$make).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_abandoned_write_leaves_nothing_after_a_restart() {
                suite::an_abandoned_write_leaves_nothing_after_a_restart(&$make).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn listing_is_in_path_string_order_for_every_page_size() {
                suite::listing_is_in_path_string_order_for_every_page_size(&$make).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn summaries_count_each_module_version_in_path_order() {
                suite::summaries_count_each_module_version_in_path_order(&$make).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_large_probe_streams_in_bounded_chunks() {
                suite::a_large_probe_streams_in_bounded_chunks(&$make).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_signature_is_kept_exactly_and_replaced_only_with_its_probe() {
                suite::a_signature_is_kept_exactly_and_replaced_only_with_its_probe(&$make).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_batch_lookup_of_100000_paths_answers_in_order() {
                suite::a_batch_lookup_of_100000_paths_answers_in_order(&$make).await;
            }
        }
    };
}

/// Largest chunk a reader may hand out: the API's chunk limit for GetProbe.
const MAX_READ_CHUNK: usize = 1 << 20;

fn path(s: &str) -> ProbePath {
    ProbePath::parse(s).unwrap()
}

fn kernel(i: usize) -> ProbePath {
    path(&format!("2.5.0/collector-ebpf-5.{i}.0.o.gz"))
}

async fn put(store: &dyn ProbeStore, p: &ProbePath, bytes: &[u8], overwrite: bool) -> Result<CommitOutcome> {
    put_signed(store, p, bytes, None, overwrite).await
}

async fn put_signed(
    store: &dyn ProbeStore,
    p: &ProbePath,
    bytes: &[u8],
    signature: Option<&'static [u8]>,
    overwrite: bool,
) -> Result<CommitOutcome> {
    let mut writer = store.create(p.clone(), bytes.len() as u64).await?;
    if let Some(signature) = signature {
        writer.set_signature(Bytes::from_static(signature));
    }
    for chunk in bytes.chunks(64 * 1024) {
        writer.write(Bytes::copy_from_slice(chunk)).await?;
    }
    writer.finish(Sha256Digest::of(bytes).into(), overwrite).await?.await.map(|c| c.outcome)
}

async fn read(store: &dyn ProbeStore, p: &ProbePath) -> Option<(StoredProbe, Vec<u8>)> {
    let reader = store.open(p).await.unwrap()?;
    let chunks: Vec<Bytes> = reader.chunks.map(|chunk| chunk.unwrap()).collect().await;
    Some((reader.probe, chunks.concat()))
}

pub async fn a_probe_is_visible_only_whole(fixture: &dyn StoreFixture) {
    let store = fixture.open().await;
    let p = kernel(1);
    let mut writer = store.create(p.clone(), 10).await.unwrap();
    writer.write(Bytes::from_static(b"12345")).await.unwrap();
    assert!(store.stat(&p).await.unwrap().is_none(), "half a probe is not visible");
    assert!(store.open(&p).await.unwrap().is_none());
    assert!(store.list(None, None, 10).await.unwrap().is_empty());
    writer.write(Bytes::from_static(b"67890")).await.unwrap();
    let commit = writer.finish(Sha256Digest::of(b"1234567890").into(), false).await.unwrap();
    assert_eq!(commit.await.unwrap().outcome, CommitOutcome::Stored);
    let (probe, bytes) = read(store.as_ref(), &p).await.unwrap();
    assert_eq!((probe.size, bytes.as_slice()), (10, &b"1234567890"[..]));

    // A reader that opened the old bytes reads them whole across an overwrite.
    let old_reader = store.open(&p).await.unwrap().unwrap();
    put(store.as_ref(), &p, b"new bytes!", true).await.unwrap();
    let old: Vec<Bytes> = old_reader.chunks.map(|chunk| chunk.unwrap()).collect().await;
    assert_eq!(old.concat(), b"1234567890");
    assert_eq!(read(store.as_ref(), &p).await.unwrap().1, b"new bytes!");
}

pub async fn racing_writers_of_one_path_store_it_once(fixture: &dyn StoreFixture) {
    let store = fixture.open().await;
    let p = kernel(2);
    let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 1000 + usize::from(i)]).collect();
    let mut commits = Vec::new();
    for bytes in &contents {
        let mut writer = store.create(p.clone(), bytes.len() as u64).await.unwrap();
        writer.write(Bytes::copy_from_slice(bytes)).await.unwrap();
        commits.push(writer.finish(Sha256Digest::of(bytes).into(), false).await.unwrap());
    }
    let outcomes: Vec<CommitOutcome> = futures_join(commits).await;
    let stored = outcomes.iter().filter(|o| **o == CommitOutcome::Stored).count();
    let conflicts = outcomes.iter().filter(|o| matches!(o, CommitOutcome::Conflict { .. })).count();
    assert_eq!((stored, conflicts), (1, 7), "{outcomes:?}");
    let winner = outcomes.iter().position(|o| *o == CommitOutcome::Stored).unwrap();
    assert_eq!(read(store.as_ref(), &p).await.unwrap().1, contents[winner], "the stored probe is one writer's, whole");
}

async fn futures_join(commits: Vec<super::PendingCommit>) -> Vec<CommitOutcome> {
    let tasks: Vec<_> = commits.into_iter().map(tokio::spawn).collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap().unwrap().outcome);
    }
    outcomes
}

pub async fn the_overwrite_rule_holds(fixture: &dyn StoreFixture) {
    let store = fixture.open().await;
    let p = kernel(3);
    let (first, second) = (Sha256Digest::of(b"first"), Sha256Digest::of(b"second"));
    assert_eq!(put(store.as_ref(), &p, b"first", false).await.unwrap(), CommitOutcome::Stored);
    assert_eq!(put(store.as_ref(), &p, b"first", true).await.unwrap(), CommitOutcome::Identical);
    assert_eq!(put(store.as_ref(), &p, b"second", false).await.unwrap(), CommitOutcome::Conflict { existing: first });
    assert_eq!(read(store.as_ref(), &p).await.unwrap().1, b"first");
    assert_eq!(put(store.as_ref(), &p, b"second", true).await.unwrap(), CommitOutcome::Overwritten { previous: first });
    let (probe, bytes) = read(store.as_ref(), &p).await.unwrap();
    assert_eq!((probe.sha256, bytes.as_slice()), (second, &b"second"[..]));
}

pub async fn wrong_sizes_and_digests_store_nothing(fixture: &dyn StoreFixture) {
    let store = fixture.open().await;
    let p = kernel(4);
    let mut writer = store.create(p.clone(), 5).await.unwrap();
    writer.write(Bytes::from_static(b"hello")).await.unwrap();
    let error = writer.finish(Sha256Digest::of(b"other").into(), false).await.unwrap().await.unwrap_err();
    assert_eq!(error.code, Code::DataLoss);

    let mut writer = store.create(p.clone(), 5).await.unwrap();
    writer.write(Bytes::from_static(b"hello")).await.unwrap();
    let wrong_crc = ExpectedDigests { sha256: None, crc32: Some(crc32fast::hash(b"hellO")) };
    let error = writer.finish(wrong_crc, false).await.unwrap().await.unwrap_err();
    assert_eq!(error.code, Code::DataLoss);
    assert!(error.message.contains("CRC-32"), "{}", error.message);

    // Both given: each is checked.
    let mut writer = store.create(p.clone(), 5).await.unwrap();
    writer.write(Bytes::from_static(b"hello")).await.unwrap();
    let one_wrong = ExpectedDigests { sha256: Some(Sha256Digest::of(b"hello")), crc32: Some(0) };
    assert_eq!(writer.finish(one_wrong, false).await.unwrap().await.unwrap_err().code, Code::DataLoss);

    let mut writer = store.create(p.clone(), 5).await.unwrap();
    writer.write(Bytes::from_static(b"hello")).await.unwrap();
    let error = writer.finish(ExpectedDigests::default(), false).await.err().expect("no digest is refused");
    assert_eq!(error.code, Code::InvalidArgument);

    let mut writer = store.create(p.clone(), 5).await.unwrap();
    writer.write(Bytes::from_static(b"hell")).await.unwrap();
    let error = writer.finish(Sha256Digest::of(b"hell").into(), false).await.unwrap().await.unwrap_err();
    assert_eq!(error.code, Code::InvalidArgument);

    let mut writer = store.create(p.clone(), 5).await.unwrap();
    assert_eq!(writer.write(Bytes::from_static(b"hello!")).await.unwrap_err().code, Code::InvalidArgument);
    drop(writer);
    assert!(store.stat(&p).await.unwrap().is_none());
}

pub async fn a_crc32_alone_verifies_and_both_digests_are_kept(fixture: &dyn StoreFixture) {
    let store = fixture.open().await;
    let p = kernel(8);
    let bytes = b"a probe sent with its zip entry's CRC-32 only";
    let mut writer = store.create(p.clone(), bytes.len() as u64).await.unwrap();
    writer.write(Bytes::from_static(bytes)).await.unwrap();
    let crc_only = ExpectedDigests { sha256: None, crc32: Some(crc32fast::hash(bytes)) };
    let committed = writer.finish(crc_only, false).await.unwrap().await.unwrap();
    assert_eq!(committed.outcome, CommitOutcome::Stored);
    assert_eq!(committed.sha256, Sha256Digest::of(bytes), "the store computes the SHA-256 itself");
    let expected = StoredProbe {
        path: p.clone(),
        size: bytes.len() as u64,
        sha256: Sha256Digest::of(bytes),
        crc32: Some(crc32fast::hash(bytes)),
        signature: None,
    };
    assert_eq!(store.stat(&p).await.unwrap().as_ref(), Some(&expected));
    assert_eq!(read(store.as_ref(), &p).await.unwrap().0, expected);
    // A probe sent with its SHA-256 only gets a CRC-32 too.
    put(store.as_ref(), &kernel(9), b"sha only", false).await.unwrap();
    assert_eq!(store.stat(&kernel(9)).await.unwrap().unwrap().crc32, Some(crc32fast::hash(b"sha only")));
    drop(store);
    let store = fixture.open().await;
    assert_eq!(store.stat(&p).await.unwrap(), Some(expected), "both digests survive a restart");
}

pub async fn an_abandoned_write_leaves_nothing_after_a_restart(fixture: &dyn StoreFixture) {
    let store = fixture.open().await;
    put(store.as_ref(), &kernel(5), b"committed", false).await.unwrap();
    let mut writer = store.create(kernel(6), 100).await.unwrap();
    writer.write(Bytes::from_static(b"half a probe")).await.unwrap();
    drop(writer);
    drop(store);
    fixture.leave_a_crashed_write().await;
    let store = fixture.open().await;
    assert_eq!(fixture.leftovers().await, 0, "a restart clears abandoned writes");
    assert!(store.stat(&kernel(6)).await.unwrap().is_none());
    assert_eq!(store.list(None, None, 10).await.unwrap().len(), 1, "only the committed probe");
    assert_eq!(read(store.as_ref(), &kernel(5)).await.unwrap().1, b"committed", "committed probes stay");
}

pub async fn listing_is_in_path_string_order_for_every_page_size(fixture: &dyn StoreFixture) {
    let store = fixture.open().await;
    let mut paths = vec![
        "2.5.0/collector-ebpf-5.4.0.o.gz",
        "2.5.0/collector-5.4.0.ko.gz",
        "2.5.0-rc1/collector-ebpf-5.4.0.o.gz",
        "2.5.0-rc10/collector-ebpf-5.4.0.o.gz",
        "2.10.0/collector-ebpf-5.4.0.o.gz",
        "2.5.1/collector-ebpf-5.4.0.o.gz",
        "1123dde0458e72a49880b06922e135dbcd36fb784fed530ab84ddfa8924e5c05/collector-4.9.ko.gz",
    ];
    for p in &paths {
        put(store.as_ref(), &path(p), p.as_bytes(), false).await.unwrap();
    }
    paths.sort();
    for filter in [None, Some("2.5.0"), Some("2.5.0-rc1"), Some("9.9.9")] {
        let version = filter.map(|v| ModuleVersion::parse(v).unwrap());
        let expected: Vec<&str> =
            paths.iter().copied().filter(|p| filter.is_none_or(|v| p.starts_with(&format!("{v}/")))).collect();
        for page_size in 1..=paths.len() + 1 {
            let (mut listed, mut after) = (Vec::new(), None::<ProbePath>);
            loop {
                let page = store.list(version.as_ref(), after.as_ref(), page_size).await.unwrap();
                listed.extend(page.iter().map(|p| p.path.to_string()));
                if page.len() < page_size {
                    break;
                }
                after = page.last().map(|p| p.path.clone());
            }
            assert_eq!(listed, expected, "filter {filter:?}, page size {page_size}");
        }
    }
}

pub async fn summaries_count_each_module_version_in_path_order(fixture: &dyn StoreFixture) {
    let store = fixture.open().await;
    assert_eq!(store.summaries().await.unwrap(), vec![], "an empty store");
    let before = crate::store::misses::unix_now();
    let probes = [
        ("2.5.0/collector-ebpf-5.4.0.o.gz", 10),
        ("2.5.0/collector-5.4.0.ko.gz", 20),
        ("2.5.0-rc1/collector-ebpf-5.4.0.o.gz", 5),
        ("2.6.0/collector-ebpf-5.4.0.o.gz", 7),
    ];
    for (p, size) in probes {
        put(store.as_ref(), &path(p), &vec![1; size], false).await.unwrap();
    }
    store.remove(&path("2.6.0/collector-ebpf-5.4.0.o.gz")).await.unwrap();
    let after = crate::store::misses::unix_now();
    let summaries = store.summaries().await.unwrap();
    let counted: Vec<(&str, u64, u64)> =
        summaries.iter().map(|s| (s.module_version.as_str(), s.probes, s.bytes)).collect();
    assert_eq!(counted, [("2.5.0-rc1", 1, 5), ("2.5.0", 2, 30)], "path order; a deleted version is gone");
    for summary in &summaries {
        let stored = summary.last_stored.expect("a time");
        assert!((before..=after).contains(&stored), "{summary:?} not within {before}..={after}");
    }
}

pub async fn a_large_probe_streams_in_bounded_chunks(fixture: &dyn StoreFixture) {
    let store = fixture.open().await;
    let p = kernel(7);
    let size = 48 << 20;
    let mut hasher = Sha256Hasher::new();
    let mut writer = store.create(p.clone(), size as u64).await.unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    for _ in 0..size / block.len() {
        hasher.update(&block);
        writer.write(Bytes::copy_from_slice(&block)).await.unwrap();
    }
    let sha256 = hasher.finish();
    writer.finish(sha256.into(), false).await.unwrap().await.unwrap();

    let mut reader = store.open(&p).await.unwrap().unwrap();
    let (mut read, mut hasher, mut largest) = (0usize, Sha256Hasher::new(), 0usize);
    while let Some(chunk) = reader.chunks.next().await {
        let chunk = chunk.unwrap();
        largest = largest.max(chunk.len());
        read += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!((read, hasher.finish()), (size, sha256));
    assert!(largest <= MAX_READ_CHUNK, "a chunk of {largest} bytes: the reader must stream, not load");
}

pub async fn a_batch_lookup_of_100000_paths_answers_in_order(fixture: &dyn StoreFixture) {
    let store = fixture.open().await;
    let stored: Vec<usize> = (0..100_000).step_by(1000).collect();
    for &i in &stored {
        put(store.as_ref(), &kernel(i), format!("probe {i}").as_bytes(), false).await.unwrap();
    }
    let asked: Vec<ProbePath> = (0..100_000).map(kernel).collect();
    let answers = store.stat_many(&asked).await.unwrap();
    assert_eq!(answers.len(), asked.len());
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Some(probe) => {
                assert!(i % 1000 == 0, "{i} was never stored");
                assert_eq!(probe.path, asked[i]);
                assert_eq!(probe.sha256, Sha256Digest::of(format!("probe {i}").as_bytes()));
            }
            None => assert!(i % 1000 != 0, "{i} was stored"),
        }
    }
}

/// A store without trusted keys keeps what it was given, byte for byte; the
/// overwrite rule treats another signature as other content.
pub async fn a_signature_is_kept_exactly_and_replaced_only_with_its_probe(fixture: &dyn StoreFixture) {
    let store = fixture.open().await;
    let (p, bytes) = (kernel(11), b"a signed probe");
    let (first, second): (&[u8], &[u8]) = (b"untrusted comment: a\n\x00\xff binary too\n", b"another signature");
    assert_eq!(put_signed(store.as_ref(), &p, bytes, Some(first), false).await.unwrap(), CommitOutcome::Stored);
    let signature = |store: &Arc<dyn ProbeStore>| {
        let (store, p) = (store.clone(), p.clone());
        async move { store.stat(&p).await.unwrap().unwrap().signature }
    };
    assert_eq!(signature(&store).await.as_deref(), Some(first));
    assert_eq!(read(store.as_ref(), &p).await.unwrap().0.signature.as_deref(), Some(first));
    drop(store);
    let store = fixture.open().await;
    assert_eq!(signature(&store).await.as_deref(), Some(first), "kept across a restart");
    let identical = put_signed(store.as_ref(), &p, bytes, Some(first), false).await.unwrap();
    assert_eq!(identical, CommitOutcome::Identical);
    let conflict = put_signed(store.as_ref(), &p, bytes, Some(second), false).await.unwrap();
    assert!(matches!(conflict, CommitOutcome::Conflict { .. }), "{conflict:?}");
    assert!(matches!(put(store.as_ref(), &p, bytes, false).await.unwrap(), CommitOutcome::Conflict { .. }));
    assert_eq!(signature(&store).await.as_deref(), Some(first), "a conflict keeps the signature");
    let replaced = put_signed(store.as_ref(), &p, b"new bytes", Some(second), true).await.unwrap();
    assert!(matches!(replaced, CommitOutcome::Overwritten { .. }));
    let (probe, content) = read(store.as_ref(), &p).await.unwrap();
    assert_eq!((probe.signature.as_deref(), content.as_slice()), (Some(second), &b"new bytes"[..]));
    assert!(matches!(put(store.as_ref(), &p, b"new bytes", true).await.unwrap(), CommitOutcome::Overwritten { .. }));
    assert_eq!(signature(&store).await, None, "an unsigned overwrite leaves the probe unsigned");
}
