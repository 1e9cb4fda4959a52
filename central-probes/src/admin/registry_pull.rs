//! `central-probes package pull`: a support package read back from a
//! registry into the zip any Central or roxctl takes.
//!
//! The index and its shard manifests are read first (each checked against
//! its digest), then the blobs: up to `CONCURRENCY` fetched at once, each
//! checked against its digest, and handed in order to a blocking thread
//! that writes the zip. Blobs over `WHOLE_BLOB_MAX` are streamed through
//! instead of held. The zip is written under a temporary name and renamed
//! into place once complete and fsync'd: a failed pull leaves nothing that
//! looks like a package.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use probe_api::digest::Sha256Hasher;
use probe_api::signing::SIGNATURE_SUFFIX;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use zip::ZipWriter;
use zip::write::SimpleFileOptions;

use super::progress::Progress;
use super::registry_target::WHOLE_BLOB_MAX;
use crate::oci::Registry;
use crate::oci::checked::{fetch_blob, mismatch, read_artifact};
use crate::oci::error::{OciResult, invalid};
use crate::oci::layout::{ProbeLayer, digest_text};

/// Blob fetches at once.
const CONCURRENCY: usize = 8;

/// What a pull wrote.
#[derive(Debug, Default)]
pub struct PullReport {
    pub probes: usize,
    pub signatures: usize,
    pub bytes: u64,
    pub module_version: String,
    pub index_digest: String,
}

/// A probe fetched, or to be streamed when large (`bytes` is `None`).
struct Fetched {
    layer: ProbeLayer,
    bytes: Option<Bytes>,
    signature: Option<Bytes>,
    /// Held until the probe is handed to the writer: fetched probes
    /// waiting their turn count against the concurrency too.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

enum Piece {
    Entry { name: String, size: u64 },
    Data(Bytes),
}

/// Pulls the package `tag` names into a zip at `out`.
pub async fn pull(registry: Arc<Registry>, tag: &str, out: &Path, progress: &Progress) -> OciResult<PullReport> {
    let (index, index_digest, probes) = read_artifact(&registry, tag).await?;
    let module_version = index.module_version.to_string();
    progress.start(probes.iter().map(|p| p.size).sum());
    let partial = partial_path(out);
    let file = File::create(&partial).map_err(|e| invalid(format!("creating {}: {e}", partial.display())))?;
    let (pieces, receiver) = mpsc::channel(16);
    let writer_path = partial.clone();
    let writer = tokio::task::spawn_blocking(move || write_zip(file, receiver, &writer_path));
    let report = PullReport {
        probes: probes.len(),
        signatures: probes.iter().filter(|p| p.signature.is_some()).count(),
        bytes: probes.iter().map(|p| p.size).sum(),
        module_version: module_version.clone(),
        index_digest,
    };
    let sent = send_probes(registry, probes, &module_version, pieces, progress).await;
    let written = writer.await.map_err(|e| invalid(format!("the zip writer failed: {e}")))?;
    let done = sent.and(written.map_err(|e| invalid(format!("writing {}: {e}", partial.display()))));
    if let Err(error) = done {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    std::fs::rename(&partial, out).map_err(|e| invalid(format!("renaming into {}: {e}", out.display())))?;
    if let Ok(dir) = File::open(out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))) {
        let _ = dir.sync_all();
    }
    progress.finish();
    Ok(report)
}

/// Fetches the probes concurrently and passes them on in order.
async fn send_probes(
    registry: Arc<Registry>,
    probes: Vec<ProbeLayer>,
    module_version: &str,
    pieces: mpsc::Sender<Piece>,
    progress: &Progress,
) -> OciResult<()> {
    let (fetches, mut in_order) = mpsc::channel::<JoinHandle<OciResult<Fetched>>>(CONCURRENCY);
    let limit = Arc::new(Semaphore::new(CONCURRENCY));
    let starter_registry = registry.clone();
    let starter = tokio::spawn(async move {
        for layer in probes {
            let permit = limit.clone().acquire_owned().await.expect("never closed");
            let registry = starter_registry.clone();
            let fetch = tokio::spawn(async move {
                let bytes = match layer.size as usize <= WHOLE_BLOB_MAX {
                    true => Some(fetch_blob(&registry, &layer.digest, layer.size).await?),
                    false => None,
                };
                let signature = match &layer.signature {
                    Some((digest, size)) => Some(fetch_blob(&registry, digest, *size).await?),
                    None => None,
                };
                Ok(Fetched { layer, bytes, signature, _permit: permit })
            });
            if fetches.send(fetch).await.is_err() {
                return;
            }
        }
    });
    let closed = || invalid("the zip writer stopped");
    let result = async {
        while let Some(fetch) = in_order.recv().await {
            let fetched = fetch.await.map_err(|e| invalid(format!("a fetch failed: {e}")))??;
            let name = format!("kernel-modules/{module_version}/{}", fetched.layer.file_name.as_str());
            pieces.send(Piece::Entry { name: name.clone(), size: fetched.layer.size }).await.map_err(|_| closed())?;
            match fetched.bytes {
                Some(bytes) => pieces.send(Piece::Data(bytes)).await.map_err(|_| closed())?,
                None => stream_blob(&registry, &fetched.layer, &pieces).await?,
            }
            progress.inc(fetched.layer.size);
            if let Some(signature) = fetched.signature {
                let entry = Piece::Entry { name: format!("{name}{SIGNATURE_SUFFIX}"), size: signature.len() as u64 };
                pieces.send(entry).await.map_err(|_| closed())?;
                pieces.send(Piece::Data(signature)).await.map_err(|_| closed())?;
            }
        }
        OciResult::Ok(())
    }
    .await;
    starter.abort();
    result
}

/// Streams a large blob to the writer, checking its digest at the end.
async fn stream_blob(registry: &Registry, layer: &ProbeLayer, pieces: &mpsc::Sender<Piece>) -> OciResult<()> {
    let text = digest_text(&layer.digest);
    let mut answer = registry.get_blob(&text).await?;
    let (mut hasher, mut received) = (Sha256Hasher::new(), 0u64);
    while let Some(chunk) = answer.chunk().await? {
        received += chunk.len() as u64;
        if received > layer.size {
            return Err(mismatch(registry, &text));
        }
        hasher.update(&chunk);
        pieces.send(Piece::Data(chunk)).await.map_err(|_| invalid("the zip writer stopped"))?;
    }
    if received != layer.size || hasher.finish() != layer.digest {
        return Err(mismatch(registry, &text));
    }
    Ok(())
}

fn write_zip(file: File, mut pieces: mpsc::Receiver<Piece>, path: &Path) -> std::io::Result<()> {
    let zip_error = |e: zip::result::ZipError| std::io::Error::other(e);
    let mut zip = ZipWriter::new(BufWriter::with_capacity(64 << 10, file));
    // Probes are gzip files already: deflating them again gains nothing.
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    while let Some(piece) = pieces.blocking_recv() {
        match piece {
            Piece::Entry { name, size } => {
                zip.start_file(name, options.large_file(size >= u64::from(u32::MAX))).map_err(zip_error)?
            }
            Piece::Data(bytes) => zip.write_all(&bytes)?,
        }
    }
    let file = zip.finish().map_err(zip_error)?.into_inner().map_err(|e| e.into_error())?;
    file.sync_all().map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
}

/// Beside `out`, so that the rename is atomic.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_owned();
    name.push(".partial");
    out.with_file_name(name)
}
