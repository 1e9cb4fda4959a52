//! Reads checked against the digest that names them: a manifest by
//! digest, a blob held whole, a tag's whole artifact (index and shards). A registry whose bytes differ from their
//! digest has a damaged copy; nothing read from it is used.

use bytes::Bytes;
use probe_api::digest::Sha256Digest;

use super::Registry;
use super::error::{OciError, OciErrorKind, OciResult};
use super::layout::{self, PackageIndex, ProbeLayer, digest_text};

/// A manifest by digest, checked against it.
pub async fn read_manifest(registry: &Registry, digest: &Sha256Digest) -> OciResult<Vec<u8>> {
    let text = digest_text(digest);
    let (bytes, _) = registry.get_manifest(&text).await?.ok_or_else(|| {
        OciError::new(
            OciErrorKind::NotFound,
            format!("{} lacks the manifest {text} its index names: push the package again", registry.name()),
        )
    })?;
    if Sha256Digest::of(&bytes) != *digest {
        return Err(mismatch(registry, &text));
    }
    Ok(bytes)
}

pub fn mismatch(registry: &Registry, digest: &str) -> OciError {
    OciError::new(
        OciErrorKind::DataLoss,
        format!(
            "{}: {digest} does not match its digest: the registry's copy is damaged; push the package again",
            registry.name()
        ),
    )
}

/// A blob whole, at most `size` bytes, checked against its digest.
pub async fn fetch_blob(registry: &Registry, digest: &Sha256Digest, size: u64) -> OciResult<Bytes> {
    let text = digest_text(digest);
    let answer = registry.get_blob(&text).await?;
    let bytes = answer
        .bytes(size as usize, &format!("{}: blob {text}", registry.name()))
        .await
        .map_err(|e| OciError::new(OciErrorKind::DataLoss, format!("{e}, more than its manifest says")))?;
    if Sha256Digest::of(&bytes) != *digest {
        return Err(mismatch(registry, &text));
    }
    Ok(Bytes::from(bytes))
}

/// The index `tag` names and its probes, read and checked.
pub async fn read_artifact(registry: &Registry, tag: &str) -> OciResult<(PackageIndex, String, Vec<ProbeLayer>)> {
    let Some((bytes, media_type)) = registry.get_manifest(tag).await? else {
        return Err(OciError::new(
            OciErrorKind::NotFound,
            format!(
                "{} has no tag {tag} (or no such repository): `skopeo list-tags docker://{}` lists the tags there",
                registry.name(),
                registry.name()
            ),
        ));
    };
    let index =
        layout::parse_index(&bytes, &media_type).map_err(|e| e.context(format!("{}:{tag}", registry.name())))?;
    let mut probes = Vec::new();
    for (digest, _) in &index.shards {
        let shard = read_manifest(registry, digest).await?;
        probes.extend(layout::parse_shard(&shard).map_err(|e| e.context(registry.name()))?);
    }
    probes.sort_by(|a, b| a.file_name.as_str().cmp(b.file_name.as_str()));
    Ok((index, digest_text(&Sha256Digest::of(&bytes)), probes))
}
