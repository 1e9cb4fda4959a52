//! End to end: `central-probes ls --summary` sums up what is stored, and
//! `central-probes export` writes a support package of stored
//! probes that another Central takes whole, and ExportProbes keeps its
//! documented limits against clients that do not read.

#[path = "common/cli.rs"]
mod cli;
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use central_probes::server::uploads::file_messages;
use central_probes::synthetic::PackageSpec;
use cli::central_cli;
use common::{Central, CentralOptions, TestPki};
use probe_api::limits::{MAX_EXPORT_MODULE_VERSIONS, MAX_EXPORTS};
use probe_api::v1::upload_probes_request::Message;
use probe_api::v1::{ExportProbesRequest, UploadOptions, UploadProbesRequest};
use tonic::Code;

fn spec(module_version: &str, kernels: usize, deflate: bool) -> PackageSpec {
    let kernels: Vec<String> = (0..kernels).map(|i| format!("5.{}.0-{}-generic", 4 + i % 7, 100 + i)).collect();
    let kernels: Vec<&str> = kernels.iter().map(String::as_str).collect();
    PackageSpec { kernel_modules: true, size_divisor: 20, deflate, ..PackageSpec::new(module_version, &kernels) }
}

/// Runs the CLI against `central`: (success, stdout, stderr).
async fn cli_run(central: &Central, pki: &TestPki, token: &str, args: &[&str]) -> (bool, String, String) {
    let ca = pki.ca_file();
    let mut args = args.to_vec();
    args.extend(["-e", &central.address, "--ca", ca.to_str().unwrap()]);
    central_cli(&args, token).await
}

/// Runs the CLI against `central` and insists that it succeeds.
async fn cli_ok(central: &Central, pki: &TestPki, token: &str, args: &[&str]) -> String {
    let (ok, stdout, stderr) = cli_run(central, pki, token, args).await;
    assert!(ok, "{args:?}: {stdout}\n{stderr}");
    stdout
}

/// Path -> SHA-256 of everything `central` stores, from `ls -o json`.
async fn digests(central: &Central, pki: &TestPki) -> BTreeMap<String, String> {
    let listing = cli_ok(central, pki, &central.view_token, &["ls", "-o", "json"]).await;
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    let probes = listing["probes"].as_array().unwrap();
    probes.iter().map(|p| (p["path"].as_str().unwrap().to_owned(), p["sha256"].as_str().unwrap().to_owned())).collect()
}

fn zip_names(path: &Path) -> Vec<String> {
    let archive = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    archive.file_names().map(|name| name.unwrap().into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_uploaded_to_a_fresh_central_gives_identical_sha256s_for_every_probe() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let source = Central::start(&pki, &dir.path().join("source")).await;
    let (old, new) = (spec("2.5.0", 20, false), spec("2.6.0", 4, true));
    for (spec, name) in [(&old, "old.zip"), (&new, "new.zip")] {
        spec.write(&dir.path().join(name)).unwrap();
        cli_ok(&source, &pki, &source.admin_token, &["upload", dir.path().join(name).to_str().unwrap()]).await;
    }
    let stored = digests(&source, &pki).await;
    assert_eq!(stored.len(), 48);
    // ls --summary: a line per module version.
    let summary = cli_ok(&source, &pki, &source.view_token, &["ls", "--summary", "-o", "json"]).await;
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    let versions = summary["module_versions"].as_array().unwrap();
    let counted: Vec<(&str, u64)> =
        versions.iter().map(|v| (v["module_version"].as_str().unwrap(), v["probes"].as_u64().unwrap())).collect();
    assert_eq!(counted, [("2.5.0", 40), ("2.6.0", 8)], "{summary}");
    assert_eq!(summary["probes"], 48);
    let bytes: u64 = versions.iter().map(|v| v["bytes"].as_u64().unwrap()).sum();
    assert_eq!(summary["bytes"].as_u64(), Some(bytes));
    let expected_bytes: u64 =
        [&old, &new].iter().flat_map(|s| s.probe_paths().into_iter().map(|p| s.probe_bytes(&p).len() as u64)).sum();
    assert_eq!(bytes, expected_bytes);
    assert!(versions.iter().all(|v| v["last_upload"].as_str().is_some_and(|t| t.ends_with('Z'))), "{summary}");
    // The pack store's space: every record live (each more than its bytes),
    // none dead yet.
    assert!(summary["space"]["live_bytes"].as_u64().unwrap() > bytes, "{summary}");
    assert_eq!(summary["space"]["dead_bytes"], 0, "{summary}");
    let table = cli_ok(&source, &pki, &source.view_token, &["ls", "--summary"]).await;
    assert!(table.starts_with("MODULE VERSION") && table.lines().count() == 3, "{table}");

    let package = dir.path().join("support-pkg-export.zip");
    let out = cli_ok(&source, &pki, &source.view_token, &["export", "--out", package.to_str().unwrap()]).await;
    assert!(out.contains("Exported 48 probes"), "{out}");
    assert!(out.contains("2.5.0, 2.6.0"), "{out}");
    let mut names = zip_names(&package);
    names.sort();
    let expected: Vec<String> = stored.keys().map(|path| format!("kernel-modules/{path}")).collect();
    assert_eq!(names, expected, "the product's layout, every probe once");
    assert!(!dir.path().join("support-pkg-export.zip.partial").exists());

    let target = Central::start(&pki, &dir.path().join("target")).await;
    let report = cli_ok(&target, &pki, &target.admin_token, &["upload", "-o", "json", package.to_str().unwrap()]).await;
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["stored"].as_u64(), Some(48), "{report}");
    assert_eq!(digests(&target, &pki).await, stored, "the same probes with the same SHA-256s");
    // And back: the source has every file already.
    let report = cli_ok(&source, &pki, &source.admin_token, &["upload", "-o", "json", package.to_str().unwrap()]).await;
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["identical"].as_u64(), Some(48), "{report}");

    // One module version only; -o is the output format, as in ls.
    let one = dir.path().join("one.zip");
    let out = cli_ok(
        &source,
        &pki,
        &source.view_token,
        &["export", "--module-version", "2.6.0", "-o", "json", "--out", one.to_str().unwrap()],
    )
    .await;
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((out["probes"].as_u64(), &out["module_versions"]), (Some(8), &serde_json::json!(["2.6.0"])), "{out}");
    assert!(zip_names(&one).iter().all(|name| name.starts_with("kernel-modules/2.6.0/")));
    // `-o json` once wrote a zip named `json`: now it asks for --out.
    let (ok, _, stderr) = cli_run(&source, &pki, &source.view_token, &["export", "-o", "json"]).await;
    assert!(!ok && stderr.contains("export needs --out FILE"), "{stderr}");
    // The old `-o FILE` still writes the file, with a warning.
    let old = dir.path().join("old.zip");
    let args = ["export", "--module-version", "2.6.0", "-o", old.to_str().unwrap()];
    let (ok, stdout, stderr) = cli_run(&source, &pki, &source.view_token, &args).await;
    assert!(ok && stdout.contains("Exported 8 probes"), "{stdout}\n{stderr}");
    assert!(stderr.contains("warning: `export -o FILE` is deprecated") && stderr.contains("--out"), "{stderr}");
    assert_eq!(zip_names(&old).len(), 8);

    // A module version Central has none of: a plain error naming it, and
    // the file already there is untouched; also when another has probes.
    for asked in [&["9.9.9"][..], &["2.6.0", "9.9.9"]] {
        let mut args = vec!["export", "--out", one.to_str().unwrap()];
        args.extend(asked.iter().flat_map(|version| ["--module-version", version]));
        let (ok, _, stderr) = cli_run(&source, &pki, &source.view_token, &args).await;
        assert!(!ok, "{stderr}");
        assert!(
            stderr.contains("Central has no probes for module version 9.9.9; `central-probes ls` lists what it has"),
            "{stderr}"
        );
        assert!(!stderr.contains("breaks the API"), "{stderr}");
        assert_eq!(zip_names(&one).len(), 8);
        assert!(!dir.path().join("one.zip.partial").exists());
    }
    target.stop().await;
    source.stop().await;
}

/// Stores `count` probes of `size` bytes each under module version 2.5.0.
async fn store_probes(central: &Central, pki: &TestPki, count: usize, size: usize) {
    let mut messages = vec![UploadProbesRequest { message: Some(Message::Options(UploadOptions::default())) }];
    for i in 0..count {
        let bytes: Vec<u8> = (0..size).map(|j| (i * 7 + j) as u8).collect();
        messages.extend(file_messages(&format!("2.5.0/collector-ebpf-6.{i}.0.o.gz"), &bytes, 1 << 20));
    }
    central.admin(pki, &central.admin_token).upload_probes(tokio_stream::iter(messages)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_are_bounded_and_one_whose_client_reads_nothing_is_ended() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let limits =
        central_probes::server::ConnectionLimits { send_timeout: Duration::from_secs(2), ..Default::default() };
    let central = Central::start_with(&pki, dir.path(), CentralOptions { limits, ..Default::default() }).await;
    // Far more than the buffers between Central and a client that reads
    // nothing, so that such an export cannot finish.
    store_probes(&central, &pki, 48, 1 << 20).await;
    let mut admin = central.admin(&pki, &central.view_token);

    let bad = ExportProbesRequest { module_versions: vec!["latest".into()] };
    let status = admin.export_probes(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("latest"), "{status:?}");
    let many = ExportProbesRequest { module_versions: vec!["2.5.0".into(); MAX_EXPORT_MODULE_VERSIONS + 1] };
    assert_eq!(admin.export_probes(many).await.unwrap_err().code(), Code::InvalidArgument);

    // Exports whose clients read nothing, each on its own connection.
    let mut unread = Vec::new();
    for _ in 0..MAX_EXPORTS {
        let mut client = central.admin(&pki, &central.view_token);
        unread.push(client.export_probes(ExportProbesRequest::default()).await.unwrap().into_inner());
    }
    let status = admin.export_probes(ExportProbesRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // The send timeout ends them, and their slots come back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut whole = loop {
        match admin.export_probes(ExportProbesRequest::default()).await {
            Ok(stream) => break stream.into_inner(),
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(tokio::time::Instant::now() < deadline, "the unread exports were never ended");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    let mut bytes = 0u64;
    while let Some(message) = whole.message().await.unwrap() {
        if let Some(probe_api::v1::export_probes_response::Message::Chunk(chunk)) = message.message {
            assert!(chunk.len() <= probe_api::limits::MAX_EXPORT_CHUNK);
            bytes += chunk.len() as u64;
        }
    }
    assert_eq!(bytes, 48 << 20, "a reading client gets every byte");
    // An unread export's stream is cut short, never completed.
    let mut cut = unread.pop().unwrap();
    let mut received = 0u64;
    let ended = loop {
        match cut.message().await {
            Ok(Some(message)) => {
                if let Some(probe_api::v1::export_probes_response::Message::Chunk(chunk)) = message.message {
                    received += chunk.len() as u64;
                }
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    let status = ended.expect_err("an export cut short must not end with OK");
    assert_eq!(status.code(), Code::Unavailable, "{status:?} after {received} bytes");
    assert!(received < 48 << 20);
    drop(unread);
    central.stop().await;
}
