//! Central's gRPC server: one TLS port carrying the Collector-facing
//! `ProbeService` (mutual TLS), the admin-facing `ProbeUploadService`
//! (bearer tokens), gRPC health and server reflection.
//!
//! `run` takes a bound listener and a shutdown future, so the binary and the
//! tests start the very same server; `connections` serves the connections.

use std::future::Future;
use std::sync::Arc;

use probe_api::limits::MAX_GET_PROBE_REQUEST;
pub mod auth;
pub mod connections;
pub mod metrics;
pub mod page_token;
pub mod probe_service;
pub mod probe_slots;
pub mod sources;
pub mod upload_service;
pub mod upload_session;
pub mod upstream;

use probe_api::limits::MAX_REQUEST_MESSAGE;
use probe_api::v1::probe_service_server::ProbeServiceServer;
use probe_api::v1::probe_upload_service_server::ProbeUploadServiceServer;
use tokio::net::TcpListener;
use tonic::codegen::InterceptedService;
use tonic::service::Routes;
use tracing::info;

use crate::error::{Error, Result};
use crate::server::auth::{Role, TokenAuth};
use crate::server::metrics::Metrics;
use crate::server::probe_service::CollectorService;
use crate::server::probe_slots::ProbeSlots;
use crate::server::sources::{ProbeSource, SourceChain, UploadedProbes};
use crate::server::upload_service::UploadService;
use crate::server::upstream::UpstreamSource;
use crate::store::ProbeStore;
use connections::ConnectionLimits;

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
    /// Connection, stream and timeout limits.
    pub limits: ConnectionLimits,
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
    let tls = tls_config(&options.tls)?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ProbeServiceServer<CollectorService>>().await;
    health_reporter.set_serving::<ProbeUploadServiceServer<UploadService>>().await;
    // Both reflection versions: grpcurl before 1.9 and other older tools
    // speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(probe_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error = |e| Error::internal(format!("building reflection: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;

    // Uploaded probes always win over the upstream's.
    let mut sources: Vec<Arc<dyn ProbeSource>> = vec![Arc::new(UploadedProbes(store.clone()))];
    if let Some(upstream) = options.upstream {
        sources.push(upstream);
    }
    let limits = options.limits;
    let slots = ProbeSlots::new(limits.max_probe_streams, limits.send_timeout);
    let collector = ProbeServiceServer::new(CollectorService::new(
        SourceChain::new(sources),
        options.allow_anonymous_reads,
        options.metrics.clone(),
        slots,
        limits.probe_stream_wait,
    ))
    .max_decoding_message_size(MAX_GET_PROBE_REQUEST);
    let upload = ProbeUploadServiceServer::new(UploadService::new(store, auth.clone(), options.metrics))
        .max_decoding_message_size(MAX_REQUEST_MESSAGE)
        .max_encoding_message_size(MAX_REQUEST_MESSAGE);
    // The token is checked before tonic reads the request body: a caller
    // without one cannot make Central buffer a 64 MiB message. Each RPC
    // checks the role it needs on top.
    let upload = InterceptedService::new(upload, move |request: tonic::Request<()>| {
        auth.authorize(request.metadata(), Role::View).map_err(tonic::Status::from)?;
        Ok(request)
    });

    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(collector)
        .add_service(upload);
    info!(%address, "listening on {address}");
    connections::serve(listener, tls, routes, limits, shutdown).await;
    info!("server stopped");
    Ok(())
}

/// Central's TLS: its identity, and client certificates verified against
/// the cluster CA but optional at this level, since admins authenticate
/// with tokens; ProbeService insists on one itself.
fn tls_config(tls: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid =
        |what: &str, e: &dyn std::fmt::Display| Error::invalid_argument(format!("TLS configuration: {what}: {e}"));
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("the certificate", &e))?;
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| invalid("the private key", &e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&tls.client_ca_pem) {
        roots.add(ca.map_err(|e| invalid("the client CA", &e))?).map_err(|e| invalid("the client CA", &e))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| invalid("the client CA", &e))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| invalid("the certificate and key", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
