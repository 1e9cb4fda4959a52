//! Any bytes as a support package: opening, indexing and reading entries
//! must fail with an error, never panic, hang or run out of memory.
#![no_main]

use std::sync::OnceLock;

use central_probes::admin::chunk_pool::ChunkPool;
use central_probes::admin::package::{Package, PackageReads};
use libfuzzer_sys::fuzz_target;

/// Entries declaring more than this are skipped: the reader bounds what it
/// reads by the declared size, and a fuzzer-made 4 GiB declaration would
/// only measure inflate speed.
const MAX_ENTRY: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let path = DIR.get_or_init(|| tempfile::tempdir().unwrap()).path().join("package.zip");
    std::fs::write(&path, data).unwrap();
    let Ok(mut package) = Package::open(&path, &PackageReads::default()) else { return };
    let Ok(index) = package.index() else { return };
    let mut pool = ChunkPool::new(64 << 10, 4);
    for probe in index.probes.iter().filter(|p| p.size <= MAX_ENTRY).take(64) {
        let mut total = 0u64;
        let _ = package.read_entry(probe, &mut pool, |chunk| {
            total += chunk.len() as u64;
            assert!(total <= probe.size, "read past the declared size");
            Ok(())
        });
    }
});
