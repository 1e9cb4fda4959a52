//! What the fuzz targets share: a scratch directory in RAM, and for the
//! upload targets a per-file store with a runtime, kept for the whole run,
//! and the check that an upload left no temporary file behind.

#![allow(dead_code)] // each target uses a different part of it

use std::sync::Arc;

use central_probes::store::ProbeStore;
use central_probes::store::filesystem::{FilesystemStore, FilesystemStoreConfig};

/// A scratch directory in RAM when there is one: the store syncs every
/// commit, which on a disk would make most of a run's time.
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap()
}

/// A per-file store in a scratch directory, and a runtime to drive it.
pub struct World {
    pub runtime: tokio::runtime::Runtime,
    pub store: Arc<dyn ProbeStore>,
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn new() -> World {
        let dir = scratch_dir();
        let config = FilesystemStoreConfig { data_dir: dir.path().to_owned(), min_free_bytes: 0 };
        let store: Arc<dyn ProbeStore> = Arc::new(FilesystemStore::open(&config).unwrap());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        World { runtime, store, dir }
    }

    /// Panics when a temporary file stays behind after an upload ended.
    pub fn assert_no_temporary_file(&self) {
        // Writers dropped mid-file remove their file from their own thread.
        for _ in 0..200 {
            if std::fs::read_dir(self.dir.path().join("tmp")).unwrap().count() == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("a temporary file stayed behind");
    }
}
