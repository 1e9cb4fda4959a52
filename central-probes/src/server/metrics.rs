//! Prometheus metrics of Central, and the plain-HTTP endpoint that serves
//! them with Central's readiness: `GET /metrics` for Prometheus, `GET
//! /ready` for a Kubernetes readiness probe (200 while Central serves, 503
//! before it listens and once it shuts down). An axum router served by
//! hyper, both already in the tree under tonic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub rpc: &'static str,
    pub code: String,
    /// Which source served a GetProbe call ("" for other RPCs and errors).
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// Why a probe's signature was refused, and where.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignatureLabels {
    /// `SignatureError::reason`: "missing", "invalid", "unknown_key", ...
    pub reason: &'static str,
    /// "upload" (UploadProbes and the product's upload) or "upstream".
    pub at: &'static str,
}

/// Which store a damaged probe was found in.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// "upload" (the uploaded probes), "upstream" (the cache of upstream
    /// probes) or "copies" (the local copies of a database's probes).
    pub store: &'static str,
}

/// Who changed the store, and how (the audit counters).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    /// The name of the API token.
    pub token: String,
    /// "upload" (a finished stream), "overwrite" (a replaced file),
    /// "delete" (a deleted probe).
    pub action: &'static str,
}

/// Every metric Central keeps. Cheap to clone (counters are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub probe_bytes_served: Counter,
    pub upstream_fetches: Family<ResultLabels, Counter>,
    pub upstream_cache_hits: Counter,
    /// The upstream's "not found" answers remembered now, and those
    /// forgotten before their time to keep within the bound.
    pub upstream_not_found_answers: Gauge,
    pub upstream_not_found_evictions: Counter,
    pub upload_bytes: Counter,
    pub upload_files: Family<OutcomeLabels, Counter>,
    pub changes_by_token: Family<AuditLabels, Counter>,
    /// Probes asked for that no source had, not resolved since (`misses`).
    pub open_misses: Gauge,
    /// Bytes of the pack store's live records and of its dead ones (old
    /// versions, removals, refused uploads) that compaction reclaims.
    pub store_live_bytes: Gauge,
    pub store_dead_bytes: Gauge,
    /// Probes refused under `--trusted-keys`, by reason and where.
    pub signature_refusals: Family<SignatureLabels, Counter>,
    /// Reads that found a stored probe damaged, by store.
    pub damaged_reads: Family<StoreLabels, Counter>,
    /// GetProbe calls of any outcome, for tests and benchmarks; not
    /// exported (`requests` has them by code and source).
    get_probe_calls: Counter,
    /// Whether Central accepts requests: what `/ready` answers.
    ready: Arc<AtomicBool>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("central_probes");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "gRPC requests by RPC, status code and probe source", requests.clone());
        let probe_bytes_served = Counter::default();
        registry.register("probe_bytes_served", "Probe bytes sent to GetProbe callers", probe_bytes_served.clone());
        let upstream_fetches = Family::<ResultLabels, Counter>::default();
        registry.register(
            "upstream_fetches",
            "Fetches from the upstream probe server by result",
            upstream_fetches.clone(),
        );
        let upstream_cache_hits = Counter::default();
        registry.register(
            "upstream_cache_hits",
            "GetProbe calls served from the cache of upstream probes",
            upstream_cache_hits.clone(),
        );
        let (upstream_not_found_answers, upstream_not_found_evictions) = (Gauge::default(), Counter::default());
        registry.register(
            "upstream_not_found_answers",
            "The upstream's recent not-found answers that Central remembers, so as not to ask again at once",
            upstream_not_found_answers.clone(),
        );
        registry.register(
            "upstream_not_found_evictions",
            "Not-found answers of the upstream forgotten before their time because the map was full",
            upstream_not_found_evictions.clone(),
        );
        let upload_bytes = Counter::default();
        registry.register("upload_bytes", "Probe bytes received by UploadProbes", upload_bytes.clone());
        let upload_files = Family::<OutcomeLabels, Counter>::default();
        registry.register("upload_files", "Uploaded files by outcome", upload_files.clone());
        let changes_by_token = Family::<AuditLabels, Counter>::default();
        registry.register(
            "changes_by_token",
            "Uploads, overwrites and deletions by the name of the API token that made them",
            changes_by_token.clone(),
        );
        let open_misses = Gauge::default();
        registry.register(
            "open_misses",
            "Probes Collectors asked for that no source had, and that no upload or upstream has provided since",
            open_misses.clone(),
        );
        let (store_live_bytes, store_dead_bytes) = (Gauge::default(), Gauge::default());
        registry.register(
            "store_live_bytes",
            "Bytes of the pack store's records that hold current probes",
            store_live_bytes.clone(),
        );
        registry.register(
            "store_dead_bytes",
            "Bytes of the pack store's records that compaction can reclaim (old versions, removed probes)",
            store_dead_bytes.clone(),
        );
        let signature_refusals = Family::<SignatureLabels, Counter>::default();
        registry.register(
            "signature_refusals",
            "Uploaded and upstream probes refused because their signature is missing or does not verify",
            signature_refusals.clone(),
        );
        let damaged_reads = Family::<StoreLabels, Counter>::default();
        registry.register(
            "damaged_reads",
            "Reads that found a stored probe's bytes damaged (not matching its record) and did not serve them",
            damaged_reads.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            damaged_reads,
            signature_refusals,
            open_misses,
            store_live_bytes,
            store_dead_bytes,
            requests,
            probe_bytes_served,
            upstream_fetches,
            upstream_cache_hits,
            upstream_not_found_answers,
            upstream_not_found_evictions,
            upload_bytes,
            upload_files,
            changes_by_token,
            get_probe_calls: Counter::default(),
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// What a store checking signatures calls for each probe it refuses.
    pub fn on_signature_refused(&self, at: &'static str) -> crate::store::verified::OnRefused {
        let refusals = self.signature_refusals.clone();
        Arc::new(move |why: &probe_api::signing::SignatureError| {
            refusals.get_or_create(&SignatureLabels { reason: why.reason(), at }).inc();
        })
    }

    /// What a store calls for each damaged probe its reads find.
    pub fn on_damaged(&self, store: &'static str) -> crate::store::check::OnDamaged {
        let damaged = self.damaged_reads.clone();
        Arc::new(move |_: &crate::store::StoredProbe, _: &str| {
            damaged.get_or_create(&StoreLabels { store }).inc();
        })
    }

    /// Reads that found a damaged probe in `store` so far.
    pub fn damaged_read_count(&self, store: &'static str) -> u64 {
        self.damaged_reads.get_or_create(&StoreLabels { store }).get()
    }

    /// Central starts or stops accepting requests.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn count_request(&self, rpc: &'static str, code: tonic::Code, source: &'static str) {
        let labels = RequestLabels { rpc, code: format!("{code:?}"), source };
        self.requests.get_or_create(&labels).inc();
        if rpc == "GetProbe" {
            self.get_probe_calls.inc();
        }
    }

    /// GetProbe calls answered, whatever the outcome (tests, benchmarks).
    #[cfg(any(test, feature = "testing"))]
    pub fn get_probe_requests(&self) -> u64 {
        self.get_probe_calls.get()
    }

    pub fn upstream_fetch_count(&self, result: &'static str) -> u64 {
        self.upstream_fetches.get_or_create(&ResultLabels { result }).get()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// Serves `/metrics` and `/ready` over plain HTTP/1.1 on `listener` until
/// the task is dropped.
pub async fn serve(metrics: Metrics, listener: TcpListener) {
    if let Ok(address) = listener.local_addr() {
        info!(%address, "metrics on http://{address}/metrics, readiness on http://{address}/ready");
    }
    let scrape = metrics.clone();
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = scrape.render();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text) }
            }),
        )
        .route(
            "/ready",
            get(move || {
                let ready = metrics.ready.load(Ordering::SeqCst);
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not serving\n").into_response()
                    }
                }
            }),
        );
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors or a reset: give the process a moment.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone())).into_owned();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(address: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn the_endpoint_serves_counters_in_prometheus_text_format() {
        let metrics = Metrics::new();
        metrics.count_request("GetProbe", tonic::Code::Ok, "upstream_cache");
        metrics.count_request("GetProbe", tonic::Code::NotFound, "");
        metrics.upstream_fetches.get_or_create(&ResultLabels { result: "fetched" }).inc();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(metrics.clone(), listener));

        let response = get(address, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        let expected = r#"central_probes_requests_total{rpc="GetProbe",code="Ok",source="upstream_cache"} 1"#;
        assert!(response.contains(expected), "{response}");
        assert!(response.contains(r#"central_probes_upstream_fetches_total{result="fetched"} 1"#), "{response}");
        assert_eq!(metrics.get_probe_requests(), 2);
        assert!(!metrics.render().contains("DataLoss"), "asking for the count adds no series");
        assert!(get(address, "/other").await.starts_with("HTTP/1.1 404"));

        assert!(get(address, "/ready").await.starts_with("HTTP/1.1 503"), "not ready before Central serves");
        metrics.set_ready(true);
        assert!(get(address, "/ready").await.starts_with("HTTP/1.1 200"));
        metrics.set_ready(false);
        assert!(get(address, "/ready").await.starts_with("HTTP/1.1 503"), "not ready once it shuts down");
        server.abort();
    }
}
