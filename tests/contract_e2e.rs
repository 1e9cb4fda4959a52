//! The documented contract, checked as a client generated from proto/ (or a
//! hostile one) meets it: every limit refused with the code its RPC comment
//! names, never a code that says "retry" for a request that cannot succeed.

mod common;
#[path = "common/raw_grpc.rs"]
mod raw_grpc;

use bytes::Bytes;
use central_probes::server::upload_session::file_messages;
use common::{Central, TestPki};
use probe_api::limits::{MAX_REQUEST_MESSAGE, MAX_UPLOAD_CHUNK};
use probe_api::v1::upload_probes_request::Message;
use probe_api::v1::{
    FileHeader, GetExistingProbesRequest, ListModuleVersionsRequest, ListProbesRequest, UploadOptions,
    UploadProbesRequest,
};
use raw_grpc::{grpc_frame, raw_grpc_call, raw_http2};
use tokio_stream::StreamExt;
use tonic::Code;

const UPLOAD: &str = "/kprobes.v1.ProbeUploadService/UploadProbes";
const EXISTING: &str = "/kprobes.v1.ProbeUploadService/GetExistingProbes";
const GET_PROBE: &str = "/kprobes.v1.ProbeService/GetProbe";
const LIST: &str = "/kprobes.v1.ProbeUploadService/ListProbes";
const MODULE_VERSIONS: &str = "/kprobes.v1.ProbeUploadService/ListModuleVersions";
const DELETE: &str = "/kprobes.v1.ProbeUploadService/DeleteProbes";
const EXPORT: &str = "/kprobes.v1.ProbeUploadService/ExportProbes";
const MISSES: &str = "/kprobes.v1.ProbeUploadService/ListMisses";
const COVERAGE: &str = "/kprobes.v1.ProbeUploadService/CheckCoverage";
/// The product's GetExistingProbes (proto/v1), which its roxctl calls.
const PRODUCT_EXISTING: &str = "/v1.ProbeUploadService/GetExistingProbes";

fn options() -> UploadProbesRequest {
    UploadProbesRequest { message: Some(Message::Options(UploadOptions::default())) }
}

fn kernel_path(i: usize) -> String {
    format!("2.5.0/collector-ebpf-6.{i}.0.o.gz")
}

async fn existing(central: &Central, pki: &TestPki, paths: &[String]) -> Vec<String> {
    let mut admin = central.admin(pki, &central.view_token);
    let response = admin.get_existing_probes(GetExistingProbesRequest { paths: paths.to_vec() }).await.unwrap();
    response.into_inner().probes.into_iter().map(|p| p.path).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_probes_come_in_the_order_asked_once_each_and_missing_ones_left_out() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    let mut messages = vec![options()];
    for i in [1, 2] {
        messages.extend(file_messages(&kernel_path(i), b"a probe", 3));
    }
    central.admin(&pki, &central.admin_token).upload_probes(tokio_stream::iter(messages)).await.unwrap();
    let asked = [kernel_path(2), kernel_path(9), kernel_path(1), kernel_path(2), kernel_path(1)];
    assert_eq!(existing(&central, &pki, &asked).await, vec![kernel_path(2), kernel_path(1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_after_a_failing_file_are_not_committed_and_the_error_names_it() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    let failing = kernel_path(0);
    let large: Vec<u8> = (0..4 << 20).map(|i| (i % 253) as u8).collect();
    let mut messages = vec![options()];
    let mut corrupt = file_messages(&failing, &large, 1 << 20);
    corrupt.pop();
    corrupt.extend(file_messages(&failing, b"other bytes", 1).pop());
    messages.extend(corrupt);
    let valid: Vec<String> = (1..=40).map(kernel_path).collect();
    for path in &valid {
        messages.extend(file_messages(path, b"valid probe", 4));
    }
    let error =
        central.admin(&pki, &central.admin_token).upload_probes(tokio_stream::iter(messages)).await.unwrap_err();
    assert_eq!(error.code(), Code::DataLoss, "{error:?}");
    assert!(error.message().contains(&failing), "the error names the failing file: {}", error.message());
    let mut asked = valid.clone();
    asked.push(failing);
    assert_eq!(existing(&central, &pki, &asked).await, Vec::<String>::new(), "nothing after the failing file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_and_undecodable_messages_get_codes_that_do_not_say_retry() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    let raw = raw_http2(&central.address, &pki, true).await;
    let admin = Some(central.admin_token.as_str());

    // A message frame announcing 65 MiB: refused on its length alone.
    let mut over_limit = vec![0u8];
    over_limit.extend_from_slice(&((MAX_REQUEST_MESSAGE as u32) + (1 << 20)).to_be_bytes());
    let over_limit = Bytes::from(over_limit);
    // Bytes that are no protobuf message: field 1 with wire type 7.
    let garbage = Bytes::from_static(&[0, 0, 0, 0, 3, 0x0f, 0xff, 0xff]);
    let mut cases = vec![
        ("upload, a 65 MiB message", UPLOAD, over_limit.clone(), Code::ResourceExhausted),
        ("upload, no protobuf", UPLOAD, garbage.clone(), Code::InvalidArgument),
        ("get probe, a 65 MiB message", GET_PROBE, over_limit.clone(), Code::ResourceExhausted),
        ("get probe, no protobuf", GET_PROBE, garbage.clone(), Code::InvalidArgument),
    ];
    // Every unary or server-streaming admin RPC reads its request the same way.
    for method in [EXISTING, LIST, MODULE_VERSIONS, DELETE, EXPORT, MISSES, COVERAGE, PRODUCT_EXISTING] {
        cases.push(("a 65 MiB message", method, over_limit.clone(), Code::ResourceExhausted));
        cases.push(("no protobuf", method, garbage.clone(), Code::InvalidArgument));
    }
    for (case, method, body, code) in cases {
        let status = raw_grpc_call(&raw, method, admin, body).await;
        assert_eq!(status.code(), code, "{method}, {case}: {status:?}");
    }

    // A chunk over the per-chunk limit, in a well-formed stream.
    let mut stream = grpc_frame(&options()).to_vec();
    let header = FileHeader { path: kernel_path(1), size: MAX_UPLOAD_CHUNK as u64 + 1 };
    stream.extend_from_slice(&grpc_frame(&UploadProbesRequest { message: Some(Message::FileHeader(header)) }));
    let chunk = Bytes::from(vec![7u8; MAX_UPLOAD_CHUNK + 1]);
    stream.extend_from_slice(&grpc_frame(&UploadProbesRequest { message: Some(Message::Chunk(chunk)) }));
    let status = raw_grpc_call(&raw, UPLOAD, admin, Bytes::from(stream)).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("chunk"), "{status:?}");

    // Central reads the upload stream itself: a compressed message, and a
    // stream cut inside a message, are the client's mistakes.
    let first = grpc_frame(&options());
    let mut compressed = first.to_vec();
    compressed[0] = 1;
    for (case, body) in [("a compressed message", Bytes::from(compressed)), ("a cut frame", first.slice(..4))] {
        let status = raw_grpc_call(&raw, UPLOAD, admin, body).await;
        assert_eq!(status.code(), Code::InvalidArgument, "upload, {case}: {status:?}");
    }

    // A GetProbe request is two names: 4 KiB is its limit.
    let request = probe_api::v1::GetProbeRequest { module_version: "2.5.0".into(), file_name: "x".repeat(5000) };
    let status = raw_grpc_call(&raw, GET_PROBE, None, grpc_frame(&request)).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // GetProbe takes exactly one uncompressed message.
    let one = grpc_frame(&probe_api::v1::GetProbeRequest {
        module_version: "2.5.0".into(),
        file_name: "collector-ebpf-5.4.0.o.gz".into(),
    });
    let mut compressed = one.to_vec();
    compressed[0] = 1;
    let cases = [
        ("no message", Bytes::new()),
        ("a cut frame", one.slice(..one.len() - 1)),
        ("two messages", Bytes::from([one.to_vec(), one.to_vec()].concat())),
        ("a compressed message", Bytes::from(compressed)),
    ];
    for (case, body) in cases {
        let status = raw_grpc_call(&raw, GET_PROBE, None, body).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_names_are_refused_before_any_byte_is_accepted() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    let long_version = format!("{}.0.0", "1".repeat(300));
    let long_path = format!("{long_version}/collector-ebpf-5.4.0.o.gz");
    let long_name = format!("2.5.0/collector-ebpf-5.{}.o.gz", "1".repeat(300));
    let over_512 = format!("2.5.0/collector-ebpf-5.{}.o.gz", "1".repeat(500));
    for path in [&long_path, &long_name, &over_512] {
        let error = central
            .admin(&pki, &central.view_token)
            .get_existing_probes(GetExistingProbesRequest { paths: vec![path.clone()] })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{path}: {error:?}");

        // The header alone is refused: the stream never sends its bytes.
        let header = FileHeader { path: path.clone(), size: 1 << 20 };
        let messages = vec![options(), UploadProbesRequest { message: Some(Message::FileHeader(header)) }];
        let error = central
            .admin(&pki, &central.admin_token)
            .upload_probes(tokio_stream::iter(messages).chain(tokio_stream::pending()))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{path}: {error:?}");
    }
    let (module_version, file_name) = long_path.split_once('/').unwrap();
    let error = central.collector(&pki, Some(&pki.collector)).fetch(module_version, file_name).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    assert_eq!(common::tmp_files(dir.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_in_path_string_order_with_tokens_only_central_gives() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    let mut paths = vec![
        "2.5.0/collector-ebpf-5.4.0.o.gz".to_owned(),
        "2.5.0-rc1/collector-ebpf-5.4.0.o.gz".to_owned(),
        "2.5.0/collector-5.4.0.ko.gz".to_owned(),
        "2.10.0/collector-ebpf-5.4.0.o.gz".to_owned(),
    ];
    let mut messages = vec![options()];
    for path in &paths {
        messages.extend(file_messages(path, path.as_bytes(), 64));
    }
    let mut admin = central.admin(&pki, &central.admin_token);
    admin.upload_probes(tokio_stream::iter(messages)).await.unwrap();
    paths.sort();

    for page_size in 1..=5 {
        let (mut listed, mut token) = (Vec::new(), String::new());
        loop {
            let request = ListProbesRequest { module_version: String::new(), page_size, page_token: token };
            let page = admin.list_probes(request).await.unwrap().into_inner();
            listed.extend(page.probes.into_iter().map(|p| p.path));
            if page.next_page_token.is_empty() {
                break;
            }
            assert!(!paths.contains(&page.next_page_token), "a token is not a bare path");
            token = page.next_page_token;
        }
        assert_eq!(listed, paths, "page size {page_size}");
    }

    let first = admin
        .list_probes(ListProbesRequest { module_version: String::new(), page_size: 1, page_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    let forged = [
        paths[0].clone(),
        first.next_page_token.replace(|c: char| c.is_ascii_digit(), "0"),
        format!("{}0", first.next_page_token),
    ];
    for token in forged {
        let request = ListProbesRequest { module_version: String::new(), page_size: 1, page_token: token.clone() };
        let error = admin.list_probes(request).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{token}: {error:?}");
    }
    let other_filter =
        ListProbesRequest { module_version: "2.5.0".into(), page_size: 1, page_token: first.next_page_token.clone() };
    assert_eq!(admin.list_probes(other_filter).await.unwrap_err().code(), Code::InvalidArgument);

    // Tokens stay valid across a restart: the key is kept in the store.
    central.stop().await;
    let central = Central::start(&pki, dir.path()).await;
    let mut admin = central.admin(&pki, &central.admin_token);
    let request = ListProbesRequest { module_version: String::new(), page_size: 10, page_token: first.next_page_token };
    let rest = admin.list_probes(request).await.unwrap().into_inner().probes;
    assert_eq!(rest.len(), paths.len() - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_by_module_version_with_dry_run_changes_nothing_and_without_removes_exactly_that_version() {
    use probe_api::v1::DeleteProbesRequest;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    let old: Vec<String> = (0..3).map(|i| format!("2.5.0/collector-ebpf-6.{i}.0.o.gz")).collect();
    let new: Vec<String> = (0..2).map(|i| format!("2.6.0/collector-ebpf-6.{i}.0.o.gz")).collect();
    let mut messages = vec![options()];
    for path in old.iter().chain(&new) {
        messages.extend(file_messages(path, path.as_bytes(), 64));
    }
    central.admin(&pki, &central.admin_token).upload_probes(tokio_stream::iter(messages)).await.unwrap();
    let all: Vec<String> = old.iter().chain(&new).cloned().collect();
    let by_version = |version: &str, dry_run: bool| DeleteProbesRequest {
        paths: vec![],
        module_versions: vec![version.to_owned()],
        dry_run,
    };

    let denied = central.admin(&pki, &central.view_token).delete_probes(by_version("2.5.0", false)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let mut admin = central.admin(&pki, &central.admin_token);
    let empty = admin.delete_probes(DeleteProbesRequest::default()).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    let bad = DeleteProbesRequest { module_versions: vec!["../x".into()], ..Default::default() };
    assert_eq!(admin.delete_probes(bad).await.unwrap_err().code(), Code::InvalidArgument);

    let dry = admin.delete_probes(by_version("2.5.0", true)).await.unwrap().into_inner();
    let listed: Vec<&str> = dry.deleted.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(listed, old.iter().map(String::as_str).collect::<Vec<_>>(), "in path order");
    assert_eq!(dry.deleted_bytes, old.iter().map(|p| p.len() as u64).sum::<u64>());
    assert_eq!(existing(&central, &pki, &all).await, all, "a dry run deletes nothing");

    let done = admin.delete_probes(by_version("2.5.0", false)).await.unwrap().into_inner();
    assert_eq!(done.deleted.len(), 3);
    assert_eq!(existing(&central, &pki, &all).await, new, "exactly that version is gone");

    // By path: one stored, one not.
    let request = DeleteProbesRequest { paths: vec![new[0].clone(), old[0].clone()], ..Default::default() };
    let done = admin.delete_probes(request).await.unwrap().into_inner();
    assert_eq!(done.deleted.iter().map(|p| p.path.clone()).collect::<Vec<_>>(), [new[0].clone()]);
    assert_eq!(existing(&central, &pki, &all).await, [new[1].clone()]);
    // The pack store reports what the removals left dead for compaction.
    let gauge = |name: &str| -> u64 {
        let metrics = central.metrics.render();
        let line = metrics.lines().find(|line| line.starts_with(&format!("{name} "))).unwrap_or_default().to_owned();
        line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    for _ in 0..50 {
        if gauge("central_probes_store_dead_bytes") > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (live, dead) = (gauge("central_probes_store_live_bytes"), gauge("central_probes_store_dead_bytes"));
    assert!(live > new[1].len() as u64, "one probe's record is live: {live}");
    assert!(dead > old.iter().map(|p| p.len() as u64).sum::<u64>(), "four removed probes are dead: {dead}");
    // And ListModuleVersions (`ls --summary`): the one record left is its
    // 88-byte header, its path and its bytes (here the path again).
    let listed = admin.list_module_versions(ListModuleVersionsRequest {}).await.unwrap().into_inner();
    let space = listed.space.expect("a pack store tells its space");
    assert_eq!(space.live_bytes, 88 + 2 * new[1].len() as u64, "{space:?}");
    let removed: u64 = old.iter().chain(&new[..1]).map(|p| 88 + 2 * p.len() as u64).sum();
    assert!(space.dead_bytes >= removed.max(dead), "the four removed records at least: {space:?}");
    central.stop().await;
}
