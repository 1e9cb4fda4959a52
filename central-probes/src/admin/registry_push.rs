//! `central-probes package push`: a support package written to a registry
//! (or an OCI layout directory) in the layout of `oci::layout`.
//!
//! A blocking thread reads the zip probe by probe and hashes each one; up
//! to `CONCURRENCY` uploads run at once, each asking the registry first
//! (HEAD) and sending only what it lacks. Probes up to `WHOLE_BLOB_MAX`
//! travel as one PUT from memory; larger ones were hashed on the first
//! read and are read again in pieces, each a PATCH. Memory stays bounded
//! by the queue and the uploads in flight, whatever the package's size.
//! Shard manifests go up once every blob they name is there, and the tagged
//! index last: a reader never sees an index naming what is missing.
//!
//! What the tag names already (an earlier push of the same module version)
//! is read first: a registry accepts a manifest only once it has every blob
//! it names, so those blobs need no HEAD. Registries check credentials on
//! every request (bcrypt, for htpasswd), so a re-push of an unchanged
//! package then makes a few dozen requests instead of one per blob.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use probe_api::digest::{Sha256Digest, Sha256Hasher};
use probe_api::names::ModuleVersion;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::chunk_pool::ChunkPool;
use super::package::{Package, PackageProbe, PackageReads};
use super::progress::Progress;
use super::registry_target::{Target, WHOLE_BLOB_MAX};
use super::signatures::read_signatures;
use crate::oci::error::{OciResult, invalid};
use crate::oci::layout::{self, ProbeLayer};

/// Uploads at once.
const CONCURRENCY: usize = 8;
/// Probes read ahead of the uploads.
const QUEUE: usize = 8;

/// What a push did.
#[derive(Debug, Default)]
pub struct PushReport {
    pub probes: usize,
    pub signatures: usize,
    /// Blobs the target lacked and was sent, and their bytes.
    pub blobs_sent: usize,
    pub bytes_sent: u64,
    pub shards: usize,
    /// `sha256:...` of the tagged index.
    pub index_digest: String,
    pub module_version: String,
}

/// A probe read from the package, ready to upload.
struct ReadProbe {
    probe: PackageProbe,
    digest: Sha256Digest,
    /// Its bytes, unless over `WHOLE_BLOB_MAX` (then read again to send).
    bytes: Option<Bytes>,
}

/// Pushes the package at `package` to `target` under `tag` (the module
/// version when `None`).
pub async fn push(
    package: &Path,
    target: Arc<Target>,
    tag: Option<String>,
    progress: &Progress,
) -> OciResult<PushReport> {
    let (module_version, total) = {
        let package = package.to_owned();
        tokio::task::spawn_blocking(move || survey(&package)).await.map_err(|e| invalid(format!("reading: {e}")))??
    };
    let tag = tag.unwrap_or_else(|| module_version.to_string());
    crate::oci::reference::check_tag(&tag)?;
    progress.start(total);
    let (sender, mut receiver) = mpsc::channel(QUEUE);
    let reader = {
        let package = package.to_owned();
        tokio::task::spawn_blocking(move || read_probes(&package, sender))
    };
    let limit = Arc::new(Semaphore::new(CONCURRENCY));
    let mut uploads = JoinSet::new();
    let mut layers = Vec::new();
    let mut report = PushReport { module_version: module_version.to_string(), ..PushReport::default() };
    let known = Arc::new(target.known_blobs(&tag).await?);
    let empty = Sha256Digest::of(layout::EMPTY_CONFIG);
    if !known.contains(&empty) && !target.has_blob(&empty).await? {
        target.put_blob(&empty, Bytes::from_static(layout::EMPTY_CONFIG)).await?;
    }
    let mut collect = |result: Result<OciResult<(ProbeLayer, usize, u64)>, _>, report: &mut PushReport| {
        let (layer, sent, bytes) = result.map_err(|e| invalid(format!("an upload failed: {e}")))??;
        progress.inc(layer.size);
        report.blobs_sent += sent;
        report.bytes_sent += bytes;
        layers.push(layer);
        OciResult::Ok(())
    };
    while let Some(read) = receiver.recv().await {
        let permit = limit.clone().acquire_owned().await.expect("never closed");
        let (target, package, known) = (target.clone(), package.to_owned(), known.clone());
        uploads.spawn(async move {
            let _permit = permit;
            upload(&target, &package, read, &known).await
        });
        while let Some(result) = uploads.try_join_next() {
            collect(result, &mut report)?;
        }
    }
    while let Some(result) = uploads.join_next().await {
        collect(result, &mut report)?;
    }
    reader.await.map_err(|e| invalid(format!("reading: {e}")))??;
    progress.finish();
    report.probes = layers.len();
    report.signatures = layers.iter().filter(|l| l.signature.is_some()).count();
    let (index_digest, shards) = put_manifests(&target, &module_version, &tag, &layers, &known).await?;
    report.index_digest = index_digest;
    report.shards = shards;
    Ok(report)
}

/// The package's one module version and the bytes of its probes.
fn survey(path: &Path) -> OciResult<(ModuleVersion, u64)> {
    let mut package = Package::open(path, &PackageReads::default()).map_err(|e| invalid(e.to_string()))?;
    let index = package.index().map_err(|e| invalid(e.to_string()))?;
    let mut versions: Vec<&ModuleVersion> = index.probes.iter().map(|p| p.path.module_version()).collect();
    versions.sort();
    versions.dedup();
    match versions.as_slice() {
        [one] => Ok(((*one).clone(), index.probes.iter().map(|p| p.size).sum())),
        [] => Err(invalid(format!("{} holds no probes", path.display()))),
        many => Err(invalid(format!(
            "{} holds probes of {} module versions; a tag holds one: split the package (central-probes export per module version)",
            path.display(),
            many.len()
        ))),
    }
}

/// Reads and hashes every probe, in archive order, into `sender`.
fn read_probes(path: &Path, sender: mpsc::Sender<ReadProbe>) -> OciResult<()> {
    let mut package = Package::open(path, &PackageReads::default()).map_err(|e| invalid(e.to_string()))?;
    let mut index = package.index().map_err(|e| invalid(e.to_string()))?;
    read_signatures(&mut package, &mut index).map_err(|e| invalid(e.to_string()))?;
    let mut pool = ChunkPool::new(1 << 20, 4);
    for probe in index.probes {
        let mut hasher = Sha256Hasher::new();
        let whole = probe.size as usize <= WHOLE_BLOB_MAX;
        let mut bytes = Vec::with_capacity(if whole { probe.size as usize } else { 0 });
        package
            .read_entry(&probe, &mut pool, |chunk| {
                hasher.update(&chunk);
                if whole {
                    bytes.extend_from_slice(&chunk);
                }
                Ok(())
            })
            .map_err(|e| invalid(format!("{}: {}: {e}", path.display(), probe.path)))?;
        let read = ReadProbe { probe, digest: hasher.finish(), bytes: whole.then(|| Bytes::from(bytes)) };
        if sender.blocking_send(read).is_err() {
            // The uploads stopped on an error of their own.
            return Ok(());
        }
    }
    Ok(())
}

/// Sends a probe and its signature unless the target has them: its layer,
/// the blobs sent and their bytes.
async fn upload(
    target: &Target,
    package: &Path,
    read: ReadProbe,
    known: &HashSet<Sha256Digest>,
) -> OciResult<(ProbeLayer, usize, u64)> {
    let (mut sent, mut bytes) = (0, 0);
    if !known.contains(&read.digest) && !target.has_blob(&read.digest).await? {
        match read.bytes {
            Some(whole) => target.put_blob(&read.digest, whole).await?,
            None => target.put_blob_from_package(&read.digest, package, &read.probe).await?,
        }
        sent += 1;
        bytes += read.probe.size;
    }
    let signature = match &read.probe.signature {
        None => None,
        Some(signature) => {
            let digest = Sha256Digest::of(signature);
            if !known.contains(&digest) && !target.has_blob(&digest).await? {
                target.put_blob(&digest, signature.clone()).await?;
                sent += 1;
                bytes += signature.len() as u64;
            }
            Some((digest, signature.len() as u64))
        }
    };
    let layer = ProbeLayer {
        file_name: read.probe.path.file_name().clone(),
        digest: read.digest,
        size: read.probe.size,
        signature,
    };
    Ok((layer, sent, bytes))
}

/// Puts the shard manifests the target lacks, then the index under `tag`:
/// the index's digest and the shard count.
async fn put_manifests(
    target: &Target,
    module_version: &ModuleVersion,
    tag: &str,
    layers: &[ProbeLayer],
    known: &HashSet<Sha256Digest>,
) -> OciResult<(String, usize)> {
    let count = layout::shard_count(layers)?;
    let mut by_shard: Vec<Vec<&ProbeLayer>> = vec![Vec::new(); count];
    for layer in layers {
        by_shard[layout::shard_of(layer.file_name.as_str(), count)].push(layer);
    }
    let mut shards = Vec::with_capacity(count);
    for (shard, members) in by_shard.into_iter().enumerate() {
        let manifest = layout::shard_manifest(module_version, shard, members);
        let digest = Sha256Digest::of(&manifest);
        shards.push((digest, manifest.len() as u64));
        if !known.contains(&digest) && !target.has_manifest(&digest).await? {
            target.put_manifest(&layout::digest_text(&digest), layout::MANIFEST_MEDIA_TYPE, manifest.into()).await?;
        }
    }
    let index = layout::index(module_version, &shards);
    let digest = layout::digest_text(&Sha256Digest::of(&index));
    target.put_manifest(tag, layout::INDEX_MEDIA_TYPE, index.into()).await?;
    Ok((digest, count))
}
