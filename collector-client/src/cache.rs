//! The node-local cache (`--cache-dir`): probes a Collector on this node
//! got over the network, kept so that a Collector restarted while Central
//! is away does not crash-loop although the right probe was here a minute
//! ago.
//!
//! A probe is kept as its source served it (gzip'd), at
//! `<dir>/<module version>/collector-ebpf-<kernel>.o.gz`, with its SHA-256
//! in hex beside it (`.sha256`) and its signature when it had one
//! (`.minisig`), so that the signature policy checks a cached probe as it
//! checks a fetched one; each is replaced whole through [`Dir`] (never
//! through a planted symlink), the file last. It is used only when no remote source could be reached
//! for the whole retry budget, and only if it still hashes to its digest;
//! one that does not (a torn write, a damaged disk) is deleted.

use std::io;
use std::path::{Path, PathBuf};

use probe_api::digest::Sha256Digest;
use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
use probe_api::signing::{MAX_SIGNATURE_LEN, SIGNATURE_SUFFIX};

use crate::chain::{self, Served};
use crate::files::Dir;
use crate::limits::MAX_PROBE_FILE;
use crate::report::{NotServed, Outcome, Tried};
use crate::signatures::SignaturePolicy;

pub struct ProbeCache {
    dir: PathBuf,
}

/// A kept probe: its path, its file (gzip'd) and its signature.
pub struct Kept {
    pub path: ProbePath,
    pub file: Vec<u8>,
    pub signature: Option<Vec<u8>>,
}

/// The names of a probe's file, digest and signature in its module
/// version's directory.
struct Names {
    file: String,
    digest: String,
    signature: String,
}

impl ProbeCache {
    pub fn new(dir: &Path) -> Self {
        ProbeCache { dir: dir.to_owned() }
    }

    /// The probe path of `kernel` and the names of its files.
    fn names(module_version: &ModuleVersion, kernel: &str) -> Option<(ProbePath, Names)> {
        // Kernel names come from the host or the environment: one that is
        // not a valid probe name is never a path here.
        let name = ProbeFileName::ebpf(kernel).ok()?;
        let file = name.as_str().to_owned();
        let names = Names { digest: format!("{file}.sha256"), signature: format!("{file}{SIGNATURE_SUFFIX}"), file };
        Some((ProbePath::new(module_version.clone(), name), names))
    }

    /// Keeps the probe file for `kernel` and its signature.
    pub fn keep(
        &self,
        module_version: &ModuleVersion,
        kernel: &str,
        file: &[u8],
        signature: Option<&[u8]>,
    ) -> io::Result<()> {
        let Some((_, names)) = Self::names(module_version, kernel) else { return Ok(()) };
        let dir = Dir::open(&self.dir, true)?.subdir(module_version.as_str(), true)?;
        let locked = dir.lock()?;
        match signature {
            Some(signature) => locked.replace(&names.signature, signature, 0o644)?,
            None => locked.remove(&names.signature)?,
        }
        locked.replace(&names.digest, Sha256Digest::of(file).to_hex().as_bytes(), 0o644)?;
        locked.replace(&names.file, file, 0o644)
    }

    /// The kept probe for `kernel`, if there is one that hashes to its
    /// digest; one that does not is deleted (with its digest).
    pub fn verified(&self, module_version: &ModuleVersion, kernel: &str) -> Option<Kept> {
        let (probe_path, names) = Self::names(module_version, kernel)?;
        let dir = Dir::open(&self.dir, false).and_then(|dir| dir.subdir(module_version.as_str(), false)).ok()?;
        let read = |name: &str, max: u64| {
            dir.read(name, max).inspect_err(|error| tracing::warn!(%error, "a cached probe's file is unusable")).ok()?
        };
        let file = read(&names.file, MAX_PROBE_FILE)?;
        let expected =
            read(&names.digest, 128).and_then(|hex| Sha256Digest::from_hex(String::from_utf8_lossy(&hex).trim()));
        if expected == Some(Sha256Digest::of(&file)) {
            let signature = read(&names.signature, MAX_SIGNATURE_LEN as u64 + 1);
            return Some(Kept { path: probe_path, file, signature });
        }
        tracing::warn!(path = %dir.path().join(&names.file).display(), "a cached probe does not match its digest: deleted, not used");
        if let Ok(locked) = dir.lock() {
            let _ = locked.remove(&names.file);
            let _ = locked.remove(&names.digest);
        }
        None
    }

    /// The first candidate's probe kept here that hashes to its digest and
    /// passes the signature policy, as a fetched one must; a kept probe the
    /// policy refuses is reported in `not_served`.
    pub fn serve(
        &self,
        module_version: &ModuleVersion,
        candidates: &[String],
        signatures: &SignaturePolicy,
        not_served: &mut NotServed,
    ) -> Option<Served> {
        let source = format!("the node-local cache {}", self.dir.display());
        candidates.iter().find_map(|kernel| {
            let kept = self.verified(module_version, kernel)?;
            let checked = match signatures.check(&kept.path, &kept.file, kept.signature.as_deref()) {
                Ok(checked) => checked,
                Err(why) => {
                    not_served.tried.push(Tried {
                        file_name: kept.path.file_name().to_string(),
                        source: source.clone(),
                        outcome: format!("signature refused: {why}"),
                        kind: Outcome::Refused,
                        attempts: 1,
                    });
                    return None;
                }
            };
            let probe = chain::decompress(&kept.file, true)
                .inspect_err(|why| tracing::warn!(path = %kept.path, "a cached probe is unusable: {why}"))
                .ok()?;
            Some(Served {
                probe,
                candidate: kernel.clone(),
                source: source.clone(),
                detail: String::new(),
                remote: false,
                file: kept.file,
                signature: kept.signature,
                checked,
            })
        })
    }
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
