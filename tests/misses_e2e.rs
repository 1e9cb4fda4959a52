//! End to end: Collectors that miss probes show up in `central-probes
//! misses` with their counts and distinct clients; an upload or the
//! upstream resolves a miss; open misses outlive a restart.

#[path = "common/cli.rs"]
mod cli;
mod common;

use std::path::Path;
use std::time::Duration;

use central_probes::pki::CertifiedKey;
use central_probes::server::upstream::{UpstreamConfig, UpstreamKind};
use central_probes::synthetic::PackageSpec;
use cli::central_cli;
use common::{Central, CentralOptions, TestPki};
use serde_json::Value;

const OLD_KERNEL: &str = "5.15.0-91-generic";
const NEW_KERNEL: &str = "6.8.0-31-generic";

fn probe_of(kernel: &str) -> String {
    format!("collector-ebpf-{kernel}.o.gz")
}

/// A Collector asks `central` for a probe it does not have.
async fn miss(central: &Central, pki: &TestPki, identity: &CertifiedKey, module_version: &str, kernel: &str) {
    let result = central.collector(pki, Some(identity)).fetch(module_version, &probe_of(kernel)).await;
    let code = result.map(|probe| probe.source).map_err(|error| error.code());
    assert_eq!(code.unwrap_err(), tonic::Code::NotFound);
}

async fn cli(central: &Central, pki: &TestPki, args: &[&str]) -> String {
    let ca = pki.ca_file();
    let mut args = args.to_vec();
    args.extend(["-e", &central.address, "--ca", ca.to_str().unwrap()]);
    let token = if args[0] == "upload" { &central.admin_token } else { &central.view_token };
    let (ok, stdout, stderr) = central_cli(&args, token).await;
    assert!(ok, "{args:?}: {stdout}\n{stderr}");
    stdout
}

async fn misses_json(central: &Central, pki: &TestPki, all: bool) -> Value {
    let args: &[&str] = if all { &["misses", "--all", "-o", "json"] } else { &["misses", "-o", "json"] };
    serde_json::from_str(&cli(central, pki, args).await).unwrap()
}

fn find<'a>(report: &'a Value, path: &str) -> Option<&'a Value> {
    report["misses"].as_array().unwrap().iter().find(|miss| miss["path"] == path)
}

fn open_misses_gauge(central: &Central) -> String {
    let metrics = central.metrics.render();
    metrics.lines().find(|line| line.starts_with("central_probes_open_misses ")).unwrap_or_default().to_owned()
}

fn write_package(dir: &Path, module_version: &str, kernel: &str) -> String {
    let path = dir.join(format!("support-pkg-{module_version}.zip"));
    PackageSpec { size_divisor: 20, ..PackageSpec::new(module_version, &[kernel]) }.write(&path).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_are_listed_resolved_by_an_upload_and_kept_across_a_restart() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let central = Central::start(&pki, &data).await;
    let other_node = pki.ca.issue_client("collector-on-node-2").unwrap();
    let (old, new) = (format!("2.5.0/{}", probe_of(OLD_KERNEL)), format!("2.6.0/{}", probe_of(NEW_KERNEL)));

    // Two nodes miss the old kernel's probe (one of them twice), one node
    // the new kernel's.
    miss(&central, &pki, &pki.collector, "2.5.0", OLD_KERNEL).await;
    miss(&central, &pki, &pki.collector, "2.5.0", OLD_KERNEL).await;
    miss(&central, &pki, &other_node, "2.5.0", OLD_KERNEL).await;
    miss(&central, &pki, &other_node, "2.6.0", NEW_KERNEL).await;

    let report = misses_json(&central, &pki, false).await;
    assert_eq!(report["open_count"], 2, "{report}");
    assert_eq!(report["module_versions_to_upload"], serde_json::json!(["2.5.0", "2.6.0"]));
    let first = find(&report, &old).unwrap();
    assert_eq!((first["requests"].as_u64(), first["distinct_clients"].as_u64()), (Some(3), Some(2)), "{first}");
    assert_eq!((first["module_version"].as_str(), first["status"].as_str()), (Some("2.5.0"), Some("open")));
    assert_eq!(first["file_name"].as_str(), Some(probe_of(OLD_KERNEL).as_str()));
    assert!(first["first_seen"].as_str().unwrap().ends_with('Z') && first["resolved_at"].is_null(), "{first}");
    let second = find(&report, &new).unwrap();
    assert_eq!((second["requests"].as_u64(), second["distinct_clients"].as_u64()), (Some(1), Some(1)), "{second}");
    assert_eq!(open_misses_gauge(&central), "central_probes_open_misses 2");
    let table = cli(&central, &pki, &["misses"]).await;
    assert!(table.starts_with("PATH") && table.contains(&old) && table.contains(&new), "{table}");
    assert!(table.contains("module version 2.5.0, 2.6.0"), "{table}");

    // A package with the old kernel's probe resolves its miss.
    cli(&central, &pki, &["upload", &write_package(dir.path(), "2.5.0", OLD_KERNEL)]).await;
    let report = misses_json(&central, &pki, false).await;
    assert_eq!(report["open_count"], 1, "{report}");
    assert!(find(&report, &old).is_none(), "only open misses without --all: {report}");
    let all = misses_json(&central, &pki, true).await;
    let resolved = find(&all, &old).unwrap();
    assert_eq!((resolved["status"].as_str(), resolved["resolved_by"].as_str()), (Some("resolved"), Some("upload")));
    assert_eq!(open_misses_gauge(&central), "central_probes_open_misses 1");

    // The other stays open across a restart, counts and all, with a miss
    // seen just before the stop (merged as Central stops).
    miss(&central, &pki, &pki.collector, "2.6.0", NEW_KERNEL).await;
    central.stop().await;
    let central = Central::start(&pki, &data).await;
    let report = misses_json(&central, &pki, false).await;
    assert_eq!(report["open_count"], 1, "{report}");
    assert_eq!(report["module_versions_to_upload"], serde_json::json!(["2.6.0"]));
    let kept = find(&report, &new).unwrap();
    assert_eq!((kept["requests"].as_u64(), kept["distinct_clients"].as_u64()), (Some(2), Some(2)), "{kept}");
    assert_eq!(kept["status"], "open");
    assert_eq!(open_misses_gauge(&central), "central_probes_open_misses 1");
    let all = misses_json(&central, &pki, true).await;
    assert_eq!(find(&all, &old).unwrap()["resolved_by"], "upload", "resolutions are kept too");
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_resolved_when_the_upstream_later_has_the_probe() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let upstream = Central::start_with(
        &pki,
        &dir.path().join("upstream"),
        CentralOptions { allow_anonymous_reads: true, ..Default::default() },
    )
    .await;
    let config = UpstreamConfig {
        kind: UpstreamKind::Grpc { address: format!("https://{}", upstream.address) },
        tls: pki.tls_with(None),
        proxies: Default::default(),
        connect_timeout: Duration::from_secs(2),
        fetch_timeout: Duration::from_secs(10),
        cache_dir: dir.path().join("cache"),
        cache_max_bytes: 1 << 30,
        min_free_bytes: 0,
        // Ask the upstream again at once.
        not_found_ttl: Duration::ZERO,
        view_token: None,
    };
    let options = CentralOptions { upstream: Some(config), ..Default::default() };
    let central = Central::start_with(&pki, &dir.path().join("central"), options).await;
    miss(&central, &pki, &pki.collector, "2.5.0", OLD_KERNEL).await;
    assert_eq!(misses_json(&central, &pki, false).await["open_count"], 1);

    cli(&upstream, &pki, &["upload", &write_package(dir.path(), "2.5.0", OLD_KERNEL)]).await;
    let fetched = central.collector(&pki, Some(&pki.collector)).fetch("2.5.0", &probe_of(OLD_KERNEL)).await.unwrap();
    assert_eq!(fetched.source, probe_api::v1::ProbeSource::Upstream);
    // Marked in the background: serving does not wait for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let all = misses_json(&central, &pki, true).await;
        if all["open_count"] == 0 {
            let path = format!("2.5.0/{}", probe_of(OLD_KERNEL));
            assert_eq!(find(&all, &path).unwrap()["resolved_by"], "upstream", "{all}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never resolved: {all}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    central.stop().await;
    upstream.stop().await;
}
