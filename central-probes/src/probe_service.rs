//! `ProbeService`: serves a probe to a Collector, header first, then its
//! bytes as the store reads them (never the whole file in memory).

use std::pin::Pin;
use std::sync::Arc;

use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
use probe_api::v1::get_probe_response::Message;
use probe_api::v1::probe_service_server::ProbeService;
use probe_api::v1::{GetProbeRequest, GetProbeResponse, ProbeHeader, ProbeSource};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};
use tracing::instrument;

use crate::error::{Error, Result};
use crate::store::ProbeStore;

pub type ProbeStream = Pin<Box<dyn Stream<Item = Result<GetProbeResponse, Status>> + Send>>;

pub struct CollectorService {
    store: Arc<dyn ProbeStore>,
    /// Serve callers without a client certificate (a public upstream server).
    allow_anonymous: bool,
}

impl CollectorService {
    pub fn new(store: Arc<dyn ProbeStore>, allow_anonymous: bool) -> Self {
        CollectorService {
            store,
            allow_anonymous,
        }
    }

    async fn get_probe(&self, request: GetProbeRequest) -> Result<ProbeStream> {
        let path = ProbePath::new(
            ModuleVersion::parse(&request.module_version)?,
            ProbeFileName::parse(&request.file_name)?,
        );
        let Some(reader) = self.store.open(&path).await? else {
            return Err(Error::new(Code::NotFound, format!("no probe {path}")));
        };
        let header = GetProbeResponse {
            message: Some(Message::Header(ProbeHeader {
                path: path.to_string(),
                size: reader.probe.size,
                sha256: reader.probe.sha256.to_hex(),
                source: ProbeSource::UploadedPackage.into(),
            })),
        };
        let chunks = reader.chunks.map(|chunk| match chunk {
            Ok(bytes) => Ok(GetProbeResponse {
                message: Some(Message::Chunk(bytes)),
            }),
            Err(error) => Err(Status::from(error)),
        });
        Ok(Box::pin(tokio_stream::once(Ok(header)).chain(chunks)))
    }
}

#[tonic::async_trait]
impl ProbeService for CollectorService {
    type GetProbeStream = ProbeStream;

    #[instrument(skip_all, fields(module_version = %request.get_ref().module_version, file_name = %request.get_ref().file_name))]
    async fn get_probe(
        &self,
        request: Request<GetProbeRequest>,
    ) -> Result<Response<ProbeStream>, Status> {
        // rustls has verified any certificate against the cluster CA; here
        // it only remains to insist that there was one.
        let has_client_cert = request.peer_certs().is_some_and(|certs| !certs.is_empty());
        if !has_client_cert && !self.allow_anonymous {
            return Err(Status::unauthenticated(
                "GetProbe needs a client certificate signed by the cluster CA",
            ));
        }
        Ok(Response::new(self.get_probe(request.into_inner()).await?))
    }
}
