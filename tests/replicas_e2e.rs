//! End to end: several Centrals sharing one PostgreSQL database (a
//! throwaway cluster started by the tests), over real mutual TLS.

mod common;

use std::time::Duration;

use central_probes::admin::client as admin_client;
use central_probes::admin::progress::Progress;
use central_probes::admin::upload::{self as admin_upload, UploadRequest};
use central_probes::server::{DatabaseConfig, PostgresConfig};
use central_probes::store::postgres::test_cluster::TestCluster;
use central_probes::synthetic::PackageSpec;
use common::{Central, CentralOptions, TestPki};
use probe_api::v1::{FileOutcome, ProbeSource};
use tonic::Code;

fn database(url: &str) -> DatabaseConfig {
    DatabaseConfig {
        postgres: PostgresConfig {
            url: url.to_owned(),
            max_connections: 8,
            statement_timeout: Duration::from_secs(5),
            ca_pem: None,
        },
        local_copies_bytes: 64 << 20,
    }
}

async fn replica(pki: &TestPki, dir: &std::path::Path, name: &str, url: &str) -> Central {
    let options = CentralOptions { database: Some(database(url)), ..Default::default() };
    Central::start_with(pki, &dir.join(name), options).await
}

fn spec(variant: u64) -> PackageSpec {
    let kernels = ["5.4.0-100-generic", "5.10.0-27-cloud-amd64", "6.1.0-18-amd64", "4.18.0-513.el8.x86_64"];
    PackageSpec { kernel_modules: true, variant, size_divisor: 10, ..PackageSpec::new("2.5.0", &kernels) }
}

async fn upload(
    central: &Central,
    pki: &TestPki,
    package: &std::path::Path,
    overwrite: bool,
) -> admin_upload::UploadReport {
    let mut admin = central.admin(pki, &central.admin_token);
    let request = UploadRequest { package: package.to_owned(), overwrite, checksum: None, verify: false };
    admin_upload::upload(&mut admin, &request, |_| Progress::Silent).await.unwrap()
}

async fn fetch(central: &Central, pki: &TestPki, path: &str) -> Result<Vec<u8>, Code> {
    let (module_version, file_name) = path.split_once('/').unwrap();
    let client = central.collector(pki, Some(&pki.collector));
    match client.fetch(module_version, file_name).await {
        Ok(probe) => {
            assert_eq!(probe.source, ProbeSource::UploadedPackage);
            Ok(probe.bytes)
        }
        Err(error) => Err(error.code()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_uploaded_through_one_replica_is_served_by_another_and_an_overwrite_seen_once_notified() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let url = TestCluster::get().new_database();
    let (a, b) = (replica(&pki, dir.path(), "a", &url).await, replica(&pki, dir.path(), "b", &url).await);
    let original = spec(0);
    let package = dir.path().join("pkg.zip");
    original.write(&package).unwrap();
    assert_eq!(upload(&a, &pki, &package, false).await.response.unwrap().stored_count, 8);

    for path in original.probe_paths() {
        assert_eq!(fetch(&b, &pki, &path).await.unwrap(), original.probe_bytes(&path), "{path} through b");
        assert_eq!(fetch(&b, &pki, &path).await.unwrap(), original.probe_bytes(&path), "{path} again, from b's copy");
    }
    // Replaced through a: b serves the new bytes as soon as the database's
    // notification reaches it (milliseconds), although it has served (and
    // trusts) its copies of the old ones; never anything but one whole
    // version or the other (fetch checks size and SHA-256).
    let changed = spec(1);
    let changed_package = dir.path().join("changed.zip");
    changed.write(&changed_package).unwrap();
    assert_eq!(upload(&a, &pki, &changed_package, true).await.response.unwrap().overwritten_count, 8);
    for path in changed.probe_paths() {
        let mut served = Vec::new();
        for _ in 0..100 {
            served = fetch(&b, &pki, &path).await.unwrap();
            if served == changed.probe_bytes(&path) {
                break;
            }
            assert_eq!(served, original.probe_bytes(&path), "{path}: the old version, whole, until notified");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(served, changed.probe_bytes(&path), "{path} after the overwrite");
    }
    // b's re-upload of the same package finds everything there.
    let again = upload(&b, &pki, &changed_package, false).await;
    assert_eq!((again.identical, again.files_sent), (8, 0));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_uploads_through_two_replicas_store_each_probe_once_and_whole() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let url = TestCluster::get().new_database();
    let (a, b) = (replica(&pki, dir.path(), "a", &url).await, replica(&pki, dir.path(), "b", &url).await);
    let (one, other) = (spec(0), spec(1));
    let (package_one, package_other) = (dir.path().join("one.zip"), dir.path().join("other.zip"));
    one.write(&package_one).unwrap();
    other.write(&package_other).unwrap();
    let (from_a, from_b) = tokio::join!(upload(&a, &pki, &package_one, false), upload(&b, &pki, &package_other, false));
    // Each client saw what Central decided; what it skipped before sending
    // it counts as a conflict too.
    let outcome = |report: &admin_upload::UploadReport, path: &str| -> &'static str {
        if report.conflicts.iter().any(|c| c == path) {
            return "conflict";
        }
        let result = report.response.as_ref().and_then(|r| r.results.iter().find(|r| r.path == path));
        match result.map(|r| r.outcome) {
            Some(o) if o == FileOutcome::Stored as i32 => "stored",
            other => panic!("{path}: {other:?}"),
        }
    };
    for path in one.probe_paths() {
        let outcomes = [outcome(&from_a, &path), outcome(&from_b, &path)];
        assert!(matches!(outcomes, ["stored", "conflict"] | ["conflict", "stored"]), "{path}: {outcomes:?}");
        let served = fetch(&a, &pki, &path).await.unwrap();
        let winner = if outcomes[0] == "stored" { &one } else { &other };
        assert_eq!(served, winner.probe_bytes(&path), "{path}: the winner's bytes, whole");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_gives_unavailable_and_central_recovers_by_itself() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::private();
    let url = cluster.new_database();
    let central = replica(&pki, dir.path(), "a", &url).await;
    let spec = spec(0);
    let package = dir.path().join("pkg.zip");
    spec.write(&package).unwrap();
    upload(&central, &pki, &package, false).await;
    let path = &spec.probe_paths()[0];
    assert_eq!(fetch(&central, &pki, path).await.unwrap(), spec.probe_bytes(path));

    cluster.stop("fast");
    let never_read = &spec.probe_paths()[1];
    assert_eq!(fetch(&central, &pki, never_read).await.unwrap_err(), Code::Unavailable, "the database is down: retry");
    // A copy trusted before is served until the lost notifications are
    // noticed (the listening connection breaks at once on a shutdown).
    let mut down = Ok(Vec::new());
    for _ in 0..100 {
        down = fetch(&central, &pki, path).await;
        if down.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(down.unwrap_err(), Code::Unavailable, "nothing is trusted while the database is away");
    cluster.start_again();
    let mut served = Err(Code::Unknown);
    for _ in 0..50 {
        served = fetch(&central, &pki, path).await;
        if served.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served.unwrap(), spec.probe_bytes(path), "served again without restarting Central");
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_at_start_is_a_clear_error_and_exit_code() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://postgres@127.0.0.1:{closed}/probes");
    let output = serve_command(&pki, &dir.path().join("data"), &url).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains("opening the probe database") && last.contains("connecting to the database"), "{stderr}");
}

fn central_cli(args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_central-probes"))
        .args(args)
        .env_remove("CENTRAL_DATA_DIR")
        .env_remove("CENTRAL_DATABASE_URL")
        .output()
        .unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

/// Whether `token` may list probes through `central`.
async fn token_works(central: &Central, pki: &TestPki, token: &str) -> Result<(), Code> {
    let mut admin = central.admin(pki, token);
    admin_client::list_all(&mut admin, None).await.map(drop).map_err(|e| match e {
        central_probes::admin::error::AdminError::Rpc { status, .. } => status.0.code(),
        other => panic!("{other}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_made_and_revoked_in_the_database_hold_on_every_replica() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let url = TestCluster::get().new_database();
    let (a, b) = (replica(&pki, dir.path(), "a", &url).await, replica(&pki, dir.path(), "b", &url).await);
    let (ok, token, stderr) =
        central_cli(&["token", "create", "--database-url", &url, "--role", "view", "--name", "ci"]);
    assert!(ok, "{stderr}");
    let token = token.trim().to_owned();
    let (ok, listed, _) = central_cli(&["token", "list", "--database-url", &url]);
    assert!(ok && listed.lines().any(|line| line == "ci\tview"), "{listed}");

    // Every replica reloads the tokens each second.
    let until = |want: Result<(), Code>, token: String| {
        let (a, b, pki) = (&a, &b, &pki);
        async move {
            for _ in 0..40 {
                if token_works(a, pki, &token).await == want && token_works(b, pki, &token).await == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
    };
    assert!(until(Ok(()), token.clone()).await, "the new token works on both replicas");
    let (ok, _, stderr) = central_cli(&["token", "revoke", "--database-url", &url, "--name", "ci"]);
    assert!(ok, "{stderr}");
    assert!(until(Err(Code::Unauthenticated), token).await, "the revoked token is refused on both replicas");
    a.stop().await;
    b.stop().await;
}

/// `central-probes serve` on a free port with the database at `url`,
/// its TLS files written into the PKI directory.
fn serve_command(pki: &TestPki, data_dir: &std::path::Path, url: &str) -> std::process::Command {
    let (cert, key) = (pki.dir.path().join("server.pem"), pki.dir.path().join("server-key.pem"));
    std::fs::write(&cert, &pki.server.cert_pem).unwrap();
    std::fs::write(&key, &pki.server.key_pem).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_central-probes"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .args(["--client-ca", pki.ca_file().to_str().unwrap()])
        .args(["--database-url", url]);
    command
}

/// A replica in a process of its own (to be killed), on `url`.
fn replica_process(pki: &TestPki, data_dir: &std::path::Path, url: &str) -> (std::process::Child, String) {
    let log = data_dir.with_extension("log");
    let mut child = serve_command(pki, data_dir, url).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    for _ in 0..200 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(address) = text.split("listening on ").nth(1) {
            return (child, address.split_whitespace().next().unwrap().to_owned());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the replica did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_upload_leaves_whole_probes_only_and_the_other_completes_the_upload() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let url = TestCluster::get().new_database();
    let survivor = replica(&pki, dir.path(), "survivor", &url).await;
    let (mut doomed, doomed_address) = replica_process(&pki, &dir.path().join("doomed"), &url);
    let kernels: Vec<String> = (0..60).map(|i| format!("5.{}.0-{}-generic", 4 + i % 7, 100 + i)).collect();
    let kernels: Vec<&str> = kernels.iter().map(String::as_str).collect();
    let spec = PackageSpec { kernel_modules: true, size_divisor: 2, ..PackageSpec::new("2.5.0", &kernels) };
    let package = dir.path().join("pkg.zip");
    spec.write(&package).unwrap();
    let mut uploader = std::process::Command::new(env!("CARGO_BIN_EXE_central-probes"))
        .args(["upload", package.to_str().unwrap(), "-e", &doomed_address, "--ca", pki.ca_file().to_str().unwrap()])
        .env("ROX_API_TOKEN", &survivor.admin_token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut admin = survivor.admin(&pki, &survivor.view_token);
    let ask = probe_api::v1::GetExistingProbesRequest { paths: spec.probe_paths() };
    let mut stored = 0;
    for _ in 0..2000 {
        stored = admin.get_existing_probes(ask.clone()).await.unwrap().into_inner().probes.len();
        if stored >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(stored >= 5, "the upload through the doomed replica got going");
    doomed.kill().unwrap(); // SIGKILL, mid-upload
    doomed.wait().unwrap();
    let _ = uploader.wait();

    // Whatever the database shows is whole, through the survivor.
    let kept = admin_client::list_all(&mut admin, None).await.unwrap();
    assert!(kept.len() < spec.probe_paths().len(), "killed mid-upload: {} of {}", kept.len(), spec.probe_paths().len());
    for probe in &kept {
        assert_eq!(fetch(&survivor, &pki, &probe.path).await.unwrap(), spec.probe_bytes(&probe.path), "{}", probe.path);
    }
    let report = upload(&survivor, &pki, &package, false).await;
    assert_eq!((report.identical, report.files_sent), (kept.len(), spec.probe_paths().len() - kept.len()));
    for path in spec.probe_paths().iter().step_by(9) {
        assert_eq!(fetch(&survivor, &pki, path).await.unwrap(), spec.probe_bytes(path), "{path}");
    }
    survivor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_of_every_replica_meet_in_the_database_and_an_upload_through_another_resolves_them() {
    use probe_api::v1::ListMissesRequest;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let url = TestCluster::get().new_database();
    let (a, b) = (replica(&pki, dir.path(), "a", &url).await, replica(&pki, dir.path(), "b", &url).await);
    let other_node = pki.ca.issue_client("collector-on-node-2").unwrap();
    let probes = spec(0);
    let missed = &probes.probe_paths()[0];
    let (module_version, file_name) = missed.split_once('/').unwrap();
    for (central, identity) in [(&a, &pki.collector), (&b, &other_node), (&b, &other_node)] {
        let result = central.collector(&pki, Some(identity)).fetch(module_version, file_name).await;
        assert_eq!(result.map(drop).unwrap_err().code(), Code::NotFound);
    }
    // b merges its own when asked; a merges its miss every second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let listed = loop {
        let listed = b.admin(&pki, &b.view_token).list_misses(ListMissesRequest::default()).await.unwrap().into_inner();
        if listed.misses.first().is_some_and(|miss| miss.requests == 3) {
            break listed;
        }
        assert!(tokio::time::Instant::now() < deadline, "a's miss never reached the database: {listed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(listed.open_count, 1, "{listed:?}");
    let miss = &listed.misses[0];
    assert_eq!((&miss.path, miss.requests, miss.distinct_clients), (missed, 3, 2), "{listed:?}");

    // An upload through b resolves it for a too.
    let package = dir.path().join("pkg.zip");
    probes.write(&package).unwrap();
    upload(&b, &pki, &package, false).await;
    let request = ListMissesRequest { include_resolved: true };
    let listed = a.admin(&pki, &a.view_token).list_misses(request).await.unwrap().into_inner();
    assert_eq!(listed.open_count, 0, "{listed:?}");
    assert_eq!(listed.misses[0].resolved_by, "upload");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_through_a_replica_holds_every_probe_of_the_database() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let url = TestCluster::get().new_database();
    let (a, b) = (replica(&pki, dir.path(), "a", &url).await, replica(&pki, dir.path(), "b", &url).await);
    let probes = spec(0);
    let package = dir.path().join("pkg.zip");
    probes.write(&package).unwrap();
    upload(&a, &pki, &package, false).await;

    // Through b, which has no local copy of anything.
    let exported = dir.path().join("export.zip");
    let mut admin = b.admin(&pki, &b.view_token);
    let report = central_probes::admin::export::export(&mut admin, vec![], &exported).await.unwrap();
    assert_eq!((report.probes, report.module_versions.clone()), (8, vec!["2.5.0".to_owned()]));
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&exported).unwrap()).unwrap();
    for path in probes.probe_paths() {
        let mut entry = archive.by_name(&format!("kernel-modules/{path}")).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
        assert_eq!(bytes, probes.probe_bytes(&path), "{path}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_uploaded_through_one_replica_is_served_by_another() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let url = TestCluster::get().new_database();
    let (a, b) = (replica(&pki, dir.path(), "a", &url).await, replica(&pki, dir.path(), "b", &url).await);
    let keys = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let key_file = dir.path().join("site.key");
    std::fs::write(&key_file, keys.sk.to_box(None).unwrap().into_string()).unwrap();
    let (package, signed) = (dir.path().join("pkg.zip"), dir.path().join("signed.zip"));
    spec(0).write(&package).unwrap();
    let key = central_probes::admin::signatures::load_secret_key(&key_file, None).unwrap();
    central_probes::admin::signatures::sign_package(&package, &signed, &key, 7).unwrap();
    assert_eq!(upload(&a, &pki, &signed, false).await.response.unwrap().stored_count, 8);
    let trusted = probe_api::signing::TrustedKeys::parse(&keys.pk.to_box().unwrap().into_string()).unwrap();
    for path in spec(0).probe_paths() {
        let parsed = probe_api::names::ProbePath::parse(&path).unwrap();
        let (module_version, file_name) = path.split_once('/').unwrap();
        let probe = b.collector(&pki, Some(&pki.collector)).fetch(module_version, file_name).await.unwrap();
        let verified = trusted.verify(&parsed, &probe.bytes, probe.signature.as_deref()).unwrap();
        assert_eq!(verified.serial, 7, "{path} through b, signed");
    }
    a.stop().await;
    b.stop().await;
}
