//! The product's upload route, `POST /api/extensions/probeupload`, as its
//! unmodified `roxctl collector support-packages upload` sends it: a
//! serialized `v1.ProbeUploadManifest` of `manifestLen` bytes, then each
//! listed file's bytes in manifest order (the contract and its answers are
//! in `proto/v1/probe_upload_service.proto`).
//!
//! The body is never held whole: the manifest is read and checked first,
//! then the rest of the body is cut at file boundaries into the events of
//! the upload use case (`uploads`): options with overwrite, since the
//! client decided that; per file a start, its bytes as they arrive, an end
//! with the manifest's CRC-32. The upload takes them as UploadProbes' are
//! taken, so files commit by the same durable, in-order rule, and the body
//! is read only as fast as the store takes it. A body that brings nothing
//! for `--upload-idle-timeout` ends the upload (408); an upload whose
//! client went away is still recorded with what it committed.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use probe_api::limits::{MAX_FILE_SIZE, MAX_MANIFEST_BYTES, MAX_MANIFEST_FILES, MAX_UPLOAD_CHUNK};
use probe_api::names::ProbePath;
use probe_api::product::v1::ProbeUploadManifest;
use probe_api::v1::UploadProbesResponse;
use prost::Message as _;
use tokio_stream::Stream;
use tonic::Code;
use tonic::metadata::MetadataMap;

use crate::error::{Error, Result};
use crate::server::edge::http::{next_data, text};
use crate::server::edge::{Answer, Call, Handler};
use crate::server::uploads::{UploadEnd, UploadEvent, UploadSession, Uploader, Uploads, Via};
use crate::store::ProbeStore;

/// The route's path.
pub const PATH: &str = "/api/extensions/probeupload";

/// One file of the manifest, checked.
struct Planned {
    path: ProbePath,
    size: u64,
    crc32: u32,
}

/// The route, into the upload use case.
pub struct RoxctlUpload(pub Arc<Uploads>);

impl Handler for RoxctlUpload {
    fn call(&self, call: Call) -> Answer {
        let (uploads, client) = (self.0.clone(), call.client());
        Box::pin(answer(uploads, call.request, client))
    }
}

/// Answers one request of the route; `client` names the peer in the audit
/// log.
async fn answer<B>(uploads: Arc<Uploads>, request: Request<B>, client: String) -> Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    match upload(&uploads, request, client).await {
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

async fn upload<B>(uploads: &Arc<Uploads>, request: Request<B>, client: String) -> Result<UploadProbesResponse>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    let via = Via::RoxctlRoute;
    if request.method() != Method::POST {
        let refused = Error::invalid_argument(format!("{PATH} takes POST only, not {}", request.method()));
        return Err(uploads.refuse(via, refused));
    }
    let caller = uploads.authorize(&MetadataMap::from_headers(request.headers().clone()), via)?;
    let idle = uploads.idle_timeout();
    uploads.run(Uploader { caller, client, via }, events(request, idle)).await
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
    match events(request, idle).await {
        Ok(events) => UploadSession::new(store).run_to_end(events).await,
        Err(error) => UploadEnd::refused(error),
    }
}

/// The upload's events, once the manifest is read and checked; an error
/// refuses the upload before any byte is stored.
async fn events<B>(
    request: Request<B>,
    idle: Duration,
) -> Result<impl Stream<Item = Result<UploadEvent>> + Send + Unpin + 'static>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    let (body, rest, files) = planned(request, idle).await?;
    let body = RoxctlBody { body, rest, files: files.into_iter(), idle, step: Step::Options };
    let events = futures_util::stream::unfold(body, |mut body| async move { body.next().await.map(|e| (e, body)) });
    Ok(Box::pin(events))
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

/// The body after its manifest, cut into upload events.
struct RoxctlBody<B> {
    body: B,
    /// Bytes received and not handed on yet.
    rest: Bytes,
    files: std::vec::IntoIter<Planned>,
    idle: Duration,
    step: Step,
}

/// What comes next.
enum Step {
    Options,
    FileStart,
    /// `left` bytes of `file`, then its end.
    File {
        file: Planned,
        left: u64,
    },
    /// The events ended, at the body's end or at an error.
    Done,
}

impl<B> RoxctlBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// The next event; an error is the last.
    async fn next(&mut self) -> Option<Result<UploadEvent>> {
        self.step().await.transpose()
    }

    async fn step(&mut self) -> Result<Option<UploadEvent>> {
        // An error leaves `Done` behind.
        match std::mem::replace(&mut self.step, Step::Done) {
            Step::Options => {
                self.step = Step::FileStart;
                Ok(Some(UploadEvent::Options { overwrite: true }))
            }
            Step::FileStart => match self.files.next() {
                Some(file) => {
                    let start = UploadEvent::FileStart { path: file.path.to_string(), size: file.size };
                    self.step = Step::File { left: file.size, file };
                    Ok(Some(start))
                }
                None => {
                    ends_here(&mut self.body, &mut self.rest, self.idle).await?;
                    Ok(None)
                }
            },
            Step::File { file, left } if left > 0 => {
                if self.rest.is_empty() {
                    match next_data(&mut self.body, self.idle).await? {
                        Some(data) => self.rest = data,
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
                let take = (left.min(self.rest.len() as u64) as usize).min(MAX_UPLOAD_CHUNK);
                self.step = Step::File { file, left: left - take as u64 };
                Ok(Some(UploadEvent::Chunk(vec![self.rest.split_to(take)])))
            }
            Step::File { file, .. } => {
                // The last file commits only once the body is known to end there.
                if self.files.len() == 0 {
                    ends_here(&mut self.body, &mut self.rest, self.idle).await?;
                }
                self.step = Step::FileStart;
                Ok(Some(UploadEvent::FileEnd {
                    sha256: String::new(),
                    crc32: Some(file.crc32),
                    signature: Bytes::new(),
                }))
            }
            Step::Done => Ok(None),
        }
    }
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
