//! ExportProbes: stored probes streamed out, file by file in path order,
//! for `central-probes export`. A task per export lists the store a page at
//! a time and reads each probe as the client takes its bytes (a bounded
//! queue in between), so an export holds one open probe and a few chunks
//! whatever the store's size. A semaphore bounds the exports running at
//! once, since each holds a file open and a task busy.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use probe_api::limits::{MAX_EXPORT_CHUNK, MAX_EXPORT_MODULE_VERSIONS, MAX_EXPORTS, MAX_PAGE_SIZE};
use probe_api::names::{ModuleVersion, ProbePath};
use probe_api::v1::export_probes_response::Message;
use probe_api::v1::{ExportProbesRequest, ExportProbesResponse, ProbeInfo};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use tracing::debug;

use crate::error::{Error, Result};
use crate::store::ProbeStore;

/// Messages queued between the store and the client: a few chunks.
const QUEUE: usize = 8;

/// The stream of one export. It ends with OK only if the export sent
/// everything: a stream cut short (its client stalled, its task failed)
/// ends with UNAVAILABLE, so that no client takes part of an export for
/// all of it.
pub struct ExportStream {
    messages: ReceiverStream<Result<ExportProbesResponse, Status>>,
    completed: Arc<AtomicBool>,
}

impl Stream for ExportStream {
    type Item = Result<ExportProbesResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.messages).poll_next(cx) {
            Poll::Ready(None) if !self.completed.swap(true, Ordering::AcqRel) => {
                Poll::Ready(Some(Err(Status::unavailable("the export was ended before it was complete; export again"))))
            }
            other => other,
        }
    }
}

/// Runs exports, at most `MAX_EXPORTS` at once.
pub struct Exports {
    store: Arc<dyn ProbeStore>,
    running: Arc<Semaphore>,
    /// An export whose client takes nothing for this long is ended.
    send_timeout: Duration,
}

/// The module versions a call (`what`: "export", "verification") asks
/// for: at most `MAX_EXPORT_MODULE_VERSIONS`, each valid, in path order
/// (`ModuleVersion`'s), each once.
pub(crate) fn module_versions_asked(asked: &[String], what: &str) -> Result<Vec<ModuleVersion>> {
    if asked.len() > MAX_EXPORT_MODULE_VERSIONS {
        return Err(Error::invalid_argument(format!(
            "{} module versions asked for; at most {MAX_EXPORT_MODULE_VERSIONS} per {what}",
            asked.len()
        )));
    }
    let mut versions = asked.iter().map(|v| ModuleVersion::parse(v)).collect::<Result<Vec<_>, _>>()?;
    versions.sort();
    versions.dedup();
    Ok(versions)
}

impl Exports {
    pub fn new(store: Arc<dyn ProbeStore>, send_timeout: Duration) -> Self {
        Exports { store, running: Arc::new(Semaphore::new(MAX_EXPORTS)), send_timeout }
    }

    /// Checks the request and starts streaming what it asks for.
    pub fn start(&self, request: ExportProbesRequest) -> Result<ExportStream> {
        let versions = module_versions_asked(&request.module_versions, "export")?;
        let Ok(permit) = self.running.clone().try_acquire_owned() else {
            return Err(Error::new(
                tonic::Code::ResourceExhausted,
                format!("Central is running its limit of {MAX_EXPORTS} exports; retry when one has finished"),
            ));
        };
        let (sender, receiver) = mpsc::channel(QUEUE);
        let completed = Arc::new(AtomicBool::new(false));
        let export = Export {
            store: self.store.clone(),
            sender,
            send_timeout: self.send_timeout,
            completed: completed.clone(),
            _permit: permit,
        };
        tokio::spawn(export.run(versions));
        Ok(ExportStream { messages: ReceiverStream::new(receiver), completed })
    }
}

/// One export being streamed.
struct Export {
    store: Arc<dyn ProbeStore>,
    sender: mpsc::Sender<Result<ExportProbesResponse, Status>>,
    send_timeout: Duration,
    /// Set once everything was sent; see `ExportStream`.
    completed: Arc<AtomicBool>,
    _permit: OwnedSemaphorePermit,
}

/// Why an export stopped early.
enum Stop {
    /// The client went away or stopped reading: nobody to tell.
    Client,
    /// The store failed: the client is told.
    Store(Error),
}

impl From<Error> for Stop {
    fn from(error: Error) -> Self {
        Stop::Store(error)
    }
}

impl Export {
    async fn run(self, versions: Vec<ModuleVersion>) {
        let outcome = if versions.is_empty() {
            self.send_version(None).await
        } else {
            let mut outcome = Ok(());
            for version in &versions {
                outcome = self.send_version(Some(version)).await;
                if outcome.is_err() {
                    break;
                }
            }
            outcome
        };
        match outcome {
            Ok(()) => self.completed.store(true, Ordering::Release),
            Err(Stop::Client) => debug!("export ended: the client stopped reading"),
            Err(Stop::Store(error)) => {
                // After the chunks queued before it; a client that stalls
                // meanwhile is told by `ExportStream` instead.
                let _ = tokio::time::timeout(self.send_timeout, self.sender.send(Err(error.into()))).await;
            }
        }
    }

    /// Every probe of `version` (or every probe), a page at a time.
    async fn send_version(&self, version: Option<&ModuleVersion>) -> Result<(), Stop> {
        let page_size = MAX_PAGE_SIZE as usize;
        let mut after: Option<ProbePath> = None;
        loop {
            let page = self.store.list(version, after.as_ref(), page_size).await?;
            for probe in &page {
                self.send_probe(&probe.path).await?;
            }
            if page.len() < page_size {
                return Ok(());
            }
            after = page.last().map(|probe| probe.path.clone());
        }
    }

    async fn send_probe(&self, path: &ProbePath) -> Result<(), Stop> {
        // Deleted since it was listed: left out.
        let Some(reader) = self.store.open(path).await? else { return Ok(()) };
        let signature = reader.probe.signature.clone().unwrap_or_default();
        let header = ProbeInfo { signature, ..reader.probe.into() };
        self.send(Message::FileHeader(header)).await?;
        let mut chunks = reader.chunks;
        while let Some(chunk) = chunks.next().await {
            let mut chunk: Bytes = chunk?;
            while !chunk.is_empty() {
                let part = chunk.split_to(chunk.len().min(MAX_EXPORT_CHUNK));
                self.send(Message::Chunk(part)).await?;
            }
        }
        Ok(())
    }

    async fn send(&self, message: Message) -> Result<(), Stop> {
        let message = Ok(ExportProbesResponse { message: Some(message) });
        match tokio::time::timeout(self.send_timeout, self.sender.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(Stop::Client),
        }
    }
}
