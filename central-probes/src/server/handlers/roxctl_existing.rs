//! The product's own upload API beside ours (`proto/v1`), so that its
//! unmodified `roxctl` uploads to this Central: `v1.ProbeUploadService`'s
//! GetExistingProbes over gRPC, the same over gRPC-web for
//! `roxctl --force-http1` (HTTP/1.1, trailers as the body's last frame).
//! Names are the product's `<module version>/<probe file>`, and files carry
//! the size and CRC-32 that roxctl compares with its package's zip
//! directory. The answer is the catalog's, as for our own API.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use probe_api::limits::MAX_REQUEST_MESSAGE;
use probe_api::product::v1::probe_upload_manifest::File;
use probe_api::product::v1::probe_upload_service_server::ProbeUploadService;
use probe_api::product::v1::{GetExistingProbesRequest, GetExistingProbesResponse};
use prost::Message as _;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::error::{Error, Result};
use crate::server::auth::{Role, TokenAuth};
use crate::server::catalog::{Catalog, InvalidPaths};
use crate::server::edge::grpc::read_message;
use crate::server::edge::grpc_web;
use crate::server::edge::{Answer, Call, Handler};
use crate::server::metrics::Metrics;

/// The gRPC-web path of GetExistingProbes, the one method roxctl calls.
pub const GET_EXISTING_PATH: &str = "/v1.ProbeUploadService/GetExistingProbes";

/// GetExistingProbes as the product's API answers it: the tokens, the
/// catalog and the metrics.
pub struct RoxctlExisting {
    pub catalog: Arc<Catalog>,
    pub auth: TokenAuth,
    pub metrics: Metrics,
}

impl RoxctlExisting {
    /// The stored files among `names`: an invalid or unknown name, a
    /// probe stored before CRC-32s were recorded, and one a read found
    /// damaged (so that roxctl sends it again, which repairs it) are left
    /// out.
    async fn existing(&self, names: Vec<String>) -> Result<GetExistingProbesResponse> {
        let found = self.catalog.existing(names, InvalidPaths::Skip).await?;
        let existing_files = found
            .into_iter()
            .filter_map(|(name, probe)| Some(File { name, size: i64::try_from(probe.size).ok()?, crc32: probe.crc32? }))
            .collect();
        Ok(GetExistingProbesResponse { existing_files })
    }

    fn counted<T>(&self, result: Result<T>) -> Result<T> {
        let code = result.as_ref().map_or_else(|e| e.code, |_| Code::Ok);
        self.metrics.count_request("v1.GetExistingProbes", code, "");
        result
    }
}

/// `v1.ProbeUploadService` over gRPC.
pub struct ProductUploadService(pub Arc<RoxctlExisting>);

#[tonic::async_trait]
impl ProbeUploadService for ProductUploadService {
    async fn get_existing_probes(
        &self,
        request: tonic::Request<GetExistingProbesRequest>,
    ) -> Result<tonic::Response<GetExistingProbesResponse>, Status> {
        let uploads = &self.0;
        let result = match uploads.auth.authorize(request.metadata(), Role::View) {
            Ok(_) => uploads.existing(request.into_inner().files_to_check).await,
            Err(error) => Err(error),
        };
        Ok(tonic::Response::new(uploads.counted(result)?))
    }
}

/// Answers a gRPC-web request: GetExistingProbes, or UNIMPLEMENTED for any
/// other method. Every answer is HTTP 200 with the status in the trailer
/// frame, as gRPC-web clients expect (roxctl reads an HTTP error as
/// UNAVAILABLE and retries it).
pub struct ExistingOverGrpcWeb(pub Arc<RoxctlExisting>);

impl Handler for ExistingOverGrpcWeb {
    fn call(&self, call: Call) -> Answer {
        let uploads = self.0.clone();
        Box::pin(async move { grpc_web(&uploads, call.request).await })
    }
}

async fn grpc_web<B>(uploads: &RoxctlExisting, request: Request<B>) -> Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if let Some(refused) = grpc_web::refuse_text(&request) {
        return refused;
    }
    if request.uri().path() != GET_EXISTING_PATH {
        let status = Status::unimplemented(format!("{} is not served over gRPC-web", request.uri().path()));
        return grpc_web::answer(None, &status);
    }
    let metadata = MetadataMap::from_headers(request.headers().clone());
    let result = async {
        // The token before the body, as over gRPC.
        uploads.auth.authorize(&metadata, Role::View)?;
        let message = read_message(request, MAX_REQUEST_MESSAGE).await?;
        let asked = GetExistingProbesRequest::decode(message)
            .map_err(|e| Error::invalid_argument(format!("the request message was refused: {e}")))?;
        uploads.existing(asked.files_to_check).await
    }
    .await;
    match uploads.counted(result) {
        Ok(answer) => grpc_web::answer(Some(answer.encode_to_vec()), &Status::ok("")),
        Err(error) => grpc_web::answer(None, &Status::from(error)),
    }
}
