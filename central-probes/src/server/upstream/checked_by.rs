//! Which trusted keys the probes in the upstream cache were checked by. The
//! cache outlives a run of Central, and a probe in it is served without a
//! new check: when Central starts with other keys, or with none, the cache
//! is emptied. The record is a fingerprint of the keys themselves, not of
//! their ids: anyone can make a key with the id of another, so a swap
//! under the same id must empty the cache too.

use std::path::Path;

use probe_api::signing::TrustedKeys;
use tracing::info;

use crate::error::{Error, Result};
use crate::store::filesystem::FilesystemStore;

/// Where the upstream cache records the keys its probes were checked by.
const CHECKED_BY: &str = "checked-by";

/// Empties the upstream cache in `cache_dir` unless what it holds was
/// checked by exactly `keys` (or, without keys, not checked at all): a
/// cache kept by an earlier run under other keys, or none, may hold probes
/// these keys would refuse. Then records `keys`. Before the cache opens.
pub fn forget_cache_checked_otherwise(cache_dir: &Path, keys: Option<&TrustedKeys>) -> Result<()> {
    let wanted = match keys {
        Some(keys) => format!("kprobes upstream cache checked by the keys of SHA-256 {}\n", keys.fingerprint()),
        None => "kprobes upstream cache checked by no keys\n".to_owned(),
    };
    let marker = cache_dir.join(CHECKED_BY);
    let io = |what: &'static str| move |e| Error::io(format!("{what} the upstream cache"), e);
    match std::fs::read_to_string(&marker) {
        Ok(recorded) if recorded == wanted => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && keys.is_none() => {}
        _ => {
            FilesystemStore::empty(cache_dir)?;
            info!("emptied the upstream cache: its probes were not checked by the trusted keys given now");
        }
    }
    std::fs::create_dir_all(cache_dir).map_err(io("creating"))?;
    crate::private_file::replace(&marker, wanted.as_bytes()).map_err(io("marking"))
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    use super::*;

    /// A new key's `minisign.pub` line, with its key id replaced by `id`'s
    /// when given.
    fn key_line(id_of: Option<&str>) -> String {
        let keys = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let mut binary = STANDARD.decode(keys.pk.to_base64()).unwrap();
        if let Some(other) = id_of {
            binary[2..10].copy_from_slice(&STANDARD.decode(other).unwrap()[2..10]);
        }
        STANDARD.encode(binary)
    }

    fn cached_probe(cache_dir: &Path) -> std::path::PathBuf {
        cache_dir.join("probes/2.5.0/collector-ebpf-6.1.0.o.gz")
    }

    fn put_probe(cache_dir: &Path) {
        let probe = cached_probe(cache_dir);
        std::fs::create_dir_all(probe.parent().unwrap()).unwrap();
        std::fs::write(probe, b"checked by the keys of the run that fetched it").unwrap();
    }

    #[test]
    fn the_cache_is_kept_under_the_same_keys_and_emptied_when_a_key_is_swapped_under_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let original = key_line(None);
        let keys = TrustedKeys::parse(&original).unwrap();
        let impostor = TrustedKeys::parse(&key_line(Some(&original))).unwrap();
        assert_eq!(keys.key_ids().collect::<Vec<_>>(), impostor.key_ids().collect::<Vec<_>>());

        forget_cache_checked_otherwise(dir.path(), Some(&keys)).unwrap();
        put_probe(dir.path());
        forget_cache_checked_otherwise(dir.path(), Some(&keys)).unwrap();
        assert!(cached_probe(dir.path()).exists(), "the same keys keep the cache");

        forget_cache_checked_otherwise(dir.path(), Some(&impostor)).unwrap();
        assert!(!cached_probe(dir.path()).exists(), "another key under the same id empties it");
    }

    #[test]
    fn the_cache_is_emptied_when_keys_are_added_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (key_line(None), key_line(None));
        let one = TrustedKeys::parse(&first).unwrap();
        let two = TrustedKeys::parse(&format!("{first}\n{second}\n")).unwrap();
        let steps: [(Option<&TrustedKeys>, bool); 5] =
            [(None, true), (Some(&one), false), (Some(&two), false), (Some(&one), false), (None, false)];
        for (step, (keys, kept)) in steps.into_iter().enumerate() {
            put_probe(dir.path());
            forget_cache_checked_otherwise(dir.path(), keys).unwrap();
            assert_eq!(cached_probe(dir.path()).exists(), kept, "step {step}");
        }
    }
}
