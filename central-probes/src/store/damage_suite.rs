//! The rule every store keeps about damaged probes, written once against
//! `ProbeStore`: a probe whose stored bytes no longer match its record is
//! never handed out whole (its read ends with DATA_LOSS before its last
//! chunk), a check and `verify_all` name it, an uploader is told it is not
//! there, and an upload of its bytes repairs it (not IDENTICAL). A store's
//! tests provide a `DamageFixture` and expand `store_damage_tests!`.

use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use tokio_stream::StreamExt;
use tonic::Code;

use super::check::{Checked, verify_all};
use super::conformance::StoreFixture;
use super::{CommitOutcome, ProbeStore};

/// A store whose stored bytes a test can damage.
#[tonic::async_trait]
pub trait DamageFixture: StoreFixture {
    /// Flips a bit of byte `at` of the stored bytes of `path`, behind the
    /// store's back (rot on the disk, a damaged row).
    async fn flip_a_byte(&self, path: &ProbePath, at: u64);

    /// Whether what reads found damaged is still known after a restart (a
    /// store with a data directory keeps it there; a database replica
    /// keeps it in memory).
    fn remembers_damage(&self) -> bool {
        true
    }
}

/// Generates the damage cases for the fixture `$make`.
#[macro_export]
macro_rules! store_damage_tests {
    ($make:expr) => {
        mod damage {
            use super::*;
            use $crate::store::damage_suite as suite;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_damaged_probe_is_never_served_whole_and_an_upload_repairs_it() {
                suite::a_damaged_probe_is_never_served_whole_and_an_upload_repairs_it(&$make).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn what_a_check_found_damaged_is_repaired_by_an_upload_after_a_restart() {
                suite::what_a_check_found_damaged_is_repaired_by_an_upload_after_a_restart(&$make).await;
            }
        }
    };
}

fn kernel(i: usize) -> ProbePath {
    ProbePath::parse(&format!("2.5.0/collector-ebpf-5.{i}.0.o.gz")).unwrap()
}

async fn put(store: &dyn ProbeStore, p: &ProbePath, bytes: &[u8]) -> CommitOutcome {
    let mut writer = store.create(p.clone(), bytes.len() as u64).await.unwrap();
    for chunk in bytes.chunks(64 * 1024) {
        writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    writer.finish(Sha256Digest::of(bytes).into(), false).await.unwrap().await.unwrap().outcome
}

/// Every chunk a read hands out, and the error it ends with, if any (a
/// store that copies the probe before serving it fails the open).
async fn read(store: &dyn ProbeStore, p: &ProbePath) -> (Vec<u8>, Option<Code>) {
    let mut chunks = match store.open(p).await {
        Ok(reader) => reader.expect("stored").chunks,
        Err(error) => return (Vec::new(), Some(error.code)),
    };
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(error) => return (bytes, Some(error.code)),
        }
    }
    (bytes, None)
}

pub async fn a_damaged_probe_is_never_served_whole_and_an_upload_repairs_it(fixture: &dyn DamageFixture) {
    // One probe of one chunk, one of several (the last byte damaged), and
    // one left intact.
    let small: Vec<u8> = (0..10_000u32).map(|i| (i * 13) as u8).collect();
    let large: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
    let (p_small, p_large, p_intact) = (kernel(1), kernel(2), kernel(3));
    let store = fixture.open().await;
    for (p, bytes) in [(&p_small, &small), (&p_large, &large), (&p_intact, &small)] {
        assert_eq!(put(store.as_ref(), p, bytes).await, CommitOutcome::Stored);
    }
    fixture.flip_a_byte(&p_small, 5_000).await;
    fixture.flip_a_byte(&p_large, large.len() as u64 - 1).await;

    for (p, bytes) in [(&p_small, &small), (&p_large, &large)] {
        // Twice: a cache in front must not keep what the first read saw.
        for _ in 0..2 {
            let (served, end) = read(store.as_ref(), p).await;
            assert_eq!(end, Some(Code::DataLoss), "{p}: a damaged probe's read ends with DATA_LOSS");
            assert!(served.len() < bytes.len(), "{p}: never handed out whole ({} bytes)", served.len());
        }
        assert!(matches!(store.check(p).await.unwrap(), Checked::Damaged(_)), "{p}");
        assert!(store.is_damaged(p), "{p}: an uploader is told to send it again");
    }
    assert_eq!(read(store.as_ref(), &p_intact).await, (small.clone(), None));
    assert!(!store.is_damaged(&p_intact));
    let mut found = Vec::new();
    let summary = verify_all(store.as_ref(), &[], |damaged| {
        found.push(damaged.probe.path);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(found, vec![p_small.clone(), p_large.clone()]);
    assert_eq!((summary.checked, summary.damaged), (3, 2));

    // The same bytes again repair it; an intact probe stays IDENTICAL.
    for (p, bytes) in [(&p_small, &small), (&p_large, &large)] {
        assert_eq!(put(store.as_ref(), p, bytes).await, CommitOutcome::Repaired, "{p}");
        assert_eq!(read(store.as_ref(), p).await, (bytes.clone(), None), "{p}");
        assert!(!store.is_damaged(p));
        assert_eq!(store.check(p).await.unwrap(), Checked::Intact);
        assert_eq!(put(store.as_ref(), p, bytes).await, CommitOutcome::Identical, "{p}");
    }
    assert_eq!(put(store.as_ref(), &p_intact, &small).await, CommitOutcome::Identical);
    let summary = verify_all(store.as_ref(), &[], |damaged| panic!("{damaged:?}")).await.unwrap();
    assert_eq!((summary.checked, summary.damaged), (3, 0));
}

/// What `verify` does offline: a check finds the damage, the store closes;
/// the Central started next still knows, and an upload repairs it.
pub async fn what_a_check_found_damaged_is_repaired_by_an_upload_after_a_restart(fixture: &dyn DamageFixture) {
    let bytes: Vec<u8> = (0..20_000u32).map(|i| (i * 31) as u8).collect();
    let p = kernel(4);
    {
        let store = fixture.open().await;
        assert_eq!(put(store.as_ref(), &p, &bytes).await, CommitOutcome::Stored);
        fixture.flip_a_byte(&p, 0).await;
        assert!(matches!(store.check(&p).await.unwrap(), Checked::Damaged(_)));
    }
    let store = fixture.open().await;
    if fixture.remembers_damage() {
        assert!(store.is_damaged(&p), "known after the restart");
    } else {
        assert!(!store.is_damaged(&p), "forgotten with the process");
        assert_eq!(read(store.as_ref(), &p).await.1, Some(Code::DataLoss), "found again by the next read");
    }
    assert_eq!(put(store.as_ref(), &p, &bytes).await, CommitOutcome::Repaired);
    assert!(!store.is_damaged(&p));
    assert_eq!(read(store.as_ref(), &p).await, (bytes.clone(), None));
    drop(store);
    let store = fixture.open().await;
    assert!(!store.is_damaged(&p), "the repair is kept too");
    assert_eq!(put(store.as_ref(), &p, &bytes).await, CommitOutcome::Identical);
}
