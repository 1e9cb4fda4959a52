//! End to end: support packages uploaded through the CLI and the library
//! into Central over TLS, and probes fetched back over mutual TLS.

#[path = "common/cli.rs"]
mod cli;
mod common;

use std::time::Duration;

use central_probes::admin::client as admin_client;
use central_probes::admin::error::AdminError;
use central_probes::admin::progress::Progress;
use central_probes::admin::upload::{self as admin_upload, UploadRequest};
use central_probes::synthetic::PackageSpec;
use cli::central_cli;
use common::{Central, CentralOptions, TestPki, tmp_files, whole_probes_on_disk};

use probe_api::v1::upload_probes_request::Message;
use probe_api::v1::{GetExistingProbesRequest, ProbeSource, UploadOptions, UploadProbesRequest};
use tonic::Code;

fn kernels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("5.{}.0-{}-generic", 4 + i % 7, 100 + i)).collect()
}

/// A package of `n` kernels with both probe kinds, small probes.
fn spec(n: usize, variant: u64) -> PackageSpec {
    let kernels = kernels(n);
    let kernels: Vec<&str> = kernels.iter().map(String::as_str).collect();
    PackageSpec { kernel_modules: true, variant, size_divisor: 20, ..PackageSpec::new("2.5.0", &kernels) }
}

fn write(spec: &PackageSpec, dir: &std::path::Path, name: &str) -> String {
    let path = dir.join(name);
    spec.write(&path).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn fetch(central: &Central, pki: &TestPki, path: &str) -> Vec<u8> {
    let (module_version, file_name) = path.split_once('/').unwrap();
    let probe = central.collector(pki, Some(&pki.collector)).fetch(module_version, file_name).await.unwrap();
    assert_eq!(probe.source, ProbeSource::UploadedPackage);
    probe.bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_upload_through_the_cli_stores_every_probe_for_collectors() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let spec = spec(30, 0);
    let package = write(&spec, dir.path(), "support-pkg-2.5.0-20260101000000.zip");
    let ca = pki.ca_file();
    let (ok, stdout, stderr) =
        central_cli(&["upload", &package, "-e", &central.address, "--ca", ca.to_str().unwrap()], &central.admin_token)
            .await;
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("Uploaded 60 files"), "{stdout}");
    assert!(stdout.contains("60 stored"), "{stdout}");
    assert!(stderr.contains("60 new"), "{stderr}");

    for path in spec.probe_paths().iter().step_by(7) {
        assert_eq!(fetch(&central, &pki, path).await, spec.probe_bytes(path), "{path}");
    }
    let (ok, stdout, stderr) =
        central_cli(&["ls", "-e", &central.address, "--ca", ca.to_str().unwrap()], &central.view_token).await;
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 60);
    // The same as one JSON object with the documented fields.
    let (ok, stdout, stderr) =
        central_cli(&["ls", "-o", "json", "-e", &central.address, "--ca", ca.to_str().unwrap()], &central.view_token)
            .await;
    assert!(ok, "{stderr}");
    let listing: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listing["count"], 60);
    let probes = listing["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 60);
    let first = &probes[0];
    let path = first["path"].as_str().unwrap();
    assert_eq!(first["size"].as_u64().unwrap(), spec.probe_bytes(path).len() as u64);
    assert_eq!(first["sha256"].as_str().unwrap().len(), 64);
    assert!(first["crc32"].is_u64());
    assert_eq!(listing["bytes"].as_u64(), Some(probes.iter().map(|p| p["size"].as_u64().unwrap()).sum()));

    // Uploading again with -o json: one object, nothing sent, all identical.
    let (ok, stdout, stderr) = central_cli(
        &["upload", &package, "-o", "json", "-e", &central.address, "--ca", ca.to_str().unwrap()],
        &central.admin_token,
    )
    .await;
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((report["probes_in_package"].as_u64(), report["identical"].as_u64()), (Some(60), Some(60)));
    assert_eq!((report["files_sent"].as_u64(), report["stored"].as_u64()), (Some(0), Some(0)));
    assert_eq!(report["files"].as_array().map(Vec::len), Some(0));
    assert_eq!(tmp_files(&central.data_dir), 0);
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reupload_of_an_unchanged_package_reads_only_its_directory_and_sends_nothing() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    // Probes of realistic size (about 130 KB): the package is megabytes, its
    // directory a few kilobytes.
    let spec = PackageSpec { size_divisor: 1, ..spec(20, 0) };
    let package = write(&spec, dir.path(), "pkg.zip");
    let package_len = std::fs::metadata(&package).unwrap().len();
    let probe_bytes: u64 = spec.probe_paths().iter().map(|p| spec.probe_bytes(p).len() as u64).sum();
    let mut admin = central.admin(&pki, &central.admin_token);
    let request = UploadRequest { package: package.clone().into(), overwrite: false, checksum: None, verify: false };

    let first = admin_upload::upload(&mut admin, &request, |_| Progress::Silent).await.unwrap();
    assert_eq!(first.files_sent, 40);
    assert_eq!(first.response.unwrap().stored_count, 40);
    // Every probe once, and little else: no read-ahead thrown away per entry.
    assert!(
        first.package_bytes_read >= probe_bytes && first.package_bytes_read < package_len + (256 << 10),
        "read {} bytes of a {package_len}-byte package",
        first.package_bytes_read
    );

    let again = admin_upload::upload(&mut admin, &request, |_| Progress::Silent).await.unwrap();
    assert_eq!((again.files_sent, again.bytes_sent), (0, 0));
    assert!(again.response.is_none(), "no UploadProbes call at all");
    assert_eq!(again.identical, 40);
    // The directory, the end record and a read buffer or two: no probe.
    assert!(
        again.package_bytes_read < 256 << 10 && again.package_bytes_read * 20 < package_len,
        "read {} bytes of a {package_len}-byte package",
        again.package_bytes_read
    );

    // --verify reads and hashes every probe Central has, and agrees.
    let verify = UploadRequest { verify: true, ..request };
    let verified = admin_upload::upload(&mut admin, &verify, |_| Progress::Silent).await.unwrap();
    assert_eq!((verified.identical, verified.files_sent), (40, 0));
    assert!(verified.package_bytes_read >= probe_bytes, "{} of {probe_bytes}", verified.package_bytes_read);

    let ca = pki.ca_file();
    let (ok, stdout, _) = central_cli(
        &["collector", "support-packages", "upload", &package, "-e", &central.address, "--ca", ca.to_str().unwrap()],
        &central.admin_token,
    )
    .await;
    assert!(ok);
    assert!(stdout.contains("Nothing to do: all 40 probe files are already in Central."), "{stdout}");
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_files_are_kept_without_overwrite_and_replaced_with_it() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let original = spec(5, 0);
    let changed = spec(5, 1);
    let ca = pki.ca_file();
    let ca = ca.to_str().unwrap();
    let upload = |package: String, overwrite: bool| {
        let mut args =
            vec!["upload".to_owned(), package, "-e".into(), central.address.clone(), "--ca".into(), ca.into()];
        if overwrite {
            args.push("--overwrite".into());
        }
        let token = central.admin_token.clone();
        async move { central_cli(&args.iter().map(String::as_str).collect::<Vec<_>>(), &token).await }
    };
    let (ok, ..) = upload(write(&original, dir.path(), "a.zip"), false).await;
    assert!(ok);

    let changed_package = write(&changed, dir.path(), "b.zip");
    let (ok, stdout, stderr) = upload(changed_package.clone(), false).await;
    assert!(ok, "a conflict is a warning, not a failure: {stderr}");
    assert!(stderr.contains("10 files differ from the ones in Central and were not overwritten"), "{stderr}");
    assert!(stderr.contains("--overwrite"), "{stderr}");
    assert!(stdout.contains("Nothing uploaded: 0 probe files are already in Central, 10 differ"), "{stdout}");

    let path = &original.probe_paths()[3];
    assert_eq!(fetch(&central, &pki, path).await, original.probe_bytes(path));

    let (ok, stdout, stderr) = upload(changed_package, true).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("10 overwritten"), "{stdout}");
    assert_eq!(fetch(&central, &pki, path).await, changed.probe_bytes(path));
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_upload_keeps_finished_files_and_the_rerun_sends_only_the_rest() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let spec = spec(3, 0);
    let paths = spec.probe_paths();
    let mut admin = central.admin(&pki, &central.admin_token);

    // Three whole files and half of a fourth, then the client goes away.
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    let mut call_client = admin.clone();
    let call =
        tokio::spawn(
            async move { call_client.upload_probes(tokio_stream::wrappers::ReceiverStream::new(receiver)).await },
        );
    let options = UploadProbesRequest { message: Some(Message::Options(UploadOptions { overwrite: false })) };
    sender.send(options).await.unwrap();
    for path in &paths[..3] {
        for message in central_probes::server::uploads::file_messages(path, &spec.probe_bytes(path), 4096) {
            sender.send(message).await.unwrap();
        }
    }
    let mut fourth = central_probes::server::uploads::file_messages(&paths[3], &spec.probe_bytes(&paths[3]), 1024);
    fourth.truncate(3);
    for message in fourth {
        sender.send(message).await.unwrap();
    }
    let ask = GetExistingProbesRequest { paths: paths.clone() };
    let mut stored = 0;
    for _ in 0..500 {
        stored = admin.get_existing_probes(ask.clone()).await.unwrap().into_inner().probes.len();
        if stored == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stored, 3);
    call.abort();
    drop(sender);

    // The half-written fourth file is dropped and its temporary file removed.
    wait_for_no_tmp_files(&central).await;
    let existing = admin.get_existing_probes(ask).await.unwrap().into_inner().probes;
    assert_eq!(existing.len(), 3);

    let package = write(&spec, dir.path(), "pkg.zip");
    let request = UploadRequest { package: package.into(), overwrite: false, checksum: None, verify: false };
    let report = admin_upload::upload(&mut admin, &request, |_| Progress::Silent).await.unwrap();
    assert_eq!(report.files_sent, 3, "only the files the interruption missed");
    assert_eq!(report.identical, 3);
    for path in &paths {
        assert_eq!(fetch(&central, &pki, path).await, spec.probe_bytes(path));
    }
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_would_fill_the_disk_is_refused_and_keeps_nothing() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let options = CentralOptions { min_free_bytes: u64::MAX / 4, ..CentralOptions::default() };
    let central = Central::start_with(&pki, &data_dir, options).await;
    let token = central.admin_token.clone();
    let package = write(&spec(2, 0), dir.path(), "pkg.zip");
    let ca = pki.ca_file();
    let (ok, stdout, stderr) =
        central_cli(&["upload", &package, "-e", &central.address, "--ca", ca.to_str().unwrap()], &token).await;
    assert!(!ok, "{stdout}");
    let error_line = stderr.lines().last().unwrap();
    assert!(error_line.starts_with("error: upload failed: ResourceExhausted"), "{stderr}");
    assert!(error_line.contains("not enough disk space"), "{stderr}");
    let mut admin = central.admin(&pki, &token);
    assert!(admin_client::list_all(&mut admin, None).await.unwrap().is_empty());
    assert_eq!(tmp_files(&central.data_dir), 0);
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_packages_fail_with_one_clear_line() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let ca = pki.ca_file();
    let not_zip = dir.path().join("not.zip");
    std::fs::write(&not_zip, b"this is no zip").unwrap();
    let empty = PackageSpec::new("2.5.0", &[]);
    let empty = write(&empty, dir.path(), "empty.zip");
    for (package, expected) in [
        (not_zip.to_str().unwrap(), "is not a readable zip file"),
        (empty.as_str(), "holds no probe files"),
        ("/nonexistent/pkg.zip", "cannot open"),
    ] {
        let (ok, _, stderr) = central_cli(
            &["upload", package, "-e", &central.address, "--ca", ca.to_str().unwrap()],
            &central.admin_token,
        )
        .await;
        assert!(!ok);
        let last = stderr.lines().last().unwrap();
        assert!(last.starts_with("error: ") && last.contains(expected), "{stderr}");
    }
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_that_does_not_match_its_checksum_is_refused_before_anything_is_sent() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let ca = pki.ca_file();
    let spec = spec(3, 0);
    let package = write(&spec, dir.path(), "support-pkg-2.5.0-20240101000000.zip");
    let digest = probe_api::digest::Sha256Digest::of(&std::fs::read(&package).unwrap());
    let upload = |checksum: String| {
        let (package, address, ca) = (package.clone(), central.address.clone(), ca.to_str().unwrap().to_owned());
        let token = central.admin_token.clone();
        async move { central_cli(&["upload", &package, "-e", &address, "--ca", &ca, "--checksum", &checksum], &token).await }
    };

    // A damaged copy: one byte flipped in the middle.
    let mut bytes = std::fs::read(&package).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    let damaged = probe_api::digest::Sha256Digest::of(&bytes);
    assert_ne!(damaged, digest);
    let sums = dir.path().join("support-pkg-2.5.0-20240101000000.zip.sha256");
    std::fs::write(&sums, format!("{damaged}  support-pkg-2.5.0-20240101000000.zip\n")).unwrap();
    for checksum in [damaged.to_hex(), sums.to_str().unwrap().to_owned()] {
        let (ok, _, stderr) = upload(checksum).await;
        assert!(!ok, "{stderr}");
        let last = stderr.lines().last().unwrap();
        assert!(last.contains("not the") && last.contains("nothing was sent"), "{stderr}");
    }
    let mut admin = central.admin(&pki, &central.view_token);
    assert!(admin_client::list_all(&mut admin, None).await.unwrap().is_empty(), "nothing was stored");

    std::fs::write(&sums, format!("{digest}  support-pkg-2.5.0-20240101000000.zip\n")).unwrap();
    let (ok, stdout, stderr) = upload(sums.to_str().unwrap().to_owned()).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Uploaded"), "{stdout}");
    assert_eq!(admin_client::list_all(&mut admin, None).await.unwrap().len(), spec.probe_paths().len());
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_probes_are_answered_for_20000_names_in_one_call() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let spec = spec(2, 0);
    let mut admin = central.admin(&pki, &central.admin_token);
    let package = write(&spec, dir.path(), "pkg.zip");
    let request = UploadRequest { package: package.into(), overwrite: false, checksum: None, verify: false };
    admin_upload::upload(&mut admin, &request, |_| Progress::Silent).await.unwrap();

    let mut paths: Vec<String> = kernels(10_000)
        .iter()
        .flat_map(|k| {
            [
                format!("1123dde0458e72a49880b06922e135dbcd36fb784fed530ab84ddfa8924e5c05/collector-ebpf-{k}.o.gz"),
                format!("1123dde0458e72a49880b06922e135dbcd36fb784fed530ab84ddfa8924e5c05/collector-{k}.ko.gz"),
            ]
        })
        .collect();
    paths.extend(spec.probe_paths());
    assert!(paths.len() > 20_000);
    let response = admin.get_existing_probes(GetExistingProbesRequest { paths }).await.unwrap().into_inner();
    assert_eq!(response.probes.len(), 4);
    assert!(response.probes.iter().all(|p| p.sha256.len() == 64 && p.size > 0));

    let bad = GetExistingProbesRequest { paths: vec!["2.5.0/../../etc/passwd".into()] };
    assert_eq!(admin.get_existing_probes(bad).await.unwrap_err().code(), Code::InvalidArgument);
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_all_probes_and_filters_by_module_version() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let mut admin = central.admin(&pki, &central.admin_token);
    let a = spec(700, 0);
    let b = PackageSpec { module_version: "2.6.0".into(), ..spec(10, 0) };
    for (spec, name) in [(&a, "a.zip"), (&b, "b.zip")] {
        let request = UploadRequest {
            package: write(spec, dir.path(), name).into(),
            overwrite: false,
            checksum: None,
            verify: false,
        };
        admin_upload::upload(&mut admin, &request, |_| Progress::Silent).await.unwrap();
    }
    let all = admin_client::list_all(&mut admin, None).await.unwrap();
    assert_eq!(all.len(), 1420, "1,420 probes take two pages of 1,000");
    assert!(all.windows(2).all(|w| w[0].path < w[1].path));
    let only_b = admin_client::list_all(&mut admin, Some("2.6.0")).await.unwrap();
    assert_eq!(only_b.len(), 20);
    assert!(admin_client::list_all(&mut admin, Some("latest")).await.is_err());
    central.stop().await;
}

/// The whole probes on disk once Central has finished with an upload that
/// broke off: its client may learn of the break before Central has worked
/// through what had already arrived, so wait until nothing is being written
/// and the count holds still.
async fn settled_whole_probes(central: &Central, spec: &PackageSpec) -> usize {
    let (mut last, mut steady) = (usize::MAX, 0);
    for _ in 0..300 {
        wait_for_no_tmp_files(central).await;
        let now = whole_probes_on_disk(&central.data_dir, spec);
        steady = if now == last { steady + 1 } else { 0 };
        if steady == 3 {
            return now;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Central kept committing probes");
}

async fn wait_for_no_tmp_files(central: &Central) {
    for _ in 0..1000 {
        if tmp_files(&central.data_dir) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("temporary files stayed behind");
}

async fn wait_for_stored(admin: &mut central_probes::admin::client::AdminClient, spec: &PackageSpec, at_least: usize) {
    let ask = GetExistingProbesRequest { paths: spec.probe_paths() };
    for _ in 0..2000 {
        if admin.get_existing_probes(ask.clone()).await.unwrap().into_inner().probes.len() >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("fewer than {at_least} probes were stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_uploader_leaves_whole_probes_only_and_the_rerun_completes() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let spec = PackageSpec { size_divisor: 2, ..spec(40, 0) };
    let package = write(&spec, dir.path(), "pkg.zip");
    let mut uploader = std::process::Command::new(env!("CARGO_BIN_EXE_central-probes"))
        .args(["upload", &package, "-e", &central.address, "--ca", pki.ca_file().to_str().unwrap()])
        .env("ROX_API_TOKEN", &central.admin_token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut admin = central.admin(&pki, &central.admin_token);
    wait_for_stored(&mut admin, &spec, 3).await;
    uploader.kill().unwrap(); // SIGKILL
    uploader.wait().unwrap();

    let kept = settled_whole_probes(&central, &spec).await;
    let request = UploadRequest { package: package.into(), overwrite: false, checksum: None, verify: false };
    let report = admin_upload::upload(&mut admin, &request, |_| Progress::Silent).await.unwrap();
    assert_eq!(report.files_sent, spec.probe_paths().len() - kept);
    assert_eq!(whole_probes_on_disk(&central.data_dir, &spec), spec.probe_paths().len());
    central.stop().await;
}

/// Forwards one connection to `target` and cuts it once `cut_after` bytes
/// went from the client to the server.
async fn cutting_proxy(target: String, cut_after: u64) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(target).await.unwrap();
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let back = tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
        let mut forwarded = 0u64;
        let mut buffer = vec![0u8; 16 << 10];
        while forwarded < cut_after {
            let n = client_read.read(&mut buffer).await.unwrap_or(0);
            if n == 0 || server_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
            forwarded += n as u64;
        }
        // Both directions go down at once, as when a link drops.
        back.abort();
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_cut_mid_stream_keeps_whole_probes_only_and_the_rerun_completes() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let spec = PackageSpec { size_divisor: 2, ..spec(40, 0) };
    let package = write(&spec, dir.path(), "pkg.zip");
    let total: usize = spec.probe_paths().iter().map(|p| spec.probe_bytes(p).len()).sum();
    let proxy = cutting_proxy(central.address.clone(), total as u64 / 3).await;
    let mut through_proxy = central_probes::admin::client::connect(
        &proxy,
        pki.ca.cert_pem.clone().into_bytes(),
        &central.admin_token,
        Duration::from_secs(5),
    )
    .unwrap();
    let request = UploadRequest { package: package.into(), overwrite: false, checksum: None, verify: false };
    let error = admin_upload::upload(&mut through_proxy, &request, |_| Progress::Silent).await.unwrap_err();
    assert!(matches!(error, AdminError::Rpc { what: "upload failed", .. } | AdminError::CallEnded), "{error}");

    let kept = settled_whole_probes(&central, &spec).await;
    assert!(kept > 0 && kept < spec.probe_paths().len(), "{kept}");
    let mut admin = central.admin(&pki, &central.admin_token);
    let report = admin_upload::upload(&mut admin, &request, |_| Progress::Silent).await.unwrap();
    assert_eq!(report.files_sent, spec.probe_paths().len() - kept);
    assert_eq!(whole_probes_on_disk(&central.data_dir, &spec), spec.probe_paths().len());
    central.stop().await;
}

/// A size-limited tmpfs, unmounted on drop; `None` where mounting is not
/// allowed (not root, or no CAP_SYS_ADMIN in a container).
struct SmallFilesystem {
    dir: tempfile::TempDir,
}

impl SmallFilesystem {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir.path().to_str()?])
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(SmallFilesystem { dir })
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_the_upload_keeps_stored_probes_and_keeps_serving() {
    let Some(small) = SmallFilesystem::mount("3m") else {
        eprintln!("SKIPPED: mounting a small tmpfs needs root (CAP_SYS_ADMIN); the disk-full test did not run");
        return;
    };
    let pki = TestPki::new();
    let data_dir = small.dir.path().join("data");
    let central = Central::start(&pki, &data_dir).await;
    let mut admin = central.admin(&pki, &central.admin_token);
    // About 6 MiB of probes for a 3 MiB file system.
    let spec = PackageSpec { size_divisor: 2, ..spec(50, 0) };
    let scratch = tempfile::tempdir().unwrap();
    let package = write(&spec, scratch.path(), "pkg.zip");
    let request = UploadRequest { package: package.into(), overwrite: false, checksum: None, verify: false };
    let error = admin_upload::upload(&mut admin, &request, |_| Progress::Silent).await.unwrap_err();
    assert_eq!(error.code(), Some(Code::ResourceExhausted), "{error}");

    // Under load, commits of the files before the refused one may land
    // after a pause longer than `settled_whole_probes` waits out: wait until
    // what is listed and what is whole on disk agree.
    let mut tries = 0;
    let (kept, stored) = loop {
        let kept = settled_whole_probes(&central, &spec).await;
        let stored = admin_client::list_all(&mut admin, None).await.unwrap();
        tries += 1;
        if stored.len() == kept || tries == 50 {
            break (kept, stored);
        }
    };
    assert!(kept > 0 && kept < spec.probe_paths().len(), "{kept} probes fit");
    assert_eq!(stored.len(), kept);
    let (module_version, file_name) = stored[0].path.split_once('/').unwrap();
    let probe = central.collector(&pki, Some(&pki.collector)).fetch(module_version, file_name).await.unwrap();
    assert_eq!(probe.bytes, spec.probe_bytes(&stored[0].path), "Central keeps serving");
    central.stop().await;
}

/// A Central that says it has every asked probe, with a malformed digest.
struct GarbledCentral;

#[tonic::async_trait]
impl probe_api::v1::probe_upload_service_server::ProbeUploadService for GarbledCentral {
    async fn get_existing_probes(
        &self,
        request: tonic::Request<GetExistingProbesRequest>,
    ) -> Result<tonic::Response<probe_api::v1::GetExistingProbesResponse>, tonic::Status> {
        let probes = request
            .into_inner()
            .paths
            .into_iter()
            .map(|path| probe_api::v1::ProbeInfo {
                size: spec(2, 0).probe_bytes(&path).len() as u64,
                path,
                sha256: "zz".into(),
                crc32: None,
                ..Default::default()
            })
            .collect();
        Ok(tonic::Response::new(probe_api::v1::GetExistingProbesResponse { probes }))
    }

    async fn upload_probes(
        &self,
        _: tonic::Request<tonic::Streaming<UploadProbesRequest>>,
    ) -> Result<tonic::Response<probe_api::v1::UploadProbesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn list_probes(
        &self,
        _: tonic::Request<probe_api::v1::ListProbesRequest>,
    ) -> Result<tonic::Response<probe_api::v1::ListProbesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn delete_probes(
        &self,
        _: tonic::Request<probe_api::v1::DeleteProbesRequest>,
    ) -> Result<tonic::Response<probe_api::v1::DeleteProbesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn list_module_versions(
        &self,
        _: tonic::Request<probe_api::v1::ListModuleVersionsRequest>,
    ) -> Result<tonic::Response<probe_api::v1::ListModuleVersionsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn list_misses(
        &self,
        _: tonic::Request<probe_api::v1::ListMissesRequest>,
    ) -> Result<tonic::Response<probe_api::v1::ListMissesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn check_coverage(
        &self,
        _: tonic::Request<probe_api::v1::CheckCoverageRequest>,
    ) -> Result<tonic::Response<probe_api::v1::CheckCoverageResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    type ExportProbesStream = tokio_stream::Empty<Result<probe_api::v1::ExportProbesResponse, tonic::Status>>;

    async fn export_probes(
        &self,
        _: tonic::Request<probe_api::v1::ExportProbesRequest>,
    ) -> Result<tonic::Response<Self::ExportProbesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    type VerifyProbesStream = tokio_stream::Empty<Result<probe_api::v1::VerifyProbesResponse, tonic::Status>>;

    async fn verify_probes(
        &self,
        _: tonic::Request<probe_api::v1::VerifyProbesRequest>,
    ) -> Result<tonic::Response<Self::VerifyProbesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_digest_from_central_fails_the_upload_instead_of_being_guessed() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let service = probe_api::v1::probe_upload_service_server::ProbeUploadServiceServer::new(GarbledCentral);
    let (address, server) = common::serve_fake(&pki, tonic::service::Routes::new(service)).await;
    let package = write(&spec(2, 0), dir.path(), "pkg.zip");
    let mut client =
        admin_client::connect(&address, pki.ca.cert_pem.clone().into_bytes(), "token", Duration::from_secs(5)).unwrap();
    let request = UploadRequest { package: package.into(), overwrite: false, checksum: None, verify: false };
    let error = admin_upload::upload(&mut client, &request, |_| Progress::Silent).await.unwrap_err();
    assert!(matches!(&error, AdminError::BadReply(why) if why.contains("malformed SHA-256")), "{error}");
    server.abort();
}

/// Where the bytes of the package entry for `probe_path` start in the file.
fn entry_data_start(package: &str, probe_path: &str) -> (u64, u64) {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(package).unwrap()).unwrap();
    let entry = archive.by_name(&format!("kernel-modules/{probe_path}")).unwrap();
    (entry.data_start().unwrap(), entry.size())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_entry_is_refused_by_the_uploader_with_its_name_and_nothing_of_it_is_stored() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let spec = spec(5, 0);
    let package = write(&spec, dir.path(), "pkg.zip");
    let paths = spec.probe_paths();
    // One flipped byte in the middle of the fourth probe's stored bytes.
    let corrupt = &paths[3];
    let (start, size) = entry_data_start(&package, corrupt);
    let mut bytes = std::fs::read(&package).unwrap();
    bytes[(start + size / 2) as usize] ^= 0x01;
    std::fs::write(&package, bytes).unwrap();

    let ca = pki.ca_file();
    let (ok, _, stderr) =
        central_cli(&["upload", &package, "-e", &central.address, "--ca", ca.to_str().unwrap()], &central.admin_token)
            .await;
    assert!(!ok, "{stderr}");
    let last = stderr.lines().last().unwrap();
    assert!(last.contains(corrupt.as_str()) && last.contains("CRC-32") && last.contains("corrupt"), "{stderr}");

    let mut admin = central.admin(&pki, &central.view_token);
    let stored: Vec<String> =
        admin_client::list_all(&mut admin, None).await.unwrap().into_iter().map(|p| p.path).collect();
    assert!(!stored.contains(corrupt), "nothing of the corrupt entry is stored: {stored:?}");
    let mut before: Vec<String> = paths[..3].to_vec();
    before.sort();
    assert_eq!(stored, before, "the entries before it are stored, none after it");
    assert_eq!(tmp_files(&central.data_dir), 0);
    central.stop().await;
}

/// `bytes` with its last four bytes replaced so that its CRC-32 becomes
/// `target`: CRC-32 is affine over GF(2) in those 32 bits, so one solves a
/// 32x32 linear system. What a forger (or a very unlucky change) does.
fn with_crc32(mut bytes: Vec<u8>, target: u32) -> Vec<u8> {
    let n = bytes.len();
    bytes[n - 4..].fill(0);
    let base = crc32fast::hash(&bytes);
    // Column i: how flipping bit i of the last four bytes changes the CRC.
    let mut columns: Vec<(u32, u32)> = (0..32)
        .map(|bit| {
            let mut flipped = bytes.clone();
            flipped[n - 4 + bit / 8] ^= 1 << (bit % 8);
            (crc32fast::hash(&flipped) ^ base, 1u32 << bit)
        })
        .collect();
    // Gaussian elimination: reduce the columns to a basis with distinct
    // leading bits, tracking which input bits make each.
    let mut basis: Vec<(u32, u32)> = Vec::new();
    for (mut effect, mut inputs) in columns.drain(..) {
        for &(b_effect, b_inputs) in &basis {
            if effect ^ b_effect < effect {
                effect ^= b_effect;
                inputs ^= b_inputs;
            }
        }
        if effect != 0 {
            basis.push((effect, inputs));
            basis.sort_by_key(|b| std::cmp::Reverse(b.0));
        }
    }
    let (mut want, mut inputs) = (target ^ base, 0u32);
    for &(b_effect, b_inputs) in &basis {
        if want ^ b_effect < want {
            want ^= b_effect;
            inputs ^= b_inputs;
        }
    }
    assert_eq!(want, 0, "the last four bytes reach every CRC-32");
    bytes[n - 4..].copy_from_slice(&inputs.to_le_bytes());
    assert_eq!(crc32fast::hash(&bytes), target);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_compares_sha256_and_finds_a_change_that_keeps_size_and_crc32() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let spec = spec(3, 0);
    let package = write(&spec, dir.path(), "pkg.zip");
    let mut admin = central.admin(&pki, &central.admin_token);
    let request = UploadRequest { package: package.clone().into(), overwrite: false, checksum: None, verify: false };
    admin_upload::upload(&mut admin, &request, |_| Progress::Silent).await.unwrap();

    // A second package: one probe changed, with its size and CRC-32 kept.
    let changed = &spec.probe_paths()[1];
    let original = spec.probe_bytes(changed);
    let mut forged = original.clone();
    forged[10] ^= 0xff;
    let forged = with_crc32(forged, crc32fast::hash(&original));
    let forged_package = dir.path().join("forged.zip");
    {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&forged_package).unwrap());
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for path in spec.probe_paths() {
            zip.start_file(format!("kernel-modules/{path}"), options).unwrap();
            let bytes = if &path == changed { forged.clone() } else { spec.probe_bytes(&path) };
            zip.write_all(&bytes).unwrap();
        }
        zip.finish().unwrap();
    }
    let forged_request = UploadRequest { package: forged_package, ..request };

    // By the directory alone the change cannot be seen (documented).
    let quick = admin_upload::upload(&mut admin, &forged_request, |_| Progress::Silent).await.unwrap();
    assert_eq!((quick.identical, quick.conflicts.len()), (6, 0));
    // --verify hashes what Central has and finds it.
    let verify = UploadRequest { verify: true, ..forged_request.clone() };
    let verified = admin_upload::upload(&mut admin, &verify, |_| Progress::Silent).await.unwrap();
    assert_eq!((verified.identical, verified.conflicts.clone()), (5, vec![changed.clone()]));
    let overwrite = UploadRequest { overwrite: true, ..verify };
    let replaced = admin_upload::upload(&mut admin, &overwrite, |_| Progress::Silent).await.unwrap();
    assert_eq!(replaced.response.unwrap().overwritten_count, 1);
    assert_eq!(fetch(&central, &pki, changed).await, forged);
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_reports_each_file_as_json() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let spec = spec(3, 0);
    let package = write(&spec, dir.path(), "support-pkg-2.5.0-20260101000000.zip");
    let ca = pki.ca_file();
    let (ok, stdout, stderr) = central_cli(
        &["upload", &package, "-o", "json", "-e", &central.address, "--ca", ca.to_str().unwrap()],
        &central.admin_token,
    )
    .await;
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let files = report["files"].as_array().unwrap();
    assert_eq!(files.len(), 6);
    assert_eq!(report["stored"].as_u64(), Some(6));
    for file in files {
        let path = file["path"].as_str().unwrap();
        assert_eq!(file["outcome"], "stored", "{file}");
        let sha256 = probe_api::digest::Sha256Digest::of(&spec.probe_bytes(path)).to_hex();
        assert_eq!(file["sha256"].as_str(), Some(sha256.as_str()), "{path}");
    }
    central.stop().await;
}

/// Runs the CLI with the admin token: (exit status, stdout, stderr).
async fn cli_status(central: &Central, pki: &TestPki, args: &[&str]) -> (Option<i32>, String, String) {
    let ca = pki.ca_file();
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend(["-e".into(), central.address.clone(), "--ca".into(), ca.display().to_string()]);
    let token = central.admin_token.clone();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_central-probes"))
            .args(&args)
            .env("ROX_API_TOKEN", token)
            .output()
            .unwrap();
        let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
        (output.status.code(), text(output.stdout), text(output.stderr))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_skipped_invalid_entries_says_so_in_its_summary_and_exits_3() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let spec = spec(2, 0);
    let package = dir.path().join("support-pkg-2.5.0-mixed.zip");
    let invalid = [
        "kernel-modules/latest/collector-ebpf-5.4.0-1-generic.o.gz",
        "kernel-modules/2.5.0/notes.txt",
        "kernel-modules/2.5.0/collector-ebpf-5.4.0-1-generic.o",
        "kernel-modules/collector-5.4.0-1-generic.ko.gz",
    ];
    {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&package).unwrap());
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for path in spec.probe_paths() {
            zip.start_file(format!("kernel-modules/{path}"), options).unwrap();
            zip.write_all(&spec.probe_bytes(&path)).unwrap();
        }
        for name in invalid {
            zip.start_file(name, options).unwrap();
            zip.write_all(b"not a probe").unwrap();
        }
        zip.finish().unwrap();
    }
    let package = package.to_str().unwrap();

    let (status, stdout, stderr) = cli_status(&central, &pki, &["upload", package]).await;
    assert_eq!(status, Some(3), "{stdout}\n{stderr}");
    // The summary is the last thing said, and names the first few.
    let summary = stdout.lines().last().unwrap();
    assert!(summary.starts_with("Skipped 4 entries under kernel-modules/"), "{stdout}");
    assert!(summary.contains(invalid[0]) && summary.ends_with("and 1 more"), "{summary}");
    assert!(stdout.contains("Uploaded 4 files"), "{stdout}");
    assert!(stderr.contains("4 entries of") && stderr.contains("--allow-skipped"), "{stderr}");
    for path in spec.probe_paths() {
        assert_eq!(fetch(&central, &pki, &path).await, spec.probe_bytes(&path), "the valid ones are stored");
    }

    // The documented spelling, as JSON: the same count and status.
    let (status, stdout, stderr) =
        cli_status(&central, &pki, &["collector", "support-packages", "upload", package, "-o", "json"]).await;
    assert_eq!(status, Some(3), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((report["skipped"].as_u64(), report["identical"].as_u64()), (Some(4), Some(4)), "{report}");

    // --allow-skipped accepts them, in both spellings; the summary still says so.
    for spelling in [&["upload"][..], &["collector", "support-packages", "upload"]] {
        let args = [spelling, &[package, "--allow-skipped"]].concat();
        let (status, stdout, stderr) = cli_status(&central, &pki, &args).await;
        assert_eq!(status, Some(0), "{args:?}: {stdout}\n{stderr}");
        assert!(stdout.contains("Skipped 4 entries"), "{stdout}");
    }
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_larger_than_a_collector_takes_is_stored_with_a_warning() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    let package = dir.path().join("support-pkg-2.5.0-large.zip");
    let (small, large) = ("2.5.0/collector-ebpf-5.4.0-1-generic.o.gz", "2.5.0/collector-ebpf-5.4.0-2-generic.o.gz");
    let limit = probe_api::limits::COLLECTOR_MAX_PROBE_FILE as usize;
    {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&package).unwrap());
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (path, size) in [(small, 1000), (large, limit + 1)] {
            zip.start_file(format!("kernel-modules/{path}"), options).unwrap();
            zip.write_all(&vec![7u8; size]).unwrap();
        }
        zip.finish().unwrap();
    }
    let (status, stdout, stderr) = cli_status(&central, &pki, &["upload", package.to_str().unwrap()]).await;
    assert_eq!(status, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("Uploaded 2 files"), "both are stored: {stdout}");
    let warning = stderr.lines().find(|l| l.starts_with("warning: 1 probe files are larger than a Collector"));
    assert!(warning.is_some_and(|w| w.ends_with(large)), "{stderr}");
    central.stop().await;
}
