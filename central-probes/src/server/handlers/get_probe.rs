//! GetProbe answered beside tonic, on the same `ProbeServing`: the probe's
//! chunks go to HTTP/2 as they are, each behind a 9-byte prefix (the gRPC
//! message header and the protobuf field header of `chunk`), instead of
//! being copied into tonic's encode buffer (what that copy cost:
//! BENCHMARKS.md, "Serving a probe"). The bytes on the wire are what tonic
//! would send: a client cannot tell the two apart (`tests` decodes the
//! stream with prost).
//!
//! The request is read here too: one message frame of at most
//! `MAX_GET_PROBE_REQUEST` bytes (RESOURCE_EXHAUSTED beyond), valid
//! protobuf (INVALID_ARGUMENT otherwise), uncompressed (Central accepts no
//! compressed requests: INVALID_ARGUMENT). Errors before the first message
//! are trailers-only responses, as tonic sends them; an error while the
//! probe streams ends the stream with its status in the trailers.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use probe_api::limits::MAX_GET_PROBE_REQUEST;
use probe_api::v1::get_probe_response::Message;
use probe_api::v1::{GetProbeRequest, GetProbeResponse, ProbeHeader};
use prost::Message as _;
use tokio_stream::Stream;
use tonic::{Code, Status};

use crate::server::connections::handle::ConnectionHandle;
use crate::server::serving::{Asker, ProbeChunks, ProbeServing, Serving};

/// The HTTP/2 path of GetProbe.
pub const PATH: &str = "/kprobes.v1.ProbeService/GetProbe";

/// Tag of `GetProbeResponse.chunk`: field 2, length-delimited (the test
/// checks it against prost's own encoding).
const CHUNK_TAG: u8 = (2 << 3) | 2;

/// Answers one GetProbe call.
pub async fn handle<B>(
    serving: &ProbeServing,
    request: Request<B>,
    asker: Asker,
    connection: &ConnectionHandle,
) -> Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let request = match read_request(request).await {
        Ok(request) => request,
        Err(status) => return trailers_only(status),
    };
    let served = serving.serve("GetProbe", &request.module_version, &request.file_name, asker, connection);
    let Serving { probe, source, chunks } = match served.await {
        Ok(serving) => serving,
        Err(error) => return trailers_only(Status::from(error)),
    };
    let header = GetProbeResponse {
        message: Some(Message::Header(ProbeHeader {
            path: probe.path.to_string(),
            size: probe.size,
            sha256: probe.sha256.to_hex(),
            source: source.into(),
            signature: probe.signature.clone().unwrap_or_default(),
        })),
    };
    let body = ProbeBody { header: Some(frame_of(&header)), pending: None, chunks, done: false };
    let mut response = Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// The response stream: the header message, then each chunk behind its
/// prefix, then the trailers with the call's status.
struct ProbeBody {
    header: Option<Bytes>,
    /// A chunk whose prefix went out last.
    pending: Option<Bytes>,
    chunks: ProbeChunks,
    /// The trailers went out.
    done: bool,
}

impl http_body::Body for ProbeBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(data) = self.header.take().or_else(|| self.pending.take()) {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(Pin::new(&mut self.chunks).poll_next(cx)) {
            Some(Ok(chunk)) => {
                let prefix = chunk_prefix(chunk.len());
                self.pending = Some(chunk);
                return Poll::Ready(Some(Ok(Frame::data(prefix))));
            }
            Some(Err(error)) => Status::from(error),
            None => Status::new(Code::Ok, ""),
        };
        self.done = true;
        Poll::Ready(Some(Ok(Frame::trailers(status_trailers(status)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.header.is_none() && self.pending.is_none()
    }
}

/// The one request message of the call.
async fn read_request<B>(request: Request<B>) -> Result<GetProbeRequest, Status>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let message = read_message(request, MAX_GET_PROBE_REQUEST).await?;
    GetProbeRequest::decode(message)
        .map_err(|e| Status::invalid_argument(format!("the request message was refused: not valid protobuf: {e}")))
}

/// The bytes of the one message of a gRPC (or gRPC-web) request, read by
/// hand as Central does beside tonic: uncompressed, at most `limit` bytes
/// (RESOURCE_EXHAUSTED beyond, on the length alone), exactly one frame
/// (INVALID_ARGUMENT otherwise).
pub(crate) async fn read_message<B>(request: Request<B>, limit: usize) -> Result<Bytes, Status>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if request.headers().get("grpc-encoding").is_some_and(|encoding| encoding != "identity") {
        return Err(Status::invalid_argument("Central accepts no compressed requests"));
    }
    let mut body = request.into_body();
    let mut received = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::invalid_argument(format!("reading the request: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        received.extend_from_slice(&data);
        if received.len() >= 5 {
            let length = u32::from_be_bytes([received[1], received[2], received[3], received[4]]) as usize;
            if length > limit {
                return Err(Status::resource_exhausted(format!(
                    "the request message was refused: {length} bytes, over the limit of {limit}"
                )));
            }
            if received.len() > 5 + length {
                return Err(Status::invalid_argument("more than one request message"));
            }
        }
    }
    let malformed = || Status::invalid_argument("the request is not one gRPC message frame");
    if received.len() < 5 {
        return Err(malformed());
    }
    let length = u32::from_be_bytes([received[1], received[2], received[3], received[4]]) as usize;
    if received[0] != 0 {
        return Err(Status::invalid_argument("Central accepts no compressed requests"));
    }
    if received.len() != 5 + length {
        return Err(malformed());
    }
    Ok(received.freeze().slice(5..))
}

/// `message` as one gRPC message frame.
pub(crate) fn frame_of(message: &impl prost::Message) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + message.encoded_len());
    frame.put_u8(0);
    frame.put_u32(message.encoded_len() as u32);
    message.encode(&mut frame).expect("the buffer has room");
    frame.freeze()
}

/// What goes before a chunk of `len` bytes: the gRPC message header and
/// the protobuf tag and length of `GetProbeResponse.chunk`.
fn chunk_prefix(len: usize) -> Bytes {
    let mut field = BytesMut::with_capacity(16);
    field.put_u8(CHUNK_TAG);
    prost::encoding::encode_varint(len as u64, &mut field);
    let mut prefix = BytesMut::with_capacity(5 + field.len());
    prefix.put_u8(0);
    prefix.put_u32((field.len() + len) as u32);
    prefix.extend_from_slice(&field);
    prefix.freeze()
}

pub(crate) fn status_trailers(status: Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    // Only fails for a status whose details cannot be encoded; ours have none.
    let _ = status.add_header(&mut trailers);
    trailers
}

/// A response that is only headers: how gRPC ends a call that failed
/// before its first message.
pub(crate) fn trailers_only(status: Status) -> Response<tonic::body::Body> {
    let mut response = Response::new(tonic::body::Body::empty());
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    let _ = status.add_header(headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefixed_chunk_decodes_as_the_message_tonic_would_send() {
        for len in [0usize, 1, 127, 128, 65_536, 1 << 20] {
            let chunk = Bytes::from(vec![7u8; len]);
            let mut wire = chunk_prefix(len).to_vec();
            wire.extend_from_slice(&chunk);
            let expected = frame_of(&GetProbeResponse { message: Some(Message::Chunk(chunk.clone())) });
            assert_eq!(wire, expected.to_vec(), "a chunk of {len} bytes");
        }
    }
}
