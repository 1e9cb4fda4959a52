//! The embedded store: one file per probe under a data directory.
//!
//! Layout: `probes/<module version>/<probe file name>` holds a header
//! (magic, size, SHA-256, CRC-32, signature length; `format.rs`) followed
//! by the probe's bytes and its signature, so a probe, its digests and its
//! signature are committed together by a single rename; `tmp/` holds
//! files being written. A file is written to `tmp/`, verified, fsync'd,
//! renamed into place, and its directory fsync'd. A crash can leave files in
//! `tmp/` only; they are removed at start-up. An exclusive lock on `lock`
//! keeps a second Central off the same directory.
//!
//! The index of all probes (path, size, digests) is kept in memory, built at
//! start-up from the headers, so existence checks and listings never touch
//! the disk. This is a `Backend`: it stages bytes by blocking writes on the
//! lane that hashes them (`store::lanes`) and commits under its index lock;
//! `FilesystemStore` is it behind `VerifiedStore`, which hashes, verifies
//! and keeps the disk floor.

pub(in crate::store) mod entry;
pub(in crate::store) mod format;
mod index;
mod reader;
mod snapshot;
mod state;
#[cfg(test)]
mod tests;
mod writer;

#[cfg(any(test, feature = "testing"))]
pub use reader::{flip_a_byte, read_probe_file};

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use probe_api::names::{ModuleVersion, ProbePath};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::store::backend::{Backend, Stage};
use crate::store::disk::{DAMAGE_FILE, available_bytes, load_or_create_key, lock_data_dir, sync_dir};
use crate::store::verified::VerifiedStore;
use crate::store::{ModuleSummary, ProbeReader, StoredProbe, list_range};

use entry::stored;
use format::remove_leftovers;
use index::load_index;
use reader::open_probe;
use state::Inner;
use writer::FsStaging;

/// Settings of the embedded store.
#[derive(Clone, Debug)]
pub struct FilesystemStoreConfig {
    pub data_dir: PathBuf,
    /// Writes are refused when they would leave less free space than this.
    pub min_free_bytes: u64,
}

/// The embedded store: the filesystem backend behind verification.
pub type FilesystemStore = VerifiedStore<FilesystemBackend>;

/// Probes as files under a data directory.
pub struct FilesystemBackend {
    inner: Arc<Inner>,
}

impl FilesystemStore {
    /// Opens (creating if needed) the store under `config.data_dir`: takes
    /// the directory lock, removes leftovers of interrupted writes and loads
    /// the index. Blocking.
    pub fn open(config: &FilesystemStoreConfig) -> Result<Self> {
        Ok(VerifiedStore::new(FilesystemBackend::open(&config.data_dir, true)?, config.min_free_bytes))
    }

    /// Opens the store as a cache of copies that can be fetched again: it
    /// starts empty (whatever an earlier run left is removed) and skips the
    /// fsyncs, since a copy a crash may have torn is never read again.
    /// Commits are as atomic as ever (a temporary file renamed into place).
    pub fn open_cache(config: &FilesystemStoreConfig) -> Result<Self> {
        Self::empty(&config.data_dir)?;
        Ok(VerifiedStore::new(FilesystemBackend::open(&config.data_dir, false)?, config.min_free_bytes))
    }

    /// Removes every probe of the (closed) store in `data_dir`, and its
    /// index snapshot.
    pub fn empty(data_dir: &Path) -> Result<()> {
        for old in ["probes", "index.snapshot", DAMAGE_FILE] {
            let path = data_dir.join(old);
            let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("emptying {}", path.display()), e)),
            }
        }
        Ok(())
    }

    /// Number of probes stored.
    pub fn len(&self) -> usize {
        self.backend().inner.index().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FilesystemBackend {
    fn open(data_dir: &Path, durable: bool) -> Result<Self> {
        let probes_dir = data_dir.join("probes");
        let tmp_dir = data_dir.join("tmp");
        for dir in [data_dir, &probes_dir, &tmp_dir] {
            fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let lock = lock_data_dir(data_dir)?;
        // Probes uploaded into packs would be missing from this layout's
        // view, and uploads would go on beside them.
        if fs::read_dir(data_dir.join("packs")).is_ok_and(|mut packs| packs.next().is_some()) {
            return Err(Error::new(
                tonic::Code::FailedPrecondition,
                format!(
                    "{} holds a pack store: serve it with --store-layout packs, or export its probes and import \
                     them into an empty directory",
                    data_dir.display()
                ),
            ));
        }
        let page_token_key = load_or_create_key(&data_dir.join("page-token.key"))?;
        let leftovers = remove_leftovers(&tmp_dir)?;
        if leftovers > 0 {
            info!(leftovers, "removed unfinished writes of an earlier run");
        }
        let (index, stats) = load_index(&probes_dir, snapshot::read(data_dir))?;
        info!(
            probes = index.len(),
            module_dirs_from_snapshot = stats.from_snapshot,
            module_dirs_read = stats.from_disk,
            data_dir = %data_dir.display(),
            "probe store opened"
        );
        if stats.from_disk > 0
            && let Err(error) = snapshot::write(data_dir, &probes_dir, &index)
        {
            warn!(%error, "could not write the index snapshot; the next start reads every probe");
        }
        Ok(FilesystemBackend {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_owned(),
                probes_dir,
                tmp_dir,
                index: Mutex::new(index),
                next_temp: AtomicU64::new(0),
                page_token_key,
                durable,
                _lock: lock,
            }),
        })
    }
}

#[tonic::async_trait]
impl Backend for FilesystemBackend {
    async fn stat_many(&self, paths: &[ProbePath]) -> Result<Vec<Option<StoredProbe>>> {
        let index = self.inner.index();
        Ok(paths.iter().map(|path| index.get(path).map(|entry| stored(path.clone(), entry.clone()))).collect())
    }

    async fn list(
        &self,
        module_version: Option<&ModuleVersion>,
        after: Option<&ProbePath>,
        limit: usize,
    ) -> Result<Vec<StoredProbe>> {
        let index = self.inner.index();
        Ok(list_range(&index, module_version, after)
            .take(limit)
            .map(|(path, entry)| stored(path.clone(), entry.clone()))
            .collect())
    }

    async fn summaries(&self) -> Result<Vec<ModuleSummary>> {
        let mut summaries: Vec<(ModuleSummary, Vec<PathBuf>)> = Vec::new();
        for (path, entry) in self.inner.index().iter() {
            if summaries.last().is_none_or(|(summary, _)| &summary.module_version != path.module_version()) {
                let summary = ModuleSummary {
                    module_version: path.module_version().clone(),
                    probes: 0,
                    bytes: 0,
                    last_stored: None,
                };
                summaries.push((summary, Vec::new()));
            }
            let (summary, files) = summaries.last_mut().expect("just pushed");
            summary.probes += 1;
            summary.bytes += entry.size;
            files.push(self.inner.final_path(path));
        }
        // A probe file is written whole, then renamed into place: its
        // modification time is when it was stored. One stat per probe, off
        // the runtime's threads.
        let summaries = tokio::task::spawn_blocking(move || {
            let modified = |file: &PathBuf| fs::metadata(file).and_then(|m| m.modified()).ok();
            let unix =
                |time: std::time::SystemTime| time.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs());
            summaries
                .into_iter()
                .map(|(summary, files)| ModuleSummary {
                    last_stored: files.iter().filter_map(modified).max().and_then(unix),
                    ..summary
                })
                .collect()
        })
        .await
        .map_err(|e| Error::internal(format!("summing up the store: {e}")))?;
        Ok(summaries)
    }

    async fn stage(&self, path: &ProbePath, _size: u64) -> Result<Stage> {
        Ok(Stage::Blocking(Box::new(FsStaging::start(&self.inner, path)?)))
    }

    fn available_bytes(&self) -> Result<u64> {
        available_bytes(&self.inner.tmp_dir)
    }

    async fn open(&self, path: &ProbePath) -> Result<Option<ProbeReader>> {
        if self.inner.entry(path).is_none() {
            return Ok(None);
        }
        // Opened and first chunk read on the calling thread, as nginx does:
        // a probe is usually one chunk and in the page cache, and a hop to a
        // blocking thread would cost more than the read.
        let file_path = self.inner.final_path(path);
        open_probe(path.clone(), &file_path)
    }

    fn page_token_key(&self) -> &[u8] {
        &self.inner.page_token_key
    }

    async fn location(&self, path: &ProbePath) -> String {
        self.inner.final_path(path).display().to_string()
    }

    /// None for a cache of copies: it starts empty, and a damaged copy is
    /// fetched again.
    fn damage_file(&self) -> Option<PathBuf> {
        self.inner.durable.then(|| self.inner.data_dir.join(DAMAGE_FILE))
    }

    async fn remove(&self, path: &ProbePath) -> Result<bool> {
        let inner = self.inner.clone();
        let path = path.clone();
        tokio::task::spawn_blocking(move || remove_probe(&inner, &path))
            .await
            .map_err(|e| Error::internal(format!("removing a probe: {e}")))?
    }
}

fn remove_probe(inner: &Inner, path: &ProbePath) -> Result<bool> {
    let file_path = inner.final_path(path);
    let mut index = inner.index();
    if index.remove(path).is_none() {
        return Ok(false);
    }
    match fs::remove_file(&file_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            drop(index);
            return Err(Error::io(format!("removing {path}"), e));
        }
    }
    drop(index);
    if let Some(dir) = file_path.parent() {
        sync_dir(dir).map_err(|e| Error::io(format!("syncing the directory of {path}"), e))?;
    }
    Ok(true)
}
