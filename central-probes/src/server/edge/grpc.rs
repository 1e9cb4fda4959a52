//! gRPC's framing for the calls Central answers beside tonic: the one
//! message of a unary request, the frames and trailers of a response, and
//! the trailers-only answer of a call that failed before its first message.
//! What goes on the wire is what tonic would send: a client cannot tell
//! the two apart.
//!
//! A request is uncompressed (Central accepts no compressed requests:
//! INVALID_ARGUMENT), one message frame of at most the caller's limit
//! (RESOURCE_EXHAUSTED beyond, on the length alone) and valid protobuf
//! (INVALID_ARGUMENT otherwise).

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use tonic::{Code, Status};

use crate::error::{Error, Result};

/// The gRPC message header: a compressed flag and a 4-byte length.
pub const PREFIX: usize = 5;

/// INVALID_ARGUMENT for a request that says its messages are compressed.
pub fn refuse_compressed(headers: &HeaderMap) -> Result<()> {
    match headers.get("grpc-encoding").is_some_and(|encoding| encoding != "identity") {
        true => Err(Error::invalid_argument("Central accepts no compressed requests")),
        false => Ok(()),
    }
}

/// The one message of a unary request, decoded.
pub async fn read_unary<M, B>(request: Request<B>, limit: usize) -> Result<M>
where
    M: prost::Message + Default,
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let message = read_message(request, limit).await?;
    M::decode(message)
        .map_err(|e| Error::invalid_argument(format!("the request message was refused: not valid protobuf: {e}")))
}

/// The bytes of the one message of a gRPC (or gRPC-web) request:
/// uncompressed, at most `limit` bytes (RESOURCE_EXHAUSTED beyond, on the
/// length alone), exactly one frame (INVALID_ARGUMENT otherwise).
pub async fn read_message<B>(request: Request<B>, limit: usize) -> Result<Bytes>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    refuse_compressed(request.headers())?;
    let mut body = request.into_body();
    let mut received = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Error::invalid_argument(format!("reading the request: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        received.extend_from_slice(&data);
        if received.len() >= PREFIX {
            let length = u32::from_be_bytes([received[1], received[2], received[3], received[4]]) as usize;
            if length > limit {
                return Err(Error::new(
                    Code::ResourceExhausted,
                    format!("the request message was refused: {length} bytes, over the limit of {limit}"),
                ));
            }
            if received.len() > PREFIX + length {
                return Err(Error::invalid_argument("more than one request message"));
            }
        }
    }
    let malformed = || Error::invalid_argument("the request is not one gRPC message frame");
    if received.len() < PREFIX {
        return Err(malformed());
    }
    let length = u32::from_be_bytes([received[1], received[2], received[3], received[4]]) as usize;
    if received[0] != 0 {
        return Err(Error::invalid_argument("Central accepts no compressed requests"));
    }
    if received.len() != PREFIX + length {
        return Err(malformed());
    }
    Ok(received.freeze().slice(PREFIX..))
}

/// `message` as one gRPC message frame.
pub fn frame_of(message: &impl prost::Message) -> Bytes {
    let mut frame = BytesMut::with_capacity(PREFIX + message.encoded_len());
    frame.put_u8(0);
    frame.put_u32(message.encoded_len() as u32);
    message.encode(&mut frame).expect("the buffer has room");
    frame.freeze()
}

/// What goes before `len` bytes that are a message's one length-delimited
/// field `tag`: the gRPC message header and the field's tag and length.
/// With it, the bytes go to HTTP/2 as they are instead of being copied
/// into an encode buffer.
pub fn field_frame_prefix(tag: u8, len: usize) -> Bytes {
    let mut field = BytesMut::with_capacity(16);
    field.put_u8(tag);
    prost::encoding::encode_varint(len as u64, &mut field);
    let mut prefix = BytesMut::with_capacity(PREFIX + field.len());
    prefix.put_u8(0);
    prefix.put_u32((field.len() + len) as u32);
    prefix.extend_from_slice(&field);
    prefix.freeze()
}

/// The trailers that end a call with `status`.
pub fn status_trailers(status: Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    // Only fails for a status whose details cannot be encoded; ours have none.
    let _ = status.add_header(&mut trailers);
    trailers
}

/// A response of gRPC's content type with `body`.
pub fn response(body: tonic::body::Body) -> Response<tonic::body::Body> {
    let mut response = Response::new(body);
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// The answer of a unary call that succeeded: `message`, then OK trailers.
pub fn unary_ok(message: &impl prost::Message) -> Response<tonic::body::Body> {
    let frames: [Result<_, Status>; 2] =
        [Ok(Frame::data(frame_of(message))), Ok(Frame::trailers(status_trailers(Status::ok(""))))];
    response(tonic::body::Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames))))
}

/// A response that is only headers: how gRPC ends a call that failed
/// before its first message.
pub fn trailers_only(status: Status) -> Response<tonic::body::Body> {
    let mut answer = response(tonic::body::Body::empty());
    let _ = status.add_header(answer.headers_mut());
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_api::v1::GetProbeRequest;

    fn request(body: Vec<u8>, encoding: Option<&str>) -> Request<http_body_util::Full<Bytes>> {
        let mut request = Request::post("/x");
        if let Some(encoding) = encoding {
            request = request.header("grpc-encoding", encoding);
        }
        request.body(http_body_util::Full::new(Bytes::from(body))).unwrap()
    }

    #[tokio::test]
    async fn a_unary_request_is_one_uncompressed_frame_within_the_limit() {
        let message = GetProbeRequest { module_version: "2.5.0".into(), file_name: "a.o.gz".into() };
        let frame = frame_of(&message).to_vec();
        let read: GetProbeRequest = read_unary(request(frame.clone(), None), 100).await.unwrap();
        assert_eq!(read, message);
        let read: GetProbeRequest = read_unary(request(frame.clone(), Some("identity")), 100).await.unwrap();
        assert_eq!(read, message);
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        let mut compressed = frame.clone();
        compressed[0] = 1;
        let cases = [
            (request(frame.clone(), Some("gzip")), Code::InvalidArgument),
            (request(compressed, None), Code::InvalidArgument),
            (request(two, None), Code::InvalidArgument),
            (request(frame[..frame.len() - 1].to_vec(), None), Code::InvalidArgument),
            (request(vec![0, 0, 0, 0, 2, 0xff, 0xff], None), Code::InvalidArgument),
            (request(frame[..PREFIX].to_vec(), None), Code::InvalidArgument),
        ];
        for (i, (request, code)) in cases.into_iter().enumerate() {
            let error = read_unary::<GetProbeRequest, _>(request, 100).await.unwrap_err();
            assert_eq!(error.code, code, "case {i}: {error}");
        }
        let over = read_unary::<GetProbeRequest, _>(request(frame, None), 3).await.unwrap_err();
        assert_eq!(over.code, Code::ResourceExhausted);
    }
}
