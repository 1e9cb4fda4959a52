//! Opening the stores Central keeps on its disk: the uploaded probes (in
//! packs or a file each), the upstream cache and the local copies of
//! database probes, off the runtime's threads; and a stopped Central's
//! store, to verify it (`open_to_verify`).

use std::sync::Arc;

use probe_api::signing::TrustedKeys;

use crate::error::{Error, Result};
use crate::server::metrics::Metrics;
use crate::store::ProbeStore;
use crate::store::backend::Backend;
use crate::store::filesystem::{FilesystemStore, FilesystemStoreConfig};
use crate::store::pack::{BatchLimits, CompactionLimits, PackStore, PackStoreConfig};
use crate::store::verified::VerifiedStore;

/// How the data directory keeps uploaded probes (`--store-layout`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StoreLayout {
    /// Records appended to pack files, a group commit per batch
    /// (`store::pack`), compacted in the background; a per-file data
    /// directory is converted at start.
    Packs { compaction: CompactionLimits, batch: BatchLimits },
    /// A file per probe, each committed by its own fsync and rename
    /// (`store::filesystem`): the layout before packs.
    Files,
}

impl Default for StoreLayout {
    fn default() -> Self {
        StoreLayout::Packs { compaction: CompactionLimits::default(), batch: BatchLimits::default() }
    }
}

/// Opens the store of uploaded probes in `data_dir` off the runtime's
/// threads (lock, index, a conversion: blocking work), checking
/// signatures by `keys` if given.
pub(super) async fn open_uploaded(
    data_dir: &std::path::Path,
    min_free_bytes: u64,
    layout: StoreLayout,
    keys: Option<&TrustedKeys>,
    metrics: &Metrics,
) -> Result<Arc<dyn ProbeStore>> {
    let what = "the probe store";
    Ok(match layout {
        StoreLayout::Files => {
            Arc::new(checked(open_store(data_dir, min_free_bytes, what).await?, keys, metrics, "upload"))
        }
        StoreLayout::Packs { compaction, batch } => {
            let config = PackStoreConfig { min_free_bytes, compaction, batch, ..PackStoreConfig::new(data_dir) };
            let store = open_blocking(what, move || PackStore::open(&config)).await?;
            Arc::new(checked(store, keys, metrics, "upload"))
        }
    })
}

/// `store`, refusing from now on what `keys` (if any) did not sign, and
/// counting the damaged probes its reads find under `at`.
pub(super) fn checked<B: Backend>(
    store: VerifiedStore<B>,
    keys: Option<&TrustedKeys>,
    metrics: &Metrics,
    at: &'static str,
) -> VerifiedStore<B> {
    let store = store.reporting_damage(metrics.on_damaged(at));
    match keys {
        None => store,
        Some(keys) => store.checking_signatures(keys.clone(), metrics.on_signature_refused(at)),
    }
}

/// Opens a filesystem store (lock, leftovers, index: blocking work) off
/// the runtime's threads.
pub(super) async fn open_store(data_dir: &std::path::Path, min_free_bytes: u64, what: &str) -> Result<FilesystemStore> {
    open_filesystem(data_dir, min_free_bytes, what, FilesystemStore::open).await
}

/// `open_store` for the local copies of database probes: emptied at start
/// and never fsync'd (`FilesystemStore::open_cache`).
pub(super) async fn open_copies(data_dir: &std::path::Path, min_free_bytes: u64) -> Result<FilesystemStore> {
    open_filesystem(data_dir, min_free_bytes, "the local copies of database probes", FilesystemStore::open_cache).await
}

async fn open_filesystem(
    data_dir: &std::path::Path,
    min_free_bytes: u64,
    what: &str,
    open: fn(&FilesystemStoreConfig) -> Result<FilesystemStore>,
) -> Result<FilesystemStore> {
    let config = FilesystemStoreConfig { data_dir: data_dir.to_owned(), min_free_bytes };
    open_blocking(what, move || open(&config)).await
}

/// Runs `open` (a store's start-up: blocking work) off the runtime's
/// threads; its errors say that they happened opening `what`.
async fn open_blocking<T: Send + 'static>(what: &str, open: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(open)
        .await
        .map_err(|e| Error::internal(format!("opening {what}: {e}")))?
        .map_err(|e| e.context(format!("opening {what}")))
}

/// The store of uploaded probes in the data directory of a stopped Central,
/// in the layout it holds (packs, or a file per probe), opened to be read:
/// no compaction, no conversion between layouts.
pub async fn open_to_verify(data_dir: &std::path::Path) -> Result<Arc<dyn ProbeStore>> {
    let holds = |name: &str| std::fs::read_dir(data_dir.join(name)).is_ok_and(|mut dir| dir.next().is_some());
    let what = format!("the probe store in {}", data_dir.display());
    let in_use = |e: Error| match e.code {
        tonic::Code::FailedPrecondition => Error::new(
            e.code,
            format!("{e}; verify a running Central over its API: central-probes verify -e HOST:PORT --ca FILE"),
        ),
        _ => e,
    };
    if holds("packs") || holds("index") {
        let compaction = CompactionLimits { below_live_fraction: 0.0, ..CompactionLimits::default() };
        let config = PackStoreConfig { compaction, ..PackStoreConfig::new(data_dir) };
        let store = open_blocking(&what, move || PackStore::open(&config)).await.map_err(in_use)?;
        return Ok(Arc::new(store));
    }
    if holds("probes") {
        return Ok(Arc::new(open_store(data_dir, 0, &what).await.map_err(in_use)?));
    }
    Err(Error::new(
        tonic::Code::NotFound,
        format!(
            "{} holds no probe store (neither packs/ nor probes/): is it Central's --data-dir?",
            data_dir.display()
        ),
    ))
}
