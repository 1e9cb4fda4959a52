//! The product's own upload API beside ours (`proto/v1`), so that its
//! unmodified `roxctl` uploads to this Central: `v1.ProbeUploadService`'s
//! GetExistingProbes over gRPC, the same over gRPC-web for
//! `roxctl --force-http1` (HTTP/1.1, trailers as the body's last frame),
//! and what the upload route (`product_upload`) needs. Names are the
//! product's `<module version>/<probe file>`, and files carry the size and
//! CRC-32 that roxctl compares with its package's zip directory.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use probe_api::limits::{MAX_EXISTING_PATHS, MAX_REQUEST_MESSAGE};
use probe_api::names::ProbePath;
use probe_api::product::v1::probe_upload_manifest::File;
use probe_api::product::v1::probe_upload_service_server::ProbeUploadService;
use probe_api::product::v1::{GetExistingProbesRequest, GetExistingProbesResponse};
use prost::Message as _;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::error::{Error, Result};
use crate::server::auth::{Role, TokenAuth};
use crate::server::get_probe_direct::read_message;
use crate::server::metrics::Metrics;
use crate::store::ProbeStore;
use crate::store::misses::recorder::MissRecorder;

/// The gRPC-web path of GetExistingProbes, the one method roxctl calls.
pub const GET_EXISTING_PATH: &str = "/v1.ProbeUploadService/GetExistingProbes";

/// What the product's API works with: the store the services use, the
/// tokens, the metrics and audit, the misses an upload resolves.
pub struct ProductUploads {
    pub store: Arc<dyn ProbeStore>,
    pub auth: TokenAuth,
    pub metrics: Metrics,
    pub misses: Arc<MissRecorder>,
    /// An upload whose body brings nothing for this long is ended.
    pub upload_idle_timeout: std::time::Duration,
}

impl ProductUploads {
    /// The stored files among `names`: an invalid or unknown name, a
    /// probe stored before CRC-32s were recorded, and one a read found
    /// damaged (so that roxctl sends it again, which repairs it) are left
    /// out.
    async fn existing(&self, names: &[String]) -> Result<GetExistingProbesResponse> {
        if names.len() > MAX_EXISTING_PATHS {
            return Err(Error::invalid_argument(format!(
                "{} names asked for; at most {MAX_EXISTING_PATHS} per call",
                names.len()
            )));
        }
        let paths: Vec<ProbePath> = names.iter().filter_map(|name| ProbePath::parse(name).ok()).collect();
        let found = self.store.stat_many(&paths).await?;
        let existing_files = found
            .into_iter()
            .flatten()
            .filter(|probe| !self.store.is_damaged(&probe.path))
            .filter_map(|probe| {
                Some(File { name: probe.path.to_string(), size: i64::try_from(probe.size).ok()?, crc32: probe.crc32? })
            })
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
pub struct ProductUploadService(pub Arc<ProductUploads>);

#[tonic::async_trait]
impl ProbeUploadService for ProductUploadService {
    async fn get_existing_probes(
        &self,
        request: tonic::Request<GetExistingProbesRequest>,
    ) -> Result<tonic::Response<GetExistingProbesResponse>, Status> {
        let uploads = &self.0;
        let result = match uploads.auth.authorize(request.metadata(), Role::View) {
            Ok(_) => uploads.existing(&request.get_ref().files_to_check).await,
            Err(error) => Err(error),
        };
        Ok(tonic::Response::new(uploads.counted(result)?))
    }
}

/// Whether a request is to be answered in gRPC-web: it is gRPC-web
/// (`application/grpc-web`, `+proto`), or it is gRPC from a client that
/// accepts gRPC-web and cannot take trailers or asks for gRPC-web alone, as
/// roxctl's HTTP/1.1 downgrade sends it (`Content-Type: application/grpc`,
/// `Accept: application/grpc-web`, `Grpc-Web-Only: true`).
pub fn wants_grpc_web<B>(request: &Request<B>) -> bool {
    let header =
        |name: &str| request.headers().get_all(name).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
    let content_type = header("content-type").join(",");
    if content_type.starts_with("application/grpc-web") {
        return true;
    }
    if !content_type.starts_with("application/grpc") {
        return false;
    }
    let accepts_web =
        header("accept").iter().any(|accept| accept.split(',').any(|t| t.trim() == "application/grpc-web"));
    let takes_trailers = request.version() == http::Version::HTTP_2 && header("te").contains(&"trailers");
    accepts_web && (!takes_trailers || !header("grpc-web-only").is_empty())
}

/// Answers a gRPC-web request: GetExistingProbes, or UNIMPLEMENTED for any
/// other method. Every answer is HTTP 200 with the status in the trailer
/// frame, as gRPC-web clients expect (roxctl reads an HTTP error as
/// UNAVAILABLE and retries it).
pub async fn grpc_web<B>(uploads: &ProductUploads, request: Request<B>) -> Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let content_type = request.headers().get(http::header::CONTENT_TYPE).cloned();
    if content_type.as_ref().and_then(|value| value.to_str().ok()).is_some_and(|value| value.contains("-text")) {
        let status = Status::invalid_argument("Central answers binary gRPC-web only, not application/grpc-web-text");
        return grpc_web_response(None, &status);
    }
    if request.uri().path() != GET_EXISTING_PATH {
        let status = Status::unimplemented(format!("{} is not served over gRPC-web", request.uri().path()));
        return grpc_web_response(None, &status);
    }
    let metadata = MetadataMap::from_headers(request.headers().clone());
    let result = async {
        // The token before the body, as over gRPC.
        uploads.auth.authorize(&metadata, Role::View)?;
        let message = read_message(request, MAX_REQUEST_MESSAGE)
            .await
            .map_err(|status| Error::new(status.code(), status.message()))?;
        let asked = GetExistingProbesRequest::decode(message)
            .map_err(|e| Error::invalid_argument(format!("the request message was refused: {e}")))?;
        uploads.existing(&asked.files_to_check).await
    }
    .await;
    match uploads.counted(result) {
        Ok(answer) => grpc_web_response(Some(answer.encode_to_vec()), &Status::ok("")),
        Err(error) => grpc_web_response(None, &Status::from(error)),
    }
}

/// A gRPC-web answer: the message frame, if any, then the trailer frame
/// (flag 0x80) holding the status as header lines.
fn grpc_web_response(message: Option<Vec<u8>>, status: &Status) -> Response<tonic::body::Body> {
    let mut body = BytesMut::new();
    if let Some(message) = message {
        body.put_u8(0);
        body.put_u32(message.len() as u32);
        body.extend_from_slice(&message);
    }
    let mut trailers = http::HeaderMap::new();
    // Only fails for details that cannot be encoded; ours have none.
    let _ = status.add_header(&mut trailers);
    let mut block = Vec::new();
    for (name, value) in &trailers {
        block.extend_from_slice(name.as_str().as_bytes());
        block.extend_from_slice(b":");
        block.extend_from_slice(value.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    body.put_u8(0x80);
    body.put_u32(block.len() as u32);
    body.extend_from_slice(&block);
    let mut response =
        Response::new(tonic::body::Body::new(http_body_util::Full::new(body.freeze()).map_err(|never| match never {})));
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc-web+proto"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_web_is_answered_to_grpc_web_and_to_roxctls_downgrade_only() {
        let request = |version, headers: &[(&str, &str)]| {
            let mut request = Request::post(GET_EXISTING_PATH).version(version);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request.body(()).unwrap()
        };
        let (h1, h2) = (http::Version::HTTP_11, http::Version::HTTP_2);
        let grpc = ("content-type", "application/grpc");
        let trailers = ("te", "trailers");
        let accepts_web = ("accept", "application/grpc, application/grpc-web");
        assert!(wants_grpc_web(&request(h2, &[("content-type", "application/grpc-web+proto")])));
        assert!(wants_grpc_web(&request(h1, &[grpc, accepts_web])), "HTTP/1.1 cannot carry trailers");
        assert!(wants_grpc_web(&request(h2, &[grpc, trailers, accepts_web, ("grpc-web-only", "true")])));
        assert!(!wants_grpc_web(&request(h2, &[grpc, trailers, accepts_web])), "plain gRPC when trailers go");
        assert!(!wants_grpc_web(&request(h2, &[grpc, trailers])), "tonic's own clients");
        assert!(!wants_grpc_web(&request(h1, &[grpc])), "a client that accepts no gRPC-web");
        assert!(!wants_grpc_web(&request(h1, &[("content-type", "application/octet-stream"), accepts_web])));
    }

    #[tokio::test]
    async fn a_grpc_web_answer_ends_with_its_status_in_a_trailer_frame() {
        let response = grpc_web_response(Some(vec![1, 2, 3]), &Status::new(Code::Unauthenticated, "no token"));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..8], &[0, 0, 0, 0, 3, 1, 2, 3]);
        assert_eq!(body[8], 0x80);
        let length = u32::from_be_bytes([body[9], body[10], body[11], body[12]]) as usize;
        let block = std::str::from_utf8(&body[13..]).unwrap();
        assert_eq!(block.len(), length);
        assert!(block.contains("grpc-status:16\r\n"), "{block:?}");
        assert!(block.contains("grpc-message:no%20token\r\n"), "{block:?}");
    }
}
