//! GetProbe answered beside tonic, on the same `ProbeServing`: the probe's
//! chunks go to HTTP/2 as they are, each behind a 9-byte prefix (the gRPC
//! message header and the protobuf field header of `chunk`), instead of
//! being copied into tonic's encode buffer (what that copy cost:
//! BENCHMARKS.md, "Serving a probe"). The bytes on the wire are what tonic
//! would send: a client cannot tell the two apart (`tests` decodes the
//! stream with prost).
//!
//! The request is one message of at most `MAX_GET_PROBE_REQUEST` bytes
//! (`edge::grpc::read_unary` says what else it must be). Errors before the
//! first message are trailers-only responses, as tonic sends them; an error
//! while the probe streams ends the stream with its status in the trailers.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use probe_api::limits::MAX_GET_PROBE_REQUEST;
use probe_api::v1::get_probe_response::Message;
use probe_api::v1::{GetProbeRequest, GetProbeResponse, ProbeHeader};
use tokio_stream::Stream;
use tonic::{Code, Status};

use crate::server::edge::grpc::{field_frame_prefix, frame_of, read_unary, response, status_trailers, trailers_only};
use crate::server::edge::{Answer, Call, Handler};

use crate::server::serving::slots::Connection;
use crate::server::serving::{Asker, ProbeChunks, ProbeServing, Serving};

/// The HTTP/2 path of GetProbe.
pub const PATH: &str = "/kprobes.v1.ProbeService/GetProbe";

/// Tag of `GetProbeResponse.chunk`: field 2, length-delimited (the test
/// checks it against prost's own encoding).
const CHUNK_TAG: u8 = (2 << 3) | 2;

/// GetProbe, served by `serving`.
pub struct GetProbe {
    pub serving: Arc<ProbeServing>,
}

impl Handler for GetProbe {
    fn call(&self, call: Call) -> Answer {
        let serving = self.serving.clone();
        Box::pin(async move { answer(&serving, call.request, call.asker, &call.connection).await })
    }
}

/// Answers one GetProbe call.
async fn answer<B>(
    serving: &ProbeServing,
    request: Request<B>,
    asker: Asker,
    connection: &Arc<dyn Connection>,
) -> Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let request: GetProbeRequest = match read_unary(request, MAX_GET_PROBE_REQUEST).await {
        Ok(request) => request,
        Err(error) => return trailers_only(Status::from(error)),
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
    response(tonic::body::Body::new(body))
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
                let prefix = field_frame_prefix(CHUNK_TAG, chunk.len());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefixed_chunk_decodes_as_the_message_tonic_would_send() {
        for len in [0usize, 1, 127, 128, 65_536, 1 << 20] {
            let chunk = Bytes::from(vec![7u8; len]);
            let mut wire = field_frame_prefix(CHUNK_TAG, len).to_vec();
            wire.extend_from_slice(&chunk);
            let expected = frame_of(&GetProbeResponse { message: Some(Message::Chunk(chunk.clone())) });
            assert_eq!(wire, expected.to_vec(), "a chunk of {len} bytes");
        }
    }
}
