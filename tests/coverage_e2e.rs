//! End to end: `central-probes coverage` before a kernel rollout. Each
//! source covers a node in the Collector's order; COS and Ubuntu backport
//! nodes get the Collector's candidates; the upstream (another Central, or
//! a bucket) is asked without downloading, and its requests are counted;
//! `--prefetch` keeps what only the upstream has; bad input is refused.

#[path = "common/cli.rs"]
mod cli;
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use central_probes::server::upstream::UpstreamKind;
use common::{Central, CentralOptions, TestPki};
use probe_api::v1::ProbeSource;
use serde_json::Value;

const MODULE: &str = "2.5.0";

fn file(kernel: &str) -> String {
    format!("collector-ebpf-{kernel}.o.gz")
}

/// A small valid probe file for `kernel`.
fn probe(kernel: &str) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(format!("eBPF object for {kernel} ").repeat(200).as_bytes()).unwrap();
    encoder.finish().unwrap()
}

async fn upload(central: &Central, pki: &TestPki, kernel: &str) {
    common::upload_signed(central, pki, &format!("{MODULE}/{}", file(kernel)), &probe(kernel), None).await.unwrap();
}

/// `central-probes coverage` against `central`: exit status, stdout, stderr.
async fn coverage(central: &Central, pki: &TestPki, token: &str, args: &[&str]) -> (i32, String, String) {
    let ca = pki.ca_file();
    let mut all: Vec<String> =
        ["coverage", "-e", &central.address, "--ca", ca.to_str().unwrap()].iter().map(|a| a.to_string()).collect();
    all.extend(args.iter().map(|a| a.to_string()));
    let token = token.to_owned();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_central-probes"))
            .args(&all)
            .env("ROX_API_TOKEN", token)
            .output()
            .unwrap();
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
    })
    .await
    .unwrap()
}

/// The JSON report of a check of `nodes` (lines of the nodes file).
async fn check(central: &Central, pki: &TestPki, dir: &Path, nodes: &[String], extra: &[&str]) -> (i32, Value) {
    let nodes_file = write_nodes(dir, nodes);
    let mut args = vec!["--module-version", MODULE, "--nodes", nodes_file.to_str().unwrap(), "-o", "json"];
    args.extend(extra);
    let (code, stdout, stderr) = coverage(central, pki, &central.view_token, &args).await;
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    (code, report)
}

fn write_nodes(dir: &Path, nodes: &[String]) -> PathBuf {
    let path = dir.join("nodes.txt");
    std::fs::write(&path, nodes.join("\n") + "\n").unwrap();
    path
}

/// Source and candidate per node's kernel.
fn outcomes(report: &Value) -> BTreeMap<String, (String, Value)> {
    let nodes = report["nodes"].as_array().unwrap();
    nodes
        .iter()
        .map(|n| {
            (
                n["kernel"].as_str().unwrap().to_owned(),
                (n["source"].as_str().unwrap().to_owned(), n["candidate"].clone()),
            )
        })
        .collect()
}

/// Requests `central` answered, by RPC (from its metrics).
fn requests(central: &Central) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in central.metrics.render().lines().filter(|l| l.starts_with("central_probes_requests_total{")) {
        let rpc = line.split("rpc=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
        let count: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        *counts.entry(rpc).or_default() += count;
    }
    counts
}

/// An upstream Central, and a Central in front of it that may ask it.
async fn central_pair(pki: &TestPki, dir: &Path) -> (Central, Central) {
    let options = CentralOptions { allow_anonymous_reads: true, ..CentralOptions::default() };
    let upstream = Central::start_with(pki, &dir.join("upstream"), options).await;
    let kind = UpstreamKind::Grpc { address: format!("https://{}", upstream.address) };
    let mut config = common::upstream_config(pki, kind, &dir.join("cache"));
    config.view_token = Some(upstream.view_token.clone());
    let options = CentralOptions { upstream: Some(config), ..CentralOptions::default() };
    let central = Central::start_with(pki, &dir.join("central"), options).await;
    (upstream, central)
}

#[tokio::test]
async fn each_source_covers_nodes_in_the_collectors_order_and_a_crash_loop_exits_1() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (upstream, central) = central_pair(&pki, dir.path()).await;
    let (builtin, both, uploaded, cached, at_upstream, missing) = (
        "5.4.0-1-generic",
        "5.4.0-2-generic",
        "5.4.0-3-generic",
        "5.4.0-4-generic",
        "5.4.0-5-generic",
        "6.8.0-9-generic",
    );
    for kernel in [both, uploaded] {
        upload(&central, &pki, kernel).await;
    }
    for kernel in [cached, at_upstream] {
        upload(&upstream, &pki, kernel).await;
    }
    // A Collector's request fills Central's upstream cache.
    let fetched = central.collector(&pki, Some(&pki.collector)).fetch(MODULE, &file(cached)).await.unwrap();
    assert_eq!(fetched.source, ProbeSource::Upstream);
    let builtin_list = dir.path().join("builtin.txt");
    std::fs::write(&builtin_list, format!("/probes/{}\n{}\n", file(builtin), file(both).trim_end_matches(".gz")))
        .unwrap();
    let before = requests(&upstream);

    // Two nodes of each kernel: identical candidate lists are asked once.
    let kernels = [builtin, both, uploaded, cached, at_upstream, missing];
    let nodes: Vec<String> = kernels.iter().chain(&kernels).map(|k| k.to_string()).collect();
    let (code, report) =
        check(&central, &pki, dir.path(), &nodes, &["--builtin", builtin_list.to_str().unwrap()]).await;
    assert_eq!(code, 1, "a node would crash-loop: {report}");
    let expected: BTreeMap<String, (String, Value)> = [
        (builtin, "builtin"),
        (both, "builtin"),
        (uploaded, "uploaded"),
        (cached, "upstream-cache"),
        (at_upstream, "upstream"),
        (missing, "none"),
    ]
    .into_iter()
    .map(|(kernel, source)| {
        let candidate = if source == "none" { Value::Null } else { Value::from(kernel) };
        (kernel.to_owned(), (source.to_owned(), candidate))
    })
    .collect();
    assert_eq!(outcomes(&report), expected);
    assert_eq!(report["nodes"].as_array().unwrap().len(), 12);
    assert_eq!(report["to_upload"], serde_json::json!([format!("{MODULE}/{}", file(missing))]));

    // The upstream Central was asked once, and nothing was downloaded.
    let after = requests(&upstream);
    assert_eq!(report["upstream_requests"], 1);
    assert_eq!(
        after.get("GetExistingProbes").copied().unwrap_or(0),
        before.get("GetExistingProbes").copied().unwrap_or(0) + 1
    );
    assert_eq!(after.get("GetProbe"), before.get("GetProbe"), "no probe was downloaded");

    // The table names the node that would crash-loop and what to upload.
    let nodes_file = write_nodes(dir.path(), &nodes);
    let builtin_arg = builtin_list.to_str().unwrap();
    let args = ["--module-version", MODULE, "--nodes", nodes_file.to_str().unwrap(), "--builtin", builtin_arg];
    let (code, stdout, stderr) = coverage(&central, &pki, &central.view_token, &args).await;
    assert_eq!(code, 1);
    let crash_loops = stdout.split("nodes from the upstream").next().unwrap();
    assert!(
        crash_loops.contains("2 nodes no probe: these nodes would crash-loop") && crash_loops.contains(missing),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("To upload, module version {MODULE}"))
            && stdout.contains(&format!("  {MODULE}/{}", file(missing))),
        "{stdout}"
    );
    assert!(stderr.contains("2 of 12 nodes would crash-loop"), "{stderr}");

    // Once it is uploaded, every node is covered: exit 0.
    upload(&central, &pki, missing).await;
    let (code, report) =
        check(&central, &pki, dir.path(), &nodes, &["--builtin", builtin_list.to_str().unwrap()]).await;
    assert_eq!((code, outcomes(&report)[missing].0.as_str()), (0, "uploaded"));
}

/// The facts line `collector-client facts -o json` prints for a host of
/// `tests/data/hosts`.
fn facts_line(host: &str) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hosts").join(host).join("root");
    let settings = collector_client::host::HostSettings { host_root: root, ..Default::default() };
    let facts = collector_client::host::read(&settings).unwrap();
    let candidates = collector_client::candidates::candidates(&facts);
    collector_client::facts::to_json(Some(&facts), "EBPF", Some(MODULE), &candidates)
}

#[tokio::test]
async fn cos_and_ubuntu_backport_nodes_are_checked_with_the_collectors_candidates() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("central")).await;
    // Only the names the Collector derives cover these nodes: COS's build
    // id, and Ubuntu's backport marker from `uname -v`.
    upload(&central, &pki, "5.15.120-17412.226.28-cos").await;
    upload(&central, &pki, "4.15.0-142-generic~16.04").await;
    let cos = facts_line("cos");
    // Without its candidates, Central derives them from the facts.
    let mut ubuntu = facts_line("ubuntu-16.04-backport");
    ubuntu.as_object_mut().unwrap().remove("candidates");
    let nodes = vec![cos.to_string(), ubuntu.to_string(), "4.15.0-142-generic".to_owned()];
    let (code, report) = check(&central, &pki, dir.path(), &nodes, &[]).await;
    let listed = report["nodes"].as_array().unwrap();
    assert_eq!(listed[0]["candidate"], "5.15.120-17412.226.28-cos", "{report}");
    assert_eq!(listed[0]["source"], "uploaded");
    assert_eq!(listed[0]["hostname"], cos["hostname"]);
    assert_eq!(listed[1]["candidates"], serde_json::json!(["4.15.0-142-generic~16.04", "4.15.0-142-generic"]));
    assert_eq!(
        (&listed[1]["candidate"], &listed[1]["source"]),
        (&Value::from("4.15.0-142-generic~16.04"), &Value::from("uploaded"))
    );
    // A bare release has no os-release: only the release is a candidate.
    assert_eq!((&listed[2]["candidate"], &listed[2]["source"]), (&Value::Null, &Value::from("none")));
    assert_eq!(code, 1);
}

#[tokio::test]
async fn a_bucket_upstream_is_asked_with_head_and_nothing_is_downloaded() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir_all(files.join(MODULE)).unwrap();
    std::fs::write(files.join(MODULE).join(file("5.10.0-1-cloud")), probe("5.10.0-1-cloud")).unwrap();
    let log = dir.path().join("requests.log");
    let bucket = common::https_bucket_with(&pki, dir.path(), &files, &["--log", log.to_str().unwrap()]);
    let kind = UpstreamKind::Bucket { base_url: format!("https://localhost:{}/", bucket.port) };
    let config = common::upstream_config(&pki, kind, &dir.path().join("cache"));
    let options = CentralOptions { upstream: Some(config), ..CentralOptions::default() };
    let central = Central::start_with(&pki, &dir.path().join("central"), options).await;
    upload(&central, &pki, "5.10.0-3-cloud").await;

    let kernels = ["5.10.0-1-cloud", "5.10.0-2-cloud", "5.10.0-3-cloud", "5.10.0-1-cloud", "5.10.0-2-cloud"];
    let nodes: Vec<String> = kernels.iter().map(|k| k.to_string()).collect();
    let (code, report) = check(&central, &pki, dir.path(), &nodes, &[]).await;
    assert_eq!(code, 1);
    let sources: Vec<&str> =
        report["nodes"].as_array().unwrap().iter().map(|n| n["source"].as_str().unwrap()).collect();
    assert_eq!(sources, ["upstream", "none", "uploaded", "upstream", "none"]);
    // One HEAD per distinct probe Central does not have; no GET.
    let asked = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<&str> = asked.lines().collect();
    lines.sort();
    let expected =
        [format!("HEAD /{MODULE}/{}", file("5.10.0-1-cloud")), format!("HEAD /{MODULE}/{}", file("5.10.0-2-cloud"))];
    assert_eq!(lines, expected, "{asked}");
    assert_eq!(report["upstream_requests"], 2);
}

#[tokio::test]
async fn thousands_of_nodes_ask_an_upstream_central_in_batches() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (upstream, central) = central_pair(&pki, dir.path()).await;
    upload(&upstream, &pki, "5.4.0-7-generic").await;
    // 10,050 distinct kernels, none at Central: two GetExistingProbes calls.
    let nodes: Vec<String> = (0..10_050).map(|i| format!("5.4.0-{i}-generic")).collect();
    let before = requests(&upstream).get("GetExistingProbes").copied().unwrap_or(0);
    let (code, report) = check(&central, &pki, dir.path(), &nodes, &[]).await;
    assert_eq!(code, 1);
    assert_eq!(report["upstream_requests"], 2);
    assert_eq!(requests(&upstream).get("GetExistingProbes").copied().unwrap_or(0), before + 2);
    assert_eq!(report["nodes"][7]["source"], "upstream");
    assert_eq!(report["counts"]["none"], 10_049);
}

#[tokio::test]
async fn prefetched_probes_serve_collectors_after_the_upstream_stops() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (upstream, central) = central_pair(&pki, dir.path()).await;
    let (kept, uploaded) = ("6.1.0-18-amd64", "6.1.0-17-amd64");
    upload(&upstream, &pki, kept).await;
    upload(&central, &pki, uploaded).await;
    let nodes_file = write_nodes(dir.path(), &[kept.to_owned(), uploaded.to_owned()]);
    let args = ["--module-version", MODULE, "--nodes", nodes_file.to_str().unwrap(), "--prefetch", "-o", "json"];

    // Fetching needs an admin.
    let (code, _, stderr) = coverage(&central, &pki, &central.view_token, &args).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("PermissionDenied") || stderr.contains("role admin"), "{stderr}");

    let (code, stdout, stderr) = coverage(&central, &pki, &central.admin_token, &args).await;
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["prefetched"], serde_json::json!([format!("{MODULE}/{}", file(kept))]), "{report}");
    assert_eq!(report["prefetch_failures"], serde_json::json!([]));

    // `ls` tells the prefetched probe from the uploaded one.
    let ca = pki.ca_file();
    let ls = ["ls", "-e", &central.address, "--ca", ca.to_str().unwrap(), "-o", "json"];
    let (ok, stdout, stderr) = cli::central_cli(&ls, &central.view_token).await;
    assert!(ok, "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    let marks: BTreeMap<String, bool> = listed["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["path"].as_str().unwrap().to_owned(), p["prefetched"].as_bool().unwrap()))
        .collect();
    let expected: BTreeMap<String, bool> =
        [(format!("{MODULE}/{}", file(kept)), true), (format!("{MODULE}/{}", file(uploaded)), false)].into();
    assert_eq!(marks, expected);

    // The upstream goes away; the Collector is served from Central's store.
    upstream.stop().await;
    let served = central.collector(&pki, Some(&pki.collector)).fetch(MODULE, &file(kept)).await.unwrap();
    assert_eq!(served.source, ProbeSource::UploadedPackage);
    assert_eq!(served.bytes, probe(kept));
    let (code, report) = check(&central, &pki, dir.path(), &[kept.to_owned()], &[]).await;
    assert_eq!((code, report["nodes"][0]["source"].as_str()), (0, Some("uploaded")));
}

#[tokio::test]
async fn bad_input_is_refused_with_an_error_that_says_what_to_do() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("central")).await;
    upload(&central, &pki, "5.4.0-1-generic").await;
    let run = |nodes: Vec<String>, module_version: &'static str| {
        let nodes_file = write_nodes(dir.path(), &nodes);
        let central = &central;
        let pki = &pki;
        async move {
            let args = ["--module-version", module_version, "--nodes", nodes_file.to_str().unwrap()];
            coverage(central, pki, &central.view_token, &args).await
        }
    };

    // A line that is neither a kernel release nor a facts line: named.
    let (code, stdout, stderr) = run(vec!["5.4.0-1-generic".into(), "{\"kernel\": ".into()], MODULE).await;
    assert_eq!((code, stdout.as_str()), (2, ""), "a check that could not be made exits 2");
    assert!(
        stderr.contains("nodes.txt:2: not valid JSON") && stderr.contains("collector-client facts -o json"),
        "{stderr}"
    );
    let (code, _, stderr) = run(vec!["Linux node-1 5.4.0".into()], MODULE).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("nodes.txt:1: \"Linux node-1 5.4.0\" is not a kernel release"), "{stderr}");

    // A module version no source knows, and one that is not one.
    let (code, _, stderr) = run(vec!["5.4.0-1-generic".into()], "9.9.9").await;
    assert_eq!(code, 2);
    assert!(
        stderr.contains("no source has any probe of module version 9.9.9") && stderr.contains("MODULE_VERSION.txt"),
        "{stderr}"
    );
    let (code, _, stderr) = run(vec!["5.4.0-1-generic".into()], "latest").await;
    assert_eq!(code, 2);
    assert!(stderr.contains("InvalidArgument") || stderr.contains("latest"), "{stderr}");

    // More nodes than one call takes.
    let many: Vec<String> = (0..20_001).map(|i| format!("5.4.0-{i}-generic")).collect();
    let (code, _, stderr) = run(many, MODULE).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("20001 nodes: a check needs 1 to 20000 nodes"), "{stderr}");
}

#[tokio::test]
async fn an_upstream_central_without_a_token_is_a_clear_failed_precondition() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let upstream = Central::start(&pki, &dir.path().join("upstream")).await;
    let kind = UpstreamKind::Grpc { address: format!("https://{}", upstream.address) };
    let config = common::upstream_config(&pki, kind, &dir.path().join("cache"));
    let options = CentralOptions { upstream: Some(config), ..CentralOptions::default() };
    let central = Central::start_with(&pki, &dir.path().join("central"), options).await;
    let nodes_file = write_nodes(dir.path(), &["5.4.0-1-generic".to_owned()]);
    let args = ["--module-version", MODULE, "--nodes", nodes_file.to_str().unwrap()];
    let (code, _, stderr) = coverage(&central, &pki, &central.view_token, &args).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("--upstream-token-file"), "{stderr}");
}

#[tokio::test]
async fn an_uploaded_probe_found_damaged_does_not_count() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let options = CentralOptions { allow_anonymous_reads: true, ..CentralOptions::default() };
    let upstream = Central::start_with(&pki, &dir.path().join("upstream"), options).await;
    let kernel = "5.14.0-284.11.1.el9_2.x86_64";
    upload(&upstream, &pki, kernel).await;
    let data_dir = dir.path().join("central");
    let start = || async {
        let kind = UpstreamKind::Grpc { address: format!("https://{}", upstream.address) };
        let mut config = common::upstream_config(&pki, kind, &dir.path().join("cache"));
        config.view_token = Some(upstream.view_token.clone());
        Central::start_with(&pki, &data_dir, CentralOptions { upstream: Some(config), ..CentralOptions::default() })
            .await
    };
    let central = start().await;
    upload(&central, &pki, kernel).await;
    let (code, report) = check(&central, &pki, dir.path(), &[kernel.to_owned()], &[]).await;
    assert_eq!((code, report["nodes"][0]["source"].as_str()), (0, Some("uploaded")));
    central.stop().await;
    wait_unlocked(&data_dir.join("lock")).await;
    let path = probe_api::names::ProbePath::parse(&format!("{MODULE}/{}", file(kernel))).unwrap();
    central_probes::store::pack::inspect::flip_a_byte(&data_dir, &path, 10).unwrap();

    // A Collector's read finds the damage; from then on the probe is not
    // served, and coverage looks further: the upstream has it.
    let central = start().await;
    let read = central.collector(&pki, Some(&pki.collector)).fetch(MODULE, &file(kernel)).await;
    assert!(read.is_err(), "a damaged probe is not served");
    let (code, report) = check(&central, &pki, dir.path(), &[kernel.to_owned()], &[]).await;
    assert_eq!((code, report["nodes"][0]["source"].as_str()), (0, Some("upstream")), "{report}");
}

/// Waits until nobody holds the lock file `lock` (a stopped Central's
/// connections may hold it a moment longer).
async fn wait_unlocked(lock: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(lock) else { return };
    for _ in 0..100 {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{} is still locked", lock.display());
}
