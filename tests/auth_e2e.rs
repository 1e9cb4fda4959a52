//! End to end: who may call what. Collectors need a client certificate from
//! the cluster CA; admins need a token of the right role.

mod common;

use central_probes::server::auth::TokenFile;
use common::{Central, TestPki};
use probe_api::v1::upload_probes_request::Message;
use probe_api::v1::{GetExistingProbesRequest, ListProbesRequest, UploadOptions, UploadProbesRequest};
use tonic::Code;

const PROBE: (&str, &str) = ("2.5.0", "collector-ebpf-5.4.0-42-generic.o.gz");

async fn store_probe(central: &Central, pki: &TestPki) {
    let mut admin = central.admin(pki, &central.admin_token);
    let mut messages = vec![UploadProbesRequest { message: Some(Message::Options(UploadOptions::default())) }];
    messages.extend(central_probes::server::uploads::file_messages(&format!("{}/{}", PROBE.0, PROBE.1), b"probe", 2));
    admin.upload_probes(tokio_stream::iter(messages)).await.unwrap();
}

/// A refused client certificate shows only after the TLS 1.3 handshake, as
/// a failed or cancelled call; the message must still point at the cause.
fn assert_refused_for_its_certificate(error: &collector_client::central::FetchError) {
    assert!(matches!(error.code(), Code::Unavailable | Code::Unknown | Code::Cancelled), "{error}");
    assert!(error.to_string().contains("client certificate"), "the error says why: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_probe_needs_a_client_certificate_from_the_cluster_ca() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    store_probe(&central, &pki).await;

    let probe = central.collector(&pki, Some(&pki.collector)).fetch(PROBE.0, PROBE.1).await.unwrap();
    assert_eq!(probe.bytes, b"probe");

    let error = central.collector(&pki, None).fetch(PROBE.0, PROBE.1).await.unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated, "{error}");

    let error = central.collector(&pki, Some(&pki.foreign_collector)).fetch(PROBE.0, PROBE.1).await.unwrap_err();
    assert_refused_for_its_certificate(&error);

    let expired = pki.ca.issue_expired_client("collector").unwrap();
    let error = central.collector(&pki, Some(&expired)).fetch(PROBE.0, PROBE.1).await.unwrap_err();
    assert_refused_for_its_certificate(&error);
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_probe_rejects_invalid_names_and_reports_missing_probes() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    let collector = central.collector(&pki, Some(&pki.collector));
    for (module_version, file_name) in
        [("latest", PROBE.1), (PROBE.0, "../../etc/passwd"), (PROBE.0, "collector.ko.gz")]
    {
        let error = collector.fetch(module_version, file_name).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{module_version}/{file_name}: {error}");
    }
    let error = collector.fetch(PROBE.0, PROBE.1).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_a_token_with_the_right_role() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    let ask = GetExistingProbesRequest { paths: vec![format!("{}/{}", PROBE.0, PROBE.1)] };
    let upload =
        || tokio_stream::iter(vec![UploadProbesRequest { message: Some(Message::Options(UploadOptions::default())) }]);

    for token in ["", "not-a-token", "kp_0000"] {
        let mut client = central.admin(&pki, token);
        assert_eq!(client.get_existing_probes(ask.clone()).await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(client.list_probes(ListProbesRequest::default()).await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(client.upload_probes(upload()).await.unwrap_err().code(), Code::Unauthenticated);
    }

    let mut view = central.admin(&pki, &central.view_token);
    view.get_existing_probes(ask.clone()).await.unwrap();
    view.list_probes(ListProbesRequest::default()).await.unwrap();
    let denied = view.upload_probes(upload()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("role admin"), "{}", denied.message());

    let mut admin = central.admin(&pki, &central.admin_token);
    admin.upload_probes(upload()).await.unwrap();

    // Revocation takes effect at once, without a restart.
    let tokens = TokenFile::in_data_dir(dir.path());
    let name =
        tokens.load().unwrap().into_iter().find(|r| r.role == central_probes::server::auth::Role::Admin).unwrap().name;
    assert!(tokens.revoke(&name).unwrap());
    assert_eq!(admin.upload_probes(upload()).await.unwrap_err().code(), Code::Unauthenticated);
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_client_that_does_not_trust_central_is_told_so() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    let mut client = central.admin(&other, &central.admin_token);
    let status = client.list_probes(ListProbesRequest::default()).await.unwrap_err();
    let description = probe_api::transport::describe(&status);
    assert!(description.contains("UnknownIssuer") || description.contains("certificate"), "{description}");
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer_anyone_over_tls() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    let channel =
        probe_api::transport::channel(&central.address, &pki.tls_with(None), std::time::Duration::from_secs(5))
            .unwrap();

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "kprobes.v1.ProbeService", "kprobes.v1.ProbeUploadService"] {
        let request = HealthCheckRequest { service: service.into() };
        let status = health.check(request).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["kprobes.v1.ProbeService", "kprobes.v1.ProbeUploadService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    central.stop().await;
}

/// What a caller gets from an RPC in the auth matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Ok,
    Code(Code),
    /// Refused by TLS before any RPC runs: the call fails at transport level.
    Refused,
}

use Expect::{Code as C, Ok as Served, Refused};

/// Callers, and what each RPC gives them:
/// GetProbe, GetExistingProbes, UploadProbes, ListProbes.
const AUTH_MATRIX: &[(&str, [Expect; 4])] = &[
    ("plain TCP, no TLS", [Refused, Refused, Refused, Refused]),
    ("TLS, no client certificate", [C(Code::Unauthenticated); 4]),
    ("client certificate from another CA", [Refused, Refused, Refused, Refused]),
    ("expired client certificate", [Refused, Refused, Refused, Refused]),
    ("Collector certificate", [Served, C(Code::Unauthenticated), C(Code::Unauthenticated), C(Code::Unauthenticated)]),
    ("view token", [C(Code::Unauthenticated), Served, C(Code::PermissionDenied), Served]),
    ("admin token", [C(Code::Unauthenticated), Served, Served, Served]),
    ("malformed token", [C(Code::Unauthenticated); 4]),
    ("empty token", [C(Code::Unauthenticated); 4]),
    ("revoked token", [C(Code::Unauthenticated); 4]),
];

fn classify(result: Result<(), tonic::Status>) -> Expect {
    match result {
        Ok(()) => Expect::Ok,
        // TLS refusals surface as transport failures of the first call.
        Err(status)
            if matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
                && (status.message().contains("transport error")
                    || status.message().contains("operation was canceled")
                    || status.message().contains("tls")
                    || status.message().contains("connection")) =>
        {
            Expect::Refused
        }
        // Plain HTTP/2 sent to the TLS port: the connection breaks as soon
        // as the server's TLS answer arrives, whichever side notices first.
        Err(status) if status.code() == Code::Internal && status.message().contains("h2 protocol error") => {
            Expect::Refused
        }
        Err(status) => Expect::Code(status.code()),
    }
}

async fn call_all(channel: tonic::transport::Channel, authorization: Option<&str>) -> [Expect; 4] {
    use probe_api::v1::probe_service_client::ProbeServiceClient;
    use probe_api::v1::probe_upload_service_client::ProbeUploadServiceClient;
    let with_token = |mut request: tonic::Request<()>| {
        if let Some(value) = authorization {
            request.metadata_mut().insert("authorization", value.parse().unwrap());
        }
        Ok(request)
    };
    let mut collector = ProbeServiceClient::new(channel.clone());
    let mut admin = ProbeUploadServiceClient::with_interceptor(channel, with_token);
    let get_probe = async {
        let request = probe_api::v1::GetProbeRequest { module_version: PROBE.0.into(), file_name: PROBE.1.into() };
        let mut stream = collector.get_probe(request).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok(())
    }
    .await;
    let existing = admin
        .get_existing_probes(GetExistingProbesRequest { paths: vec![format!("{}/{}", PROBE.0, PROBE.1)] })
        .await
        .map(drop);
    let mut messages = vec![UploadProbesRequest { message: Some(Message::Options(UploadOptions::default())) }];
    messages.extend(central_probes::server::uploads::file_messages(&format!("{}/{}", PROBE.0, PROBE.1), b"probe", 2));
    let upload = admin.upload_probes(tokio_stream::iter(messages)).await.map(drop);
    let list = admin.list_probes(ListProbesRequest::default()).await.map(drop);
    [classify(get_probe), classify(existing), classify(upload), classify(list)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_gets_the_expected_code_from_every_rpc() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    store_probe(&central, &pki).await;
    let tokens = TokenFile::in_data_dir(dir.path());
    let revoked = tokens.create(central_probes::server::auth::Role::Admin, "to-revoke").unwrap();
    assert!(tokens.revoke("to-revoke").unwrap());
    let expired = pki.ca.issue_expired_client("collector").unwrap();
    let timeout = std::time::Duration::from_secs(5);
    let tls = |identity| probe_api::transport::channel(&central.address, &pki.tls_with(identity), timeout).unwrap();

    for (caller, expected) in AUTH_MATRIX {
        let (channel, authorization) = match *caller {
            "plain TCP, no TLS" => {
                let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", central.address)).unwrap();
                (plain.connect_lazy(), None)
            }
            "TLS, no client certificate" => (tls(None), None),
            "client certificate from another CA" => (tls(Some(&pki.foreign_collector)), None),
            "expired client certificate" => (tls(Some(&expired)), None),
            "Collector certificate" => (tls(Some(&pki.collector)), None),
            "view token" => (tls(None), Some(format!("Bearer {}", central.view_token))),
            "admin token" => (tls(None), Some(format!("Bearer {}", central.admin_token))),
            "malformed token" => (tls(None), Some(format!("Token {}", central.admin_token))),
            "empty token" => (tls(None), Some("Bearer ".to_owned())),
            "revoked token" => (tls(None), Some(format!("Bearer {revoked}"))),
            other => panic!("no caller {other}"),
        };
        let got = call_all(channel, authorization.as_deref()).await;
        assert_eq!(&got, expected, "{caller}: GetProbe, GetExistingProbes, UploadProbes, ListProbes");
    }
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_overwrites_are_counted_by_token_name_and_the_tokens_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, dir.path()).await;
    let mode = std::fs::metadata(dir.path().join("tokens")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the tokens file is readable by its owner only: {mode:o}");

    let path = "2.5.0/collector-ebpf-5.4.0.o.gz";
    for (bytes, overwrite) in [(&b"first"[..], false), (&b"second"[..], true)] {
        let mut messages = vec![UploadProbesRequest { message: Some(Message::Options(UploadOptions { overwrite })) }];
        messages.extend(central_probes::server::uploads::file_messages(path, bytes, 4));
        central.admin(&pki, &central.admin_token).upload_probes(tokio_stream::iter(messages)).await.unwrap();
    }
    let metrics = central.metrics.render();
    let count = |action: &str| {
        metrics
            .lines()
            .find(|line| {
                line.starts_with("central_probes_changes_by_token_total{")
                    && line.contains("token=\"admin-")
                    && line.contains(&format!("action=\"{action}\""))
            })
            .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
    };
    assert_eq!(count("upload"), Some(2), "{metrics}");
    assert_eq!(count("overwrite"), Some(1), "{metrics}");
    central.stop().await;
}
