//! The one error of the registry client: what went wrong as one line that
//! names the registry and what to do, and its kind, so that the CLI can
//! exit with it and Central can answer with the right gRPC code.
//! Messages never hold credentials: headers carrying them are never shown,
//! and text from the registry goes through `remote_text`.

use std::fmt;

/// What kind of failure, as a caller acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OciErrorKind {
    /// 401/403: missing or wrong credentials, or no right to the repository.
    Unauthorized,
    /// The repository, tag, manifest or blob does not exist.
    NotFound,
    /// The registry refused what was sent (a manifest over its limit, a
    /// digest it computed otherwise): retrying the same will not help.
    Refused,
    /// The registry cannot be reached, times out, or answers 5xx.
    Unavailable,
    /// What the registry sent is not what it claims (a blob whose bytes do
    /// not hash to its digest).
    DataLoss,
    /// What the registry holds is not a support package, or settings or
    /// arguments are wrong.
    Invalid,
}

#[derive(Debug)]
pub struct OciError {
    pub kind: OciErrorKind,
    pub message: String,
}

impl OciError {
    pub fn new(kind: OciErrorKind, message: impl Into<String>) -> Self {
        OciError { kind, message: message.into() }
    }

    /// The same error with `what` said first (`what: message`).
    pub fn context(self, what: impl fmt::Display) -> Self {
        OciError { kind: self.kind, message: format!("{what}: {}", self.message) }
    }
}

impl fmt::Display for OciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OciError {}

pub type OciResult<T> = Result<T, OciError>;

pub(crate) fn invalid(message: impl Into<String>) -> OciError {
    OciError::new(OciErrorKind::Invalid, message)
}

pub(crate) fn unavailable(message: impl Into<String>) -> OciError {
    OciError::new(OciErrorKind::Unavailable, message)
}
