//! gRPC-web, as the product's `roxctl --force-http1` speaks it (HTTP/1.1,
//! trailers as the body's last frame): which requests want it, and the
//! answer's framing. Central answers binary gRPC-web only.

use bytes::{BufMut, BytesMut};
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use tonic::Status;

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

/// The refusal of a request in `application/grpc-web-text`, if it is one.
pub fn refuse_text<B>(request: &Request<B>) -> Option<Response<tonic::body::Body>> {
    let content_type = request.headers().get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    content_type.contains("-text").then(|| {
        let status = Status::invalid_argument("Central answers binary gRPC-web only, not application/grpc-web-text");
        answer(None, &status)
    })
}

/// A gRPC-web answer: the message frame, if any, then the trailer frame
/// (flag 0x80) holding the status as header lines. Always HTTP 200, as
/// gRPC-web clients expect (roxctl reads an HTTP error as UNAVAILABLE and
/// retries it).
pub fn answer(message: Option<Vec<u8>>, status: &Status) -> Response<tonic::body::Body> {
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
    use tonic::Code;

    #[test]
    fn grpc_web_is_answered_to_grpc_web_and_to_roxctls_downgrade_only() {
        let request = |version, headers: &[(&str, &str)]| {
            let mut request = Request::post("/v1.ProbeUploadService/GetExistingProbes").version(version);
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
        let response = answer(Some(vec![1, 2, 3]), &Status::new(Code::Unauthenticated, "no token"));
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
