//! The one error of the HTTPS client: why a request got no HTTP answer, as
//! a sentence.

use std::fmt;

/// Why a request got no HTTP answer.
#[derive(Debug)]
pub struct HttpsError(String);

impl fmt::Display for HttpsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HttpsError {}

pub(crate) fn error(message: impl Into<String>) -> HttpsError {
    HttpsError(message.into())
}
