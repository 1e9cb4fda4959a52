//! The node-local cache (`--cache-dir`): probes a Collector on this node
//! got over the network, kept so that a Collector restarted while Central
//! is away does not crash-loop although the right probe was here a minute
//! ago.
//!
//! A probe is kept as its source served it (gzip'd), at
//! `<dir>/<module version>/collector-ebpf-<kernel>.o.gz`, with its SHA-256
//! in hex beside it (`.sha256`) and its signature when it had one
//! (`.minisig`), so that the signature policy checks a cached probe as it
//! checks a fetched one; each is written to a temporary file and renamed,
//! the file last. It is used only when no remote source could be reached
//! for the whole retry budget, and only if it still hashes to its digest;
//! one that does not (a torn write, a damaged disk) is deleted.

use std::io;
use std::path::{Path, PathBuf};

use probe_api::digest::Sha256Digest;
use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
use probe_api::signing::SIGNATURE_SUFFIX;

pub struct ProbeCache {
    dir: PathBuf,
}

/// A kept probe: its path, its file (gzip'd) and its signature.
pub struct Kept {
    pub path: ProbePath,
    pub file: Vec<u8>,
    pub signature: Option<Vec<u8>>,
}

impl ProbeCache {
    pub fn new(dir: &Path) -> Self {
        ProbeCache { dir: dir.to_owned() }
    }

    /// Where the probe of `kernel` lives: its file, digest and signature.
    fn paths(&self, module_version: &ModuleVersion, kernel: &str) -> Option<(ProbePath, [PathBuf; 3])> {
        // Kernel names come from the host or the environment: one that is
        // not a valid probe name is never a path here.
        let name = ProbeFileName::ebpf(kernel).ok()?;
        let file = self.dir.join(module_version.as_str()).join(name.as_str());
        let digest = file.with_extension("gz.sha256");
        let signature = PathBuf::from(format!("{}{SIGNATURE_SUFFIX}", file.display()));
        Some((ProbePath::new(module_version.clone(), name), [file, digest, signature]))
    }

    /// Keeps the probe file for `kernel` and its signature.
    pub fn keep(
        &self,
        module_version: &ModuleVersion,
        kernel: &str,
        file: &[u8],
        signature: Option<&[u8]>,
    ) -> io::Result<()> {
        let Some((_, [path, digest_path, signature_path])) = self.paths(module_version, kernel) else { return Ok(()) };
        let dir = path.parent().expect("a module directory");
        std::fs::create_dir_all(dir)?;
        match signature {
            Some(signature) => write_atomically(&signature_path, signature)?,
            None => match std::fs::remove_file(&signature_path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            },
        }
        write_atomically(&digest_path, Sha256Digest::of(file).to_hex().as_bytes())?;
        write_atomically(&path, file)
    }

    /// The kept probe for `kernel`, if there is one that hashes to its
    /// digest; one that does not is deleted (with its digest).
    pub fn verified(&self, module_version: &ModuleVersion, kernel: &str) -> Option<Kept> {
        let (probe_path, [path, digest_path, signature_path]) = self.paths(module_version, kernel)?;
        let file = std::fs::read(&path).ok()?;
        let expected = std::fs::read_to_string(&digest_path).ok().and_then(|hex| Sha256Digest::from_hex(hex.trim()));
        if expected == Some(Sha256Digest::of(&file)) {
            let signature = std::fs::read(&signature_path).ok();
            return Some(Kept { path: probe_path, file, signature });
        }
        tracing::warn!(path = %path.display(), "a cached probe does not match its digest: deleted, not used");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&digest_path);
        None
    }
}

/// Writes `bytes` to `<path>.part`, fsyncs it and renames it to `path`.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    // The whole name with ".part" after it: a probe's digest and signature,
    // `<file>.sha256` and `<file>.minisig`, never share a temporary file.
    let mut temp = path.as_os_str().to_owned();
    temp.push(".part");
    let temp = PathBuf::from(temp);
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
        cache.keep(&version, "5.4.0-1", b"a gzip'd probe", Some(b"its signature")).unwrap();
        let kept = cache.verified(&version, "5.4.0-1").unwrap();
        assert_eq!(
            (kept.file.as_slice(), kept.signature.as_deref()),
            (&b"a gzip'd probe"[..], Some(&b"its signature"[..]))
        );
        assert_eq!(kept.path.to_string(), "2.5.0/collector-ebpf-5.4.0-1.o.gz");
        assert!(cache.verified(&version, "5.4.0-2").is_none(), "another kernel");
        assert!(cache.verified(&ModuleVersion::parse("2.6.0").unwrap(), "5.4.0-1").is_none(), "another version");
        cache.keep(&version, "5.4.0-1", b"a gzip'd probe", None).unwrap();
        assert_eq!(cache.verified(&version, "5.4.0-1").unwrap().signature, None, "an unsigned copy drops the old one");

        let path = dir.path().join("2.5.0/collector-ebpf-5.4.0-1.o.gz");
        std::fs::write(&path, b"a gzip'd probE").unwrap();
        assert!(cache.verified(&version, "5.4.0-1").is_none());
        assert!(!path.exists(), "the damaged probe is gone");
        assert!(cache.verified(&version, "../../etc/passwd").is_none());
    }
}
