//! Central's gRPC server: one TLS port carrying the Collector-facing
//! `ProbeService` (mutual TLS) and its HTTPS twin `/kernel-objects/`, the
//! admin-facing `ProbeUploadService` (bearer tokens), gRPC health and
//! server reflection.
//!
//! `Central` is the one composition root: built from a `CentralConfig`, it
//! opens the store, the tokens and the upstream, and `run(listener,
//! shutdown)` serves until told to stop, so the binary, the tests and the
//! benches start the very same server. `connections` serves the connections.

pub mod auth;
pub mod connections;
pub mod coverage;
pub mod export;
pub mod get_probe_direct;
pub mod kernel_objects;
pub mod metrics;
pub mod page_token;
pub mod probe_service;
pub mod probe_slots;
pub mod product_api;
pub mod product_upload;
pub mod sources;
mod stores;
pub mod upload_direct;
mod upload_record;
pub mod upload_service;
pub mod upload_session;
pub mod upstream;
pub mod verify_probes;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use probe_api::limits::MAX_REQUEST_MESSAGE;
use probe_api::product::v1::probe_upload_service_server::ProbeUploadServiceServer as ProductServer;
use probe_api::v1::probe_upload_service_server::ProbeUploadServiceServer;
use tokio::net::TcpListener;
use tonic::codegen::InterceptedService;
use tonic::service::Routes;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::server::auth::TokenAuth;
use crate::server::metrics::Metrics;
use crate::server::probe_service::ProbeServing;
use crate::server::probe_slots::ProbeSlots;
use crate::server::product_api::{ProductUploadService, ProductUploads};
use crate::server::sources::{ProbeSource, SourceChain, UploadedProbes};
use crate::server::upload_service::UploadService;
use crate::server::upstream::UpstreamSource;
use crate::store::ProbeStore;
use crate::store::hot::HotProbes;
use crate::store::misses::MissLog;
use crate::store::misses::file::FileMissLog;
use crate::store::misses::recorder::MissRecorder;
use crate::store::postgres::PostgresStore;
use crate::store::read_through::ReadThrough;
use probe_api::signing::TrustedKeys;
use stores::{checked, open_copies, open_store, open_uploaded};
// The server's front door: what the binary needs to configure and run it.
pub use crate::store::pack::{BatchLimits, CompactionLimits};
pub use crate::store::postgres::PostgresConfig;
pub use auth::{Role, TokenFile};
pub use connections::ConnectionLimits;
pub use metrics::serve as serve_metrics;
pub use stores::{StoreLayout, open_to_verify};
pub use upstream::{UpstreamConfig, UpstreamKind};

/// PEM-encoded TLS material of the server.
#[derive(Clone)]
pub struct TlsMaterial {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The cluster CA that signs Collector certificates.
    pub client_ca_pem: Vec<u8>,
}

/// Everything Central is built from.
pub struct CentralConfig {
    /// Where probes, token hashes and the upstream cache live.
    pub data_dir: PathBuf,
    /// Writes are refused when they would leave less free disk than this.
    pub min_free_bytes: u64,
    /// How the data directory keeps uploaded probes.
    pub store_layout: StoreLayout,
    /// Memory for hot uploaded probes (`store::hot`); 0 for none.
    pub hot_cache_bytes: u64,
    /// Keep uploaded probes in this shared database instead of the data
    /// directory, which then holds local copies only.
    pub database: Option<DatabaseConfig>,
    pub tls: TlsMaterial,
    /// Serve GetProbe to callers without a client certificate.
    pub allow_anonymous_reads: bool,
    /// Asked when no uploaded package has a probe; `None` for none (and
    /// when offline).
    pub upstream: Option<UpstreamConfig>,
    /// Connection, stream and timeout limits.
    pub limits: ConnectionLimits,
    /// Refuse uploaded and upstream probes whose signature does not verify
    /// by one of these keys (`--trusted-keys`).
    pub trusted_keys: Option<TrustedKeys>,
}

/// The shared PostgreSQL store of replicas, and this replica's local copies.
#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    pub postgres: PostgresConfig,
    /// Disk for local copies of probes read from the database.
    pub local_copies_bytes: u64,
}

/// Where the local copies of database probes live in the data directory;
/// apart from any probes a filesystem store kept there, since copies are
/// evicted.
const LOCAL_COPIES_DIR: &str = "database-copies";

/// How often the misses of requests are merged into their log.
const MISSES_MERGED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Central, opened and ready to serve.
pub struct Central {
    store: Arc<dyn ProbeStore>,
    /// The store without its caches.
    record: Arc<dyn ProbeStore>,
    misses: Arc<MissRecorder>,
    auth: TokenAuth,
    upstream: Option<Arc<UpstreamSource>>,
    coverage: Arc<coverage::Coverage>,
    metrics: Metrics,
    tls: TlsMaterial,
    allow_anonymous_reads: bool,
    limits: ConnectionLimits,
}

impl Central {
    /// Opens the store under the data directory (taking its lock and
    /// reading its index) and sets up the upstream.
    pub async fn open(config: CentralConfig) -> Result<Central> {
        // Hot probes are kept in memory in front of what is served from this
        // machine's disk: the store itself, or the local copies of the
        // database's probes (behind the check against the database, so that
        // a probe replaced through another replica is not served from memory).
        let hot = |store: Arc<dyn ProbeStore>| -> Arc<dyn ProbeStore> {
            match config.hot_cache_bytes {
                0 => store,
                budget => Arc::new(HotProbes::new(store, budget)),
            }
        };
        // Misses are kept beside the probes: in the data directory, or in the
        // database, where every replica's misses meet.
        // Exports read the store itself (`record`), without its caches, so
        // that reading every probe once does not push the hot ones out.
        let metrics = Metrics::new();
        let keys = config.trusted_keys.as_ref();
        let (store, record, auth, misses): (_, Arc<dyn ProbeStore>, _, Arc<dyn MissLog>) = match &config.database {
            None => {
                let store =
                    open_uploaded(&config.data_dir, config.min_free_bytes, config.store_layout, keys, &metrics).await?;
                (
                    hot(store.clone()),
                    store,
                    TokenAuth::new(TokenFile::in_data_dir(&config.data_dir)),
                    Arc::new(FileMissLog::open(&config.data_dir).map_err(|e| e.context("opening the misses"))?),
                )
            }
            Some(database) => {
                let record = PostgresStore::connect(&database.postgres)
                    .await
                    .map_err(|e| e.context("opening the probe database"))?;
                let record = checked(record, keys, &metrics, "upload");
                let auth = TokenAuth::shared(record.backend().tokens().watch().await?);
                let changes = record.backend().changes();
                let misses = Arc::new(record.backend().misses());
                let copies = config.data_dir.join(LOCAL_COPIES_DIR);
                let local =
                    open_copies(&copies, config.min_free_bytes).await?.reporting_damage(metrics.on_damaged("copies"));
                let budget = database.local_copies_bytes;
                let record: Arc<dyn ProbeStore> = Arc::new(record);
                let store = ReadThrough::new(record.clone(), hot(Arc::new(local)), budget, Some(changes)).await?;
                (Arc::new(store) as Arc<dyn ProbeStore>, record, auth, misses)
            }
        };
        let misses = Arc::new(MissRecorder::open(misses, metrics.open_misses.clone()).await?);
        let upstream = match &config.upstream {
            None => None,
            Some(upstream) => {
                upstream::forget_cache_checked_otherwise(&upstream.cache_dir, config.trusted_keys.as_ref())?;
                let cache = open_store(&upstream.cache_dir, upstream.min_free_bytes, "the upstream cache").await?;
                let cache = checked(cache, keys, &metrics, "upstream");
                let upstream = upstream.clone();
                let source = UpstreamSource::new(upstream, Arc::new(cache), metrics.clone())
                    .await
                    .map_err(|e| e.context("setting up the upstream"))?;
                Some(Arc::new(source))
            }
        };
        let coverage = Arc::new(coverage::Coverage::new(store.clone(), upstream.clone(), &config.data_dir)?);
        Ok(Central {
            store,
            record,
            misses,
            auth,
            upstream,
            coverage,
            metrics,
            tls: config.tls,
            allow_anonymous_reads: config.allow_anonymous_reads,
            limits: config.limits,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The store the services use (benches fill it directly).
    pub fn store(&self) -> Arc<dyn ProbeStore> {
        self.store.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting and lets
    /// requests in flight finish.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<()> {
        serve(self, listener, shutdown).await
    }
}

/// Installs the one rustls crypto provider this build has. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Keeps the live and dead bytes gauges of a store that has them current,
/// until the store is closed (it holds the store only to look).
fn report_space(store: Arc<dyn ProbeStore>, metrics: Metrics) {
    if store.space().is_none() {
        return;
    }
    let store = Arc::downgrade(&store);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            every.tick().await;
            let Some((live, dead)) = store.upgrade().and_then(|store| store.space()) else { return };
            metrics.store_live_bytes.set(live as i64);
            metrics.store_dead_bytes.set(dead as i64);
        }
    });
}

async fn serve(central: Central, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<()> {
    let Central { store, record, misses, auth, upstream, coverage, metrics, tls, allow_anonymous_reads, limits } =
        central;
    misses.merge_every(MISSES_MERGED_EVERY);
    report_space(record.clone(), metrics.clone());
    install_crypto_provider();
    let address = listener.local_addr().map_err(|e| Error::io("reading the listening address", e))?;
    let tls = tls_config(&tls)?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // GetProbe is answered beside tonic (`get_probe_direct`), so its
    // service is named here rather than through a tonic server type.
    health_reporter.set_service_status("kprobes.v1.ProbeService", tonic_health::ServingStatus::Serving).await;
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
    if let Some(upstream) = upstream {
        sources.push(upstream);
    }
    let slots = ProbeSlots::new(limits.max_probe_streams, limits.send_timeout);
    let serving = Arc::new(ProbeServing::new(
        SourceChain::new(sources),
        allow_anonymous_reads,
        metrics.clone(),
        slots,
        limits.probe_stream_wait,
        misses.clone(),
    ));
    let product = Arc::new(ProductUploads {
        store: store.clone(),
        auth: auth.clone(),
        metrics: metrics.clone(),
        misses: misses.clone(),
        upload_idle_timeout: limits.upload_idle_timeout,
    });
    let product_grpc = ProductServer::new(ProductUploadService(product.clone()))
        .max_decoding_message_size(MAX_REQUEST_MESSAGE)
        .max_encoding_message_size(MAX_REQUEST_MESSAGE);
    let product_auth = auth.clone();
    let product_grpc = InterceptedService::new(product_grpc, move |request: tonic::Request<()>| {
        product_auth.authorize(request.metadata(), Role::View).map_err(tonic::Status::from)?;
        Ok(request)
    });
    let uploads = Arc::new(UploadService::new(
        store,
        record,
        misses.clone(),
        auth.clone(),
        metrics.clone(),
        limits.send_timeout,
        limits.upload_idle_timeout,
        coverage,
    ));
    let upload = ProbeUploadServiceServer::from_arc(uploads.clone())
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
        .add_service(upload)
        .add_service(product_grpc);
    info!(%address, "listening on {address}");
    metrics.set_ready(true);
    let shutdown = async {
        shutdown.await;
        metrics.set_ready(false);
    };
    let direct = connections::Direct { probes: serving, product, uploads };
    connections::serve(listener, tls, routes, direct, limits, shutdown).await;
    if let Err(error) = misses.flush().await {
        warn!(%error, "could not record the last misses");
    }
    info!("server stopped");
    Ok(())
}

/// The product's ALPN name for HTTP/2 carrying only gRPC.
pub const PRODUCT_ALPN_HTTP2: &[u8] = b"https://alpn.stackrox.io/#pure-grpc";

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
    // HTTP/1.1 for the HTTPS probe route's older clients and
    // `roxctl --force-http1`; gRPC needs h2. The product's roxctl offers
    // its own name for HTTP/2 first and refuses a server that selects
    // none: rustls picks the first of these the client offers, so roxctl
    // gets h2, and a client offering only the product's name gets that
    // (HTTP/2 is told by its preface either way).
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), PRODUCT_ALPN_HTTP2.to_vec()];
    Ok(Arc::new(config))
}
