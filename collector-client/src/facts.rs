//! The node's facts as `collector-client facts -o json` prints them: what
//! `get-probe` derives its kernel names from, and the names, one JSON
//! object a line, so that a coverage check before a kernel rollout asks
//! for exactly what the node will ask for.

use crate::candidates::HostFacts;

/// The os-release values the candidates are derived from.
const OS_RELEASE_KEYS: [&str; 3] = ["ID", "BUILD_ID", "PRETTY_NAME"];

/// `host` is `None` when the candidates were given (`KERNEL_CANDIDATES`),
/// which replaces everything read from the host.
pub fn to_json(
    host: Option<&HostFacts>,
    collection_method: &str,
    module_version: Option<&str>,
    candidates: &[String],
) -> serde_json::Value {
    let os_release: serde_json::Map<String, serde_json::Value> = OS_RELEASE_KEYS
        .into_iter()
        .filter_map(|key| Some((key.to_owned(), host?.os_release.get(key)?.clone().into())))
        .collect();
    serde_json::json!({
        "kernel": host.map(|h| &h.release),
        "uname_v": host.map(|h| &h.version),
        "os_release": os_release,
        "hostname": host.map(|h| &h.hostname),
        "etc_version": host.and_then(|h| h.version_file.as_deref()?.lines().next()),
        "collection_method": collection_method,
        "module_version": module_version,
        "candidates": candidates,
        "candidates_given": host.is_none(),
    })
}
