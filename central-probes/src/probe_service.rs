//! `ProbeService`: serves a probe to a Collector from the first source of
//! the chain that has it (uploaded packages, then the upstream), header
//! first, then its bytes as the source reads them (never the whole file in
//! memory).

use std::pin::Pin;

use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
use probe_api::v1::get_probe_response::Message;
use probe_api::v1::probe_service_server::ProbeService;
use probe_api::v1::{GetProbeRequest, GetProbeResponse, ProbeHeader};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};
use tracing::instrument;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::sources::{SourceChain, source_label};

pub type ProbeStream = Pin<Box<dyn Stream<Item = Result<GetProbeResponse, Status>> + Send>>;

pub struct CollectorService {
    sources: SourceChain,
    /// Serve callers without a client certificate (a public upstream server).
    allow_anonymous: bool,
    metrics: Metrics,
}

impl CollectorService {
    pub fn new(sources: SourceChain, allow_anonymous: bool, metrics: Metrics) -> Self {
        CollectorService { sources, allow_anonymous, metrics }
    }

    async fn get_probe(&self, request: GetProbeRequest) -> Result<ProbeStream> {
        let path =
            ProbePath::new(ModuleVersion::parse(&request.module_version)?, ProbeFileName::parse(&request.file_name)?);
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
        Ok(Box::pin(tokio_stream::once(Ok(header)).chain(chunks)))
    }
}

#[tonic::async_trait]
impl ProbeService for CollectorService {
    type GetProbeStream = ProbeStream;

    #[instrument(skip_all, fields(module_version = %request.get_ref().module_version, file_name = %request.get_ref().file_name))]
    async fn get_probe(&self, request: Request<GetProbeRequest>) -> Result<Response<ProbeStream>, Status> {
        // rustls has verified any certificate against the cluster CA; here
        // it only remains to insist that there was one.
        let has_client_cert = request.peer_certs().is_some_and(|certs| !certs.is_empty());
        if !has_client_cert && !self.allow_anonymous {
            self.metrics.count_request("GetProbe", Code::Unauthenticated, "");
            return Err(Status::unauthenticated("GetProbe needs a client certificate signed by the cluster CA"));
        }
        let stream = self
            .get_probe(request.into_inner())
            .await
            .inspect_err(|error| self.metrics.count_request("GetProbe", error.code, ""))?;
        Ok(Response::new(stream))
    }
}
