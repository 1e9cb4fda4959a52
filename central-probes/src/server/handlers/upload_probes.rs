//! UploadProbes answered beside tonic, on the same `AdminService`: its
//! request stream is read here, straight from the HTTP/2 body. tonic copies
//! every DATA frame into its decode buffer before it decodes a message
//! (what that cost: BENCHMARKS.md, "Receiving an upload"). Here a chunk message (a
//! message that is only the `chunk` field, of at most `MAX_UPLOAD_CHUNK`
//! bytes) goes to the store as the pieces of the frames that carried it,
//! and the store copies them once, into the pack. Every other message
//! (options, headers, trailers, and any message laid out otherwise) is
//! gathered and decoded by prost, as tonic would; a client cannot tell the
//! two apart (`tests` feeds both the same bytes in every split).
//!
//! Errors (the proto's): a compressed message (INVALID_ARGUMENT: Central
//! accepts none), a message over `MAX_REQUEST_MESSAGE` (RESOURCE_EXHAUSTED,
//! on its length alone, before its bytes are read), a message that is not
//! valid protobuf or a body that ends inside a message (INVALID_ARGUMENT);
//! a broken body (the client went away) ends the stream as CANCELLED, and
//! a body that brings nothing for `--upload-idle-timeout` as
//! DEADLINE_EXCEEDED (`uploads::idle_error`). Time the store takes
//! does not count as idle: the body is not waited on meanwhile.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use probe_api::limits::{MAX_REQUEST_MESSAGE, MAX_UPLOAD_CHUNK};
use probe_api::v1::UploadProbesRequest;
use prost::Message as _;
use tokio_stream::Stream;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::server::handlers::admin_service::AdminService;
use crate::server::handlers::get_probe::{frame_of, status_trailers, trailers_only};
use crate::server::uploads::{Part, idle_error};

/// The HTTP/2 path of UploadProbes.
pub const PATH: &str = "/kprobes.v1.ProbeUploadService/UploadProbes";

/// Tag of `UploadProbesRequest.chunk`: field 3, length-delimited (the test
/// checks it against prost's own encoding).
const CHUNK_TAG: u8 = (3 << 3) | 2;
/// The gRPC message header: a compressed flag and a 4-byte length.
const PREFIX: usize = 5;

/// Answers one UploadProbes call.
pub async fn handle<B>(uploads: Arc<AdminService>, request: Request<B>, client: String) -> Response<tonic::body::Body>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if request.headers().get("grpc-encoding").is_some_and(|encoding| encoding != "identity") {
        return trailers_only(Status::invalid_argument("Central accepts no compressed requests"));
    }
    let (head, body) = request.into_parts();
    let metadata = MetadataMap::from_headers(head.headers);
    let parts = UploadParts::new(body).ending_after_idle(uploads.upload_idle_timeout());
    match uploads.upload(&metadata, client, parts).await {
        Ok(response) => {
            let frames: [Result<_, Status>; 2] =
                [Ok(Frame::data(frame_of(&response))), Ok(Frame::trailers(status_trailers(Status::ok(""))))];
            let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
            let mut response = Response::new(tonic::body::Body::new(body));
            let content_type = http::HeaderValue::from_static("application/grpc");
            response.headers_mut().insert(http::header::CONTENT_TYPE, content_type);
            response
        }
        Err(status) => trailers_only(status),
    }
}

/// The messages of an UploadProbes request body, a chunk in the pieces its
/// frames carried.
pub struct UploadParts<B> {
    body: B,
    /// Bytes received and not handed on yet, in order.
    received: VecDeque<Bytes>,
    /// Their sum.
    buffered: usize,
    body_ended: bool,
    /// The stream ended, at the body's end or at an error.
    done: bool,
    /// The stream ends when the body brings nothing for this long.
    idle_timeout: Option<Duration>,
    /// Armed while the body is waited on; whatever arrives disarms it.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> UploadParts<B> {
    pub fn new(body: B) -> Self {
        UploadParts {
            body,
            received: VecDeque::new(),
            buffered: 0,
            body_ended: false,
            done: false,
            idle_timeout: None,
            idle: None,
        }
    }

    /// Ends the stream with `idle_error` once the body brings nothing for
    /// `timeout`.
    pub fn ending_after_idle(self, timeout: Duration) -> Self {
        UploadParts { idle_timeout: Some(timeout), ..self }
    }

    /// The next part, once all of its bytes are buffered.
    fn next_part(&mut self) -> Result<Option<Part>, Status> {
        if self.buffered < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        self.peek(0, &mut prefix);
        if prefix[0] != 0 {
            return Err(Status::invalid_argument("a compressed message: Central accepts no compressed requests"));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > MAX_REQUEST_MESSAGE {
            return Err(Status::resource_exhausted(format!("a message of {len} bytes")));
        }
        if self.buffered < PREFIX + len {
            return Ok(None);
        }
        if let Some(field_header) = self.chunk_field_header(len) {
            self.take(PREFIX + field_header);
            return Ok(Some(Part::Chunk(self.take(len - field_header))));
        }
        self.take(PREFIX);
        let message = match self.take(len).as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            pieces => pieces.concat().into(),
        };
        let request = UploadProbesRequest::decode(message)
            .map_err(|e| Status::invalid_argument(format!("not valid protobuf: {e}")))?;
        Ok(Some(Part::from(request)))
    }

    /// For a message of `len` bytes that is a `chunk` field and nothing
    /// else, of at most `MAX_UPLOAD_CHUNK` bytes: the length of the field's
    /// tag and length. A larger chunk is decoded whole, and refused by the
    /// session as tonic's would be.
    fn chunk_field_header(&self, len: usize) -> Option<usize> {
        let mut head = [0u8; 11];
        let head = &mut head[..len.min(11)];
        self.peek(PREFIX, head);
        let (&tag, mut rest) = head.split_first()?;
        if tag != CHUNK_TAG {
            return None;
        }
        let varint_len = rest.len();
        let field_len = prost::encoding::decode_varint(&mut rest).ok()?;
        let header = 1 + varint_len - rest.len();
        (field_len == (len - header) as u64 && field_len as usize <= MAX_UPLOAD_CHUNK).then_some(header)
    }

    /// Copies buffered bytes from `offset` on into `out`, leaving them
    /// buffered; the caller knows that enough are.
    fn peek(&self, mut offset: usize, out: &mut [u8]) {
        let mut filled = 0;
        for piece in &self.received {
            if filled == out.len() {
                break;
            }
            if offset >= piece.len() {
                offset -= piece.len();
                continue;
            }
            let n = (piece.len() - offset).min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&piece[offset..offset + n]);
            filled += n;
            offset = 0;
        }
    }

    /// Takes the first `len` buffered bytes, as the pieces they came in.
    fn take(&mut self, mut len: usize) -> Vec<Bytes> {
        self.buffered -= len;
        let mut pieces = Vec::new();
        while len > 0 {
            let front = self.received.front_mut().expect("the caller knows that enough are buffered");
            if front.len() <= len {
                len -= front.len();
                pieces.extend(self.received.pop_front());
            } else {
                pieces.push(front.split_to(len));
                len = 0;
            }
        }
        pieces
    }
}

impl<B> Stream for UploadParts<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Item = Result<Part, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.next_part() {
                Ok(Some(part)) => return Poll::Ready(Some(Ok(part))),
                Ok(None) => {}
                Err(status) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
            if this.body_ended {
                this.done = true;
                let inside = this.buffered > 0;
                return Poll::Ready(inside.then(|| Err(Status::invalid_argument("the body ended inside a message"))));
            }
            let polled = Pin::new(&mut this.body).poll_frame(cx);
            let Poll::Ready(polled) = polled else {
                let Some(timeout) = this.idle_timeout else { return Poll::Pending };
                let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.done = true;
                return Poll::Ready(Some(Err(Status::from(idle_error(timeout)))));
            };
            this.idle = None;
            match polled {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        this.buffered += data.len();
                        this.received.push_back(data);
                    }
                }
                Some(Err(error)) => {
                    this.done = true;
                    let error: Box<dyn std::error::Error + Send + Sync> = error.into();
                    return Poll::Ready(Some(Err(Status::cancelled(error.to_string()))));
                }
                None => this.body_ended = true,
            }
        }
    }
}

#[cfg(test)]
mod tests;
