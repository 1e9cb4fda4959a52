//! The product's upload route, `POST /api/extensions/probeupload`, as its
//! unmodified `roxctl collector support-packages upload` sends it: a
//! serialized `v1.ProbeUploadManifest` of `manifestLen` bytes, then each
//! listed file's bytes in manifest order (the contract and its answers are
//! in `proto/v1/probe_upload_service.proto`).
//!
//! The body is never held whole: the manifest is read and checked first,
//! then the rest of the body is cut at file boundaries into the messages of
//! an UploadProbes stream (options with overwrite, since the client decided
//! that; per file a header, its bytes as they arrive, a trailer with the
//! manifest's CRC-32) and fed to the very `UploadSession` that UploadProbes
//! runs, so files commit by the same durable, in-order rule. A task reads
//! the body into a small bounded channel: the body is read only as fast as
//! the store takes it. A body that brings nothing for
//! `--upload-idle-timeout` ends the upload (408), and the whole upload runs
//! in a task of its own, so that one whose client went away is still
//! logged and audited with what it committed (`uploads::record`).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use probe_api::limits::{MAX_FILE_SIZE, MAX_MANIFEST_BYTES, MAX_MANIFEST_FILES, MAX_UPLOAD_CHUNK};
use probe_api::names::ProbePath;
use probe_api::product::v1::ProbeUploadManifest;
use probe_api::v1::upload_probes_request::Message;
use probe_api::v1::{FileHeader, FileTrailer, UploadOptions, UploadProbesRequest, UploadProbesResponse};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataMap;

use crate::error::{Error, Result};
use crate::server::auth::Role;
use crate::server::edge::http::{next_data, text};
use crate::server::edge::{Answer, Call, Handler};
use crate::server::handlers::roxctl_existing::ProductUploads;
use crate::server::uploads::record::{Uploader, record_upload_end};
use crate::server::uploads::{Part, UploadEnd, UploadSession};
use crate::store::ProbeStore;

/// The route's path.
pub const PATH: &str = "/api/extensions/probeupload";

/// Messages between the task reading the body and the upload session:
/// with chunks of at most one HTTP/2 frame or HTTP/1.1 read, a few hundred
/// KiB at most.
const FEED_DEPTH: usize = 8;

/// One file of the manifest, checked.
struct Planned {
    path: ProbePath,
    size: u64,
    crc32: u32,
}

/// The route, uploading through `ProductUploads`.
pub struct RoxctlUpload(pub Arc<ProductUploads>);

impl Handler for RoxctlUpload {
    fn call(&self, call: Call) -> Answer {
        let (uploads, client) = (self.0.clone(), call.client());
        Box::pin(answer(uploads, call.request, client))
    }
}

/// Answers one request of the route; `client` names the peer in the audit
/// log.
async fn answer<B>(uploads: Arc<ProductUploads>, request: Request<B>, client: String) -> Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    // When the client goes away this call is dropped; the task is not.
    let upload = tokio::spawn(async move {
        let result = upload(&uploads, request, &client).await;
        let code = result.as_ref().map_or_else(|e| e.code, |_| Code::Ok);
        uploads.metrics.count_request("probeupload", code, "");
        result
    });
    let result = upload.await.unwrap_or_else(|e| Err(Error::internal(format!("the upload's task failed: {e}"))));
    match result {
        Ok(response) => text(
            StatusCode::OK,
            &format!(
                "{} files: {} stored, {} overwritten, {} identical",
                response.results.len(),
                response.stored_count,
                response.overwritten_count,
                response.identical_count
            ),
        ),
        Err(error) => text(http_status(error.code), &error.to_string()),
    }
}

async fn upload<B>(uploads: &ProductUploads, request: Request<B>, client: &str) -> Result<UploadProbesResponse>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    if request.method() != Method::POST {
        return Err(Error::invalid_argument(format!("{PATH} takes POST only, not {}", request.method())));
    }
    let caller = uploads.auth.caller(&MetadataMap::from_headers(request.headers().clone()), Role::Admin)?;
    let end = receive(uploads.store.clone(), uploads.upload_idle_timeout, request).await;
    let uploader = Uploader { caller: &caller, client, via: PATH };
    record_upload_end(&uploads.metrics, &uploads.misses, &uploader, &end).await;
    end.into_result()
}

/// Receives an authorized upload into `store` to its end: what it
/// committed, and the error that stopped it, if any. Public (and hidden)
/// for the fuzz target `roxctl_body`, which drives the body's parser
/// through it.
#[doc(hidden)]
pub async fn receive<B>(store: Arc<dyn ProbeStore>, idle: Duration, request: Request<B>) -> UploadEnd
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    let (body, rest, files) = match planned(request, idle).await {
        Ok(planned) => planned,
        Err(error) => return UploadEnd { response: UploadProbesResponse::default(), error: Some(error) },
    };
    let (messages, received) = mpsc::channel(FEED_DEPTH);
    let feeder = tokio::spawn(async move {
        let fed = feed(body, rest, files, &messages, idle).await;
        if fed.is_err() {
            // The session stops at this, after the files before it commit.
            let _ = messages.send(Err(tonic::Status::cancelled("the body was refused"))).await;
        }
        fed
    });
    let parts = ReceiverStream::new(received).map(|message| message.map(Part::from));
    let mut end = UploadSession::new(store).run_to_end(parts).await;
    let fed = feeder.await.unwrap_or_else(|e| Err(Error::internal(format!("reading the upload: {e}"))));
    end.error = match (fed, end.error.take()) {
        // The session stopped because of the body: the body's error says why.
        (Err(error), Some(stopped)) if stopped.code == Code::Cancelled => {
            Some(error.context("the upload stopped; the files before it are stored"))
        }
        (_, Some(error)) | (Err(error), None) => Some(error),
        (Ok(()), None) => None,
    };
    end
}

/// The body after its manifest, what of it came with the manifest, and
/// the manifest's files, each checked, before any byte is stored.
async fn planned<B>(request: Request<B>, idle: Duration) -> Result<(B, Bytes, Vec<Planned>)>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let manifest_len = manifest_len(request.uri().query().unwrap_or_default())?;
    let content_length = match request.headers().get(http::header::CONTENT_LENGTH) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| Error::invalid_argument("a Content-Length that is not a number"))?,
        ),
    };
    let mut body = request.into_body();
    let (manifest, rest) = read_manifest(&mut body, manifest_len, idle).await?;
    let files = plan(&manifest)?;
    let declared = manifest_len as u64 + files.iter().map(|file| file.size).sum::<u64>();
    if let Some(length) = content_length
        && length != declared
    {
        return Err(Error::invalid_argument(format!(
            "Content-Length is {length} but the manifest declares {declared} bytes ({manifest_len} of manifest and \
             its files)"
        )));
    }
    Ok((body, rest, files))
}

/// `manifestLen=N` of the query string.
fn manifest_len(query: &str) -> Result<usize> {
    let value = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("manifestLen="))
        .ok_or_else(|| Error::invalid_argument("the query has no manifestLen=<bytes of the manifest>"))?;
    let len: usize =
        value.parse().map_err(|_| Error::invalid_argument(format!("manifestLen={value:?} is not a number")))?;
    if len > MAX_MANIFEST_BYTES {
        return Err(Error::new(
            Code::ResourceExhausted,
            format!("a manifest of {len} bytes is over the limit of {MAX_MANIFEST_BYTES}"),
        ));
    }
    Ok(len)
}

/// The manifest, and what of the body came with it.
async fn read_manifest<B>(body: &mut B, len: usize, idle: Duration) -> Result<(ProbeUploadManifest, Bytes)>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut manifest = BytesMut::new();
    let mut rest = Bytes::new();
    while manifest.len() < len {
        let Some(mut data) = next_data(body, idle).await? else {
            return Err(Error::invalid_argument(format!(
                "the body ended after {} bytes, inside its manifest of {len}",
                manifest.len()
            )));
        };
        let take = (len - manifest.len()).min(data.len());
        manifest.extend_from_slice(&data.split_to(take));
        rest = data;
    }
    let manifest = ProbeUploadManifest::decode(manifest.freeze())
        .map_err(|e| Error::invalid_argument(format!("the manifest is not a valid ProbeUploadManifest: {e}")))?;
    Ok((manifest, rest))
}

/// The manifest's files, each checked, before any byte is stored.
fn plan(manifest: &ProbeUploadManifest) -> Result<Vec<Planned>> {
    if manifest.files.len() > MAX_MANIFEST_FILES {
        return Err(Error::new(
            Code::ResourceExhausted,
            format!("{} files in the manifest; at most {MAX_MANIFEST_FILES} per upload", manifest.files.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut files = Vec::with_capacity(manifest.files.len());
    for file in &manifest.files {
        let path = ProbePath::parse(&file.name)
            .map_err(|e| Error::invalid_argument(format!("the manifest names {:?}: {e}", file.name)))?;
        let size = u64::try_from(file.size)
            .map_err(|_| Error::invalid_argument(format!("{path}: a negative size {}", file.size)))?;
        if size > MAX_FILE_SIZE {
            return Err(Error::new(
                Code::ResourceExhausted,
                format!("{path}: {size} bytes is over the limit of {MAX_FILE_SIZE}"),
            ));
        }
        if !seen.insert(path.clone()) {
            return Err(Error::invalid_argument(format!("{path} comes twice in the manifest")));
        }
        files.push(Planned { path, size, crc32: file.crc32 });
    }
    Ok(files)
}

/// Cuts the body after the manifest into the messages of an upload stream.
/// Returns what was wrong with the body, if anything; a session that went
/// away (it failed on a file) is not the body's fault.
async fn feed<B>(
    mut body: B,
    mut rest: Bytes,
    files: Vec<Planned>,
    messages: &mpsc::Sender<Result<UploadProbesRequest, tonic::Status>>,
    idle: Duration,
) -> Result<()>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let send = |message| {
        let messages = messages.clone();
        async move { messages.send(Ok(UploadProbesRequest { message: Some(message) })).await.is_ok() }
    };
    if !send(Message::Options(UploadOptions { overwrite: true })).await {
        return Ok(());
    }
    let last = files.len().saturating_sub(1);
    for (index, file) in files.into_iter().enumerate() {
        let header = FileHeader { path: file.path.to_string(), size: file.size };
        if !send(Message::FileHeader(header)).await {
            return Ok(());
        }
        let mut left = file.size;
        while left > 0 {
            if rest.is_empty() {
                match next_data(&mut body, idle).await? {
                    Some(data) => rest = data,
                    None => {
                        return Err(Error::invalid_argument(format!(
                            "the body ended inside {}: {} of its {} bytes came",
                            file.path,
                            file.size - left,
                            file.size
                        )));
                    }
                }
            }
            let take = (left.min(rest.len() as u64) as usize).min(MAX_UPLOAD_CHUNK);
            left -= take as u64;
            if !send(Message::Chunk(rest.split_to(take))).await {
                return Ok(());
            }
        }
        // The last file commits only once the body is known to end there.
        if index == last {
            ends_here(&mut body, &mut rest, idle).await?;
        }
        let trailer = FileTrailer { sha256: String::new(), crc32: Some(file.crc32), signature: Bytes::new() };
        if !send(Message::FileTrailer(trailer)).await {
            return Ok(());
        }
    }
    ends_here(&mut body, &mut rest, idle).await
}

/// INVALID_ARGUMENT when the body goes on past what the manifest declares.
async fn ends_here<B>(body: &mut B, rest: &mut Bytes, idle: Duration) -> Result<()>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    while rest.is_empty() {
        match next_data(body, idle).await? {
            Some(data) => *rest = data,
            None => return Ok(()),
        }
    }
    Err(Error::invalid_argument(
        "the body goes on past the files its manifest declares; its last file was not committed",
    ))
}

/// The HTTP status of an error, as the product's clients read it: roxctl
/// retries 429 and 5xx other than 501, so a client's mistake is never one.
/// A body that stalled gets 408: the files before it are stored, and
/// running the upload again sends only the rest.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::DeadlineExceeded => StatusCode::REQUEST_TIMEOUT,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
        Code::DataLoss => StatusCode::UNPROCESSABLE_ENTITY,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Internal | Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_len_is_read_from_the_query_and_bounded() {
        assert_eq!(manifest_len("manifestLen=12").unwrap(), 12);
        assert_eq!(manifest_len("a=b&manifestLen=0").unwrap(), 0);
        assert_eq!(manifest_len("").unwrap_err().code, Code::InvalidArgument);
        assert_eq!(manifest_len("manifestLen=x").unwrap_err().code, Code::InvalidArgument);
        let over = format!("manifestLen={}", MAX_MANIFEST_BYTES + 1);
        assert_eq!(manifest_len(&over).unwrap_err().code, Code::ResourceExhausted);
    }

    #[test]
    fn client_mistakes_are_never_answered_with_a_status_roxctl_retries() {
        for code in [Code::InvalidArgument, Code::Cancelled, Code::AlreadyExists, Code::FailedPrecondition] {
            assert_eq!(http_status(code), StatusCode::BAD_REQUEST, "{code:?}");
        }
        assert_eq!(http_status(Code::DataLoss), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(http_status(Code::ResourceExhausted), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(http_status(Code::DeadlineExceeded), StatusCode::REQUEST_TIMEOUT, "a stalled body");
    }
}
