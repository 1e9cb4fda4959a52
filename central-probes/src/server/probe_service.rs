//! `ProbeService`: serves a probe to a Collector from the first source of
//! the chain that has it (uploaded packages, then the upstream), header
//! first, then its bytes as the source reads them (never the whole file in
//! memory). Each stream holds one of the global probe stream slots, and
//! tells it whether its client is reading.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
use probe_api::v1::get_probe_response::Message;
use probe_api::v1::probe_service_server::ProbeService;
use probe_api::v1::{GetProbeRequest, GetProbeResponse, ProbeHeader};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};
use tracing::instrument;

use crate::error::{Error, Result};
use crate::server::connections::ConnectionHandle;
use crate::server::metrics::Metrics;
use crate::server::probe_slots::{ProbeSlots, Slot};
use crate::server::sources::{SourceChain, source_label};

pub type ProbeStream = Pin<Box<dyn Stream<Item = Result<GetProbeResponse, Status>> + Send>>;

pub struct CollectorService {
    sources: SourceChain,
    /// Serve callers without a client certificate (a public upstream server).
    allow_anonymous: bool,
    metrics: Metrics,
    slots: ProbeSlots,
    /// How long a request waits for a free slot.
    slot_wait: Duration,
}

impl CollectorService {
    pub fn new(
        sources: SourceChain,
        allow_anonymous: bool,
        metrics: Metrics,
        slots: ProbeSlots,
        slot_wait: Duration,
    ) -> Self {
        CollectorService { sources, allow_anonymous, metrics, slots, slot_wait }
    }

    async fn get_probe(&self, request: GetProbeRequest, connection: &ConnectionHandle) -> Result<ProbeStream> {
        let path =
            ProbePath::new(ModuleVersion::parse(&request.module_version)?, ProbeFileName::parse(&request.file_name)?);
        // Taken before the probe is opened: slots bound open files too.
        let Some(slot) = self.slots.acquire(connection, self.slot_wait).await else {
            return Err(Error::new(
                Code::Unavailable,
                format!("Central is serving its limit of {} probe streams; retry", self.slots.capacity()),
            ));
        };
        let Some(found) = self.sources.find(&path).await? else {
            return Err(Error::new(Code::NotFound, format!("no source has the probe {path}")));
        };
        self.metrics.count_request("GetProbe", Code::Ok, source_label(found.source));
        let header = GetProbeResponse {
            message: Some(Message::Header(ProbeHeader {
                path: path.to_string(),
                size: found.reader.probe.size,
                sha256: found.reader.probe.sha256.to_hex(),
                source: found.source.into(),
            })),
        };
        let bytes_served = self.metrics.probe_bytes_served.clone();
        let chunks = found.reader.chunks.map(move |chunk| match chunk {
            Ok(bytes) => {
                bytes_served.inc_by(bytes.len() as u64);
                Ok(GetProbeResponse { message: Some(Message::Chunk(bytes)) })
            }
            Err(error) => Err(Status::from(error)),
        });
        Ok(Box::pin(SlottedStream { inner: Box::pin(tokio_stream::once(Ok(header)).chain(chunks)), slot }))
    }
}

/// A probe stream holding its slot until it ends or is dropped. Between
/// handing out a message and being asked for the next, it waits on its
/// client: that is the stall `ProbeSlots` watches.
struct SlottedStream {
    inner: ProbeStream,
    slot: Slot,
}

impl Stream for SlottedStream {
    type Item = Result<GetProbeResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.slot.client_reads();
        let next = self.inner.as_mut().poll_next(cx);
        if matches!(next, Poll::Ready(Some(_))) {
            self.slot.waiting_on_client();
        }
        next
    }
}

#[tonic::async_trait]
impl ProbeService for CollectorService {
    type GetProbeStream = ProbeStream;

    // At debug level: an info span would format both names for every call
    // even when nothing is logged.
    #[instrument(level = "debug", skip_all, fields(module_version = %request.get_ref().module_version, file_name = %request.get_ref().file_name))]
    async fn get_probe(&self, request: Request<GetProbeRequest>) -> Result<Response<ProbeStream>, Status> {
        // rustls has verified any certificate against the cluster CA; here
        // it only remains to insist that there was one.
        let has_client_cert = request.peer_certs().is_some_and(|certs| !certs.is_empty());
        if !has_client_cert && !self.allow_anonymous {
            self.metrics.count_request("GetProbe", Code::Unauthenticated, "");
            return Err(Status::unauthenticated("GetProbe needs a client certificate signed by the cluster CA"));
        }
        let connection =
            request.extensions().get::<ConnectionHandle>().cloned().unwrap_or_else(ConnectionHandle::detached);
        let stream = self
            .get_probe(request.into_inner(), &connection)
            .await
            .inspect_err(|error| self.metrics.count_request("GetProbe", error.code, ""))?;
        Ok(Response::new(stream))
    }
}
