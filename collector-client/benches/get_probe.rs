//! GetProbe throughput and latency over mutual TLS, and the fan-out of
//! many Collectors asking at once for a probe only the upstream has.
//!
//!   cargo bench -p collector-client --bench get_probe
//!
//! Central and the clients run in this process on loopback (both share the
//! machine's cores, as they would on a small node). Each client has its own
//! long-lived connection and picks probes at random. Settings through the
//! environment: BENCH_SECONDS (per concurrency level, default 5),
//! BENCH_PROBES (default 300), BENCH_FANOUT (default 200).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use central_probes::pki::CertificateAuthority;
use central_probes::server::auth::{Role, TokenFile};
use central_probes::server::metrics::Metrics;
use central_probes::server::upstream::{UpstreamConfig, UpstreamKind};
use central_probes::server::{Central, CentralConfig, TlsMaterial};
use central_probes::store::ProbeStore;
use central_probes::synthetic::PackageSpec;
use collector_client::central::CentralClient;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use probe_api::transport::ClientTls;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Pki {
    ca: CertificateAuthority,
    tls: TlsMaterial,
    client: ClientTls,
}

fn pki() -> Pki {
    let ca = CertificateAuthority::new("bench CA").unwrap();
    let server = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
    let collector = ca.issue_client("collector").unwrap();
    let tls = TlsMaterial {
        cert_pem: server.cert_pem.into_bytes(),
        key_pem: server.key_pem.into_bytes(),
        client_ca_pem: ca.cert_pem.clone().into_bytes(),
    };
    let client = ClientTls {
        ca_pem: ca.cert_pem.clone().into_bytes(),
        identity: Some((collector.cert_pem.into_bytes(), collector.key_pem.into_bytes())),
    };
    Pki { ca, tls, client }
}

/// Stores the probes of `spec` directly through the store.
async fn fill(store: &Arc<dyn ProbeStore>, spec: &PackageSpec) -> Vec<String> {
    let paths = spec.probe_paths();
    for path in &paths {
        let bytes = spec.probe_bytes(path);
        let mut writer = store.create(ProbePath::parse(path).unwrap(), bytes.len() as u64).await.unwrap();
        writer.write(bytes.clone().into()).await.unwrap();
        writer.finish(Sha256Digest::of(&bytes).into(), false).await.unwrap().await.unwrap();
    }
    paths
}

async fn start(
    pki: &Pki,
    dir: &std::path::Path,
    upstream: Option<UpstreamConfig>,
    anonymous: bool,
) -> (String, Arc<dyn ProbeStore>, Metrics) {
    TokenFile::in_data_dir(dir).create(Role::View, "bench").unwrap();
    let config = CentralConfig {
        data_dir: dir.to_owned(),
        min_free_bytes: 0,
        hot_cache_bytes: 16 << 20,
        store_layout: Default::default(),
        database: None,
        tls: pki.tls.clone(),
        allow_anonymous_reads: anonymous,
        upstream,
        limits: Default::default(),
        trusted_keys: None,
    };
    let central = Central::open(config).await.unwrap();
    let (store, metrics) = (central.store(), central.metrics().clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(central.run(listener, std::future::pending()));
    (address, store, metrics)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn load(address: &str, tls: &ClientTls, paths: Arc<Vec<String>>, concurrency: usize, seconds: u64) {
    let bytes = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let client = CentralClient::new(address, tls, Duration::from_secs(2)).unwrap();
        let (paths, bytes) = (paths.clone(), bytes.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (worker as u64 + 1);
            while Instant::now() < deadline {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let (module_version, file_name) = paths[(state % paths.len() as u64) as usize].split_once('/').unwrap();
                let started = Instant::now();
                let probe = client.fetch(module_version, file_name).await.expect("GetProbe succeeds");
                latencies.push(started.elapsed());
                bytes.fetch_add(probe.bytes.len() as u64, Ordering::Relaxed);
            }
            latencies
        }));
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    println!(
        "{concurrency:>11} {:>10.0} {:>8.0} {:>9.2} {:>9.2}",
        latencies.len() as f64 / elapsed,
        bytes.load(Ordering::Relaxed) as f64 / elapsed / 1e6,
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    central_probes::server::install_crypto_provider();
    let seconds = setting("BENCH_SECONDS", 5);
    let probes = setting("BENCH_PROBES", 300) as usize;
    let fanout = setting("BENCH_FANOUT", 200) as usize;
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();

    let kernels: Vec<String> = (0..probes).map(|i| format!("5.{}.0-{}-generic", i % 20, i)).collect();
    let kernels: Vec<&str> = kernels.iter().map(String::as_str).collect();
    let spec = PackageSpec::new("2.5.0", &kernels);
    let (address, store, _) = start(&pki, &dir.path().join("central"), None, false).await;
    let paths = Arc::new(fill(&store, &spec).await);
    let mean = paths.iter().map(|p| spec.probe_bytes(p).len()).sum::<usize>() / paths.len();
    println!(
        "GetProbe over mutual TLS, {probes} probes (mean {} KB), {seconds} s per level, random picks",
        mean / 1000
    );
    println!("concurrency  requests/s     MB/s  p50 (ms)  p99 (ms)");
    for concurrency in [1, 16, 64] {
        load(&address, &pki.client, paths.clone(), concurrency, seconds).await;
    }

    // Fan-out: a probe only the upstream has, asked for by many at once.
    let (upstream_address, upstream_store, upstream_metrics) =
        start(&pki, &dir.path().join("upstream"), None, true).await;
    let only_upstream = PackageSpec::new("2.5.0", &["6.1.0-1-cloud-amd64"]);
    let path = fill(&upstream_store, &only_upstream).await.remove(0);
    let config = UpstreamConfig {
        kind: UpstreamKind::Grpc { address: upstream_address },
        tls: ClientTls { ca_pem: pki.ca.cert_pem.clone().into_bytes(), identity: None },
        proxies: Default::default(),
        connect_timeout: Duration::from_secs(2),
        fetch_timeout: Duration::from_secs(30),
        cache_dir: dir.path().join("cache"),
        cache_max_bytes: 1 << 30,
        min_free_bytes: 0,
        not_found_ttl: Duration::from_secs(30),
        view_token: None,
    };
    let (middle, _, _) = start(&pki, &dir.path().join("middle"), Some(config), false).await;
    let clients: Vec<CentralClient> =
        (0..fanout).map(|_| CentralClient::new(&middle, &pki.client, Duration::from_secs(5)).unwrap()).collect();
    let (module_version, file_name) = path.split_once('/').unwrap();
    let started = Instant::now();
    let fetches: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let (module_version, file_name) = (module_version.to_owned(), file_name.to_owned());
            tokio::spawn(async move { client.fetch(&module_version, &file_name).await.map(|p| p.bytes.len()) })
        })
        .collect();
    for fetch in fetches {
        fetch.await.unwrap().expect("every collector gets the probe");
    }
    println!(
        "fan-out: {fanout} collectors (each with a new connection) got an upstream-only probe in {:.0} ms; \
         upstream requests: {}",
        started.elapsed().as_secs_f64() * 1e3,
        upstream_metrics.get_probe_requests()
    );
}
