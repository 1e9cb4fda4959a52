//! End to end: a Collector gets its probe through the chain, built-in
//! files, then Central over mutual TLS, then the upstream that Central asks
//! over TLS; or fails the way operators know.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use central_probes::server::upstream::{UpstreamConfig, UpstreamKind};
use common::{Central, CentralOptions, TestPki};
use probe_api::v1::probe_service_server::{ProbeService, ProbeServiceServer};
use probe_api::v1::upload_probes_request::Message;
use probe_api::v1::{
    GetProbeRequest, GetProbeResponse, ProbeHeader, ProbeSource, UploadOptions, UploadProbesRequest, get_probe_response,
};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

const MODULE: &str = "2.5.0";
const KERNEL: &str = "5.14.0-284.11.1.el9_2.x86_64";

fn file_name(kernel: &str) -> String {
    format!("collector-ebpf-{kernel}.o.gz")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// The eBPF object of a kernel, and the gzip'd probe file holding it.
fn probe_for(kernel: &str) -> (Vec<u8>, Vec<u8>) {
    let object = format!("eBPF object for {kernel}").repeat(100).into_bytes();
    let file = gzip(&object);
    (object, file)
}

async fn upload(central: &Central, pki: &TestPki, kernel: &str) {
    let mut admin = central.admin(pki, &central.admin_token);
    let mut messages = vec![UploadProbesRequest { message: Some(Message::Options(UploadOptions::default())) }];
    let path = format!("{MODULE}/{}", file_name(kernel));
    messages.extend(central_probes::server::uploads::file_messages(&path, &probe_for(kernel).1, 1000));
    admin.upload_probes(tokio_stream::iter(messages)).await.unwrap();
}

/// An upstream probe server: a Central serving anonymous reads.
async fn upstream_server(pki: &TestPki, dir: &Path) -> Central {
    let options = CentralOptions { allow_anonymous_reads: true, ..CentralOptions::default() };
    Central::start_with(pki, &dir.join("upstream"), options).await
}

fn upstream_config(pki: &TestPki, address: &str, dir: &Path) -> UpstreamConfig {
    let kind = UpstreamKind::Grpc { address: format!("https://{address}") };
    common::upstream_config(pki, kind, &dir.join("central-cache"))
}

/// Central with `upstream` behind it, or offline when `None`.
async fn central_with(pki: &TestPki, dir: &Path, upstream: Option<&str>) -> Central {
    let upstream = upstream.map(|address| upstream_config(pki, address, dir));
    Central::start_with(pki, &dir.join("central"), CentralOptions { upstream, ..CentralOptions::default() }).await
}

/// `collector-client get-probe` with the Collector identity written to
/// `dir`, quick retries, and the probe written to `dir/probe.o`.
#[derive(Clone)]
struct CollectorCli {
    ca_file: PathBuf,
    dir: PathBuf,
    retry_interval: &'static str,
    retry_budget: &'static str,
}

impl CollectorCli {
    fn new(pki: &TestPki, dir: &Path) -> Self {
        std::fs::write(dir.join("collector.pem"), &pki.collector.cert_pem).unwrap();
        std::fs::write(dir.join("collector-key.pem"), &pki.collector.key_pem).unwrap();
        CollectorCli { ca_file: pki.ca_file(), dir: dir.to_owned(), retry_interval: "100ms", retry_budget: "1s" }
    }

    /// Returns (exit code, stdout, stderr).
    async fn run(&self, central: &str, extra: &[&str]) -> (i32, String, String) {
        let dir = &self.dir;
        let mut args: Vec<String> = vec![
            "get-probe".into(),
            "--collection-method".into(),
            "ebpf".into(),
            "--module-version".into(),
            MODULE.into(),
            "--kernel-candidates".into(),
            KERNEL.into(),
            "--central".into(),
            central.into(),
            "--ca".into(),
            self.ca_file.display().to_string(),
            "--cert".into(),
            dir.join("collector.pem").display().to_string(),
            "--key".into(),
            dir.join("collector-key.pem").display().to_string(),
            "--out".into(),
            dir.join("probe.o").display().to_string(),
            "--retry-interval".into(),
            self.retry_interval.into(),
            "--retry-budget".into(),
            self.retry_budget.into(),
            "--connect-timeout".into(),
            "500ms".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        run_collector(args).await
    }
}

async fn run_collector(args: Vec<String>) -> (i32, String, String) {
    run_collector_with_env(args, Vec::new()).await
}

/// The Collector's settings that the test's own environment must not set.
const SETTINGS: [&str; 11] = [
    "KERNEL_VERSION",
    "MODULE_VERSION",
    "GRPC_SERVER",
    "COLLECTION_METHOD",
    "KERNEL_CANDIDATES",
    "COLLECTOR_HOST_ROOT",
    "NODE_HOSTNAME",
    "MODULE_DOWNLOAD_BASE_URL",
    "SNI_HOSTNAME",
    "https_proxy",
    "HTTPS_PROXY",
];

/// `collector-client` with only `env` of the Collector's settings.
async fn run_collector_with_env(args: Vec<String>, env: Vec<(String, String)>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_collector-client"));
        for name in SETTINGS {
            command.env_remove(name);
        }
        let output = command.args(&args).envs(env).output().unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_bpf_needs_no_probe_and_contacts_nothing() {
    let args = "get-probe --collection-method core_bpf --central 127.0.0.1:1 --ca /none --cert /none --key /none";
    let (code, stdout, stderr) = run_collector(args.split(' ').map(String::from).collect()).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("CORE_BPF") && stdout.contains("nothing to fetch"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_built_in_probe_is_used_without_contacting_central() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = central_with(&pki, dir.path(), None).await;
    let builtin = dir.path().join("builtin");
    std::fs::create_dir(&builtin).unwrap();
    let (object, file) = probe_for(KERNEL);
    std::fs::write(builtin.join(file_name(KERNEL)), file).unwrap();

    let (code, stdout, stderr) =
        CollectorCli::new(&pki, dir.path()).run(&central.address, &["--builtin-dir", builtin.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("built-in"), "{stdout}");
    assert_eq!(std::fs::read(dir.path().join("probe.o")).unwrap(), object);
    assert_eq!(central.metrics.get_probe_requests(), 0, "Central was never asked");

    // An uncompressed built-in probe works too.
    std::fs::remove_file(builtin.join(file_name(KERNEL))).unwrap();
    std::fs::write(builtin.join(format!("collector-ebpf-{KERNEL}.o")), b"raw object").unwrap();
    let (code, _, stderr) =
        CollectorCli::new(&pki, dir.path()).run(&central.address, &["--builtin-dir", builtin.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read(dir.path().join("probe.o")).unwrap(), b"raw object");
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_in_central_is_served_without_asking_the_upstream() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_server(&pki, dir.path()).await;
    upload(&upstream, &pki, KERNEL).await;
    let central = central_with(&pki, dir.path(), Some(&upstream.address)).await;
    upload(&central, &pki, KERNEL).await;

    let (code, stdout, stderr) = CollectorCli::new(&pki, dir.path()).run(&central.address, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("UploadedPackage"), "{stdout}");
    assert_eq!(std::fs::read(dir.path().join("probe.o")).unwrap(), probe_for(KERNEL).0);
    assert_eq!(upstream.metrics.get_probe_requests(), 0, "the upstream received no request");
    central.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_probe_is_fetched_once_then_served_from_centrals_cache() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_server(&pki, dir.path()).await;
    upload(&upstream, &pki, KERNEL).await;
    let central = central_with(&pki, dir.path(), Some(&upstream.address)).await;
    let collector = central.collector(&pki, Some(&pki.collector));

    let first = collector.fetch(MODULE, &file_name(KERNEL)).await.unwrap();
    assert_eq!(first.source, ProbeSource::Upstream);
    let second = collector.fetch(MODULE, &file_name(KERNEL)).await.unwrap();
    assert_eq!(second.source, ProbeSource::UpstreamCache);
    assert_eq!(first.bytes, probe_for(KERNEL).1);
    assert_eq!(second.bytes, first.bytes);
    assert_eq!(upstream.metrics.get_probe_requests(), 1);

    // The CLI gets it from the cache as well.
    let (code, stdout, stderr) = CollectorCli::new(&pki, dir.path()).run(&central.address, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("UpstreamCache"), "{stdout}");
    assert_eq!(upstream.metrics.get_probe_requests(), 1);
    central.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_miss_exits_1_with_the_crash_loop_report() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = central_with(&pki, dir.path(), None).await;
    let (code, _, stderr) = CollectorCli::new(&pki, dir.path()).run(&central.address, &[]).await;
    assert_eq!(code, 1, "{stderr}");
    for expected in [
        "CrashLoopBackOff",
        &format!("{} from Central {}: NotFound", file_name(KERNEL), central.address),
        &format!("upload a kernel support package for module version {MODULE} that covers kernel {KERNEL}"),
        "CORE_BPF",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
    assert!(!dir.path().join("probe.o").exists());
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_retried_then_reported() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    // A port with nothing listening: bind, note it, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let central = central_with(&pki, dir.path(), Some(&closed)).await;
    let (code, _, stderr) = CollectorCli::new(&pki, dir.path()).run(&central.address, &[]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("Unavailable") && stderr.contains("upstream"), "{stderr}");
    let tries = central.metrics.get_probe_requests();
    assert!(tries >= 3, "the collector retried: {tries} tries");
    assert!(central.metrics.upstream_fetch_count("error") >= 3);
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_uploaded_while_the_collector_retries_is_picked_up() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = central_with(&pki, dir.path(), None).await;
    let address = central.address.clone();
    let cli = CollectorCli { retry_interval: "200ms", retry_budget: "30s", ..CollectorCli::new(&pki, dir.path()) };
    let collector = tokio::spawn(async move { cli.run(&address, &[]).await });
    // Let it miss a few times first.
    while central.metrics.get_probe_requests() < 3 {
        assert!(!collector.is_finished(), "the collector gave up early: {:?}", collector.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    upload(&central, &pki, KERNEL).await;
    let (code, stdout, stderr) = collector.await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("UploadedPackage"), "{stdout}");
    assert_eq!(stderr.matches("not found").count(), 1, "NOT_FOUND is logged once:\n{stderr}");
    assert_eq!(std::fs::read(dir.path().join("probe.o")).unwrap(), probe_for(KERNEL).0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_collectors_on_a_new_kernel_cause_one_upstream_request() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_server(&pki, dir.path()).await;
    upload(&upstream, &pki, KERNEL).await;
    let central = central_with(&pki, dir.path(), Some(&upstream.address)).await;
    let mut collectors = Vec::new();
    for _ in 0..200 {
        let client = central.collector(&pki, Some(&pki.collector));
        collectors.push(tokio::spawn(async move { client.fetch(MODULE, &file_name(KERNEL)).await }));
    }
    let expected = probe_for(KERNEL).1;
    for collector in collectors {
        let probe = collector.await.unwrap().unwrap();
        assert_eq!(probe.bytes, expected);
    }
    assert_eq!(upstream.metrics.get_probe_requests(), 1, "exactly one upstream request");
    central.stop().await;
    upstream.stop().await;
}

/// An upstream that announces one digest and sends other bytes.
struct LyingUpstream;

#[tonic::async_trait]
impl ProbeService for LyingUpstream {
    type GetProbeStream = Pin<Box<dyn Stream<Item = Result<GetProbeResponse, Status>> + Send>>;

    async fn get_probe(&self, request: Request<GetProbeRequest>) -> Result<Response<Self::GetProbeStream>, Status> {
        let request = request.into_inner();
        let promised = probe_for(KERNEL).1;
        let mut delivered = promised.clone();
        delivered[10] ^= 0xff;
        let header = ProbeHeader {
            path: format!("{}/{}", request.module_version, request.file_name),
            size: promised.len() as u64,
            sha256: probe_api::digest::Sha256Digest::of(&promised).to_hex(),
            source: ProbeSource::UploadedPackage.into(),
            signature: Default::default(),
        };
        let messages = vec![
            Ok(GetProbeResponse { message: Some(get_probe_response::Message::Header(header)) }),
            Ok(GetProbeResponse { message: Some(get_probe_response::Message::Chunk(delivered.into())) }),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_upstream_reply_is_rejected_and_nothing_is_written() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let routes = tonic::service::Routes::new(ProbeServiceServer::new(LyingUpstream));
    let (liar, server) = common::serve_fake(&pki, routes).await;
    let central = central_with(&pki, dir.path(), Some(&liar)).await;

    let error = central.collector(&pki, Some(&pki.collector)).fetch(MODULE, &file_name(KERNEL)).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert!(error.to_string().contains("bad reply"), "{error}");
    let cached = dir.path().join("central-cache/probes");
    let cached_files = std::fs::read_dir(&cached).map(|d| d.count()).unwrap_or(0);
    assert_eq!(cached_files, 0, "nothing unverified is cached");

    let (code, _, stderr) = CollectorCli::new(&pki, dir.path()).run(&central.address, &[]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(!dir.path().join("probe.o").exists());
    central.stop().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_central_http_the_probe_comes_through_the_https_route_and_its_digest_is_checked() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = central_with(&pki, dir.path(), None).await;
    upload(&central, &pki, KERNEL).await;
    let cli = CollectorCli::new(&pki, dir.path());

    let (code, stdout, stderr) = cli.run(&central.address, &["--central-http"]).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(std::fs::read(dir.path().join("probe.o")).unwrap(), probe_for(KERNEL).0);
    assert!(stdout.contains("/kernel-objects/") && stdout.contains("matches the Digest header"), "{stdout}");
    assert_eq!(central.metrics.get_probe_requests(), 0, "GetProbe was not used");

    // A Central without the probe: the route's 404 is "not found".
    let empty = central_with(&pki, &dir.path().join("empty"), None).await;
    let (code, stdout, stderr) = cli.run(&empty.address, &["--central-http"]).await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("404"), "{stderr}");
    central.stop().await;
    empty.stop().await;
}

/// The kernel names a run of `collector-client` tried, in order, from the
/// first line of its report.
fn candidates_tried(stderr: &str) -> Vec<String> {
    let line = stderr.lines().find_map(|line| line.split_once("no probe for kernel ")).map(|(_, rest)| rest);
    let names = line.unwrap_or_else(|| panic!("no report in:\n{stderr}")).split(" (module version").next().unwrap();
    names.split(" / ").map(str::to_owned).collect()
}

/// The product's DaemonSet environment around a fake host root, against
/// a Central without the probe: the report lists the candidates tried.
fn product_env(central: &str, host_root: &Path, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![
        ("GRPC_SERVER", central),
        ("COLLECTION_METHOD", "EBPF"),
        ("MODULE_VERSION", MODULE),
        ("COLLECTOR_HOST_ROOT", host_root.to_str().unwrap()),
    ];
    env.extend_from_slice(extra);
    env.into_iter().map(|(name, value)| (name.to_owned(), value.to_owned())).collect()
}

fn identity_args(pki: &TestPki, dir: &Path) -> Vec<String> {
    std::fs::write(dir.join("collector.pem"), &pki.collector.cert_pem).unwrap();
    std::fs::write(dir.join("collector-key.pem"), &pki.collector.key_pem).unwrap();
    let path = |p: PathBuf| p.display().to_string();
    [
        "get-probe".to_owned(),
        "--ca".into(),
        path(pki.ca_file()),
        "--cert".into(),
        path(dir.join("collector.pem")),
        "--key".into(),
        path(dir.join("collector-key.pem")),
        "--out".into(),
        path(dir.join("probe.o")),
        "--retry-budget".into(),
        "0s".into(),
        "--connect-timeout".into(),
        "500ms".into(),
    ]
    .into()
}

/// Each directory of `tests/data/hosts` and the candidates expected of it.
fn distribution_hosts() -> Vec<(PathBuf, Vec<String>)> {
    let hosts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hosts");
    let dirs = std::fs::read_dir(&hosts).unwrap().map(|entry| entry.unwrap().path()).filter(|path| path.is_dir());
    let expected =
        |host: &Path| std::fs::read_to_string(host.join("candidates")).unwrap().lines().map(str::to_owned).collect();
    dirs.map(|host| (host.clone(), expected(&host))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_products_environment_each_distribution_gets_the_products_candidates() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = central_with(&pki, dir.path(), None).await;
    let hosts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hosts");
    let mut checked = 0;
    for (host, expected) in distribution_hosts() {
        let env = product_env(&central.address, &host.join("root"), &[]);
        let (code, stdout, stderr) = run_collector_with_env(identity_args(&pki, dir.path()), env).await;
        assert_eq!(code, 1, "{}: {stdout}\n{stderr}", host.display());
        assert_eq!(candidates_tried(&stderr), expected, "{}", host.display());
        checked += 1;
    }
    assert!(checked >= 11);

    // KERNEL_CANDIDATES replaces them all, split on spaces as the product does.
    let minikube = hosts.join("minikube/root");
    let env = product_env(&central.address, &minikube, &[("KERNEL_CANDIDATES", "6.1.0-1 5.4.0-2")]);
    let (_, _, stderr) = run_collector_with_env(identity_args(&pki, dir.path()), env).await;
    assert_eq!(candidates_tried(&stderr), ["6.1.0-1", "5.4.0-2"]);

    // NODE_HOSTNAME names the node before its files do.
    let env = product_env(&central.address, &minikube, &[("NODE_HOSTNAME", "worker-1")]);
    let (_, _, stderr) = run_collector_with_env(identity_args(&pki, dir.path()), env).await;
    assert_eq!(candidates_tried(&stderr), ["5.10.57"], "not minikube by name");
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_methods_are_read_as_the_product_reads_them() {
    // The product's default, and anything it does not know, is CORE_BPF.
    for method in [None, Some("core-bpf"), Some("Core_BPF"), Some("kernel_module"), Some("nonsense")] {
        let env: Vec<(String, String)> =
            method.into_iter().map(|m| ("COLLECTION_METHOD".to_owned(), m.to_owned())).collect();
        let (code, stdout, stderr) = run_collector_with_env(vec!["get-probe".into()], env).await;
        assert_eq!(code, 0, "{method:?}: {stderr}");
        assert!(stdout.contains("CORE_BPF"), "{method:?}: {stdout}");
    }
    // eBPF in any case needs a module version: this one has none to read.
    for method in ["EBPF", "ebpf", "eBPF"] {
        let env = vec![("COLLECTION_METHOD".to_owned(), method.to_owned())];
        let (code, _, stderr) = run_collector_with_env(vec!["get-probe".into()], env).await;
        assert_eq!(code, 1, "{method}: {stderr}");
        assert!(stderr.contains("MODULE_VERSION.txt"), "{method}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_central_the_module_download_base_url_is_tried() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = central_with(&pki, dir.path(), None).await;
    // A bucket: Python's static file server over TLS with the test certificate.
    let files = dir.path().join("bucket");
    std::fs::create_dir_all(files.join("modules").join(MODULE)).unwrap();
    std::fs::write(files.join("modules").join(MODULE).join(file_name(KERNEL)), probe_for(KERNEL).1).unwrap();
    let bucket = common::https_bucket(&pki, dir.path(), &files);
    let port = bucket.port.clone();

    let base_url = format!("https://localhost:{port}/modules");
    let ca = pki.ca_file().display().to_string();
    let extra = [
        ("KERNEL_CANDIDATES", KERNEL),
        ("MODULE_DOWNLOAD_BASE_URL", base_url.as_str()),
        ("SSL_CERT_FILE", ca.as_str()),
    ];
    let env = product_env(&central.address, &dir.path().join("no-host"), &extra);
    let (code, stdout, stderr) = run_collector_with_env(identity_args(&pki, dir.path()), env).await;
    drop(bucket);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("download site {base_url}")), "{stdout}");
    assert_eq!(std::fs::read(dir.path().join("probe.o")).unwrap(), probe_for(KERNEL).0);
    assert_eq!(central.metrics.get_probe_requests(), 1, "Central was asked first");
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_hostname_is_the_name_central_is_verified_against() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = central_with(&pki, dir.path(), None).await;
    upload(&central, &pki, KERNEL).await;
    // Central's certificate names localhost and 127.0.0.1, not the product's
    // default SNI name.
    let address = central.address.clone();
    for http in [false, true] {
        let mut args = identity_args(&pki, dir.path());
        if http {
            args.push("--central-http".into());
        }
        let env = |sni: &str| {
            product_env(&address, &dir.path().join("no-host"), &[("KERNEL_CANDIDATES", KERNEL), ("SNI_HOSTNAME", sni)])
        };
        let (code, stdout, stderr) = run_collector_with_env(args.clone(), env("localhost")).await;
        assert_eq!(code, 0, "http {http}: {stdout}\n{stderr}");
        let (code, _, stderr) = run_collector_with_env(args, env("sensor.stackrox.svc")).await;
        assert_eq!(code, 1, "http {http}: a name the certificate does not have: {stderr}");
        assert!(stderr.to_lowercase().contains("certificate") || stderr.contains("transport"), "http {http}: {stderr}");
    }
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_version_is_the_first_line_of_its_file() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = central_with(&pki, dir.path(), None).await;
    upload(&central, &pki, KERNEL).await;
    let file = dir.path().join("MODULE_VERSION.txt");
    std::fs::write(&file, format!("{MODULE}\nbuilt from a tree with local changes\n")).unwrap();
    let mut args = identity_args(&pki, dir.path());
    args.extend(["--module-version-file".to_owned(), file.display().to_string()]);
    let mut env = product_env(&central.address, &dir.path().join("no-host"), &[("KERNEL_CANDIDATES", KERNEL)]);
    env.retain(|(name, _)| name != "MODULE_VERSION");
    let (code, stdout, stderr) = run_collector_with_env(args, env).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_node_cache_serves_while_central_is_down_and_a_damaged_entry_is_never_used() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("node-cache");
    let cache_flag = ["--cache-dir", cache.to_str().unwrap()];
    let cli = CollectorCli::new(&pki, dir.path());
    let central = central_with(&pki, dir.path(), None).await;
    upload(&central, &pki, KERNEL).await;
    let address = central.address.clone();
    let (code, stdout, stderr) = cli.run(&address, &cache_flag).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let cached = cache.join(MODULE).join(format!("collector-ebpf-{KERNEL}.o.gz"));
    assert_eq!(std::fs::read(&cached).unwrap(), probe_for(KERNEL).1, "kept as served, to be checked again");

    // A Central that answers "not found" is not overruled by the cache.
    let empty = central_with(&pki, &dir.path().join("empty"), None).await;
    let (code, _, stderr) = cli.run(&empty.address, &cache_flag).await;
    assert_eq!(code, 1, "{stderr}");
    empty.stop().await;

    // Central down for the whole retry budget: the cached probe is used.
    central.stop().await;
    std::fs::remove_file(dir.path().join("probe.o")).unwrap();
    let started = std::time::Instant::now();
    let (code, stdout, stderr) = cli.run(&address, &cache_flag).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("node-local cache"), "the report says where it came from: {stdout}");
    assert_eq!(std::fs::read(dir.path().join("probe.o")).unwrap(), probe_for(KERNEL).0);
    assert!(started.elapsed() < Duration::from_secs(10), "within the retry budget (1 s) and its last try");

    // A damaged entry: deleted, not used, and the Collector fails as without a cache.
    let mut damaged = std::fs::read(&cached).unwrap();
    damaged[0] ^= 1;
    std::fs::write(&cached, damaged).unwrap();
    let (code, _, stderr) = cli.run(&address, &cache_flag).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(!cached.exists(), "the damaged entry is deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_probe_reports_as_json_what_served_the_probe_or_what_was_tried() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = central_with(&pki, dir.path(), None).await;
    upload(&central, &pki, KERNEL).await;
    let cli = CollectorCli::new(&pki, dir.path());
    let (code, stdout, stderr) = cli.run(&central.address, &["-o", "json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let served: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(served["result"], "served");
    assert_eq!(served["kernel"], KERNEL);
    assert_eq!(served["module_version"], MODULE);
    assert_eq!(served["candidates"], serde_json::json!([KERNEL]));
    assert!(served["source"].as_str().unwrap().starts_with("Central "), "{served}");
    assert_eq!(served["bytes"].as_u64(), Some(probe_for(KERNEL).0.len() as u64));

    let empty = central_with(&pki, &dir.path().join("empty"), None).await;
    let (code, stdout, _) = cli.run(&empty.address, &["-o", "json"]).await;
    assert_eq!(code, 1);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["result"], "not_served");
    let tried = report["tried"].as_array().unwrap();
    assert_eq!(tried[0]["file_name"], file_name(KERNEL));
    assert!(tried[0]["attempts"].as_u64().unwrap() >= 1);
    assert!(tried[0]["outcome"].as_str().unwrap().contains("NotFound"), "{report}");
    assert!(report["elapsed_ms"].is_u64());

    let (code, stdout, _) = run_collector(vec!["get-probe".into(), "-o".into(), "json".into()]).await;
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["result"], "core_bpf");
    central.stop().await;
    empty.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn facts_are_what_get_probe_would_use_on_each_distribution() {
    let hosts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hosts");
    let mut checked = 0;
    for (host, expected) in distribution_hosts() {
        let env = product_env("unused:1", &host.join("root"), &[]);
        let (code, stdout, stderr) =
            run_collector_with_env(vec!["facts".into(), "-o".into(), "json".into()], env).await;
        assert_eq!(code, 0, "{}: {stderr}", host.display());
        let facts: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(facts["candidates"], serde_json::json!(expected), "{}", host.display());
        assert_eq!(facts["module_version"], MODULE);
        assert_eq!(facts["collection_method"], "EBPF");
        assert_eq!(facts["candidates_given"], false);
        let release = std::fs::read_to_string(host.join("root/proc/sys/kernel/osrelease")).unwrap();
        assert_eq!(facts["kernel"], release.trim(), "{}", host.display());
        checked += 1;
    }
    assert!(checked >= 11);

    // An image's root, without booting it: the kernel and os-release given.
    let cos = hosts.join("cos/root");
    let args = ["facts", "--host-root", "/nonexistent", "--kernel", "5.10.123+", "--node-hostname", "node-a"];
    let mut args: Vec<String> = args.map(String::from).to_vec();
    args.extend(["--os-release".into(), cos.join("etc/os-release").display().to_string(), "-o".into(), "json".into()]);
    let (code, stdout, stderr) = run_collector(args).await;
    assert_eq!(code, 0, "{stderr}");
    let facts: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let build_id = facts["os_release"]["BUILD_ID"].as_str().unwrap();
    assert_eq!(facts["candidates"], serde_json::json!([format!("5.10.123-{build_id}-cos")]), "{facts}");
    assert_eq!(facts["hostname"], "node-a");
    assert_eq!(facts["collection_method"], "CORE_BPF", "the product's default");
    assert_eq!(facts["module_version"], serde_json::Value::Null, "no MODULE_VERSION.txt here: {stderr}");

    // Given candidates replace the host's facts; text for people.
    let args = ["facts", "--kernel-candidates", "6.1.0-1 5.4.0-2", "--module-version", "2.5.0"];
    let (code, stdout, stderr) = run_collector(args.map(String::from).to_vec()).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("candidates, given (KERNEL_CANDIDATES): 6.1.0-1 5.4.0-2"), "{stdout}");
    assert!(stdout.contains("module version      2.5.0"), "{stdout}");
    let (code, _, stderr) = run_collector(["facts", "--module-version", "latest"].map(String::from).to_vec()).await;
    assert_eq!(code, 1, "an invalid module version is an error: {stderr}");
}
