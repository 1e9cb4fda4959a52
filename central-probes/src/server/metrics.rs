//! Prometheus metrics of Central and the endpoint that serves them.
//!
//! The endpoint is a deliberately tiny HTTP/1.1 responder: Prometheus only
//! ever sends `GET /metrics`, and a full HTTP stack would be a second server
//! framework in the binary for one fixed page.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// Every metric Central keeps. Cheap to clone (counters are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub probe_bytes_served: Counter,
    pub upstream_fetches: Family<ResultLabels, Counter>,
    pub upstream_cache_hits: Counter,
    pub upload_bytes: Counter,
    pub upload_files: Family<OutcomeLabels, Counter>,
    /// GetProbe calls of any outcome, for tests and benchmarks; not
    /// exported (`requests` has them by code and source).
    get_probe_calls: Counter,
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
        let upload_bytes = Counter::default();
        registry.register("upload_bytes", "Probe bytes received by UploadProbes", upload_bytes.clone());
        let upload_files = Family::<OutcomeLabels, Counter>::default();
        registry.register("upload_files", "Uploaded files by outcome", upload_files.clone());
        Metrics {
            registry: Arc::new(registry),
            requests,
            probe_bytes_served,
            upstream_fetches,
            upstream_cache_hits,
            upload_bytes,
            upload_files,
            get_probe_calls: Counter::default(),
        }
    }

    pub fn count_request(&self, rpc: &'static str, code: tonic::Code, source: &'static str) {
        let labels = RequestLabels { rpc, code: format!("{code:?}"), source };
        self.requests.get_or_create(&labels).inc();
        if rpc == "GetProbe" {
            self.get_probe_calls.inc();
        }
    }

    /// GetProbe calls answered, whatever the outcome.
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

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(metrics: Metrics, listener: TcpListener) {
    if let Ok(address) = listener.local_addr() {
        info!(%address, "metrics on http://{address}/metrics");
    }
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buffer = [0u8; 1024];
            // Read the request head; a scraper sends no body.
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buffer[..n]),
                }
            }
            let head = String::from_utf8_lossy(&request);
            let (status, body) = if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "only /metrics is here\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(error) = stream.write_all(response.as_bytes()).await {
                debug!(%error, "metrics response not sent");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(address: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
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
        server.abort();
    }
}
