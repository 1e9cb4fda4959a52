//! The HTTP service of one connection: GetProbe (`handlers::get_probe`),
//! UploadProbes (`handlers::upload_probes`), the HTTPS probe route (`kernel_objects`),
//! the product's upload route (`handlers::roxctl_upload`) and gRPC-web
//! (`handlers::roxctl_existing`), else tonic's routes
//! with the connection's TLS facts
//! and handle in every request, requests in flight counted for
//! the idle timeout, and tonic's pre-handler errors recoded as the API
//! documents them.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tonic::Code;
use tonic::codegen::Service;
use tonic::service::Routes;
use tonic::transport::server::Connected;

use crate::server::handlers::admin_service::AdminService;
use crate::server::handlers::roxctl_existing::{self, ProductUploads};
use crate::server::handlers::{get_probe, kernel_objects, roxctl_upload, upload_probes};
use crate::server::serving::slots::Connection;
use crate::server::serving::{Asker, ProbeServing};
use crate::store::client_id::ClientId;

/// Requests in flight on a connection and when the last one ended.
pub(super) struct Activity {
    in_flight: AtomicUsize,
    since: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity { in_flight: AtomicUsize::new(0), since: Mutex::new(Instant::now()) }
    }
}

impl Activity {
    pub(super) fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.since.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).elapsed()
    }

    pub(super) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }
}

/// One request in flight, until its response body is done or dropped.
pub(super) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.since.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub type ConnectInfo = <tokio_rustls::server::TlsStream<TcpStream> as Connected>::ConnectInfo;

/// The client of a TLS connection.
pub(super) fn asker_of(connect_info: &ConnectInfo) -> Asker {
    let certificates = connect_info.peer_certs();
    let certificate = certificates.as_deref().and_then(|certs| certs.first());
    let address = connect_info.get_ref().remote_addr().map(|address| address.ip());
    Asker {
        has_certificate: certificate.is_some(),
        client: ClientId::of(certificate.map(|cert| cert.as_ref()), address),
    }
}

/// The requests Central reads itself, beside tonic's `Routes`: the hot
/// paths whose bytes tonic would copy, and the product's routes.
#[derive(Clone)]
pub struct Direct {
    pub probes: Arc<ProbeServing>,
    pub product: Arc<ProductUploads>,
    pub uploads: Arc<AdminService>,
}

/// The HTTP service of one connection: tonic's routes, with the connection's
/// TLS facts (for `peer_certs`) and handle in every request.
#[derive(Clone)]
pub(super) struct ConnectionService {
    pub(super) routes: Routes,
    /// What is answered beside tonic.
    pub(super) direct: Direct,
    pub(super) connect_info: ConnectInfo,
    /// Who is asking, for GetProbe and the HTTPS route.
    pub(super) asker: Asker,
    /// The connection, for the probe stream slots.
    pub(super) connection: Arc<dyn Connection>,
    pub(super) activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.connect_info.clone());
        let in_flight = self.activity.start();
        let track = |response: Response<tonic::body::Body>| {
            response.map(|body| tonic::body::Body::new(TrackedBody { body, _in_flight: in_flight }))
        };
        let path = request.uri().path();
        let direct = path == get_probe::PATH;
        if direct || path.starts_with(kernel_objects::PREFIX) {
            let probes = self.direct.probes.clone();
            let asker = self.asker;
            let connection = self.connection.clone();
            return Box::pin(async move {
                let response = if direct {
                    get_probe::handle(&probes, request, asker, &connection).await
                } else {
                    kernel_objects::handle(&probes, &request, asker, &connection).await
                };
                Ok(track(response))
            });
        }
        if path == upload_probes::PATH {
            let uploads = self.direct.uploads.clone();
            let client = self.client();
            return Box::pin(async move { Ok(track(upload_probes::handle(uploads, request, client).await)) });
        }
        let grpc_web = crate::server::edge::grpc_web::wants_grpc_web(&request);
        if grpc_web || path == roxctl_upload::PATH {
            let product = self.direct.product.clone();
            let client = self.client();
            return Box::pin(async move {
                let response = if grpc_web {
                    roxctl_existing::grpc_web(&product, request).await
                } else {
                    roxctl_upload::handle(product, request, client).await
                };
                Ok(track(response))
            });
        }
        let mut routes = self.routes.clone();
        Box::pin(async move {
            let mut response = routes.call(request).await?;
            recode_client_errors(response.headers_mut());
            Ok(track(response))
        })
    }
}

impl ConnectionService {
    /// The client's address, for the log.
    fn client(&self) -> String {
        self.connect_info.get_ref().remote_addr().map_or_else(|| "unknown".into(), |a| a.to_string())
    }
}

/// A response body that marks its request finished when it is dropped.
pub(super) struct TrackedBody {
    body: tonic::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// tonic answers a request message over the size limit with OUT_OF_RANGE
/// and one that does not decode with INTERNAL, before any handler runs.
/// Both are the client's mistake, and INTERNAL would read as "retry": the
/// API documents RESOURCE_EXHAUSTED and INVALID_ARGUMENT. Central's own
/// handlers never answer OUT_OF_RANGE, and their INTERNAL messages never
/// start like prost's decode error.
pub(super) fn recode_client_errors(headers: &mut http::HeaderMap) {
    let code = match headers.get("grpc-status").map(HeaderValue::as_bytes) {
        Some(b"11") => Code::ResourceExhausted,
        Some(b"13") => Code::InvalidArgument,
        _ => return,
    };
    let Some(status) = tonic::Status::from_header_map(headers) else { return };
    if code == Code::InvalidArgument && !status.message().starts_with("failed to decode Protobuf message") {
        return;
    }
    let recoded = tonic::Status::new(code, format!("the request message was refused: {}", status.message()));
    let _ = recoded.add_header(headers);
}
