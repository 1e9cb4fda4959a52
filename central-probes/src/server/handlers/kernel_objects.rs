//! The HTTPS route that Collectors of the product this replaces call:
//! `GET` or `HEAD /kernel-objects/<module version>/<file name>` on the same
//! TLS port as gRPC, over HTTP/1.1 or HTTP/2. It serves through the same
//! `ProbeServing` as GetProbe (certificate rule, stream slots, source
//! chain, metrics), so the two never disagree about a probe.
//!
//! Answers: 200 with `Content-Length`, `Content-Type: application/gzip`,
//! an `ETag` (the SHA-256 in hex), the SHA-256 as `Digest` (RFC 3230) and
//! `Repr-Digest` (RFC 9530), and `Content-Disposition` with the file name;
//! a query string (the product's CI Collectors add `?cid=collector`) is
//! ignored. `<file name>.minisig` is the probe's minisign signature
//! (`text/plain`), 404 when it has none. 400 for a name that is not a
//! probe name,
//! 401 without a client certificate (one the cluster CA did not sign never
//! gets past the TLS handshake), 404 when no source has the probe, 405 for
//! other methods, 503 with `Retry-After` when a source is unreachable or
//! every probe stream slot is taken, 500 otherwise. Error bodies are one
//! line of text.
//!
//! A stored probe found damaged (its bytes no longer match its record) is
//! never sent whole: 500 when the damage shows in its first chunk (a probe
//! of up to 256 KiB is read in one), else the body is cut short before its
//! last chunk (HTTP/2 resets the stream, HTTP/1.1 closes the connection),
//! which clients see as an error.

use std::convert::Infallible;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use probe_api::signing::SIGNATURE_SUFFIX;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::error::Error;
use crate::server::edge::http::text;
use crate::server::edge::{Answer, Call, Handler};
use crate::server::serving::slots::Connection;
use crate::server::serving::{Asker, ProbeServing, Serving};

/// Where the route starts.
pub const PREFIX: &str = "/kernel-objects/";

/// What the request metrics call this route.
const METRICS_NAME: &str = "kernel-objects";

/// `GET` and `HEAD` under `PREFIX`, served by `serving`.
pub struct KernelObjects {
    pub serving: Arc<ProbeServing>,
}

impl Handler for KernelObjects {
    fn call(&self, call: Call) -> Answer {
        let serving = self.serving.clone();
        Box::pin(async move { answer(&serving, &call.request, call.asker, &call.connection).await })
    }
}

/// Answers one request whose path starts with `PREFIX`.
async fn answer<B>(
    serving: &ProbeServing,
    request: &Request<B>,
    asker: Asker,
    connection: &Arc<dyn Connection>,
) -> Response<tonic::body::Body> {
    let head = match *request.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD are served here");
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
    };
    let Some(route) = route_path(request.uri().path()) else {
        return text(StatusCode::BAD_REQUEST, "the path must be /kernel-objects/<module version>/<file name>");
    };
    let response = match serving.serve(METRICS_NAME, route.module_version, route.file_name, asker, connection).await {
        Ok(serving) if route.signature => signature(serving, head),
        Ok(serving) => found(serving, head).await,
        Err(error) => refused(&error),
    };
    // A HEAD answer carries no body, an error's text included: over HTTP/2
    // a client takes DATA on a HEAD answer for a protocol error.
    match head {
        true => response.map(|_| tonic::body::Body::empty()),
        false => response,
    }
}

/// What a path under `PREFIX` asks for. The names are not checked here:
/// `ProbeServing::serve` parses them, so that a bad name is counted in
/// the request metrics like any other refusal.
#[derive(Debug, PartialEq, Eq)]
pub struct RoutePath<'a> {
    pub module_version: &'a str,
    /// The probe's file name, without `.minisig`.
    pub file_name: &'a str,
    /// `<file name>.minisig`: the probe's signature rather than the probe.
    pub signature: bool,
}

/// Splits a request's path (the query string is not part of it, and no
/// percent-decoding happens: `%2F` is three characters of a name, which
/// the naming rules then refuse or keep as they are). `None` when the path
/// is not `PREFIX<module version>/<file name>`. Public for the fuzz target
/// `route_path`.
pub fn route_path(path: &str) -> Option<RoutePath<'_>> {
    let (module_version, file_name) = path.strip_prefix(PREFIX)?.split_once('/')?;
    let (file_name, signature) = match file_name.strip_suffix(SIGNATURE_SUFFIX) {
        Some(probe_file) => (probe_file, true),
        None => (file_name, false),
    };
    Some(RoutePath { module_version, file_name, signature })
}

/// `<file name>.minisig`: the probe's signature as it was uploaded, 404
/// when the probe has none.
fn signature(Serving { probe, chunks, .. }: Serving, head: bool) -> Response<tonic::body::Body> {
    // Only the signature is sent: the probe's stream and its slot end now.
    drop(chunks);
    let Some(signature) = probe.signature else {
        return text(StatusCode::NOT_FOUND, &format!("{} is not signed", probe.path));
    };
    let len = signature.len();
    let body = if head {
        tonic::body::Body::empty()
    } else {
        tonic::body::Body::new(Full::new(signature).map_err(|never: Infallible| match never {}))
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    response
}

async fn found(Serving { probe, mut chunks, .. }: Serving, head: bool) -> Response<tonic::body::Body> {
    let digest = BASE64.encode(probe.sha256.0);
    let body = if head {
        // The first chunk is read as for GET, so that a probe found damaged
        // there (most probes are one chunk) is a 500 here too; then the
        // stream ends and frees its slot.
        if let Some(Err(error)) = chunks.next().await {
            return refused(&error);
        }
        drop(chunks);
        tonic::body::Body::empty()
    } else {
        // The first chunk is read before the status goes out, so that a
        // failure to read it (a damaged probe) is still a plain error.
        let first = match chunks.next().await {
            Some(Err(error)) => return refused(&error),
            first => first,
        };
        let frames = tokio_stream::iter(first)
            .chain(chunks)
            .map(|chunk| chunk.map(http_body::Frame::data).map_err(tonic::Status::from));
        tonic::body::Body::new(StreamBody::new(frames))
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/gzip"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(probe.size));
    let values = [
        (header::ETAG, format!("\"{}\"", probe.sha256.to_hex())),
        // As the product's handler sends it.
        (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{}\"", probe.path.file_name())),
        (header::HeaderName::from_static("digest"), format!("sha-256={digest}")),
        (header::HeaderName::from_static("repr-digest"), format!("sha-256=:{digest}:")),
    ];
    for (name, value) in values {
        headers.insert(name, HeaderValue::try_from(value).expect("hex and base64 are valid header values"));
    }
    response
}

fn refused(error: &Error) -> Response<tonic::body::Body> {
    let status = match error.code {
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut response = text(status, &error.message);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_path_splits_into_module_version_file_name_and_signature() {
        let probe = RoutePath { module_version: "2.5.0", file_name: "collector-6.1.ko.gz", signature: false };
        assert_eq!(route_path("/kernel-objects/2.5.0/collector-6.1.ko.gz"), Some(probe));
        let signature = RoutePath { module_version: "2.5.0", file_name: "collector-6.1.ko.gz", signature: true };
        assert_eq!(route_path("/kernel-objects/2.5.0/collector-6.1.ko.gz.minisig"), Some(signature));
        // Further slashes stay in the file name, for the naming rules to refuse.
        assert_eq!(route_path("/kernel-objects/2.5.0/../x").map(|r| r.file_name), Some("../x"));
        assert_eq!(route_path("/kernel-objects/2.5.0"), None);
        assert_eq!(route_path("/kernel-objectsX/2.5.0/a"), None);
        assert_eq!(route_path("/other/2.5.0/a"), None);
    }

    #[test]
    fn each_refusal_has_its_http_status_and_unavailable_says_when_to_retry() {
        let cases = [
            (Code::InvalidArgument, StatusCode::BAD_REQUEST),
            (Code::Unauthenticated, StatusCode::UNAUTHORIZED),
            (Code::PermissionDenied, StatusCode::FORBIDDEN),
            (Code::NotFound, StatusCode::NOT_FOUND),
            (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            (Code::DataLoss, StatusCode::INTERNAL_SERVER_ERROR),
            (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR),
        ];
        for (code, status) in cases {
            let response = refused(&Error::new(code, "why"));
            assert_eq!(response.status(), status, "{code:?}");
            let retry_after = response.headers().get(header::RETRY_AFTER).is_some();
            assert_eq!(retry_after, status == StatusCode::SERVICE_UNAVAILABLE, "{code:?}");
        }
    }
}
