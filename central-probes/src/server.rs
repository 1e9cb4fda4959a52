//! Central's gRPC server: one TLS port carrying the Collector-facing
//! `ProbeService` (mutual TLS), the admin-facing `ProbeUploadService`
//! (bearer tokens), gRPC health and server reflection.
//!
//! `run` takes a bound listener and a shutdown future, so the binary and the
//! tests start the very same server.

use std::future::Future;
use std::sync::Arc;

use probe_api::limits::MAX_REQUEST_MESSAGE;
use probe_api::v1::probe_service_server::ProbeServiceServer;
use probe_api::v1::probe_upload_service_server::ProbeUploadServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::info;

use crate::auth::TokenAuth;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::probe_service::CollectorService;
use crate::sources::{ProbeSource, SourceChain, UploadedProbes};
use crate::store::ProbeStore;
use crate::upload_service::UploadService;
use crate::upstream::UpstreamSource;

/// Per-stream and per-connection HTTP/2 receive windows. tonic's defaults
/// roughly halve bulk throughput here.
pub const STREAM_WINDOW: u32 = 16 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;

/// PEM-encoded TLS material of the server.
#[derive(Clone)]
pub struct TlsMaterial {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The cluster CA that signs Collector certificates.
    pub client_ca_pem: Vec<u8>,
}

pub struct ServerOptions {
    pub tls: TlsMaterial,
    /// Serve GetProbe to callers without a client certificate.
    pub allow_anonymous_reads: bool,
    /// Asked when no uploaded package has a probe; `None` when offline.
    pub upstream: Option<Arc<UpstreamSource>>,
    pub metrics: Metrics,
}

/// Installs the one rustls crypto provider this build has. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Serves until `shutdown` completes, then stops accepting and lets
/// requests in flight finish.
pub async fn run(
    store: Arc<dyn ProbeStore>,
    auth: TokenAuth,
    options: ServerOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    install_crypto_provider();
    let address = listener.local_addr().map_err(|e| Error::io("reading the listening address", e))?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&options.tls.cert_pem, &options.tls.key_pem))
        .client_ca_root(Certificate::from_pem(&options.tls.client_ca_pem))
        // Admins authenticate with tokens and carry no client certificate;
        // ProbeService checks for one itself.
        .client_auth_optional(true);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ProbeServiceServer<CollectorService>>().await;
    health_reporter.set_serving::<ProbeUploadServiceServer<UploadService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(probe_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::internal(format!("building reflection: {e}")))?;

    // Uploaded probes always win over the upstream's.
    let mut sources: Vec<Arc<dyn ProbeSource>> = vec![Arc::new(UploadedProbes(store.clone()))];
    if let Some(upstream) = options.upstream {
        sources.push(upstream);
    }
    let collector = ProbeServiceServer::new(CollectorService::new(
        SourceChain::new(sources),
        options.allow_anonymous_reads,
        options.metrics.clone(),
    ));
    let upload = ProbeUploadServiceServer::new(UploadService::new(store, auth, options.metrics))
        .max_decoding_message_size(MAX_REQUEST_MESSAGE)
        .max_encoding_message_size(MAX_REQUEST_MESSAGE);

    // Built from the listener so Nagle is off: serve_with_incoming ignores
    // the builder's tcp_nodelay, and with Nagle on transfers stall.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    info!(%address, "listening on {address}");
    Server::builder()
        .tls_config(tls)
        .map_err(|e| Error::invalid_argument(format!("TLS configuration: {e}")))?
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(collector)
        .add_service(upload)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::internal(format!("server: {e}")))?;
    info!("server stopped");
    Ok(())
}
