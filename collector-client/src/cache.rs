//! The node-local cache (`--cache-dir`): probes a Collector on this node
//! got over the network, kept so that a Collector restarted while Central
//! is away does not crash-loop although the right probe was here a minute
//! ago.
//!
//! A probe is kept decompressed, as written to `--out`, at
//! `<dir>/<module version>/collector-ebpf-<kernel>.o`, with its SHA-256 in
//! hex beside it (`.sha256`); each is written to a temporary file and
//! renamed, the digest first. It is used only when no remote source could
//! be reached for the whole retry budget, and only if it still hashes to
//! its digest; one that does not (a torn write, a damaged disk) is deleted.

use std::io;
use std::path::{Path, PathBuf};

use probe_api::digest::Sha256Digest;
use probe_api::names::ModuleVersion;

pub struct ProbeCache {
    dir: PathBuf,
}

impl ProbeCache {
    pub fn new(dir: &Path) -> Self {
        ProbeCache { dir: dir.to_owned() }
    }

    fn paths(&self, module_version: &ModuleVersion, kernel: &str) -> Option<(PathBuf, PathBuf)> {
        // Kernel names come from the host or the environment: one that is
        // not a valid probe name is never a path here.
        let name = probe_api::names::ProbeFileName::ebpf(kernel).ok()?;
        let probe = self.dir.join(module_version.as_str()).join(name.as_str().trim_end_matches(".gz"));
        let digest = probe.with_extension("o.sha256");
        Some((probe, digest))
    }

    /// Keeps `probe`, the decompressed probe for `kernel`.
    pub fn keep(&self, module_version: &ModuleVersion, kernel: &str, probe: &[u8]) -> io::Result<()> {
        let Some((path, digest_path)) = self.paths(module_version, kernel) else { return Ok(()) };
        let dir = path.parent().expect("a module directory");
        std::fs::create_dir_all(dir)?;
        let digest = Sha256Digest::of(probe).to_hex();
        write_atomically(&digest_path, digest.as_bytes())?;
        write_atomically(&path, probe)
    }

    /// The kept probe for `kernel`, if there is one that hashes to its
    /// digest; one that does not is deleted (with its digest).
    pub fn verified(&self, module_version: &ModuleVersion, kernel: &str) -> Option<Vec<u8>> {
        let (path, digest_path) = self.paths(module_version, kernel)?;
        let probe = std::fs::read(&path).ok()?;
        let expected = std::fs::read_to_string(&digest_path).ok().and_then(|hex| Sha256Digest::from_hex(hex.trim()));
        if expected == Some(Sha256Digest::of(&probe)) {
            return Some(probe);
        }
        tracing::warn!(path = %path.display(), "a cached probe does not match its digest: deleted, not used");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&digest_path);
        None
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = path.with_extension("part");
    std::fs::write(&temp, bytes)?;
    std::fs::File::open(&temp)?.sync_all()?;
    std::fs::rename(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_probe_comes_back_and_a_damaged_one_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ProbeCache::new(dir.path());
        let version = ModuleVersion::parse("2.5.0").unwrap();
        cache.keep(&version, "5.4.0-1", b"an eBPF object").unwrap();
        assert_eq!(cache.verified(&version, "5.4.0-1").as_deref(), Some(&b"an eBPF object"[..]));
        assert_eq!(cache.verified(&version, "5.4.0-2"), None, "another kernel");
        assert_eq!(cache.verified(&ModuleVersion::parse("2.6.0").unwrap(), "5.4.0-1"), None, "another version");

        let path = dir.path().join("2.5.0/collector-ebpf-5.4.0-1.o");
        std::fs::write(&path, b"an eBPF objecT").unwrap();
        assert_eq!(cache.verified(&version, "5.4.0-1"), None);
        assert!(!path.exists(), "the damaged probe is gone");
        assert!(cache.verified(&version, "../../etc/passwd").is_none());
    }
}
