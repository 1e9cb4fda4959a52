//! UploadProbes, answered beside tonic: its request stream is read straight
//! from the HTTP/2 body (`edge::grpc_stream`), a chunk message (a message
//! that is only the `chunk` field, of at most `MAX_UPLOAD_CHUNK` bytes) in
//! the pieces of the frames that carried it, so that the store copies them
//! once, into the pack. Every other message is decoded by prost, as tonic
//! would. Each message becomes an `UploadEvent` of the upload use case
//! (`uploads`), which does the rest.
//!
//! Errors (the proto's): a compressed request (INVALID_ARGUMENT: Central
//! accepts none), and those of the stream (`edge::grpc_stream`) and of the
//! upload (`uploads`).

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use probe_api::limits::{MAX_REQUEST_MESSAGE, MAX_UPLOAD_CHUNK};
use probe_api::v1::UploadProbesRequest;
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::error::Result;
use crate::server::edge::grpc::{refuse_compressed, trailers_only, unary_ok};
use crate::server::edge::grpc_stream::{MessagePieces, Piece, StreamLimits};
use crate::server::edge::{Answer, Call, Handler};
use crate::server::uploads::{UploadEvent, Uploader, Uploads, Via};

/// The HTTP/2 path of UploadProbes.
pub const PATH: &str = "/kprobes.v1.ProbeUploadService/UploadProbes";

/// Tag of `UploadProbesRequest.chunk`: field 3, length-delimited (the test
/// checks it against prost's own encoding).
const CHUNK_TAG: u8 = (3 << 3) | 2;

/// What an UploadProbes stream may carry: a chunk larger than
/// `MAX_UPLOAD_CHUNK` is decoded whole, for the session to refuse it as
/// tonic's would be.
pub const LIMITS: StreamLimits = StreamLimits {
    max_message: MAX_REQUEST_MESSAGE,
    field_in_pieces: Some((CHUNK_TAG, MAX_UPLOAD_CHUNK)),
    what: "upload",
};

/// UploadProbes, into the upload use case.
pub struct UploadProbes(pub Arc<Uploads>);

impl Handler for UploadProbes {
    fn call(&self, call: Call) -> Answer {
        let (uploads, client) = (self.0.clone(), call.client());
        Box::pin(answer(uploads, call.request, client))
    }
}

/// Answers one UploadProbes call.
async fn answer<B>(uploads: Arc<Uploads>, request: Request<B>, client: String) -> Response<tonic::body::Body>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Err(error) = refuse_compressed(request.headers()) {
        return trailers_only(Status::from(error));
    }
    let (head, body) = request.into_parts();
    let caller = match uploads.authorize(&MetadataMap::from_headers(head.headers), Via::UploadProbes) {
        Ok(caller) => caller,
        Err(error) => return trailers_only(Status::from(error)),
    };
    let events = MessagePieces::new(body, LIMITS).ending_after_idle(uploads.idle_timeout()).map(event_of);
    let who = Uploader { caller, client, via: Via::UploadProbes };
    match uploads.run(who, async { Ok(events) }).await {
        Ok(response) => unary_ok(&response),
        Err(error) => trailers_only(Status::from(error)),
    }
}

/// The upload event of one message of the stream.
pub fn event_of(piece: Result<Piece<UploadProbesRequest>>) -> Result<UploadEvent> {
    match piece? {
        Piece::Field(chunk) => Ok(UploadEvent::Chunk(chunk)),
        Piece::Message(message) => UploadEvent::try_from(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_api::v1::upload_probes_request::Message;
    use prost::Message as _;

    #[test]
    fn the_chunk_tag_is_prosts() {
        let request = UploadProbesRequest { message: Some(Message::Chunk(Bytes::from_static(b"abc"))) };
        assert_eq!(request.encode_to_vec()[0], CHUNK_TAG);
    }
}
