//! What Central has of a package, asked before anything is sent: one
//! GetExistingProbes per batch of paths, the batches at once, and for each
//! probe what to do with it given what Central has under its path. Under
//! `--verify`, Central first reads its own copies (VerifyProbes): a copy
//! found damaged is then left out of what it says it has, so the upload
//! sends it again and repairs it.

use std::collections::HashMap;

use probe_api::digest::Sha256Digest;
use probe_api::signing::ProbeSignature;
use probe_api::v1::verify_probes_response::Message;
use probe_api::v1::{GetExistingProbesRequest, ProbeInfo, VerifyProbesRequest};

use crate::admin::client::AdminClient;
use crate::admin::error::AdminError;
use crate::admin::package::{PackageIndex, PackageProbe};

/// Paths asked about per GetExistingProbes call: well inside the limits,
/// and a package's 16,000 probes in four calls that Central answers in
/// parallel.
const EXISTING_BATCH: usize = 4_000;

pub(super) enum Action {
    Send,
    /// Central has a file of this size: compare digests first.
    Compare(Sha256Digest),
    /// Central has other content under this path.
    Differs,
    /// Central has this very content.
    Identical,
}

/// What to do with one probe of the package, given what Central has under
/// its path. A digest Central sends must be well-formed: taking a malformed
/// one for some value would decide "identical" or "conflict" on nothing.
pub(super) fn decide(probe: &PackageProbe, existing: Option<&ProbeInfo>, verify: bool) -> Result<Action, AdminError> {
    let Some(info) = existing else { return Ok(Action::Send) };
    if info.size != probe.size || !same_signature(probe, info) {
        return Ok(Action::Differs);
    }
    match info.crc32 {
        Some(crc32) if !verify => Ok(if crc32 == probe.crc32 { Action::Identical } else { Action::Differs }),
        // Stored without a CRC-32, or the admin asked for SHA-256.
        _ => Sha256Digest::from_hex(&info.sha256)
            .map(Action::Compare)
            .ok_or_else(|| AdminError::BadReply(format!("a malformed SHA-256 {:?} for {}", info.sha256, probe.path))),
    }
}

/// Whether the package's signature of `probe` is, as far as Central's
/// listing tells, the one Central has: signed by the same key at the same
/// serial, or unsigned in both. (Two signings of one probe differ in their
/// bytes but say the same.)
fn same_signature(probe: &PackageProbe, info: &ProbeInfo) -> bool {
    let signed = probe
        .signature
        .as_deref()
        .map(|bytes| ProbeSignature::parse(bytes).map(|s| (s.key_id().to_string(), s.serial())).unwrap_or_default());
    let stored = (!info.signature_key_id.is_empty()).then(|| (info.signature_key_id.clone(), info.signature_serial));
    signed == stored
}

/// Has Central read every stored probe of the package's module versions
/// and check it against its record; the number of damaged copies found.
pub(super) async fn check_stored_copies(client: &mut AdminClient, index: &PackageIndex) -> Result<u64, AdminError> {
    let mut module_versions: Vec<String> = index.probes.iter().map(|p| p.path.module_version().to_string()).collect();
    module_versions.sort();
    module_versions.dedup();
    let what = "having Central check its stored copies (--verify)";
    let mut stream = client
        .verify_probes(VerifyProbesRequest { module_versions })
        .await
        .map_err(AdminError::rpc(what))?
        .into_inner();
    while let Some(message) = stream.message().await.map_err(AdminError::rpc(what))? {
        if let Some(Message::Summary(summary)) = message.message {
            return Ok(summary.damaged_count);
        }
    }
    Err(AdminError::BadReply("Central's verification ended without its summary".into()))
}

pub(super) async fn existing_probes(
    client: &mut AdminClient,
    index: &PackageIndex,
) -> Result<HashMap<String, ProbeInfo>, AdminError> {
    // The batches go at once, on the one connection, so that Central
    // answers them side by side: a re-upload is mostly this wait.
    let asked: Vec<_> = index
        .probes
        .chunks(EXISTING_BATCH)
        .map(|batch| {
            let paths = batch.iter().map(|p| p.path.to_string()).collect();
            let mut client = client.clone();
            tokio::spawn(async move { client.get_existing_probes(GetExistingProbesRequest { paths }).await })
        })
        .collect();
    let mut existing = HashMap::with_capacity(index.probes.len());
    for answer in asked {
        let response = answer
            .await
            .map_err(|e| AdminError::Internal(format!("asking Central which probes it has: {e}")))?
            .map_err(AdminError::rpc("asking Central which probes it has"))?;
        existing.extend(response.into_inner().probes.into_iter().map(|p| (p.path.clone(), p)));
    }
    Ok(existing)
}
