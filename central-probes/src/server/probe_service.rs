//! `ProbeServing`: finds a probe for a Collector in the first source of
//! the chain that has it (uploaded packages, then the upstream), with its
//! bytes to come as the source reads them (never the whole file in
//! memory). Each stream holds one of the global probe stream slots, and
//! tells it whether its client is reading. GetProbe (`get_probe_direct`)
//! and the HTTPS route (`kernel_objects`) both serve through it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
use probe_api::v1::ProbeSource as ApiSource;
use tokio_stream::{Stream, StreamExt};
use tonic::Code;

use crate::error::{Error, Result};
use crate::server::connections::handle::ConnectionHandle;
use crate::server::metrics::Metrics;
use crate::server::probe_slots::{ProbeSlots, Slot};
use crate::server::sources::{SourceChain, source_label};
use crate::store::StoredProbe;
use crate::store::client_id::ClientId;
use crate::store::misses::Resolver;
use crate::store::misses::recorder::MissRecorder;

/// A probe's bytes as its source reads them, holding a stream slot.
pub type ProbeChunks = SlottedStream<Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>>;

/// What both ways of fetching a probe share (GetProbe here, the HTTPS route
/// in `kernel_objects`): the certificate rule, the stream slots, the source
/// chain and the metrics.
pub struct ProbeServing {
    sources: SourceChain,
    /// Serve callers without a client certificate (a public upstream server).
    allow_anonymous: bool,
    metrics: Metrics,
    slots: ProbeSlots,
    /// How long a request waits for a free slot.
    slot_wait: Duration,
    /// Where NOT_FOUND answers are recorded.
    misses: Arc<MissRecorder>,
}

/// Who asks for a probe.
#[derive(Clone, Copy, Debug)]
pub struct Asker {
    /// Whether the client showed a certificate (rustls verified it against
    /// the cluster CA).
    pub has_certificate: bool,
    /// For counting distinct clients in the misses.
    pub client: ClientId,
}

/// A probe found: what it is, where it came from, and its bytes to come.
pub struct Serving {
    pub probe: StoredProbe,
    pub source: ApiSource,
    pub chunks: ProbeChunks,
}

impl ProbeServing {
    pub fn new(
        sources: SourceChain,
        allow_anonymous: bool,
        metrics: Metrics,
        slots: ProbeSlots,
        slot_wait: Duration,
        misses: Arc<MissRecorder>,
    ) -> Self {
        ProbeServing { sources, allow_anonymous, metrics, slots, slot_wait, misses }
    }

    /// The probe at `module_version`/`file_name` for `asker`; `what` names
    /// the way it was asked for in the request metrics.
    pub async fn serve(
        &self,
        what: &'static str,
        module_version: &str,
        file_name: &str,
        asker: Asker,
        connection: &ConnectionHandle,
    ) -> Result<Serving> {
        // rustls has verified any certificate against the cluster CA; here
        // it only remains to insist that there was one.
        if !asker.has_certificate && !self.allow_anonymous {
            self.metrics.count_request(what, Code::Unauthenticated, "");
            return Err(Error::new(
                Code::Unauthenticated,
                "a probe needs a client certificate signed by the cluster CA",
            ));
        }
        self.find(what, module_version, file_name, asker.client, connection)
            .await
            .inspect_err(|error| self.metrics.count_request(what, error.code, ""))
    }

    async fn find(
        &self,
        what: &'static str,
        module_version: &str,
        file_name: &str,
        client: ClientId,
        connection: &ConnectionHandle,
    ) -> Result<Serving> {
        let path = ProbePath::new(ModuleVersion::parse(module_version)?, ProbeFileName::parse(file_name)?);
        // Taken before the probe is opened: slots bound open files too.
        let Some(slot) = self.slots.acquire(connection, self.slot_wait).await else {
            return Err(Error::new(
                Code::Unavailable,
                format!("Central is serving its limit of {} probe streams; retry", self.slots.capacity()),
            ));
        };
        let Some(found) = self.sources.find(&path).await? else {
            self.misses.missed(&path, client);
            return Err(Error::new(Code::NotFound, format!("no source has the probe {path}")));
        };
        if found.source == ApiSource::Upstream {
            self.misses.provided(path, Resolver::Upstream);
        }
        self.metrics.count_request(what, Code::Ok, source_label(found.source));
        let bytes_served = self.metrics.probe_bytes_served.clone();
        let chunks = found.reader.chunks.map(move |chunk| {
            if let Ok(bytes) = &chunk {
                bytes_served.inc_by(bytes.len() as u64);
            }
            chunk
        });
        // From here the stream has bytes to send (its header at least) and
        // waits on HTTP/2 to ask for them, which it does only once the
        // client's window has room: a client granting none stalls it now.
        slot.waiting_on_client();
        Ok(Serving {
            probe: found.reader.probe,
            source: found.source,
            chunks: SlottedStream { inner: Box::pin(chunks), slot },
        })
    }
}

/// A probe stream holding its slot until it ends or is dropped. From being
/// handed to HTTP/2 until it is first polled, and between handing out an
/// item and being asked for the next, it waits on its client: that is the
/// stall `ProbeSlots` watches.
pub struct SlottedStream<S> {
    inner: S,
    slot: Slot,
}

impl<S: Stream + Unpin> Stream for SlottedStream<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.slot.client_reads();
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if matches!(next, Poll::Ready(Some(_))) {
            self.slot.waiting_on_client();
        }
        next
    }
}
