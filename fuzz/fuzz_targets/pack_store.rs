//! Any files as a pack store's data directory (its packs, index snapshot
//! and index logs): opening the store, listing, stat-ing and reading every
//! probe must answer with an error or with verified bytes (a read that
//! ends without an error delivered exactly the size and SHA-256 the
//! listing gave), never panic; and a store that opened once opens again
//! with the same probes.
//!
//! Input format: repeated [u8 name length][name][u32 little-endian
//! length][bytes], each a file of the data directory; an entry cut short
//! takes the rest of the input. Only the names the store uses are written
//! (`packs/<n>.pack`, `index/snapshot`, `index/log-<n>`); others are
//! skipped, so the input never writes outside the directory.
//!
//! With `PACK_STORE_SEEDS=<dir>` in the environment, the target first
//! writes seeds to `<dir>`: the files of a real store of a few probes in
//! this format, and truncated and bit-flipped variants of them, then exits.
#![no_main]

mod common;

use std::path::Path;
use std::sync::OnceLock;

use bytes::Bytes;
use central_probes::store::ProbeStore;
use central_probes::store::pack::{PackStore, PackStoreConfig};
use libfuzzer_sys::fuzz_target;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use tokio_stream::StreamExt;

/// A probe the listing gave, and what reading it delivered in full, if
/// it did.
type Served = Vec<(String, Option<Vec<u8>>)>;

fn allowed(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    name == "index/snapshot"
        || name.strip_prefix("index/log-").is_some_and(digits)
        || name.strip_prefix("packs/").and_then(|n| n.strip_suffix(".pack")).is_some_and(digits)
}

fn files(mut data: &[u8]) -> Vec<(String, &[u8])> {
    let mut files = Vec::new();
    while let Some((&name_len, rest)) = data.split_first() {
        let Some(name) = rest.get(..usize::from(name_len)) else { break };
        let rest = &rest[usize::from(name_len)..];
        let Some((len, rest)) = rest.split_first_chunk::<4>() else { break };
        let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
        if let Ok(name) = std::str::from_utf8(name)
            && allowed(name)
        {
            files.push((name.to_owned(), &rest[..len]));
        }
        data = &rest[len..];
    }
    files
}

/// Opens the store in `dir` and reads all of it; `None` when it does not
/// open.
async fn serve(dir: &Path) -> Option<Served> {
    let store = PackStore::open(&PackStoreConfig::new(dir)).ok()?;
    let Ok(listed) = store.list(None, None, usize::MAX).await else { return Some(Vec::new()) };
    let _ = store.summaries().await;
    let mut served = Vec::new();
    for probe in listed {
        let _ = store.stat(&probe.path).await;
        let read = match store.open(&probe.path).await {
            Ok(Some(reader)) => {
                let chunks: Vec<_> = reader.chunks.collect().await;
                chunks.into_iter().collect::<Result<Vec<Bytes>, _>>().ok().map(|c| c.concat())
            }
            _ => None,
        };
        if let Some(bytes) = &read {
            assert_eq!(bytes.len() as u64, probe.size, "{}: a whole read of another size", probe.path);
            assert_eq!(Sha256Digest::of(bytes), probe.sha256, "{}: a whole read of other bytes", probe.path);
        }
        served.push((probe.path.to_string(), read));
    }
    Some(served)
}

fuzz_target!(|data: &[u8]| {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        if let Some(out) = std::env::var_os("PACK_STORE_SEEDS") {
            runtime.block_on(write_seeds(Path::new(&out)));
            // The unclean store's threads were leaked on purpose: stop here.
            std::process::exit(0);
        }
        runtime
    });
    let dir = common::scratch_dir();
    for sub in ["packs", "index"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    for (name, bytes) in files(data) {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let Some(first) = runtime.block_on(serve(dir.path())) else { return };
    let listed = |served: &Served| served.iter().map(|(path, _)| path.clone()).collect::<Vec<_>>();
    let again = runtime.block_on(serve(dir.path())).expect("a store that opened once opens again");
    assert_eq!(listed(&first), listed(&again), "the probes listed changed across a restart");
});

/// The files of a store in `dir` of a few probes (one signed, one
/// overwritten, one removed), in the input format; closed cleanly (a
/// snapshot) or not (logs after it).
async fn real_store(dir: &Path, clean: bool) -> (Vec<u8>, Vec<u8>) {
    let store = PackStore::open(&PackStoreConfig::new(dir)).unwrap();
    let path = |n: usize| ProbePath::parse(&format!("2.5.0/collector-ebpf-5.4.0-{n}-generic.o.gz")).unwrap();
    for (n, round) in [(1, 0u8), (2, 0), (3, 0), (2, 1)] {
        let bytes: Vec<u8> =
            (0..100 + n * 37).map(|i| (i as u8).wrapping_mul(31).wrapping_add(n as u8 + round)).collect();
        let mut writer = store.create(path(n), bytes.len() as u64).await.unwrap();
        if n == 3 {
            writer.set_signature(Bytes::from_static(b"untrusted comment: a signature\nRWQ=\n"));
        }
        writer.write(Bytes::from(bytes.clone())).await.unwrap();
        writer.finish(Sha256Digest::of(&bytes).into(), true).await.unwrap().await.unwrap();
    }
    store.remove(&path(1)).await.unwrap();
    if clean {
        drop(store);
    } else {
        // As a process that died: no snapshot at close.
        std::mem::forget(store);
    }
    let (mut packs, mut index) = (Vec::new(), Vec::new());
    for sub in ["packs", "index"] {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(sub)).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        for name in names {
            let name = format!("{sub}/{}", name.to_str().unwrap());
            let bytes = std::fs::read(dir.join(&name)).unwrap();
            let entries = if sub == "packs" { &mut packs } else { &mut index };
            entries.push(name.len() as u8);
            entries.extend_from_slice(name.as_bytes());
            entries.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            entries.extend_from_slice(&bytes);
        }
    }
    (packs, index)
}

/// The seeds: a real store's files, and variants of them.
async fn write_seeds(out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let write = |name: &str, bytes: &[u8]| std::fs::write(out.join(name), bytes).unwrap();
    let (clean, unclean) = (common::scratch_dir(), common::scratch_dir());
    let (packs, index) = real_store(clean.path(), true).await;
    let whole = [packs.as_slice(), &index].concat();
    write("store", &whole);
    write("packs-only", &packs);
    write("index-only", &index);
    let (packs, logs) = real_store(unclean.path(), false).await;
    write("store-with-logs", &[packs, logs].concat());
    for (n, at) in [whole.len() / 3, whole.len() / 2, whole.len() - 40].into_iter().enumerate() {
        write(&format!("truncated-{n}"), &whole[..at]);
    }
    for (n, at) in [30, 100, whole.len() / 2, whole.len() - 10].into_iter().enumerate() {
        let mut flipped = whole.clone();
        flipped[at] ^= 0x10;
        write(&format!("bit-flipped-{n}"), &flipped);
    }
}
