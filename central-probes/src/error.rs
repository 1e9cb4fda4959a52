//! The crate's one error type: a gRPC code plus a message for people.
//!
//! Errors are created with the code that tells a client what to do (retry,
//! fix the input, ask for a role) and keep it while context is added on the
//! way up; the service edge turns them into `tonic::Status` unchanged.

use std::fmt;
use tonic::Code;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error { code, message: message.into() }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// An I/O error, coded by what a client can do about it: a full disk is
    /// RESOURCE_EXHAUSTED, anything else INTERNAL.
    pub fn io(what: impl fmt::Display, error: std::io::Error) -> Self {
        let code = match error.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Code::ResourceExhausted,
            _ => Code::Internal,
        };
        Self::new(code, format!("{what}: {error}"))
    }

    /// Adds what was being done in front of the message; keeps the code.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        tonic::Status::new(error.code, error.message)
    }
}

impl From<probe_api::names::NameError> for Error {
    fn from(error: probe_api::names::NameError) -> Self {
        Error::invalid_argument(error.to_string())
    }
}
