//! The one error of the HTTPS client: why a request got no HTTP answer, as
//! a sentence, and at which step, so that a caller can advise on it.

use std::fmt;

/// Why a request got no HTTP answer.
#[derive(Debug)]
pub struct HttpsError {
    message: String,
    step: Step,
}

/// Where a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// No TCP connection to the server (or through the proxy to it).
    Connect,
    /// The TLS handshake failed: certificates, names, protocol.
    Tls,
    /// Anything else: settings, HTTP.
    Other,
}

impl HttpsError {
    pub fn step(&self) -> Step {
        self.step
    }
}

impl fmt::Display for HttpsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HttpsError {}

pub(crate) fn error(message: impl Into<String>) -> HttpsError {
    HttpsError { message: message.into(), step: Step::Other }
}

pub(crate) fn unreachable(message: impl Into<String>) -> HttpsError {
    HttpsError { message: message.into(), step: Step::Connect }
}

pub(crate) fn tls_failed(message: impl Into<String>) -> HttpsError {
    HttpsError { message: message.into(), step: Step::Tls }
}
