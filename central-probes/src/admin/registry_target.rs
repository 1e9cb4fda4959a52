//! Where `package push` writes: a registry, or an OCI image layout
//! directory (`--oci-layout`, what `skopeo copy oci:DIR:TAG` reads). Both
//! take blobs and manifests by digest and the index by tag.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::chunk_pool::ChunkPool;
use super::package::{Package, PackageProbe, PackageReads};
use crate::oci::Registry;
use crate::oci::checked::read_artifact;
use crate::oci::error::{OciErrorKind, OciResult, invalid};
use crate::oci::layout::{self, digest_text};

/// Probes up to this size are held whole; larger ones are sent (and
/// pulled) in pieces of this size.
pub const WHOLE_BLOB_MAX: usize = 4 << 20;

pub enum Target {
    Registry(Box<Registry>),
    /// An OCI image layout directory.
    Layout(PathBuf),
}

impl Target {
    /// Makes the layout directory's skeleton (a registry needs nothing).
    pub fn prepare(&self) -> OciResult<()> {
        let Target::Layout(dir) = self else { return Ok(()) };
        let io = |e: std::io::Error| invalid(format!("writing the OCI layout {}: {e}", dir.display()));
        std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(io)?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io)
    }

    pub fn name(&self) -> String {
        match self {
            Target::Registry(registry) => registry.name(),
            Target::Layout(dir) => format!("oci:{}", dir.display()),
        }
    }

    /// The blobs and shard manifests the support package `tag` names
    /// already: none when there is no such tag, or it names something else.
    pub async fn known_blobs(&self, tag: &str) -> OciResult<HashSet<Sha256Digest>> {
        let Target::Registry(registry) = self else { return Ok(HashSet::new()) };
        match read_artifact(registry, tag).await {
            Ok((index, _, probes)) => {
                let mut known: HashSet<Sha256Digest> = index.shards.iter().map(|(digest, _)| *digest).collect();
                known.insert(Sha256Digest::of(layout::EMPTY_CONFIG));
                for probe in probes {
                    known.insert(probe.digest);
                    known.extend(probe.signature.map(|(digest, _)| digest));
                }
                Ok(known)
            }
            Err(e) if matches!(e.kind, OciErrorKind::NotFound | OciErrorKind::Invalid) => Ok(HashSet::new()),
            Err(e) => Err(e),
        }
    }

    pub async fn has_blob(&self, digest: &Sha256Digest) -> OciResult<bool> {
        match self {
            Target::Registry(registry) => registry.has_blob(&digest_text(digest)).await,
            Target::Layout(dir) => Ok(blob_path(dir, digest).exists()),
        }
    }

    pub async fn has_manifest(&self, digest: &Sha256Digest) -> OciResult<bool> {
        match self {
            Target::Registry(registry) => Ok(registry.manifest_digest(&digest_text(digest)).await?.is_some()),
            Target::Layout(dir) => Ok(blob_path(dir, digest).exists()),
        }
    }

    pub async fn put_blob(&self, digest: &Sha256Digest, bytes: Bytes) -> OciResult<()> {
        match self {
            Target::Registry(registry) => registry.put_blob(&digest_text(digest), bytes).await,
            Target::Layout(dir) => write_blob(dir, digest, &[bytes]),
        }
    }

    /// Sends a probe too large to hold, read again from the package in
    /// pieces.
    pub async fn put_blob_from_package(
        &self,
        digest: &Sha256Digest,
        package: &Path,
        probe: &PackageProbe,
    ) -> OciResult<()> {
        let (sender, mut pieces) = mpsc::channel::<OciResult<Bytes>>(2);
        let (package, probe) = (package.to_owned(), probe.clone());
        let reader = tokio::task::spawn_blocking(move || {
            let mut opened = Package::open(&package, &PackageReads::default()).map_err(|e| e.to_string())?;
            let mut pool = ChunkPool::new(WHOLE_BLOB_MAX, 2);
            opened
                .read_entry(&probe, &mut pool, |chunk| {
                    sender
                        .blocking_send(Ok(chunk.into_bytes()))
                        .map_err(|_| std::io::Error::other("the upload stopped"))
                })
                .map_err(|e| format!("{}: {e}", probe.path))
        });
        let sent = match self {
            Target::Registry(registry) => registry.put_blob_chunked(&digest_text(digest), &mut pieces).await,
            Target::Layout(dir) => {
                let path = blob_path(dir, digest);
                let io = |e: std::io::Error| invalid(format!("writing {}: {e}", path.display()));
                let mut file = tempfile::NamedTempFile::new_in(dir.join("blobs/sha256")).map_err(io)?;
                while let Some(piece) = pieces.recv().await.transpose()? {
                    file.write_all(&piece).map_err(io)?;
                }
                file.persist(&path).map(drop).map_err(|e| io(e.error))
            }
        };
        drop(pieces);
        let read = reader.await.map_err(|e| invalid(format!("reading the package: {e}")))?;
        sent?;
        read.map_err(invalid)
    }

    /// Stores a manifest by digest; a `reference` that is a tag also names
    /// it (the registry's tag, or the layout's `index.json` entry).
    pub async fn put_manifest(&self, reference: &str, media_type: &str, bytes: Bytes) -> OciResult<()> {
        match self {
            Target::Registry(registry) => registry.put_manifest(reference, media_type, bytes).await,
            Target::Layout(dir) => {
                let digest = Sha256Digest::of(&bytes);
                write_blob(dir, &digest, std::slice::from_ref(&bytes))?;
                if reference.starts_with("sha256:") {
                    return Ok(());
                }
                tag_in_layout(dir, reference, media_type, &digest, bytes.len())
            }
        }
    }
}

fn blob_path(dir: &Path, digest: &Sha256Digest) -> PathBuf {
    dir.join("blobs/sha256").join(digest.to_hex())
}

/// Writes a blob under a temporary name, renamed into place once whole.
fn write_blob(dir: &Path, digest: &Sha256Digest, pieces: &[Bytes]) -> OciResult<()> {
    let path = blob_path(dir, digest);
    let io = |e: std::io::Error| invalid(format!("writing {}: {e}", path.display()));
    let mut file = tempfile::NamedTempFile::new_in(dir.join("blobs/sha256")).map_err(io)?;
    for piece in pieces {
        file.write_all(piece).map_err(io)?;
    }
    file.persist(&path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Points `tag` in the layout's `index.json` at the manifest `digest`.
fn tag_in_layout(dir: &Path, tag: &str, media_type: &str, digest: &Sha256Digest, size: usize) -> OciResult<()> {
    const REF_NAME: &str = "org.opencontainers.image.ref.name";
    let path = dir.join("index.json");
    let io = |e: std::io::Error| invalid(format!("writing {}: {e}", path.display()));
    let mut manifests: Vec<Value> = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|index| index.get("manifests").and_then(Value::as_array).cloned())
            .ok_or_else(|| invalid(format!("{} is not an OCI layout index", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(e)),
    };
    manifests.retain(|m| m.get("annotations").and_then(|a| a.get(REF_NAME)).and_then(Value::as_str) != Some(tag));
    manifests.push(json!({"mediaType": media_type, "artifactType": layout::SUPPORT_PACKAGE_TYPE,
        "digest": digest_text(digest), "size": size, "annotations": {REF_NAME: tag}}));
    let index = json!({"schemaVersion": 2, "mediaType": layout::INDEX_MEDIA_TYPE, "manifests": manifests});
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    file.write_all(&serde_json::to_vec(&index).expect("plain JSON")).map_err(io)?;
    file.persist(&path).map_err(|e| io(e.error))?;
    Ok(())
}
