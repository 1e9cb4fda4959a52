//! The product's unmodified `roxctl collector support-packages upload`
//! against this Central, spoken as roxctl puts it on the wire
//! (`common/roxctl.rs`, built from the bytes its source sends, not from our
//! admin client): GetExistingProbes of `v1.ProbeUploadService` over gRPC
//! and over its HTTP/1.1 gRPC-web downgrade, the client's decision of what
//! to send, and `POST /api/extensions/probeupload` over HTTP/2 and
//! HTTP/1.1; then what Collectors get of it.

#[path = "common/cli.rs"]
mod cli;
mod common;
#[path = "common/raw_grpc.rs"]
mod raw_grpc;
#[path = "common/roxctl.rs"]
mod roxctl;
#[path = "common/served.rs"]
mod served;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Central, TestPki};
use http_body_util::BodyExt;
use probe_api::digest::Sha256Digest;
use probe_api::https::{HttpsClient, HttpsUrl, ProxySettings};
use probe_api::product::v1::probe_upload_manifest::File;
use roxctl::{Length, PackageFile, Upload};

const MV: &str = "2.5.0";

fn probe(kernel: &str, seed: u8, len: usize) -> PackageFile {
    let bytes = (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed)).collect();
    PackageFile::new(&format!("{MV}/collector-ebpf-{kernel}.o.gz"), bytes)
}

fn package() -> Vec<PackageFile> {
    vec![probe("6.1.0-1", 1, 70_000), probe("6.1.0-2", 2, 130_000), probe("6.1.0-3", 3, 1)]
}

fn names(files: &[PackageFile]) -> Vec<&str> {
    files.iter().map(|file| file.name.as_str()).collect()
}

/// The bytes GetProbe serves for `name`, or `None` for NOT_FOUND.
async fn served_by_get_probe(central: &Central, pki: &TestPki, name: &str) -> Option<Vec<u8>> {
    let (module_version, file_name) = name.split_once('/').unwrap();
    match central.collector(pki, Some(&pki.collector)).fetch(module_version, file_name).await {
        Ok(probe) => Some(probe.bytes.to_vec()),
        Err(collector_client::central::FetchError::Status(status)) if status.code() == tonic::Code::NotFound => None,
        Err(error) => panic!("GetProbe of {name}: {error}"),
    }
}

/// The bytes and Digest header `/kernel-objects/` serves for `name`.
async fn served_by_kernel_objects(central: &Central, pki: &TestPki, name: &str) -> (Vec<u8>, String) {
    let client = HttpsClient::new(
        &pki.tls_with(Some(&pki.collector)),
        ProxySettings::new(None, None).unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    let url = HttpsUrl::parse(&format!("https://{}/kernel-objects/{name}", central.address)).unwrap();
    let response = client.request(http::Method::GET, &url).await.unwrap();
    assert_eq!(response.status(), 200, "{name}");
    let digest = response.headers().get("digest").map(|d| d.to_str().unwrap().to_owned()).unwrap_or_default();
    (response.into_body().collect().await.unwrap().to_bytes().to_vec(), digest)
}

async fn start() -> (TestPki, tempfile::TempDir, Central) {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    (pki, dir, central)
}

#[tokio::test]
async fn a_first_upload_is_served_by_get_probe_and_kernel_objects_and_both_lookups_agree() {
    let (pki, _dir, central) = start().await;
    let files = package();
    let sender = roxctl::http2(&central.address, &pki).await;
    let token = central.admin_token.as_str();
    let existing = roxctl::get_existing(&sender, Some(token), &names(&files)).await.unwrap();
    assert!(existing.is_empty(), "nothing is stored yet: {existing:?}");
    let sending = roxctl::to_send(&files, &existing, false);
    assert_eq!(sending.len(), 3);

    let (status, text) = roxctl::upload_http2(&sender, Upload::of(token, &sending)).await;
    assert_eq!(status, 200, "{text}");

    for file in &files {
        let served = served_by_get_probe(&central, &pki, &file.name).await.expect("served");
        assert_eq!(served, file.bytes.to_vec(), "GetProbe serves what roxctl sent");
        let (route_bytes, digest) = served_by_kernel_objects(&central, &pki, &file.name).await;
        assert_eq!(route_bytes, file.bytes.to_vec(), "/kernel-objects/ serves what roxctl sent");
        use base64::Engine as _;
        let sha256 = base64::engine::general_purpose::STANDARD.encode(Sha256Digest::of(&file.bytes).0);
        assert_eq!(digest, format!("sha-256={sha256}"), "the same SHA-256");
    }
    // Ours and the product's GetExistingProbes agree on every file.
    let view = central.view_token.as_str();
    let product = roxctl::get_existing(&sender, Some(view), &names(&files)).await.unwrap();
    let request =
        probe_api::v1::GetExistingProbesRequest { paths: names(&files).iter().map(|n| n.to_string()).collect() };
    let ours = central.admin(&pki, view).get_existing_probes(request).await.unwrap().into_inner().probes;
    assert_eq!(product.len(), 3);
    for file in &files {
        let v1 = product.iter().find(|f| f.name == file.name).unwrap();
        let kp = ours.iter().find(|p| p.path == file.name).unwrap();
        assert_eq!(*v1, file.entry(), "v1 gives the package's size and CRC-32");
        assert_eq!((kp.size, kp.crc32), (v1.size as u64, Some(v1.crc32)));
        assert_eq!(kp.sha256, Sha256Digest::of(&file.bytes).to_hex());
    }
    central.stop().await;
}

#[tokio::test]
async fn a_reupload_sends_nothing_and_a_changed_file_is_sent_only_with_overwrite() {
    let (pki, _dir, central) = start().await;
    let files = package();
    let token = central.admin_token.as_str();
    let sender = roxctl::http2(&central.address, &pki).await;
    assert_eq!(roxctl::upload_http2(&sender, Upload::of(token, &files)).await.0, 200);

    let existing = roxctl::get_existing(&sender, Some(token), &names(&files)).await.unwrap();
    assert!(roxctl::to_send(&files, &existing, false).is_empty(), "identical files are not sent");
    assert!(roxctl::to_send(&files, &existing, true).is_empty(), "not even with --overwrite");

    let mut changed = files.clone();
    changed[1] = probe("6.1.0-2", 99, 130_000);
    assert!(roxctl::to_send(&changed, &existing, false).is_empty(), "a conflict is skipped without --overwrite");
    let sending = roxctl::to_send(&changed, &existing, true);
    assert_eq!(names(&sending), vec![changed[1].name.as_str()]);
    let (status, text) = roxctl::upload_http2(&sender, Upload::of(token, &sending)).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("1 overwritten"), "the route overwrites, as the product's does: {text}");
    assert_eq!(served_by_get_probe(&central, &pki, &changed[1].name).await.unwrap(), changed[1].bytes.to_vec());
    central.stop().await;
}

#[tokio::test]
async fn a_file_whose_bytes_miss_its_crc32_is_named_and_nothing_after_it_is_committed() {
    let (pki, _dir, central) = start().await;
    let files = package();
    let mut upload = Upload::of(&central.admin_token, &files);
    let mut entries: Vec<File> = files.iter().map(PackageFile::entry).collect();
    entries[1].crc32 ^= 1;
    upload.manifest = roxctl::manifest(entries);
    let sender = roxctl::http2(&central.address, &pki).await;
    let (status, text) = roxctl::upload_http2(&sender, upload).await;
    assert_eq!(status, 422, "{text}");
    assert!(text.contains(&files[1].name) && text.contains("CRC-32"), "{text}");
    assert!(served_by_get_probe(&central, &pki, &files[0].name).await.is_some(), "the file before stays");
    assert!(served_by_get_probe(&central, &pki, &files[1].name).await.is_none());
    assert!(served_by_get_probe(&central, &pki, &files[2].name).await.is_none(), "none after it");
    central.stop().await;
}

#[tokio::test]
async fn a_truncated_body_keeps_the_files_before_it_and_is_a_bad_request() {
    let (pki, _dir, central) = start().await;
    let files = package();
    let cut = files[1].bytes.slice(..50_000);
    let upload = Upload { length: Length::Absent, ..Upload::of(&central.admin_token, &files) }
        .with_body(vec![files[0].bytes.clone(), cut]);
    let sender = roxctl::http2(&central.address, &pki).await;
    let (status, text) = roxctl::upload_http2(&sender, upload).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains(&files[1].name) && text.contains("ended"), "{text}");
    assert!(served_by_get_probe(&central, &pki, &files[0].name).await.is_some());
    assert!(served_by_get_probe(&central, &pki, &files[1].name).await.is_none());

    // Over HTTP/1.1, a Content-Length the body does not reach.
    let upload = Upload { length: Length::Claimed(1_000_000), ..Upload::of(&central.admin_token, &files) };
    let (status, text) = roxctl::upload_http1(&central.address, &pki, upload).await;
    assert_eq!(status, 400, "a Content-Length other than the manifest's: {text}");
    central.stop().await;
}

#[tokio::test]
async fn a_body_longer_than_declared_is_refused() {
    let (pki, _dir, central) = start().await;
    let files = package();
    let sender = roxctl::http2(&central.address, &pki).await;
    let mut pieces: Vec<Bytes> = files.iter().map(|f| f.bytes.clone()).collect();
    pieces.push(Bytes::from_static(b"more"));

    // With Content-Length: refused before any byte is stored.
    let upload = Upload::of(&central.admin_token, &files).with_body(pieces.clone());
    let (status, text) = roxctl::upload_http2(&sender, upload).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("Content-Length"), "{text}");
    for file in &files {
        assert!(served_by_get_probe(&central, &pki, &file.name).await.is_none(), "nothing stored");
    }
    // Without: the last file is not committed.
    let upload = Upload { length: Length::Absent, ..Upload::of(&central.admin_token, &files) }.with_body(pieces);
    let (status, text) = roxctl::upload_http1(&central.address, &pki, upload).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("goes on past"), "{text}");
    assert!(served_by_get_probe(&central, &pki, &files[1].name).await.is_some());
    assert!(served_by_get_probe(&central, &pki, &files[2].name).await.is_none(), "the last file waits for the end");
    central.stop().await;
}

#[tokio::test]
async fn malformed_manifests_are_refused_before_any_byte_is_stored() {
    let (pki, _dir, central) = start().await;
    let files = package();
    let token = central.admin_token.as_str();
    let sender = roxctl::http2(&central.address, &pki).await;
    let invalid = |name: &str| {
        let mut entries: Vec<File> = files.iter().map(PackageFile::entry).collect();
        entries[2].name = name.to_owned();
        Upload { manifest: roxctl::manifest(entries), ..Upload::of(token, &files) }
    };
    let repeated = {
        let mut entries: Vec<File> = files.iter().map(PackageFile::entry).collect();
        entries[2] = entries[0].clone();
        entries[2].size = files[2].bytes.len() as i64;
        Upload { manifest: roxctl::manifest(entries), ..Upload::of(token, &files) }
    };
    let cases: Vec<(&str, Upload<'_>, u16)> = vec![
        ("a path outside the naming rules", invalid("2.5.0/../../etc/passwd"), 400),
        ("a file name that is no probe", invalid("2.5.0/collector-ebpf-6.1.0.o"), 400),
        ("a repeated name", repeated, 400),
        ("bytes that are no manifest", Upload { manifest: vec![0xff; 7], ..Upload::of(token, &files) }, 400),
        ("a manifestLen past the body", Upload { manifest_len: Some(1 << 20), ..Upload::of(token, &files) }, 400),
        ("a manifestLen over the limit", Upload { manifest_len: Some(1 << 30), ..Upload::of(token, &files) }, 413),
        ("a GET", Upload { method: "GET", length: Length::Absent, ..Upload::of(token, &[]) }, 400),
    ];
    for (what, upload, expected) in cases {
        let (status, text) = roxctl::upload_http2(&sender, upload).await;
        assert_eq!(status, expected, "{what}: {text}");
    }
    for file in &files {
        assert!(served_by_get_probe(&central, &pki, &file.name).await.is_none(), "nothing stored");
    }
    central.stop().await;
}

#[tokio::test]
async fn missing_and_view_tokens_get_answers_roxctl_does_not_retry() {
    let (pki, _dir, central) = start().await;
    let files = package();
    let sender = roxctl::http2(&central.address, &pki).await;
    let view = central.view_token.as_str();
    let (status, text) = roxctl::upload_http2(&sender, Upload::of(view, &files)).await;
    assert_eq!(status, 403, "{text}");
    let (status, text) = roxctl::upload_http2(&sender, Upload { token: None, ..Upload::of(view, &files) }).await;
    assert_eq!(status, 401, "{text}");
    let (status, _) = roxctl::upload_http2(&sender, Upload::of("kp_not-a-token", &files)).await;
    assert_eq!(status, 401);
    // gRPC: the code in HTTP 200 (an HTTP error would read as UNAVAILABLE).
    let refused = roxctl::get_existing(&sender, None, &names(&files)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(roxctl::get_existing(&sender, Some(view), &names(&files)).await.unwrap().is_empty());
    let too_many: Vec<String> = (0..100_001).map(|i| format!("{MV}/collector-ebpf-6.{i}.0.o.gz")).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let refused = roxctl::get_existing(&sender, Some(view), &too_many).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "over 100,000 names: {refused:?}");
    for file in &files {
        assert!(served_by_get_probe(&central, &pki, &file.name).await.is_none());
    }
    central.stop().await;
}

#[tokio::test]
async fn http1_uploads_and_the_grpc_web_downgrade_of_get_existing_probes() {
    let (pki, _dir, central) = start().await;
    let files = package();
    let token = central.admin_token.as_str();
    // Content-Length, as roxctl sends it, then chunked.
    let (status, text) = roxctl::upload_http1(&central.address, &pki, Upload::of(token, &files[..2])).await;
    assert_eq!(status, 200, "{text}");
    let chunked = Upload { length: Length::Absent, ..Upload::of(token, &files[2..]) };
    let (status, text) = roxctl::upload_http1(&central.address, &pki, chunked).await;
    assert_eq!(status, 200, "{text}");

    let (status, content_type, existing) =
        roxctl::get_existing_http1(&central.address, &pki, Some(token), &names(&files)).await;
    assert_eq!((status, content_type.as_str()), (200, "application/grpc-web+proto"));
    let existing = existing.unwrap();
    assert_eq!(existing.len(), 3);
    assert!(roxctl::to_send(&files, &existing, true).is_empty());
    let (status, _, refused) = roxctl::get_existing_http1(&central.address, &pki, None, &names(&files)).await;
    assert_eq!(status, 200, "the status goes in the trailer frame");
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
    central.stop().await;
}

#[tokio::test]
async fn tls_selects_h2_for_roxctl_and_takes_the_products_alpn_name_as_http2() {
    let (pki, _dir, central) = start().await;
    let tls = roxctl::connect(&central.address, &pki, roxctl::ROXCTL_ALPN, "localhost").await;
    assert_eq!(roxctl::selected_alpn(&tls).as_deref(), Some(&b"h2"[..]), "h2 preferred");
    let tls = roxctl::connect(&central.address, &pki, roxctl::HTTP1_ALPN, "localhost").await;
    assert_eq!(roxctl::selected_alpn(&tls).as_deref(), Some(&b"http/1.1"[..]));

    let pure = &roxctl::ROXCTL_ALPN[..1];
    let tls = roxctl::connect(&central.address, &pki, pure, "localhost").await;
    assert_eq!(roxctl::selected_alpn(&tls).as_deref(), Some(pure[0]), "always an ALPN protocol selected");
    let (sender, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let existing = roxctl::get_existing(&sender, Some(&central.view_token), &["2.5.0/x"]).await.unwrap();
    assert!(existing.is_empty(), "HTTP/2 under the product's name");
    central.stop().await;
}

/// A package of `files` probes of `size` bytes each, made as it is sent.
fn large_package(files: usize, size: usize) -> (Vec<File>, impl Iterator<Item = Bytes> + Send) {
    let bytes_of = move |index: usize| -> Vec<u8> {
        let seed = index as u32;
        (0..size as u32).map(|i| (i.wrapping_mul(2_654_435_761) ^ seed).to_le_bytes()[1]).collect()
    };
    let name = |index: usize| format!("{MV}/collector-ebpf-6.{index}.0-large.o.gz");
    let entries = (0..files)
        .map(|index| File { name: name(index), size: size as i64, crc32: crc32fast::hash(&bytes_of(index)) })
        .collect();
    (entries, (0..files).map(move |index| Bytes::from(bytes_of(index))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gigabyte_upload_through_the_route_streams_in_bounded_memory() {
    const FILES: usize = 256;
    const SIZE: usize = 4 << 20;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let token = central_probes::server::auth::TokenFile::in_data_dir(dir.path())
        .create(central_probes::server::auth::Role::Admin, "roxctl")
        .unwrap();
    let served = served::serve(&pki, dir.path(), &[]);
    let pid = served.child.id();
    let rss = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap().to_owned();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
    };
    let before = rss();
    let (entries, body) = large_package(FILES, SIZE);
    let upload = Upload {
        token: Some(&token),
        manifest_len: None,
        manifest: roxctl::manifest(entries.clone()),
        body: Box::new(body),
        body_len: (FILES * SIZE) as u64,
        length: Length::True,
        method: "POST",
    };
    let started = Instant::now();
    let sender = roxctl::http2(&served.address, &pki).await;
    let (status, text) = roxctl::upload_http2(&sender, upload).await;
    let took = started.elapsed();
    let peak = rss();
    println!(
        "1 GiB of {FILES} files through /api/extensions/probeupload: {status} in {took:?}; Central's peak RSS \
         {before} -> {peak} MiB"
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(&format!("{FILES} stored")), "{text}");
    assert!(peak < 64, "Central's peak RSS reached {peak} MiB for a 1 GiB upload");
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let existing = roxctl::get_existing(&sender, Some(&token), &names).await.unwrap();
    assert_eq!(existing.len(), FILES);
    assert!(existing.iter().all(|file| entries.contains(file)), "every file stored with its size and CRC-32");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_only_completes_the_handshake_is_closed_quietly() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let token = central_probes::server::auth::TokenFile::in_data_dir(dir.path())
        .create(central_probes::server::auth::Role::View, "roxctl")
        .unwrap();
    let served = served::serve(&pki, dir.path(), &[]);
    // roxctl's side channel: a handshake, then close.
    for _ in 0..5 {
        let tls = roxctl::connect(&served.address, &pki, roxctl::ROXCTL_ALPN, "localhost").await;
        drop(tls);
    }
    let sender = roxctl::http2(&served.address, &pki).await;
    assert!(roxctl::get_existing(&sender, Some(&token), &["2.5.0/x"]).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let noisy: Vec<String> =
        served.log.try_iter().filter(|line| line.contains("WARN") || line.contains("ERROR")).collect();
    assert!(noisy.is_empty(), "handshake-only connections are not worth a warning: {noisy:?}");
}

#[tokio::test]
async fn a_checking_central_refuses_roxctls_unsigned_files_and_stores_none() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let keys = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let trusted = probe_api::signing::TrustedKeys::parse(&keys.pk.to_box().unwrap().into_string()).unwrap();
    let options = common::CentralOptions { trusted_keys: Some(trusted), ..Default::default() };
    let central = Central::start_with(&pki, dir.path(), options).await;
    let files = package();
    let sender = roxctl::http2(&central.address, &pki).await;
    let (status, text) = roxctl::upload_http2(&sender, Upload::of(&central.admin_token, &files)).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains(&files[0].name) && text.contains("not signed"), "names the file and why: {text}");
    for file in &files {
        assert!(served_by_get_probe(&central, &pki, &file.name).await.is_none(), "{} is not stored", file.name);
    }
    central.stop().await;
}

/// An admin token for the Central about to start on `data_dir`.
fn admin_token(data_dir: &std::path::Path) -> String {
    use central_probes::server::auth::{Role, TokenFile};
    TokenFile::in_data_dir(data_dir).create(Role::Admin, "roxctl").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_answered_408_keeping_the_files_before_it_and_the_next_upload_works() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let token = admin_token(dir.path());
    let served = served::serve(&pki, dir.path(), &["--upload-idle-timeout", "1s"]);
    let files = package();
    let sender = roxctl::http2(&served.address, &pki).await;
    // All of the first file and part of the second, then nothing; the
    // client stays.
    let sent = [files[0].bytes.clone(), files[1].bytes.slice(..1000)].concat().into();
    let (response, _stalled) = roxctl::start_upload_http2(&sender, &token, &files, sent).await;
    let guard = Duration::from_secs(60);
    let (status, text) = tokio::time::timeout(guard, roxctl::answer(response)).await.expect("the upload was ended");
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("received nothing for 1s"), "{text}");
    let line = served.log_line("upload interrupted");
    assert!(line.contains("stored=1") && line.contains(r#"via="/api/extensions/probeupload""#), "{line}");
    assert_eq!(cli::listed(&served.address, &pki.ca_file(), &token).await, names(&files[..1]), "kept");

    let (status, text) = roxctl::upload_http2(&sender, Upload::of(&token, &files[1..])).await;
    assert_eq!(status, 200, "the next upload works: {text}");
    assert_eq!(cli::listed(&served.address, &pki.ca_file(), &token).await, names(&files));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_client_goes_away_is_logged_and_audited_with_what_it_committed() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let token = admin_token(dir.path());
    // Commits wait, so the client goes away while the first file's is under way.
    let served = served::serve(&pki, dir.path(), &["--metrics-listen", "127.0.0.1:0", "--commit-wait", "3s"]);
    let files = [probe("6.1.0-1", 1, 70_000), probe("6.1.0-2", 2, 8 << 20)];
    let (sender, connection) = raw_grpc::raw_http2_undriven(&served.address, &pki).await;
    let driver = tokio::spawn(connection);
    let (_response, mut stream) = roxctl::start_upload_http2(&sender, &token, &files, files[0].bytes.clone()).await;
    // 5 of the second file's 8 MiB: more than Central's window, so once all
    // is sent, Central has read past the first file.
    raw_grpc::send_as_window_allows(&mut stream, files[1].bytes.slice(..5 << 20)).await;
    // As a killed client: the connection closes with nothing more said.
    driver.abort();

    let line = served.log_line("upload interrupted");
    assert!(line.contains("stored=1") && line.contains(r#"via="/api/extensions/probeupload""#), "{line}");
    assert_eq!(cli::listed(&served.address, &pki.ca_file(), &token).await, names(&files[..1]), "kept");
    let metrics = served.metrics().await;
    let changes = "central_probes_changes_by_token_total";
    assert_eq!(served::metric(&metrics, changes, r#"action="upload_interrupted""#), Some(1), "{metrics}");
    assert_eq!(served::metric(&metrics, "central_probes_upload_files_total", r#"outcome="stored""#), Some(1));
}
