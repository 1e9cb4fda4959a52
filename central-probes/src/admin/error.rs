//! The admin side's errors, typed and with their causes kept: a caller can
//! tell a bad package from an unreachable Central, and the CLI prints the
//! whole chain on one line (`error::chain`).

use std::fmt;
use std::io;
use std::path::PathBuf;

use probe_api::transport;

/// Why a support package cannot be used.
#[derive(Debug)]
pub enum PackageError {
    Open {
        path: PathBuf,
        source: io::Error,
    },
    NotZip {
        path: PathBuf,
        source: zip::result::ZipError,
    },
    DuplicateNames {
        path: PathBuf,
        declared: usize,
        distinct: usize,
    },
    TooManyEntries {
        entries: usize,
        max: usize,
    },
    UnreadableEntry {
        index: usize,
        source: zip::result::ZipError,
    },
    UnsafeName {
        name: String,
    },
    TooLarge {
        name: String,
        size: u64,
        max: u64,
    },
    Twice {
        name: String,
    },
    /// An entry's bytes could not be read, or were not what it declares.
    Read {
        path: String,
        source: io::Error,
    },
    /// A signature entry that cannot be used.
    Signature {
        name: String,
        why: probe_api::signing::SignatureError,
    },
    /// The package is not the one its published checksum describes.
    Checksum {
        path: PathBuf,
        expected: probe_api::digest::Sha256Digest,
        actual: probe_api::digest::Sha256Digest,
    },
}

impl fmt::Display for PackageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PackageError::Open { path, .. } => write!(f, "cannot open {}", path.display()),
            PackageError::NotZip { path, .. } => write!(f, "{} is not a readable zip file", path.display()),
            PackageError::DuplicateNames { path, declared, distinct } => write!(
                f,
                "{} declares {declared} entries but has {distinct} distinct names: it holds duplicate entry names",
                path.display()
            ),
            PackageError::TooManyEntries { entries, max } => {
                write!(f, "the package has {entries} entries; at most {max} are accepted (a real one has about 16,500)")
            }
            PackageError::UnreadableEntry { index, .. } => write!(f, "zip entry {index} is unreadable"),
            PackageError::UnsafeName { name } => {
                write!(f, "the package holds an unsafe entry name {name:?}; refusing it")
            }
            PackageError::TooLarge { name, size, max } => {
                write!(f, "{name} declares {size} bytes, more than the {max} a probe may have")
            }
            PackageError::Twice { name } => write!(f, "the package holds {name} twice"),
            PackageError::Read { path, .. } => write!(f, "reading {path}"),
            PackageError::Signature { name, why } => write!(f, "{name}: {why}"),
            PackageError::Checksum { path, expected, actual } => write!(
                f,
                "{} has SHA-256 {actual}, not the {expected} of its checksum: a damaged or different package; nothing was sent",
                path.display()
            ),
        }
    }
}

impl std::error::Error for PackageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PackageError::Open { source, .. } | PackageError::Read { source, .. } => Some(source),
            PackageError::NotZip { source, .. } | PackageError::UnreadableEntry { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Why an admin command against Central failed.
#[derive(Debug)]
pub enum AdminError {
    /// The token cannot be sent as a header value.
    Token,
    /// The address or TLS settings are unusable.
    Connect(transport::TransportError),
    Package(PackageError),
    NoProbes {
        package: PathBuf,
    },
    /// A call to Central failed; `what` says which.
    Rpc {
        what: &'static str,
        status: Rpc,
    },
    /// Central answered something that breaks the API.
    BadReply(String),
    /// An export of every probe found none.
    NothingStored,
    /// An export of these module versions found no probes of them.
    NoProbesFor {
        module_versions: Vec<String>,
    },
    /// The upload call ended before the package was sent.
    CallEnded,
    /// A worker thread of this process failed.
    Internal(String),
    /// A file this command writes could not be written.
    Output {
        path: PathBuf,
        source: io::Error,
    },
}

/// A failed call's status, shown with the hints of `transport::describe`.
#[derive(Debug)]
pub struct Rpc(pub tonic::Status);

impl fmt::Display for Rpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&transport::describe(&self.0))
    }
}

impl std::error::Error for Rpc {}

impl AdminError {
    /// `NoProbesFor` the module versions of `asked` that are not among
    /// `held` (each named once, in order), if any: a version asked for by
    /// name that Central has no probes of is an error, never an empty
    /// answer (`export`, `verify`).
    pub fn unless_held<S: AsRef<str>>(asked: &[String], held: impl IntoIterator<Item = S>) -> Result<(), AdminError> {
        let held: std::collections::HashSet<String> = held.into_iter().map(|v| v.as_ref().to_owned()).collect();
        let mut missing: Vec<String> = asked.iter().filter(|v| !held.contains(v.as_str())).cloned().collect();
        missing.sort();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        Err(AdminError::NoProbesFor { module_versions: missing })
    }

    pub fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> AdminError {
        move |status| AdminError::Rpc { what, status: Rpc(status) }
    }

    /// The gRPC code of a failed call, if that is what failed.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            AdminError::Rpc { status, .. } => Some(status.0.code()),
            _ => None,
        }
    }
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::Token => f.write_str("the API token holds characters that cannot be sent"),
            AdminError::Connect(_) => f.write_str("cannot make a client of Central"),
            AdminError::Package(_) => f.write_str("the support package cannot be used"),
            AdminError::NoProbes { package } => write!(
                f,
                "{} holds no probe files under kernel-modules/: is it a kernel support package?",
                package.display()
            ),
            AdminError::Rpc { what, .. } => f.write_str(what),
            AdminError::BadReply(why) => write!(f, "Central's reply breaks the API: {why}"),
            AdminError::NothingStored => f.write_str("Central has no probes to export"),
            AdminError::NoProbesFor { module_versions } => write!(
                f,
                "Central has no probes for module version{} {}; `central-probes ls` lists what it has",
                if module_versions.len() == 1 { "" } else { "s" },
                module_versions.join(", ")
            ),
            AdminError::CallEnded => f.write_str("upload failed: the call ended early"),
            AdminError::Internal(why) => f.write_str(why),
            AdminError::Output { path, .. } => write!(f, "cannot write {}", path.display()),
        }
    }
}

impl std::error::Error for AdminError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AdminError::Package(error) => Some(error),
            AdminError::Connect(error) => Some(error),
            AdminError::Rpc { status, .. } => Some(status),
            AdminError::Output { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<PackageError> for AdminError {
    fn from(error: PackageError) -> Self {
        AdminError::Package(error)
    }
}

/// An error and its causes on one line: `a: b: c`.
pub use probe_api::errors::chain;
