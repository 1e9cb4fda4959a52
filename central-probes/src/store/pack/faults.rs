//! Every write, fsync, truncation, rename and removal the pack store makes
//! goes through here, so that a test build (feature `testing`) can stop the
//! store at the Nth of them: that step and every later one fail, as if the
//! process had been killed there, and the test reopens the directory. In
//! other builds the counting compiles away.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

#[cfg(any(test, feature = "testing"))]
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Where the store stops, in a test build; nothing in others.
#[derive(Default)]
pub struct Faults {
    #[cfg(any(test, feature = "testing"))]
    stop_at: Option<u64>,
    #[cfg(any(test, feature = "testing"))]
    steps: AtomicU64,
    #[cfg(any(test, feature = "testing"))]
    stopped: AtomicBool,
    #[cfg(any(test, feature = "testing"))]
    syncs: AtomicU64,
}

impl Faults {
    /// Stops the store at its `n`th step (counted from 1).
    #[cfg(any(test, feature = "testing"))]
    pub fn stop_at(n: u64) -> Faults {
        Faults { stop_at: Some(n), ..Faults::default() }
    }

    /// Whether the store has stopped.
    #[cfg(any(test, feature = "testing"))]
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Steps taken so far.
    #[cfg(any(test, feature = "testing"))]
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::SeqCst)
    }

    /// Stops the store now: every later step fails.
    #[cfg(any(test, feature = "testing"))]
    pub fn stop_now(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// fsyncs made so far.
    #[cfg(any(test, feature = "testing"))]
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Counts one step; fails it, and all after it, from the stop on.
    #[inline]
    fn step(&self, what: &str) -> io::Result<()> {
        #[cfg(any(test, feature = "testing"))]
        {
            let n = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
            if self.stopped.load(Ordering::SeqCst) || self.stop_at == Some(n) {
                self.stopped.store(true, Ordering::SeqCst);
                return Err(io::Error::other(format!("the store was stopped (test step {n}, {what})")));
            }
        }
        let _ = what;
        Ok(())
    }

    pub(super) fn write_at(&self, file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.step("write")?;
        file.write_all_at(bytes, offset)
    }

    pub(super) fn sync(&self, file: &File) -> io::Result<()> {
        self.step("fsync")?;
        #[cfg(any(test, feature = "testing"))]
        self.syncs.fetch_add(1, Ordering::SeqCst);
        file.sync_data()
    }

    pub(super) fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.step("fsync")?;
        #[cfg(any(test, feature = "testing"))]
        self.syncs.fetch_add(1, Ordering::SeqCst);
        File::open(dir)?.sync_all()
    }

    pub(super) fn truncate(&self, file: &File, len: u64) -> io::Result<()> {
        self.step("truncate")?;
        file.set_len(len)
    }

    pub(super) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.step("rename")?;
        std::fs::rename(from, to)
    }

    pub(super) fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.step("remove")?;
        std::fs::remove_file(path)
    }

    /// Creates a new file for writing (and reading), failing if it exists.
    pub(super) fn create(&self, path: &Path) -> io::Result<File> {
        self.step("create")?;
        std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path)
    }
}
