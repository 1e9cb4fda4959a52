//! End to end: Central mirroring a static HTTPS probe bucket (Python's
//! `http.server` over TLS, laid out as `<base>/<module version>/<file>`),
//! directly and through an HTTP CONNECT proxy the test runs, which counts
//! the tunnels it relays.

mod common;
#[path = "common/connect_proxy.rs"]
mod connect_proxy;
#[path = "common/served.rs"]
mod served;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use central_probes::server::upstream::{UpstreamConfig, UpstreamKind};
use common::{Central, CentralOptions, TestPki};
use connect_proxy::ConnectProxy;
use probe_api::digest::Sha256Digest;
use probe_api::https::ProxySettings;
use probe_api::v1::ProbeSource;
use tonic::Code;

const MODULE: &str = "2.5.0";

fn file(kernel: &str) -> String {
    format!("collector-ebpf-{kernel}.o.gz")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn probe(kernel: &str) -> Vec<u8> {
    gzip(format!("eBPF object for {kernel} ").repeat(5_000).as_bytes())
}

/// The bucket: Python's static file server over TLS with Central's test
/// certificate (valid for localhost).
struct Bucket {
    root: tempfile::TempDir,
    /// Stopped when dropped.
    _server: common::HttpsBucket,
    /// `https://localhost:PORT/collector/modules/`
    base_url: String,
}

impl Bucket {
    fn start(pki: &TestPki) -> Bucket {
        let root = tempfile::tempdir().unwrap();
        let files = root.path().join("files");
        std::fs::create_dir_all(files.join("collector/modules").join(MODULE)).unwrap();
        let server = common::https_bucket(pki, root.path(), &files);
        let base_url = format!("https://localhost:{}/collector/modules/", server.port);
        Bucket { root, _server: server, base_url }
    }

    fn module_dir(&self) -> PathBuf {
        self.root.path().join("files/collector/modules").join(MODULE)
    }

    fn put(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.module_dir().join(name), bytes).unwrap();
    }
}

fn upstream_config(pki: &TestPki, kind: UpstreamKind, cache_dir: &Path, proxies: ProxySettings) -> UpstreamConfig {
    UpstreamConfig { proxies, ..common::upstream_config(pki, kind, cache_dir) }
}

/// Probe files in the upstream cache under `cache_dir`.
fn cached_probes(cache_dir: &Path) -> usize {
    let probes = cache_dir.join("probes").join(MODULE);
    std::fs::read_dir(probes).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_is_mirrored_after_its_files_are_checked_and_bad_ones_are_never_cached() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let bucket = Bucket::start(&pki);
    let plain = probe("5.1.0");
    bucket.put(&file("5.1.0"), &plain);
    let published = probe("5.2.0");
    bucket.put(&file("5.2.0"), &published);
    let digest_line = format!("{}  {}\n", Sha256Digest::of(&published).to_hex(), file("5.2.0"));
    bucket.put(&format!("{}.sha256", file("5.2.0")), digest_line.as_bytes());
    bucket.put(&file("5.3.0"), &probe("5.3.0"));
    bucket.put(&format!("{}.sha256", file("5.3.0")), Sha256Digest::of(b"other bytes").to_hex().as_bytes());
    let whole = probe("5.4.0");
    bucket.put(&file("5.4.0"), &whole[..whole.len() - 10]);

    let cache_dir = dir.path().join("cache");
    let kind = UpstreamKind::Bucket { base_url: bucket.base_url.clone() };
    let upstream = Some(upstream_config(&pki, kind, &cache_dir, ProxySettings::default()));
    let central =
        Central::start_with(&pki, &dir.path().join("central"), CentralOptions { upstream, ..Default::default() }).await;
    let collector = central.collector(&pki, Some(&pki.collector));

    let got = collector.fetch(MODULE, &file("5.1.0")).await.unwrap();
    assert!(got.bytes == plain && got.source == ProbeSource::Upstream, "without a .sha256: {:?}", got.source);
    let again = collector.fetch(MODULE, &file("5.1.0")).await.unwrap();
    assert_eq!(again.source, ProbeSource::UpstreamCache);
    let got = collector.fetch(MODULE, &file("5.2.0")).await.unwrap();
    assert!(got.bytes == published, "with a matching .sha256");

    let wrong_digest = collector.fetch(MODULE, &file("5.3.0")).await.unwrap_err();
    assert_eq!(wrong_digest.code(), Code::Unavailable, "{wrong_digest}");
    let cut = collector.fetch(MODULE, &file("5.4.0")).await.unwrap_err();
    assert_eq!(cut.code(), Code::Unavailable, "{cut}");
    assert!(cut.to_string().contains("gzip"), "the error says why: {cut}");
    let missing = collector.fetch(MODULE, &file("5.5.0")).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing}");
    assert_eq!(cached_probes(&cache_dir), 2, "only the two good files are cached");

    // The bucket gone: a probe not cached yet is UNAVAILABLE, one cached is
    // still served.
    drop(bucket);
    let gone = collector.fetch(MODULE, &file("5.6.0")).await.unwrap_err();
    assert_eq!(gone.code(), Code::Unavailable, "{gone}");
    assert!(collector.fetch(MODULE, &file("5.1.0")).await.is_ok());
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_is_reached_through_the_proxy_unless_no_proxy_names_it_and_credentials_stay_out_of_the_log() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let bucket = Bucket::start(&pki);
    for kernel in ["6.1.0", "6.2.0", "6.3.0"] {
        bucket.put(&file(kernel), &probe(kernel));
    }
    let proxy = ConnectProxy::start().await;
    let ca = pki.ca_file();
    // No free-space floor: the test must not depend on the machine's disk.
    let upstream_args =
        ["--upstream-url", bucket.base_url.as_str(), "--upstream-ca", ca.to_str().unwrap(), "--min-free-space", "0"];
    let bucket_authority = bucket.base_url.trim_start_matches("https://").split('/').next().unwrap().to_owned();
    let fetch = |address: &str, kernel: &str| {
        let client = collector_client::central::CentralClient::new(
            address,
            &pki.tls_with(Some(&pki.collector)),
            Duration::from_secs(5),
        )
        .unwrap();
        let kernel = kernel.to_owned();
        async move { client.fetch(MODULE, &file(&kernel)).await }
    };

    // From the environment, with credentials.
    let with_credentials = format!("http://kprobes:s3cret@{}", proxy.address);
    let served =
        served::serve_with_env(&pki, &dir.path().join("a"), &upstream_args, &[("HTTPS_PROXY", &with_credentials)]);
    let got = fetch(&served.address, "6.1.0").await.unwrap();
    assert!(got.bytes == probe("6.1.0"));
    let tunnels = proxy.tunnels();
    assert!(!tunnels.is_empty(), "the fetch went through the proxy");
    for tunnel in &tunnels {
        assert!(tunnel.starts_with(&format!("CONNECT {bucket_authority} ")), "{tunnel}");
        // base64("kprobes:s3cret")
        assert!(tunnel.contains("Proxy-Authorization: Basic a3Byb2JlczpzM2NyZXQ="), "{tunnel}");
    }
    let startup_log = served.startup_log.clone();
    let (_, mut log) = served.terminate();
    log.extend(startup_log);
    assert!(log.iter().any(|line| line.contains("upstream probe source configured")), "{}", log.join("\n"));
    assert!(!log.iter().any(|line| line.contains("s3cret")), "the password is logged:\n{}", log.join("\n"));

    // NO_PROXY naming the bucket's host: straight there.
    let before = proxy.tunnels().len();
    let env = [("https_proxy", proxy.address.as_str()), ("no_proxy", "example.com,localhost")];
    let served = served::serve_with_env(&pki, &dir.path().join("b"), &upstream_args, &env);
    assert!(fetch(&served.address, "6.2.0").await.unwrap().bytes == probe("6.2.0"));
    assert_eq!(proxy.tunnels().len(), before, "no_proxy bypasses the proxy");
    served.terminate();

    // --upstream-proxy overrides a proxy from the environment (here one
    // that does not exist).
    let mut args = upstream_args.to_vec();
    let flag_proxy = format!("http://{}", proxy.address);
    args.extend(["--upstream-proxy", flag_proxy.as_str()]);
    let served = served::serve_with_env(&pki, &dir.path().join("c"), &args, &[("HTTPS_PROXY", "http://127.0.0.1:1")]);
    assert!(fetch(&served.address, "6.3.0").await.unwrap().bytes == probe("6.3.0"));
    assert!(proxy.tunnels().len() > before, "the flag's proxy was used");
    served.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_upstream_is_reached_through_the_proxy_too() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let options = CentralOptions { allow_anonymous_reads: true, ..Default::default() };
    let upstream_central = Central::start_with(&pki, &dir.path().join("upstream"), options).await;
    let mut admin = upstream_central.admin(&pki, &upstream_central.admin_token);
    let bytes = probe("7.1.0");
    let mut messages = vec![probe_api::v1::UploadProbesRequest {
        message: Some(probe_api::v1::upload_probes_request::Message::Options(Default::default())),
    }];
    messages.extend(central_probes::server::uploads::file_messages(
        &format!("{MODULE}/{}", file("7.1.0")),
        &bytes,
        64 << 10,
    ));
    admin.upload_probes(tokio_stream::iter(messages)).await.unwrap();

    let proxy = ConnectProxy::start().await;
    let port = upstream_central.address.rsplit(':').next().unwrap();
    let kind = UpstreamKind::Grpc { address: format!("https://localhost:{port}") };
    let proxies = ProxySettings::new(Some(&proxy.address), None).unwrap();
    let upstream = upstream_config(&pki, kind, &dir.path().join("cache"), proxies);
    let central = Central::start_with(
        &pki,
        &dir.path().join("central"),
        CentralOptions { upstream: Some(upstream), ..Default::default() },
    )
    .await;
    let got = central.collector(&pki, Some(&pki.collector)).fetch(MODULE, &file("7.1.0")).await.unwrap();
    assert!(got.bytes == bytes && got.source == ProbeSource::Upstream);
    let tunnels = proxy.tunnels();
    assert_eq!(tunnels.len(), 1, "{tunnels:?}");
    assert!(tunnels[0].starts_with(&format!("CONNECT localhost:{port} ")), "{}", tunnels[0]);
    central.stop().await;
    upstream_central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checking_central_takes_a_buckets_signature_beside_its_probe_and_refuses_an_unsigned_one() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let keys = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let trusted = probe_api::signing::TrustedKeys::parse(&keys.pk.to_box().unwrap().into_string()).unwrap();
    let bucket = Bucket::start(&pki);
    let (signed, unsigned) = (probe("5.1.0"), probe("5.2.0"));
    bucket.put(&file("5.1.0"), &signed);
    bucket.put(&file("5.2.0"), &unsigned);
    let path = probe_api::names::ProbePath::parse(&format!("{MODULE}/{}", file("5.1.0"))).unwrap();
    let comment = probe_api::signing::trusted_comment(&path, 4);
    let signature = minisign::sign(None, &keys.sk, std::io::Cursor::new(&signed), Some(&comment), None).unwrap();
    let signature = signature.into_string().into_bytes();
    bucket.put(&format!("{}.minisig", file("5.1.0")), &signature);

    let cache_dir = dir.path().join("cache");
    let kind = UpstreamKind::Bucket { base_url: bucket.base_url.clone() };
    let upstream = Some(upstream_config(&pki, kind, &cache_dir, ProxySettings::default()));
    let options = CentralOptions { upstream, trusted_keys: Some(trusted), ..Default::default() };
    let central = Central::start_with(&pki, &dir.path().join("central"), options).await;
    let collector = central.collector(&pki, Some(&pki.collector));
    let got = collector.fetch(MODULE, &file("5.1.0")).await.unwrap();
    assert_eq!(got.signature.as_deref(), Some(&signature[..]), "the .minisig beside it, byte for byte");
    let again = collector.fetch(MODULE, &file("5.1.0")).await.unwrap();
    assert_eq!((again.source, again.signature), (ProbeSource::UpstreamCache, Some(signature)), "cached with it");
    let refused = collector.fetch(MODULE, &file("5.2.0")).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused}");
    assert!(refused.to_string().contains("not signed"), "{refused}");
    assert_eq!(cached_probes(&cache_dir), 1, "the unsigned probe is not cached");
    central.stop().await;
}
