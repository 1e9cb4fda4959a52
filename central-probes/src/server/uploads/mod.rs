//! THE upload use case, whichever API an upload comes through
//! (UploadProbes, roxctl's route): the caller must be an admin
//! (`authorize`), and `run` takes the upload's events (`session`) to their
//! end in a task of its own, so that an upload whose client went away is
//! still recorded with what it committed: its log and audit line, its
//! failure or interruption, the misses its files resolve (`record`) and
//! the request metrics. No HTTP and no framing here: each API's handler
//! reads its own wire format into `UploadEvent`s.

pub mod record;
pub mod session;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use probe_api::v1::UploadProbesResponse;
use tokio_stream::Stream;
use tonic::Code;
use tonic::metadata::MetadataMap;

use crate::error::{Error, Result};
use crate::server::auth::{Caller, Role, TokenAuth};
use crate::server::metrics::Metrics;
use crate::store::ProbeStore;
use crate::store::misses::recorder::MissRecorder;
pub use record::{Uploader, Via};
#[cfg(any(test, feature = "testing"))]
pub use session::file_messages;
pub use session::{UploadEnd, UploadEvent, UploadSession};

/// Uploads into the store.
pub struct Uploads {
    store: Arc<dyn ProbeStore>,
    auth: TokenAuth,
    metrics: Metrics,
    misses: Arc<MissRecorder>,
    /// An upload whose body brings nothing for this long is ended.
    idle_timeout: Duration,
}

impl Uploads {
    pub fn new(
        store: Arc<dyn ProbeStore>,
        auth: TokenAuth,
        metrics: Metrics,
        misses: Arc<MissRecorder>,
        idle_timeout: Duration,
    ) -> Self {
        Uploads { store, auth, metrics, misses, idle_timeout }
    }

    /// How long an upload's body may bring nothing before its reader ends
    /// it.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The caller of an upload through `via`: an admin. A refusal is
    /// counted.
    pub fn authorize(&self, credentials: &MetadataMap, via: Via) -> Result<Caller> {
        self.auth.caller(credentials, Role::Admin).map_err(|error| self.refuse(via, error))
    }

    /// `error`, counted as the answer to an upload through `via` that was
    /// refused before it started.
    pub fn refuse(&self, via: Via, error: Error) -> Error {
        self.metrics.count_request(via.metric(), error.code, "");
        error
    }

    /// Runs an upload from `who` to its end: `events` comes first (roxctl
    /// reads and checks its manifest there; an error refuses the upload
    /// before any file), then the upload takes its events.
    pub async fn run<F, S>(self: &Arc<Self>, who: Uploader, events: F) -> Result<UploadProbesResponse>
    where
        F: Future<Output = Result<S>> + Send + 'static,
        S: Stream<Item = Result<UploadEvent>> + Send + Unpin + 'static,
    {
        let uploads = self.clone();
        // When the client goes away this call is dropped; the task is not.
        let upload = tokio::spawn(async move {
            let end = match events.await {
                Ok(events) => UploadSession::new(uploads.store.clone()).run_to_end(events).await,
                Err(error) => UploadEnd::refused(error),
            };
            record::record_upload_end(&uploads.metrics, &uploads.misses, &who, &end).await;
            let code = end.error.as_ref().map_or(Code::Ok, |error| error.code);
            uploads.metrics.count_request(who.via.metric(), code, "");
            end.into_result()
        });
        upload.await.unwrap_or_else(|e| Err(Error::internal(format!("the upload's task failed: {e}"))))
    }
}
