//! How a support package is laid out as an OCI artifact (docs/registry.md).
//!
//! The tag (the module version) names an image index of artifact type
//! `SUPPORT_PACKAGE_TYPE`; it lists shard manifests, each of at most
//! `MAX_SHARD_LAYERS` layers, because registries refuse manifests over
//! 4 MiB. A probe's shard is the first 8 bytes of the SHA-256 of its file
//! name, modulo the shard count (a power of two, in the index's
//! annotations), so a reader finds one probe with the index and one shard.
//! Each probe is one layer (its digest the SHA-256 of its bytes, its title
//! annotation its file name), and its minisign signature, when it has one,
//! the layer after it (title `<file name>.minisig`): both are reachable from
//! the tag, so every copy that follows the index carries them. The JSON is
//! compact, its fields and layers in a fixed order: the same package
//! always makes the same digests.
//!
//! Copiers may rewrite the index: `skopeo copy --all` (1.9) re-encodes it
//! without its `artifactType` and its own annotations, keeping each entry's
//! media type, digest, size and annotations, and the shard manifests byte
//! for byte. So each entry says its shard and the module version, and a
//! reader needs nothing else of the index.

use probe_api::digest::Sha256Digest;
use probe_api::limits::MAX_FILE_SIZE;
use probe_api::names::{ModuleVersion, ProbeFileName};
use probe_api::signing::{MAX_SIGNATURE_LEN, SIGNATURE_SUFFIX};
use serde_json::{Value, json};

use super::error::{OciResult, invalid};

pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The index's `artifactType`.
pub const SUPPORT_PACKAGE_TYPE: &str = "application/vnd.kprobes.support-package.v1";
/// A shard manifest's `artifactType`.
pub const SHARD_TYPE: &str = "application/vnd.kprobes.support-package.shard.v1";
/// A probe layer: a gzip'd eBPF object or kernel module.
pub const PROBE_MEDIA_TYPE: &str = "application/vnd.kprobes.probe.v1+gzip";
/// A probe's minisign signature.
pub const SIGNATURE_MEDIA_TYPE: &str = "application/vnd.kprobes.probe.signature.v1";
/// The config of every shard manifest: `{}`.
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_CONFIG: &[u8] = b"{}";

pub const TITLE: &str = "org.opencontainers.image.title";
pub const MODULE_VERSION: &str = "dev.kprobes.module-version";
pub const SHARDS: &str = "dev.kprobes.shards";
pub const SHARD: &str = "dev.kprobes.shard";

/// At most this many layers per shard manifest (ECR takes about 500).
pub const MAX_SHARD_LAYERS: usize = 256;
/// The most shards an index may name.
pub const MAX_SHARDS: usize = 4096;

/// `sha256:<hex>`.
pub fn digest_text(digest: &Sha256Digest) -> String {
    format!("sha256:{}", digest.to_hex())
}

fn parse_digest(text: &str) -> OciResult<Sha256Digest> {
    text.strip_prefix("sha256:")
        .and_then(Sha256Digest::from_hex)
        .ok_or_else(|| invalid(format!("{:?} is not a sha256 digest", probe_api::errors::remote_text(text))))
}

/// One probe of the artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeLayer {
    pub file_name: ProbeFileName,
    pub digest: Sha256Digest,
    pub size: u64,
    /// The signature blob's digest and size.
    pub signature: Option<(Sha256Digest, u64)>,
}

/// The shard of `file_name` among `count` (a power of two).
pub fn shard_of(file_name: &str, count: usize) -> usize {
    let digest = Sha256Digest::of(file_name.as_bytes());
    let first = u64::from_be_bytes(digest.0[..8].try_into().expect("8 bytes"));
    (first % count as u64) as usize
}

/// The fewest shards (a power of two) that keep every shard within
/// `MAX_SHARD_LAYERS`.
pub fn shard_count(probes: &[ProbeLayer]) -> OciResult<usize> {
    let mut count = 1;
    loop {
        let mut layers = vec![0usize; count];
        for probe in probes {
            layers[shard_of(probe.file_name.as_str(), count)] += 1 + usize::from(probe.signature.is_some());
        }
        if layers.iter().all(|&n| n <= MAX_SHARD_LAYERS) {
            return Ok(count);
        }
        count *= 2;
        if count > MAX_SHARDS {
            return Err(invalid(format!("the package's probes do not fit {MAX_SHARDS} shard manifests")));
        }
    }
}

fn layer(media_type: &str, digest: &Sha256Digest, size: u64, title: &str) -> Value {
    json!({"mediaType": media_type, "digest": digest_text(digest), "size": size, "annotations": {TITLE: title}})
}

/// The shard manifest of `probes` (all of one shard), compact JSON.
pub fn shard_manifest(module_version: &ModuleVersion, shard: usize, mut probes: Vec<&ProbeLayer>) -> Vec<u8> {
    probes.sort_by(|a, b| a.file_name.as_str().cmp(b.file_name.as_str()));
    let mut layers = Vec::new();
    for probe in probes {
        let name = probe.file_name.as_str();
        layers.push(layer(PROBE_MEDIA_TYPE, &probe.digest, probe.size, name));
        if let Some((digest, size)) = &probe.signature {
            layers.push(layer(SIGNATURE_MEDIA_TYPE, digest, *size, &format!("{name}{SIGNATURE_SUFFIX}")));
        }
    }
    let empty = Sha256Digest::of(EMPTY_CONFIG);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": SHARD_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": digest_text(&empty), "size": EMPTY_CONFIG.len(), "data": "e30="},
        "layers": layers,
        "annotations": {MODULE_VERSION: module_version.as_str(), SHARD: shard.to_string()},
    });
    serde_json::to_vec(&manifest).expect("JSON of plain values")
}

/// The index of the shard manifests, given in shard order (digest, size).
pub fn index(module_version: &ModuleVersion, shards: &[(Sha256Digest, u64)]) -> Vec<u8> {
    let manifests: Vec<Value> = shards
        .iter()
        .enumerate()
        .map(|(i, (digest, size))| {
            json!({"mediaType": MANIFEST_MEDIA_TYPE, "artifactType": SHARD_TYPE, "digest": digest_text(digest),
                   "size": size, "annotations": {SHARD: i.to_string(), MODULE_VERSION: module_version.as_str()}})
        })
        .collect();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "artifactType": SUPPORT_PACKAGE_TYPE,
        "manifests": manifests,
        "annotations": {MODULE_VERSION: module_version.as_str(), SHARDS: shards.len().to_string()},
    });
    serde_json::to_vec(&index).expect("JSON of plain values")
}

/// What an index says: the module version and its shards in order.
#[derive(Clone, Debug)]
pub struct PackageIndex {
    pub module_version: ModuleVersion,
    pub shards: Vec<(Sha256Digest, u64)>,
}

/// Reads an index, refusing anything that is not a support package
/// (naming its media type).
pub fn parse_index(bytes: &[u8], content_type: &str) -> OciResult<PackageIndex> {
    let json: Value = serde_json::from_slice(bytes).map_err(|e| invalid(format!("the index is not JSON: {e}")))?;
    let text = |value: &Value, key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
    let media_type = Some(text(&json, "mediaType")).filter(|t| !t.is_empty()).unwrap_or(content_type.to_owned());
    let artifact_type = text(&json, "artifactType");
    let manifests = json.get("manifests").and_then(Value::as_array).cloned().unwrap_or_default();
    let annotation = |value: &Value, key: &str| value.get("annotations").map(|a| text(a, key)).unwrap_or_default();
    // The index's own artifact type may have been dropped by a copy; its
    // entries' annotations are not.
    let shards_named = !manifests.is_empty()
        && manifests
            .iter()
            .enumerate()
            .all(|(i, m)| text(m, "mediaType") == MANIFEST_MEDIA_TYPE && annotation(m, SHARD) == i.to_string());
    let kind_ok = artifact_type.is_empty() || artifact_type == SUPPORT_PACKAGE_TYPE;
    if media_type != INDEX_MEDIA_TYPE || !kind_ok || !shards_named {
        let shown = |t: &str| format!("{:?}", probe_api::errors::remote_text(t));
        let artifact =
            if artifact_type.is_empty() { String::new() } else { format!(", artifact type {}", shown(&artifact_type)) };
        return Err(invalid(format!(
            "not a support package: its media type is {}{artifact} (a support package is an index of \
             artifact type {SUPPORT_PACKAGE_TYPE} whose entries are its shards)",
            shown(&media_type)
        )));
    }
    let module_version = Some(annotation(&json, MODULE_VERSION))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| annotation(&manifests[0], MODULE_VERSION));
    let module_version =
        ModuleVersion::parse(&module_version).map_err(|e| invalid(format!("the index's module version: {e}")))?;
    if !manifests.len().is_power_of_two() || manifests.len() > MAX_SHARDS {
        return Err(invalid(format!(
            "the index names {} shards, not a power of two up to {MAX_SHARDS}",
            manifests.len()
        )));
    }
    let mut shards = Vec::with_capacity(manifests.len());
    for manifest in &manifests {
        let size = manifest.get("size").and_then(Value::as_u64).ok_or_else(|| invalid("a shard without its size"))?;
        shards.push((parse_digest(&text(manifest, "digest"))?, size));
    }
    Ok(PackageIndex { module_version, shards })
}

/// Reads a shard manifest: its probes, each with its signature if any.
pub fn parse_shard(bytes: &[u8]) -> OciResult<Vec<ProbeLayer>> {
    let json: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("a shard manifest is not JSON: {e}")))?;
    if json.get("artifactType").and_then(Value::as_str) != Some(SHARD_TYPE) {
        return Err(invalid(format!("a manifest of the index is not a shard of a support package ({SHARD_TYPE})")));
    }
    let mut probes: Vec<ProbeLayer> = Vec::new();
    for layer in json.get("layers").and_then(Value::as_array).into_iter().flatten() {
        let field = |key: &str| layer.get(key).and_then(Value::as_str).unwrap_or_default();
        let title = layer.get("annotations").and_then(|a| a.get(TITLE)).and_then(Value::as_str).unwrap_or_default();
        let digest = parse_digest(field("digest"))?;
        let size = layer.get("size").and_then(Value::as_u64).ok_or_else(|| invalid("a layer without its size"))?;
        let name_error = |e| invalid(format!("a layer titled {:?}: {e}", probe_api::errors::remote_text(title)));
        match field("mediaType") {
            PROBE_MEDIA_TYPE => {
                if size > MAX_FILE_SIZE {
                    return Err(invalid(format!("the probe {title} is {size} bytes, over {MAX_FILE_SIZE}")));
                }
                let file_name = ProbeFileName::parse(title).map_err(name_error)?;
                probes.push(ProbeLayer { file_name, digest, size, signature: None });
            }
            SIGNATURE_MEDIA_TYPE => {
                let owner = title.strip_suffix(SIGNATURE_SUFFIX).unwrap_or_default();
                let probe = probes.last_mut().filter(|p| p.file_name.as_str() == owner);
                let probe =
                    probe.ok_or_else(|| invalid(format!("the signature {title:?} does not follow its probe")))?;
                if size > MAX_SIGNATURE_LEN as u64 {
                    return Err(invalid(format!("the signature {title} is {size} bytes, over {MAX_SIGNATURE_LEN}")));
                }
                probe.signature = Some((digest, size));
            }
            other => {
                return Err(invalid(format!(
                    "a layer of media type {:?} is not part of a support package",
                    probe_api::errors::remote_text(other)
                )));
            }
        }
    }
    Ok(probes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(kernel: &str, signed: bool) -> ProbeLayer {
        ProbeLayer {
            file_name: ProbeFileName::ebpf(kernel).unwrap(),
            digest: Sha256Digest::of(kernel.as_bytes()),
            size: 10,
            signature: signed.then(|| (Sha256Digest::of(b"sig"), 3)),
        }
    }

    #[test]
    fn shards_stay_within_their_layer_limit_and_round_trip() {
        let probes: Vec<ProbeLayer> = (0..3000).map(|i| probe(&format!("5.{i}.0-1"), i % 2 == 0)).collect();
        let count = shard_count(&probes).unwrap();
        assert!(count.is_power_of_two() && count >= 4500 / MAX_SHARD_LAYERS, "{count}");
        let module = ModuleVersion::parse("2.5.0").unwrap();
        let mut shards = Vec::new();
        let mut read = Vec::new();
        for shard in 0..count {
            let members: Vec<&ProbeLayer> =
                probes.iter().filter(|p| shard_of(p.file_name.as_str(), count) == shard).collect();
            let manifest = shard_manifest(&module, shard, members);
            read.extend(parse_shard(&manifest).unwrap());
            shards.push((Sha256Digest::of(&manifest), manifest.len() as u64));
        }
        read.sort_by(|a, b| a.file_name.as_str().cmp(b.file_name.as_str()));
        let mut expected = probes.clone();
        expected.sort_by(|a, b| a.file_name.as_str().cmp(b.file_name.as_str()));
        assert_eq!(read, expected);
        let bytes = index(&module, &shards);
        let parsed = parse_index(&bytes, "").unwrap();
        assert_eq!((parsed.module_version.as_str(), &parsed.shards), ("2.5.0", &shards));
        // As `skopeo copy --all` re-encodes it: no artifact type, no
        // annotations of the index itself.
        let mut copied: Value = serde_json::from_slice(&bytes).unwrap();
        let copied = copied.as_object_mut().unwrap();
        copied.remove("artifactType");
        copied.remove("annotations");
        for entry in copied["manifests"].as_array_mut().unwrap() {
            entry.as_object_mut().unwrap().remove("artifactType");
        }
        let parsed = parse_index(&serde_json::to_vec(&copied).unwrap(), "").unwrap();
        assert_eq!((parsed.module_version.as_str(), parsed.shards), ("2.5.0", shards));
    }

    #[test]
    fn an_artifact_of_another_kind_is_refused_naming_its_media_type() {
        let image = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
        let error = parse_index(image, "").unwrap_err().message;
        assert!(error.contains("not a support package") && error.contains("image.manifest.v1+json"), "{error}");
    }
}
