//! The naming rules of support packages: module versions, probe file names
//! and probe paths (`<module version>/<probe file name>`).
//!
//! Every name that crosses a trust boundary (an RPC field, a zip entry, a
//! file in the store) is parsed into one of these types first, so code that
//! holds a `ProbePath` may use it as a path component without further checks.
//! Only ASCII digits count as digits: Unicode digits are rejected.
//!
//! Probe file names follow the product's rule
//! (`collector-(?:ebpf-\d+\.[^/]+\.o|\d+\.[^/]+\.ko)\.gz`: a number, a dot,
//! at least one more character), with deliberate refusals on top: where
//! the product takes any byte but `/`, a release here holds printable ASCII
//! only, without `\` (no spaces, control characters or non-ASCII), since
//! these names become file names on disk and appear in logs and reports.

use std::fmt;

/// Longest accepted probe file name: the usual file system limit.
pub const MAX_FILE_NAME_LEN: usize = 255;
/// Longest accepted module version: the 64-character hex form. A
/// MAJOR.MINOR.PATCH[-rcN] version is far shorter in practice, and the
/// bound keeps every path component storable by every backend.
pub const MAX_MODULE_VERSION_LEN: usize = 64;
/// Longest accepted probe path. The component limits already keep a path
/// at 64 + 1 + 255 = 320 bytes; this is the bound the API documents.
pub const MAX_PATH_LEN: usize = 512;

/// A module version: 64 lowercase hex characters, or `MAJOR.MINOR.PATCH`
/// with an optional `-rcN` suffix. Module versions order as the paths of
/// their probes do: `2.5.0-rc1` before `2.5.0`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModuleVersion(String);

/// Which kind of probe a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// `collector-ebpf-<release>.o.gz`
    Ebpf,
    /// `collector-<release>.ko.gz`
    KernelModule,
}

/// A probe file name: `collector-ebpf-<release>.o.gz` or
/// `collector-<release>.ko.gz`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeFileName(String);

/// `<module version>/<probe file name>`, nothing more and nothing less.
/// Paths order as their strings do, byte by byte (the order ListProbes
/// documents), not component by component: `2.5.0-rc1/...` comes before
/// `2.5.0/...` because '-' sorts before '/'.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbePath {
    module_version: ModuleVersion,
    file_name: ProbeFileName,
}

/// Why a name was rejected; its `Display` is meant for users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameError {
    what: &'static str,
    name: String,
    reason: &'static str,
}

impl NameError {
    fn new(what: &'static str, name: &str, reason: &'static str) -> Self {
        // Hostile names can be huge; the message only needs their start.
        let name = name.chars().take(300).collect();
        NameError { what, name, reason }
    }
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {:?}: {}", self.what, self.name, self.reason)
    }
}

impl std::error::Error for NameError {}

fn is_ascii_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

impl ModuleVersion {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let error = |reason| Err(NameError::new("module version", s, reason));
        if s.len() > MAX_MODULE_VERSION_LEN {
            return error("longer than 64 bytes");
        }
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Ok(ModuleVersion(s.to_owned()));
        }
        let (release, rc) = match s.split_once("-rc") {
            Some((release, rc)) => (release, Some(rc)),
            None => (s, None),
        };
        if rc.is_some_and(|rc| !is_ascii_number(rc)) {
            return error("the -rc suffix needs a number");
        }
        let parts: Vec<&str> = release.split('.').collect();
        if parts.len() == 3 && parts.iter().all(|p| is_ascii_number(p)) {
            return Ok(ModuleVersion(s.to_owned()));
        }
        error("expected MAJOR.MINOR.PATCH[-rcN] or 64 lowercase hex characters")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ProbeFileName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let error = |reason| Err(NameError::new("probe file name", s, reason));
        if s.len() > MAX_FILE_NAME_LEN {
            return error("longer than 255 bytes");
        }
        let Some((_, release)) = Self::split(s) else {
            return error("expected collector-ebpf-<release>.o.gz or collector-<release>.ko.gz");
        };
        let digits = release.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || release.as_bytes().get(digits) != Some(&b'.') {
            return error("the kernel release must start with a number and a dot");
        }
        // The product's rule (`\d+\.[^/]+` before `.o.gz` or `.ko.gz`) wants at
        // least one character after that dot.
        if release.len() == digits + 1 {
            return error("the kernel release needs something after its first dot");
        }
        if let Some(bad) = release.bytes().find(|b| !b.is_ascii_graphic() || matches!(b, b'/' | b'\\')) {
            return Err(NameError::new(
                "probe file name",
                s,
                if bad == b'/' {
                    "a file name has no '/'"
                } else {
                    "the kernel release may hold only printable ASCII characters without '/' and '\\'"
                },
            ));
        }
        Ok(ProbeFileName(s.to_owned()))
    }

    /// The kind and the kernel release of a well-formed name. The eBPF form is
    /// tried first: `collector-ebpf-5.4.o.gz` is never a kernel module.
    fn split(s: &str) -> Option<(ProbeKind, &str)> {
        if let Some(release) = s.strip_prefix("collector-ebpf-").and_then(|r| r.strip_suffix(".o.gz")) {
            return Some((ProbeKind::Ebpf, release));
        }
        let release = s.strip_prefix("collector-")?.strip_suffix(".ko.gz")?;
        Some((ProbeKind::KernelModule, release))
    }

    /// The eBPF probe file name for a kernel release.
    pub fn ebpf(kernel_release: &str) -> Result<Self, NameError> {
        Self::parse(&format!("collector-ebpf-{kernel_release}.o.gz"))
    }

    pub fn kind(&self) -> ProbeKind {
        Self::split(&self.0).expect("validated at parse").0
    }

    pub fn kernel_release(&self) -> &str {
        Self::split(&self.0).expect("validated at parse").1
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ProbePath {
    pub fn new(module_version: ModuleVersion, file_name: ProbeFileName) -> Self {
        ProbePath { module_version, file_name }
    }

    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.len() > MAX_PATH_LEN {
            return Err(NameError::new("probe path", s, "longer than 512 bytes"));
        }
        let Some((module_version, file_name)) = s.split_once('/') else {
            return Err(NameError::new("probe path", s, "expected <module version>/<probe file name>"));
        };
        let module_version = ModuleVersion::parse(module_version)?;
        let file_name = ProbeFileName::parse(file_name)?;
        Ok(ProbePath { module_version, file_name })
    }

    pub fn module_version(&self) -> &ModuleVersion {
        &self.module_version
    }

    pub fn file_name(&self) -> &ProbeFileName {
        &self.file_name
    }

    /// The length of the path string, without building it.
    pub fn byte_len(&self) -> usize {
        self.module_version.0.len() + 1 + self.file_name.0.len()
    }

    /// The bytes of the path string, without building it.
    pub fn bytes(&self) -> impl Iterator<Item = u8> + '_ {
        self.module_version.0.bytes().chain(std::iter::once(b'/')).chain(self.file_name.0.bytes())
    }
}

impl Ord for ModuleVersion {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // As "<version>/": every path of one version sorts before or after
        // every path of the other, the way this orders the versions.
        let slash = std::iter::once(b'/');
        self.0.bytes().chain(slash.clone()).cmp(other.0.bytes().chain(slash))
    }
}

impl PartialOrd for ModuleVersion {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ProbePath {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Equal module versions (the common case) compare by file name alone.
        if self.module_version == other.module_version {
            return self.file_name.cmp(&other.file_name);
        }
        self.bytes().cmp(other.bytes())
    }
}

impl PartialOrd for ProbePath {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ModuleVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ProbeFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ProbePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.module_version, self.file_name)
    }
}

/// The file name of a probe's signature: `<probe file>.minisig`.
pub const SIGNATURE_SUFFIX: &str = ".minisig";

/// What a zip entry of a support package is.
#[derive(Debug, PartialEq, Eq)]
pub enum PackageEntry {
    /// `kernel-modules/<probe path>`: a probe to upload.
    Probe(ProbePath),
    /// `kernel-modules/<probe path>.minisig`: the signature of that probe.
    Signature(ProbePath),
    /// Directories, `LICENSE` files and anything outside `kernel-modules/`.
    Ignored,
    /// Something else under `kernel-modules/`: a sign of a corrupt package.
    Unrecognised(NameError),
}

/// Classifies the name of a zip entry of a support package.
pub fn classify_package_entry(entry_name: &str) -> PackageEntry {
    let Some(rest) = entry_name.strip_prefix("kernel-modules/") else {
        return PackageEntry::Ignored;
    };
    if rest.is_empty() || rest.ends_with('/') || rest.rsplit('/').next() == Some("LICENSE") {
        return PackageEntry::Ignored;
    }
    if let Some(probe) = rest.strip_suffix(SIGNATURE_SUFFIX) {
        return match ProbePath::parse(probe) {
            Ok(path) => PackageEntry::Signature(path),
            Err(error) => PackageEntry::Unrecognised(error),
        };
    }
    match ProbePath::parse(rest) {
        Ok(path) => PackageEntry::Probe(path),
        Err(error) => PackageEntry::Unrecognised(error),
    }
}

#[cfg(test)]
mod tests;
