//! The upload use case: the state machine of one upload stream
//! (`session`) and the record of its end (`record`).

pub(crate) mod record;
pub mod session;

#[cfg(any(test, feature = "testing"))]
pub use session::file_messages;
pub use session::{Part, UploadEnd, UploadSession};
