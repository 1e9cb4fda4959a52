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

/// What a zip entry of a support package is.
#[derive(Debug, PartialEq, Eq)]
pub enum PackageEntry {
    /// `kernel-modules/<probe path>`: a probe to upload.
    Probe(ProbePath),
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
    match ProbePath::parse(rest) {
        Ok(path) => PackageEntry::Probe(path),
        Err(error) => PackageEntry::Unrecognised(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_versions_from_the_reference_are_judged_right() {
        let hex64 = "1123dde0458e72a49880b06922e135dbcd36fb784fed530ab84ddfa8924e5c05";
        for valid in ["2.5.0", "0.0.0", "10.5.155", "2.5.0-rc1", "2.5.0-rc12", hex64] {
            assert!(ModuleVersion::parse(valid).is_ok(), "{valid} should be valid");
        }
        let hex63 = &hex64[..63];
        let hex65 = format!("{hex64}0");
        let upper = hex64.to_uppercase();
        let non_hex = format!("{}g", &hex64[..63]);
        for invalid in [
            "",
            "0.0",
            ".2.3",
            "2.3.",
            "10.5.155.123",
            "latest",
            hex63,
            &hex65,
            &upper,
            &non_hex,
            "2.5.0-rc",
            "2.5.0-rcx",
            "2.5.0-beta1",
            "2.\u{0665}.0", // ARABIC-INDIC DIGIT FIVE: a Unicode digit
            "2.5.0/..",
        ] {
            assert!(ModuleVersion::parse(invalid).is_err(), "{invalid:?} should be invalid");
        }
    }

    #[test]
    fn probe_file_names_from_the_reference_are_judged_right() {
        for (valid, kind, release) in [
            ("collector-ebpf-5.14.0-284.11.1.el9_2.x86_64.o.gz", ProbeKind::Ebpf, "5.14.0-284.11.1.el9_2.x86_64"),
            ("collector-4.9.24-coreos.ko.gz", ProbeKind::KernelModule, "4.9.24-coreos"),
            ("collector-10.1.ko.gz", ProbeKind::KernelModule, "10.1"),
            // As the product's rule: any one character after the first dot.
            ("collector-5...ko.gz", ProbeKind::KernelModule, "5.."),
            ("collector-ebpf-5.4.0-1.el8~20.04+1.o.gz", ProbeKind::Ebpf, "5.4.0-1.el8~20.04+1"),
        ] {
            let name = ProbeFileName::parse(valid).unwrap();
            assert_eq!(name.kind(), kind);
            assert_eq!(name.kernel_release(), release);
        }
        for invalid in [
            "collector-4.9.24-coreos.o.gz",
            "collector-ebpf-4.9.24-coreos.ko.gz",
            "collector-ebpf-4.9.24.o",
            "collector-4.9.24.ko",
            "collector.ko.gz",
            "collector-.ko.gz",
            "collector-5..ko.gz",
            "collector-ebpf-5..o.gz",
            "collector-ebpf-.o.gz",
            "/collector-4.9.24.ko.gz",
            "collector-4/9.ko.gz",
            "collector-x4.9.ko.gz",
            "collector-49.ko.gz",
            "collector-4.9 x.ko.gz",
            "collector-\u{0664}.9.ko.gz",
            "collector-4.9\\a.ko.gz",
        ] {
            assert!(ProbeFileName::parse(invalid).is_err(), "{invalid:?} should be invalid");
        }
        let long = format!("collector-4.{}.ko.gz", "1".repeat(250));
        assert!(ProbeFileName::parse(&long).is_err());
    }

    #[test]
    fn every_component_and_the_whole_path_are_bounded() {
        let long_version = format!("{}.0.0", "1".repeat(MAX_MODULE_VERSION_LEN));
        assert!(ModuleVersion::parse(&long_version).is_err());
        assert!(ModuleVersion::parse(&format!("{}.0.0", "1".repeat(MAX_MODULE_VERSION_LEN - 4))).is_ok());
        let longest_name = format!("collector-4.{}.ko.gz", "1".repeat(MAX_FILE_NAME_LEN - 18));
        assert_eq!(longest_name.len(), MAX_FILE_NAME_LEN);
        let longest_version = "1".repeat(MAX_MODULE_VERSION_LEN - 4) + ".0.0";
        let longest = ProbePath::parse(&format!("{longest_version}/{longest_name}")).unwrap();
        assert!(longest.to_string().len() <= MAX_PATH_LEN);
        let too_long = format!("{}/{}", long_version, "x".repeat(MAX_PATH_LEN));
        assert!(ProbePath::parse(&too_long).unwrap_err().to_string().contains("longer than 512 bytes"));
    }

    #[test]
    fn paths_order_as_their_strings() {
        let mut paths: Vec<&str> = vec![
            "2.5.0/collector-ebpf-5.4.0.o.gz",
            "2.5.0-rc1/collector-ebpf-5.4.0.o.gz",
            "2.5.0/collector-5.4.0.ko.gz",
            "2.10.0/collector-5.4.0.ko.gz",
            "2.5.1/collector-5.4.0.ko.gz",
            "1123dde0458e72a49880b06922e135dbcd36fb784fed530ab84ddfa8924e5c05/collector-4.9.24-coreos.ko.gz",
        ];
        let mut parsed: Vec<ProbePath> = paths.iter().map(|p| ProbePath::parse(p).unwrap()).collect();
        parsed.sort();
        paths.sort();
        assert_eq!(parsed.iter().map(|p| p.to_string()).collect::<Vec<_>>(), paths);
        let position = |prefix: &str| paths.iter().position(|p| p.starts_with(prefix)).unwrap();
        assert!(position("2.5.0-rc1/") < position("2.5.0/"));

        // Module versions order as their paths do.
        let mut versions: Vec<ModuleVersion> = parsed.iter().map(|p| p.module_version().clone()).collect();
        versions.sort();
        versions.dedup();
        let mut in_path_order: Vec<ModuleVersion> = Vec::new();
        for path in &parsed {
            if in_path_order.last() != Some(path.module_version()) {
                in_path_order.push(path.module_version().clone());
            }
        }
        assert_eq!(versions, in_path_order);
        assert!(ModuleVersion::parse("2.5.0-rc1").unwrap() < ModuleVersion::parse("2.5.0").unwrap());
    }

    #[test]
    fn probe_paths_are_exactly_two_components() {
        for valid in [
            "2.5.0/collector-ebpf-5.14.0-284.11.1.el9_2.x86_64.o.gz",
            "1123dde0458e72a49880b06922e135dbcd36fb784fed530ab84ddfa8924e5c05/collector-4.9.24-coreos.ko.gz",
        ] {
            let path = ProbePath::parse(valid).unwrap();
            assert_eq!(path.to_string(), valid);
        }
        for invalid in [
            "/2.5.0/collector-4.9.24.ko.gz",
            "2.5.0/collector-4.9.24.ko.gz/",
            "2.5.0//collector-4.9.24.ko.gz",
            "2.5.0/x/collector-4.9.24.ko.gz",
            "../collector-4.9.24.ko.gz",
            "collector-4.9.24.ko.gz",
            "2.5.0/",
            "",
        ] {
            assert!(ProbePath::parse(invalid).is_err(), "{invalid:?} should be invalid");
        }
    }

    #[test]
    fn package_entries_are_classified() {
        let probe = "kernel-modules/2.5.0/collector-ebpf-5.4.0.o.gz";
        assert_eq!(
            classify_package_entry(probe),
            PackageEntry::Probe(ProbePath::parse("2.5.0/collector-ebpf-5.4.0.o.gz").unwrap())
        );
        for ignored in [
            "kernel-modules/",
            "kernel-modules/2.5.0/",
            "kernel-modules/2.5.0/LICENSE",
            "README.md",
            "other/2.5.0/collector-5.4.0.ko.gz",
        ] {
            assert_eq!(classify_package_entry(ignored), PackageEntry::Ignored, "{ignored}");
        }
        for odd in [
            "kernel-modules/2.5.0/notes.txt",
            "kernel-modules/2.5.0/collector-4.9.24-coreos.o.gz",
            "kernel-modules/../2.5.0/collector-5.4.0.ko.gz",
            "kernel-modules/2.5.0/sub/collector-5.4.0.ko.gz",
        ] {
            assert!(matches!(classify_package_entry(odd), PackageEntry::Unrecognised(_)), "{odd}");
        }
    }
}
