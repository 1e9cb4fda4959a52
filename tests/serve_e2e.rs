//! End to end through the `central-probes serve` binary itself: the bound
//! address in the log, offline mode, and a clean stop on SIGTERM.

mod common;
#[path = "common/served.rs"]
mod served;

use std::path::Path;
use std::time::{Duration, Instant};

use central_probes::synthetic::PackageSpec;
use common::{TestPki, tmp_files, whole_probes_on_disk};
use served::{Served, serve};

use tonic::Code;

/// A Collector asks for a probe no uploaded package has.
async fn fetch_missing_probe(served: &Served, pki: &TestPki) -> collector_client::central::FetchError {
    let tls = pki.tls_with(Some(&pki.collector));
    let client = collector_client::central::CentralClient::new(&served.address, &tls, Duration::from_secs(5)).unwrap();
    client.fetch("2.5.0", "collector-ebpf-5.4.0.o.gz").await.unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mode_never_contacts_the_upstream_and_sigterm_stops_cleanly() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    // Stands where the upstream would be; it must never see a connection.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    upstream.set_nonblocking(true).unwrap();
    let upstream_url = format!("https://{}", upstream.local_addr().unwrap());
    let ca = pki.ca_file();
    let served = serve(
        &pki,
        &dir.path().join("data"),
        &["--upstream", &upstream_url, "--upstream-ca", ca.to_str().unwrap(), "--offline"],
    );
    assert!(!served.address.ends_with(":0"), "the bound port is logged: {}", served.address);

    let error = fetch_missing_probe(&served, &pki).await;
    assert_eq!(error.code(), Code::NotFound, "{error}");
    let accepted = upstream.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "no connection to the upstream: {accepted:?}"
    );

    let (status, log) = served.terminate();
    assert!(status.success(), "{status:?}\n{}", log.join("\n"));
    assert!(log.iter().any(|l| l.contains("server stopped")), "{}", log.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_upstream_configured_a_miss_goes_to_it() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_url = format!("https://{}", upstream.local_addr().unwrap());
    let ca = pki.ca_file();
    let served = serve(
        &pki,
        &dir.path().join("data"),
        &["--upstream", &upstream_url, "--upstream-ca", ca.to_str().unwrap(), "--upstream-timeout", "1s"],
    );
    // The "upstream" accepts but never speaks TLS: the fetch times out.
    let error = fetch_missing_probe(&served, &pki).await;
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    upstream.set_nonblocking(true).unwrap();
    assert!(upstream.accept().is_ok(), "Central did connect to the upstream");
    let (status, _) = served.terminate();
    assert!(status.success());
}

/// A data directory with an admin token, and a package to upload into it.
struct Scenario {
    pki: TestPki,
    dir: tempfile::TempDir,
    data_dir: std::path::PathBuf,
    token: String,
    spec: PackageSpec,
    package: std::path::PathBuf,
}

impl Scenario {
    fn new() -> Self {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let token = central_probes::server::auth::TokenFile::in_data_dir(&data_dir)
            .create(central_probes::server::auth::Role::Admin, "admin")
            .unwrap();
        let spec = crash_spec();
        let package = dir.path().join("pkg.zip");
        spec.write(&package).unwrap();
        Scenario { pki, dir, data_dir, token, spec, package }
    }
}

/// Waits until Central stores `at_least` probes of `spec`, the upload
/// ended, or 20 s passed.
async fn wait_for_commits(
    served: &Served,
    pki: &TestPki,
    token: &str,
    spec: &PackageSpec,
    at_least: usize,
    upload: &tokio::task::JoinHandle<Result<usize, central_probes::admin::error::AdminError>>,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored_count(&served.address, pki, token, spec).await < at_least
        && !upload.is_finished()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn crash_spec() -> PackageSpec {
    let kernels: Vec<String> = (0..40).map(|i| format!("5.{}.0-{i}-generic", i % 9)).collect();
    let kernels: Vec<&str> = kernels.iter().map(String::as_str).collect();
    PackageSpec { kernel_modules: true, size_divisor: 2, ..PackageSpec::new("2.5.0", &kernels) }
}

async fn stored_count(address: &str, pki: &TestPki, token: &str, spec: &PackageSpec) -> usize {
    let mut admin = central_probes::admin::client::connect(
        address,
        pki.ca.cert_pem.clone().into_bytes(),
        token,
        Duration::from_secs(5),
    )
    .unwrap();
    let paths = spec.probe_paths();
    match admin.get_existing_probes(probe_api::v1::GetExistingProbesRequest { paths }).await {
        Ok(response) => response.into_inner().probes.len(),
        Err(_) => 0,
    }
}

fn start_upload(
    address: &str,
    pki: &TestPki,
    token: &str,
    package: &Path,
) -> tokio::task::JoinHandle<Result<usize, central_probes::admin::error::AdminError>> {
    let mut admin = central_probes::admin::client::connect(
        address,
        pki.ca.cert_pem.clone().into_bytes(),
        token,
        Duration::from_secs(5),
    )
    .unwrap();
    let request = central_probes::admin::upload::UploadRequest {
        package: package.to_owned(),
        overwrite: false,
        checksum: None,
        verify: false,
    };
    tokio::spawn(async move {
        let report = central_probes::admin::upload::upload(&mut admin, &request, |_| {
            central_probes::admin::progress::Progress::Silent
        })
        .await?;
        Ok(report.files_sent)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_killed_at_many_points_of_an_upload_keeps_only_whole_probes_and_resumes() {
    let Scenario { pki, dir: _dir, data_dir, token, spec, package } = Scenario::new();
    let total = spec.probe_paths().len();

    // Kill points: before any commit, then after more and more commits,
    // each time with the upload in full flow.
    for kill_after in [0, 1, 3, 8, 15, 30, 50] {
        let served = serve(&pki, &data_dir, &[]);
        assert_eq!(tmp_files(&data_dir), 0, "start-up removed every leftover");
        let before = whole_probes_on_disk(&data_dir, &spec);
        if before == total {
            served.kill();
            break;
        }
        let upload = start_upload(&served.address, &pki, &token, &package);
        wait_for_commits(&served, &pki, &token, &spec, (before + kill_after).min(total), &upload).await;
        served.kill();
        let _ = upload.await;
        let after = whole_probes_on_disk(&data_dir, &spec);
        assert!(after >= before, "committed probes survive a crash ({before} -> {after})");
    }

    let served = serve(&pki, &data_dir, &[]);
    assert_eq!(tmp_files(&data_dir), 0);
    let already = whole_probes_on_disk(&data_dir, &spec);
    let sent = start_upload(&served.address, &pki, &token, &package).await.unwrap().unwrap();
    assert_eq!(sent, total - already, "the rerun sends only what the crashes lost");
    assert_eq!(whole_probes_on_disk(&data_dir, &spec), total);
    let (status, _) = served.terminate();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_upload_lets_it_finish_and_the_restart_is_clean() {
    let Scenario { pki, dir: _dir, data_dir, token, spec, package } = Scenario::new();

    let served = serve(&pki, &data_dir, &["--shutdown-grace", "30s"]);
    let upload = start_upload(&served.address, &pki, &token, &package);
    wait_for_commits(&served, &pki, &token, &spec, 2, &upload).await;
    let (status, log) = served.terminate();
    assert!(status.success(), "{}", log.join("\n"));
    let sent = upload.await.unwrap().expect("the upload in flight completes during the grace period");
    assert_eq!(sent, spec.probe_paths().len());
    assert_eq!(whole_probes_on_disk(&data_dir, &spec), spec.probe_paths().len());

    let served = serve(&pki, &data_dir, &[]);
    assert_eq!(tmp_files(&data_dir), 0);
    served.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_no_grace_abandons_the_file_in_flight_cleanly() {
    let Scenario { pki, dir: _dir, data_dir, token, spec, package } = Scenario::new();

    let served = serve(&pki, &data_dir, &["--shutdown-grace", "0s"]);
    let upload = start_upload(&served.address, &pki, &token, &package);
    wait_for_commits(&served, &pki, &token, &spec, 2, &upload).await;
    let (status, _) = served.terminate();
    assert!(status.success());
    let _ = upload.await;
    assert_eq!(tmp_files(&data_dir), 0, "an abandoned file leaves nothing behind");

    // A file stamped in its pack as the process stopped, but not yet in
    // the index log, was never reported stored: the restart cuts it off.
    // So what was kept is counted once Central has started again.
    let served = serve(&pki, &data_dir, &[]);
    let kept = whole_probes_on_disk(&data_dir, &spec);
    assert!(kept >= 2, "the files reported stored are kept");
    let sent = start_upload(&served.address, &pki, &token, &package).await.unwrap().unwrap();
    assert_eq!(sent, spec.probe_paths().len() - kept);
    served.terminate();
}
