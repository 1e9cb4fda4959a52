//! Checking a package against the checksum published beside it (a
//! `sha256sum`-format `.sha256` file, or the digest itself): an admin who
//! carries a package across an air gap refuses a damaged or swapped one
//! before anything is sent.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use probe_api::digest::{Sha256Digest, Sha256Hasher};

use crate::admin::error::PackageError;

/// Why `--checksum` names no usable digest.
#[derive(Debug)]
pub enum ChecksumError {
    Unreadable {
        file: PathBuf,
        source: io::Error,
    },
    /// The file has no line for the package (by its file name).
    NoEntry {
        file: PathBuf,
        package: String,
    },
    /// Neither 64 hex characters nor a readable file.
    Malformed {
        text: String,
    },
}

impl fmt::Display for ChecksumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChecksumError::Unreadable { file, .. } => write!(f, "reading the checksum file {}", file.display()),
            ChecksumError::NoEntry { file, package } => {
                write!(f, "the checksum file {} has no SHA-256 line for {package}", file.display())
            }
            ChecksumError::Malformed { text } => {
                write!(f, "--checksum {text:?} is neither 64 hex characters nor a sha256sum file")
            }
        }
    }
}

impl std::error::Error for ChecksumError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ChecksumError::Unreadable { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The digest `--checksum` names for `package`: 64 hex characters (either
/// case), or a file in `sha256sum` format whose line for the package's file
/// name (or whose only line) gives it.
pub fn expected_checksum(arg: &str, package: &Path) -> Result<Sha256Digest, ChecksumError> {
    if let Some(digest) = Sha256Digest::from_hex(&arg.trim().to_ascii_lowercase()) {
        return Ok(digest);
    }
    let file = Path::new(arg);
    if !file.exists() {
        return Err(ChecksumError::Malformed { text: arg.to_owned() });
    }
    let text =
        std::fs::read_to_string(file).map_err(|source| ChecksumError::Unreadable { file: file.to_owned(), source })?;
    let name = package.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // `sha256sum` writes "<hex>  <name>" ("<hex> *<name>" in binary mode).
    let lines: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| line.split_once(char::is_whitespace))
        .map(|(hex, rest)| (hex, rest.trim_start().trim_start_matches('*')))
        .collect();
    let by_name = lines.iter().find(|(_, file_name)| Path::new(file_name).file_name() == Some(name.as_ref()));
    let line = match (by_name, lines.as_slice()) {
        (Some(line), _) => line,
        (None, [only]) => only,
        _ => return Err(ChecksumError::NoEntry { file: file.to_owned(), package: name }),
    };
    Sha256Digest::from_hex(&line.0.to_ascii_lowercase())
        .ok_or_else(|| ChecksumError::NoEntry { file: file.to_owned(), package: name })
}

/// Hashes the whole package file and compares. Blocking.
pub fn verify_package(path: &Path, expected: Sha256Digest) -> Result<(), PackageError> {
    let read_error = |source| PackageError::Open { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(read_error)?;
    let mut hasher = Sha256Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|source| PackageError::Open { path: path.to_owned(), source })?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    let actual = hasher.finish();
    if actual != expected {
        return Err(PackageError::Checksum { path: path.to_owned(), expected, actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checksum_is_a_digest_or_the_line_of_a_sha256sum_file() {
        let dir = tempfile::tempdir().unwrap();
        let package = dir.path().join("support-pkg-2.5.0-20240101000000.zip");
        std::fs::write(&package, b"package bytes").unwrap();
        let digest = Sha256Digest::of(b"package bytes");
        assert_eq!(expected_checksum(&digest.to_hex().to_uppercase(), &package).unwrap(), digest);

        let sums = dir.path().join("SHA256SUMS");
        let other = Sha256Digest::of(b"other");
        std::fs::write(
            &sums,
            format!("{other}  support-pkg-2.4.0-20230101000000.zip\n{digest} *support-pkg-2.5.0-20240101000000.zip\n"),
        )
        .unwrap();
        assert_eq!(expected_checksum(sums.to_str().unwrap(), &package).unwrap(), digest);

        let single = dir.path().join("pkg.zip.sha256");
        std::fs::write(&single, format!("{digest}  some/other/name.zip\n")).unwrap();
        assert_eq!(expected_checksum(single.to_str().unwrap(), &package).unwrap(), digest, "the only line");

        std::fs::write(&sums, format!("{other}  a.zip\n{other}  b.zip\n")).unwrap();
        assert!(matches!(expected_checksum(sums.to_str().unwrap(), &package), Err(ChecksumError::NoEntry { .. })));
        assert!(matches!(expected_checksum("abc", &package), Err(ChecksumError::Malformed { .. })));

        verify_package(&package, digest).unwrap();
        assert!(matches!(verify_package(&package, other), Err(PackageError::Checksum { .. })));
    }
}
