//! An OCI registry as the upstream (`serve --upstream-oci`): support
//! packages pushed with `package push` (`oci::layout`), the tag being the
//! module version asked for.
//!
//! On a miss Central reads the tag's index (kept for `index_ttl`, then
//! revalidated by a HEAD that compares its digest), the probe's shard
//! manifest (kept by digest: a digest names the same bytes forever), then
//! the probe's blob and its signature blob, streaming the blob into the
//! cache, which checks it against the digest the manifest gives (DATA_LOSS
//! and nothing cached when it differs) and, with trusted keys, its
//! signature. A missing tag or probe is NOT_FOUND naming the registry; a
//! registry that cannot be reached is UNAVAILABLE. Whether it has probes
//! (`has`, for coverage checks) is read from the same index and shard
//! manifests, never by downloading a probe. Every read is bounded:
//! manifests by the 4 MiB registries accept, blobs by their manifest's size.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use tonic::Code;

use crate::error::{Error, Result};
use crate::oci::checked::{fetch_blob, read_manifest};
use crate::oci::layout::{self, PackageIndex, ProbeLayer, digest_text};
use crate::oci::{OciError, OciErrorKind, Registry};
use crate::store::{ExpectedDigests, ProbeStore};

/// Shard manifests kept; beyond, the cache starts over (a few module
/// versions of 64 shards each fit).
const MAX_CACHED_SHARDS: usize = 1024;

/// A tag's index as last read.
struct CachedIndex {
    index: Arc<PackageIndex>,
    digest: String,
    checked: Instant,
}

pub struct RegistryUpstream {
    registry: Registry,
    index_ttl: Duration,
    indexes: Mutex<HashMap<String, CachedIndex>>,
    shards: Mutex<HashMap<Sha256Digest, Arc<Vec<ProbeLayer>>>>,
    /// Manifest requests made so far (what a coverage check reports).
    requests: AtomicU32,
}

impl RegistryUpstream {
    pub fn new(registry: Registry, index_ttl: Duration) -> Self {
        RegistryUpstream {
            registry,
            index_ttl,
            indexes: Default::default(),
            shards: Default::default(),
            requests: AtomicU32::new(0),
        }
    }

    /// Fetches `path` into `cache`: its size.
    pub async fn fetch(&self, path: &ProbePath, cache: &dyn ProbeStore) -> Result<Option<u64>> {
        let layer = self.layer(path).await?;
        let signature = match &layer.signature {
            Some((digest, size)) => Some(fetch_blob(&self.registry, digest, *size).await.map_err(status)?),
            None => None,
        };
        let mut answer = self.registry.get_blob(&digest_text(&layer.digest)).await.map_err(status)?;
        let mut writer = cache.create(path.clone(), layer.size).await?;
        if let Some(signature) = signature {
            writer.set_signature(signature);
        }
        let mut received = 0u64;
        while let Some(chunk) = answer.chunk().await.map_err(status)? {
            received += chunk.len() as u64;
            if received > layer.size {
                return Err(self.damaged(path, &format!("more than the {} bytes its manifest says", layer.size)));
            }
            writer.write(chunk).await?;
        }
        if received != layer.size {
            return Err(self.damaged(path, &format!("{received} bytes where its manifest says {}", layer.size)));
        }
        // The cache checks the bytes against the manifest's digest.
        let commit = writer.finish(ExpectedDigests::from(layer.digest), true).await?;
        commit.await.map_err(|e| match e.code {
            Code::DataLoss | Code::InvalidArgument => self.damaged(path, &e.message),
            _ => e,
        })?;
        Ok(Some(layer.size))
    }

    fn damaged(&self, path: &ProbePath, why: &str) -> Error {
        Error::new(
            Code::DataLoss,
            format!(
                "upstream {}: the blob of {path} is damaged ({why}); nothing was cached: push the package again",
                self.registry.name()
            ),
        )
    }

    /// Which of `paths` the registry has, from the indexes of their module
    /// versions and the shard manifests they fall in (a tag that does not
    /// exist has none of them); and the registry requests it took.
    pub async fn has(&self, paths: &[ProbePath]) -> Result<(Vec<bool>, u32)> {
        let before = self.requests.load(Ordering::Relaxed);
        let mut has = vec![false; paths.len()];
        let mut indexes: HashMap<&str, Option<Arc<PackageIndex>>> = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let tag = path.module_version().as_str();
            if !indexes.contains_key(tag) {
                let index = match self.index(tag).await {
                    Ok(index) => Some(index),
                    Err(e) if e.code == Code::NotFound => None,
                    Err(e) => return Err(e),
                };
                indexes.insert(tag, index);
            }
            let Some(index) = &indexes[tag] else { continue };
            let (digest, _) = index.shards[layout::shard_of(path.file_name().as_str(), index.shards.len())];
            has[i] = self.shard(&digest).await?.iter().any(|layer| layer.file_name == *path.file_name());
        }
        Ok((has, self.requests.load(Ordering::Relaxed).wrapping_sub(before)))
    }

    /// The layer of `path` in its tag's artifact.
    async fn layer(&self, path: &ProbePath) -> Result<ProbeLayer> {
        let tag = path.module_version().as_str();
        let index = self.index(tag).await?;
        let (digest, _) = index.shards[layout::shard_of(path.file_name().as_str(), index.shards.len())];
        let shard = self.shard(&digest).await?;
        let found = shard.iter().find(|layer| layer.file_name == *path.file_name()).cloned();
        found.ok_or_else(|| {
            Error::new(
                Code::NotFound,
                format!("upstream {}:{tag} has no probe {}", self.registry.name(), path.file_name()),
            )
        })
    }

    async fn index(&self, tag: &str) -> Result<Arc<PackageIndex>> {
        let known = self.indexes().get(tag).map(|c| (c.index.clone(), c.digest.clone(), c.checked.elapsed()));
        if let Some((index, digest, age)) = &known {
            if *age < self.index_ttl {
                return Ok(index.clone());
            }
            // Stale: a HEAD says whether the tag still names the same index.
            self.requests.fetch_add(1, Ordering::Relaxed);
            if self.registry.manifest_digest(tag).await.map_err(status)?.as_deref() == Some(digest.as_str()) {
                if let Some(cached) = self.indexes().get_mut(tag) {
                    cached.checked = Instant::now();
                }
                return Ok(index.clone());
            }
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let Some((bytes, media_type)) = self.registry.get_manifest(tag).await.map_err(status)? else {
            self.indexes().remove(tag);
            return Err(Error::new(
                Code::NotFound,
                format!("upstream {} has no tag {tag}: push that module version's package there", self.registry.name()),
            ));
        };
        let index = layout::parse_index(&bytes, &media_type)
            .map_err(|e| status(e.context(format!("upstream {}:{tag}", self.registry.name()))))?;
        let index = Arc::new(index);
        let digest = digest_text(&Sha256Digest::of(&bytes));
        self.indexes().insert(tag.to_owned(), CachedIndex { index: index.clone(), digest, checked: Instant::now() });
        Ok(index)
    }

    async fn shard(&self, digest: &Sha256Digest) -> Result<Arc<Vec<ProbeLayer>>> {
        if let Some(shard) = self.shards().get(digest) {
            return Ok(shard.clone());
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let bytes = read_manifest(&self.registry, digest).await.map_err(status)?;
        let shard = Arc::new(layout::parse_shard(&bytes).map_err(|e| status(e.context(self.registry.name())))?);
        let mut shards = self.shards();
        if shards.len() >= MAX_CACHED_SHARDS {
            shards.clear();
        }
        shards.insert(*digest, shard.clone());
        Ok(shard)
    }

    fn indexes(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedIndex>> {
        self.indexes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shards(&self) -> std::sync::MutexGuard<'_, HashMap<Sha256Digest, Arc<Vec<ProbeLayer>>>> {
        self.shards.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A registry failure as Central answers it.
fn status(error: OciError) -> Error {
    let code = match error.kind {
        OciErrorKind::NotFound => Code::NotFound,
        OciErrorKind::DataLoss => Code::DataLoss,
        // Not a support package: refused like an unsigned probe, saying why.
        OciErrorKind::Invalid => Code::FailedPrecondition,
        OciErrorKind::Unauthorized | OciErrorKind::Refused | OciErrorKind::Unavailable => Code::Unavailable,
    };
    Error::new(code, format!("upstream: {}", error.message))
}
