//! End to end: a byte flipped in a stored probe (a pack, a probe file, a
//! database row) behind Central's back. GetProbe and the HTTPS route refuse
//! it, `central-probes verify` names it (offline and over the API, exit
//! status 1), and uploading the package again repairs it.

#[path = "common/cli.rs"]
mod cli;
mod common;
#[path = "common/raw_grpc.rs"]
mod raw_grpc;
#[path = "common/roxctl.rs"]
mod roxctl;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use central_probes::server::{DatabaseConfig, PostgresConfig, StoreLayout};
use central_probes::store::postgres::test_cluster::TestCluster;
use central_probes::synthetic::PackageSpec;
use cli::{central_cli, central_cli_status};
use collector_client::central::FetchError;
use common::{Central, CentralOptions, TestPki};
use probe_api::names::ProbePath;
use probe_api::v1::upload_probes_request::Message;
use probe_api::v1::{UploadOptions, UploadProbesRequest};
use tonic::Code;

/// A package of three kernels, both probe kinds: six small probes.
fn spec() -> PackageSpec {
    PackageSpec {
        kernel_modules: true,
        size_divisor: 20,
        ..PackageSpec::new("2.5.0", &["5.4.0-1", "5.4.0-2", "5.4.0-3"])
    }
}

/// A probe of several read chunks (the store reads 256 KiB at a time).
const LARGE: &str = "2.5.0/collector-ebpf-6.1.0-9-amd64.o.gz";

fn large_bytes() -> Vec<u8> {
    (0..700_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect()
}

/// Where the store is: a data directory's layout, or a database.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Packs,
    Files,
    Database,
}

struct Setup {
    pki: TestPki,
    dir: tempfile::TempDir,
    kind: Kind,
    url: Option<String>,
}

impl Setup {
    fn new(kind: Kind) -> Self {
        let url = matches!(kind, Kind::Database).then(|| TestCluster::get().new_database());
        Setup { pki: TestPki::new(), dir: tempfile::tempdir().unwrap(), kind, url }
    }

    fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    fn postgres(&self) -> PostgresConfig {
        let url = self.url.clone().unwrap();
        PostgresConfig { url, max_connections: 8, statement_timeout: Duration::from_secs(10), ca_pem: None }
    }

    async fn start(&self) -> Central {
        // The Central stopped last may hold its locks a moment longer
        // (connections closing).
        for lock in [self.data_dir().join("lock"), self.data_dir().join("database-copies/lock")] {
            wait_unlocked(&lock).await;
        }
        let options = match self.kind {
            Kind::Packs => CentralOptions::default(),
            Kind::Files => CentralOptions { store_layout: StoreLayout::Files, ..Default::default() },
            Kind::Database => CentralOptions {
                database: Some(DatabaseConfig { postgres: self.postgres(), local_copies_bytes: 1 << 30 }),
                ..Default::default()
            },
        };
        Central::start_with(&self.pki, &self.data_dir(), options).await
    }

    /// Flips a bit of byte `at` of the stored probe `path`.
    async fn flip_a_byte(&self, path: &str, at: u64) {
        let probe = ProbePath::parse(path).unwrap();
        match self.kind {
            Kind::Packs => central_probes::store::pack::inspect::flip_a_byte(&self.data_dir(), &probe, at).unwrap(),
            Kind::Files => {
                let file = self.data_dir().join("probes").join(path);
                central_probes::store::filesystem::flip_a_byte(&file, at).unwrap()
            }
            Kind::Database => {
                let (client, connection) =
                    tokio_postgres::connect(self.url.as_ref().unwrap(), tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(connection);
                let row = central_probes::store::postgres::CHUNK_ROW as u64;
                let (seq, offset) = ((at / row) as i32, (at % row) as i32);
                let flipped = client
                    .execute(
                        "UPDATE probe_chunks SET data = set_byte(data, $3, get_byte(data, $3) # 16)
                         WHERE blob = (SELECT blob FROM probes WHERE path = $1) AND seq = $2",
                        &[&path, &seq, &offset],
                    )
                    .await
                    .unwrap();
                assert_eq!(flipped, 1);
            }
        }
    }

    /// `central-probes verify` of the stopped store: (exit status, stdout, stderr).
    async fn verify_offline(&self, extra: &[&str]) -> (i32, String, String) {
        let data_dir = self.data_dir();
        let url = self.url.clone().unwrap_or_default();
        let mut args = match self.kind {
            Kind::Database => vec!["verify", "--database-url", &url],
            _ => vec!["verify", "--data-dir", data_dir.to_str().unwrap()],
        };
        args.extend_from_slice(extra);
        wait_unlocked(&self.data_dir().join("lock")).await;
        central_cli_status(&args, "").await
    }
}

/// Waits until nobody holds the lock file `lock` (if there is one).
async fn wait_unlocked(lock: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(lock) else { return };
    for _ in 0..100 {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return; // released when `file` is closed
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} stays locked after Central stopped", lock.display());
}

async fn verify_over_the_api(setup: &Setup, central: &Central) -> (i32, String, String) {
    let ca = setup.pki.ca_file();
    central_cli_status(&["verify", "-e", &central.address, "--ca", ca.to_str().unwrap()], &central.view_token).await
}

async fn upload(setup: &Setup, central: &Central, package: &Path) -> String {
    let ca = setup.pki.ca_file();
    let args = ["upload", package.to_str().unwrap(), "-e", &central.address, "--ca", ca.to_str().unwrap()];
    let (ok, stdout, stderr) = central_cli(&args, &central.admin_token).await;
    assert!(ok, "{stdout}\n{stderr}");
    stdout
}

async fn upload_large(setup: &Setup, central: &Central) {
    let mut admin = central.admin(&setup.pki, &central.admin_token);
    let mut messages = vec![UploadProbesRequest { message: Some(Message::Options(UploadOptions::default())) }];
    messages.extend(central_probes::server::uploads::file_messages(LARGE, &large_bytes(), 64 << 10));
    admin.upload_probes(tokio_stream::iter(messages)).await.unwrap();
}

/// curl's answer for `path` over `flag`: Ok((status, body length)) or its
/// error.
fn curl(setup: &Setup, central: &Central, path: &str, flag: &str) -> Result<(u16, usize), String> {
    let dir = setup.dir.path();
    let (cert, key, body) = (dir.join("collector.pem"), dir.join("collector-key.pem"), dir.join("body"));
    std::fs::write(&cert, &setup.pki.collector.cert_pem).unwrap();
    std::fs::write(&key, &setup.pki.collector.key_pem).unwrap();
    let port = central.address.rsplit(':').next().unwrap();
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "20", flag, "--cacert"])
        .arg(setup.pki.ca_file())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--output")
        .arg(&body)
        .args(["--write-out", "%{http_code}"])
        .arg(format!("https://localhost:{port}/kernel-objects/{path}"))
        .output()
        .expect("curl is installed (.ci/run installs it)");
    if !output.status.success() {
        return Err(format!("curl exit {:?}: {}", output.status.code(), String::from_utf8_lossy(&output.stderr)));
    }
    let status = String::from_utf8(output.stdout).unwrap().parse().unwrap();
    Ok((status, std::fs::read(&body).map_or(0, |b| b.len())))
}

async fn a_flipped_byte_is_refused_named_by_verify_and_repaired_by_a_reupload(kind: Kind) {
    let setup = Setup::new(kind);
    let spec = spec();
    let package = setup.dir.path().join("support-pkg-2.5.0.zip");
    spec.write(&package).unwrap();
    let central = setup.start().await;
    upload(&setup, &central, &package).await;
    upload_large(&setup, &central).await;
    central.stop().await;
    let paths = spec.probe_paths();
    let small = paths[0].as_str();
    // The later record first: a scan of a pack stops at a damaged one.
    setup.flip_a_byte(LARGE, large_bytes().len() as u64 - 1).await;
    setup.flip_a_byte(small, 100).await;

    let central = setup.start().await;
    let collector = central.collector(&setup.pki, Some(&setup.pki.collector));
    for path in [small, LARGE] {
        let (module_version, file_name) = path.split_once('/').unwrap();
        // GetProbe: DATA_LOSS from Central itself, not the client's own check.
        match collector.fetch(module_version, file_name).await {
            Err(FetchError::Status(status)) => assert_eq!(status.code(), Code::DataLoss, "{kind:?} {path}: {status}"),
            other => panic!("{kind:?} {path}: {:?}", other.map(|p| p.bytes.len())),
        }
        // The route: an error curl sees, never a complete 200.
        for flag in ["--http1.1", "--http2"] {
            let answer = tokio::task::block_in_place(|| curl(&setup, &central, path, flag));
            assert!(!matches!(answer, Ok((200, _))), "{kind:?} {path} {flag}: {answer:?}");
            if path == small {
                assert!(matches!(answer, Ok((500, _))), "{kind:?} {path} {flag}: {answer:?}");
            }
        }
        if path == small {
            let head = tokio::task::block_in_place(|| curl(&setup, &central, path, "--head"));
            assert!(matches!(head, Ok((500, _))), "{kind:?} HEAD {path}: {head:?}");
        }
    }
    assert!(central.metrics.damaged_read_count("upload") >= 2, "{kind:?}: counted");
    let (module_version, file_name) = paths[1].split_once('/').unwrap();
    assert!(collector.fetch(module_version, file_name).await.is_ok(), "{kind:?}: the intact probes are served");

    // Over the API: the same names, exit status 1.
    let (status, stdout, stderr) = verify_over_the_api(&setup, &central).await;
    assert_eq!(status, 1, "{kind:?}: {stdout}\n{stderr}");
    let named: Vec<&str> = stdout.lines().filter_map(|line| line.strip_prefix("damaged  ")).collect();
    assert!(named.len() == 2 && named[0].starts_with(small) && named[1].starts_with(LARGE), "{kind:?}: {stdout}");

    // Both GetExistingProbes leave it out, so that uploaders send it again.
    let asked = [small, paths[1].as_str()];
    let request = probe_api::v1::GetExistingProbesRequest { paths: asked.iter().map(|p| p.to_string()).collect() };
    let view = central.view_token.as_str();
    let ours = central.admin(&setup.pki, view).get_existing_probes(request).await.unwrap().into_inner().probes;
    assert_eq!(ours.iter().map(|p| p.path.as_str()).collect::<Vec<_>>(), [asked[1]], "{kind:?}");
    let sender = roxctl::http2(&central.address, &setup.pki).await;
    let product = roxctl::get_existing(&sender, Some(view), &asked).await.unwrap();
    assert_eq!(product.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), [asked[1]], "{kind:?}");

    // An export ends with DATA_LOSS and leaves no package.
    let (exported, ca) = (setup.dir.path().join("export.zip"), setup.pki.ca_file());
    let args = ["export", "-o", exported.to_str().unwrap(), "-e", &central.address, "--ca", ca.to_str().unwrap()];
    let (ok, stdout, stderr) = central_cli(&args, view).await;
    assert!(!ok && stderr.contains("damaged"), "{kind:?}: {stdout}\n{stderr}");
    assert!(!exported.exists(), "{kind:?}");

    central.stop().await;

    // Offline: each damaged probe named, exit status 1.
    let (status, stdout, stderr) = setup.verify_offline(&[]).await;
    assert_eq!(status, 1, "{kind:?}: {stdout}\n{stderr}");
    let named: Vec<&str> = stdout.lines().filter_map(|line| line.strip_prefix("damaged  ")).collect();
    assert_eq!(named.len(), 2, "{kind:?}: {stdout}\n{stderr}");
    assert!(named[0].starts_with(small) && named[1].starts_with(LARGE), "{kind:?}: {stdout}");
    assert!(stderr.contains("7 probes checked") && stderr.contains("2 damaged"), "{kind:?}: {stderr}");
    let (_, json, _) = setup.verify_offline(&["-o", "json"]).await;
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["damaged_count"], 2, "{json}");
    assert_eq!(json["damaged"][0]["path"], small, "{json}");

    // What the reads found is known to the next Central: the package again
    // repairs the small probe, the large one by hand. A database replica
    // knows it only once it has read it again.
    let central = setup.start().await;
    let collector = central.collector(&setup.pki, Some(&setup.pki.collector));
    if let Kind::Database = kind {
        assert_eq!(verify_over_the_api(&setup, &central).await.0, 1);
    }
    let report = upload(&setup, &central, &package).await;
    assert!(report.contains("1 stored"), "{kind:?}: the damaged probe is sent and stored again: {report}");
    upload_large(&setup, &central).await;
    for path in [small, LARGE] {
        let (module_version, file_name) = path.split_once('/').unwrap();
        let probe = collector.fetch(module_version, file_name).await.unwrap();
        let expected = if path == LARGE { large_bytes() } else { spec.probe_bytes(path) };
        assert!(probe.bytes == expected, "{kind:?} {path}: repaired");
        let answer = tokio::task::block_in_place(|| curl(&setup, &central, path, "--http2"));
        assert_eq!(answer, Ok((200, expected.len())), "{kind:?} {path}");
    }
    let (status, stdout, stderr) = verify_over_the_api(&setup, &central).await;
    assert_eq!(status, 0, "{kind:?}: {stdout}\n{stderr}");
    central.stop().await;
    let (status, stdout, stderr) = setup.verify_offline(&[]).await;
    assert!(status == 0 && stdout.is_empty(), "{kind:?}: {stdout}\n{stderr}");
    assert!(stderr.contains("7 probes checked") && stderr.contains("0 damaged"), "{kind:?}: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_pack_is_refused_named_by_verify_and_repaired_by_a_reupload() {
    a_flipped_byte_is_refused_named_by_verify_and_repaired_by_a_reupload(Kind::Packs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_probe_file_is_refused_named_by_verify_and_repaired_by_a_reupload() {
    a_flipped_byte_is_refused_named_by_verify_and_repaired_by_a_reupload(Kind::Files).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_database_row_is_refused_named_by_verify_and_repaired_by_a_reupload() {
    a_flipped_byte_is_refused_named_by_verify_and_repaired_by_a_reupload(Kind::Database).await;
}

#[tokio::test]
async fn a_verify_that_cannot_check_exits_2_not_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-data-dir");
    let (status, stdout, stderr) = central_cli_status(&["verify", "--data-dir", missing.to_str().unwrap()], "").await;
    assert_eq!(status, 2, "{stdout}\n{stderr}");
    assert!(stderr.contains("no-such-data-dir"), "{stderr}");

    let pki = TestPki::new();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let ca = pki.ca_file();
    let (status, stdout, stderr) =
        central_cli_status(&["verify", "-e", &closed, "--ca", ca.to_str().unwrap(), "--timeout", "5s"], "t").await;
    assert_eq!(status, 2, "{stdout}\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_verify_repairs_a_damaged_copy_that_no_read_has_found_yet() {
    let setup = Setup::new(Kind::Packs);
    let spec = spec();
    let package = setup.dir.path().join("support-pkg-2.5.0.zip");
    spec.write(&package).unwrap();
    let central = setup.start().await;
    upload(&setup, &central, &package).await;
    central.stop().await;
    let paths = spec.probe_paths();
    setup.flip_a_byte(&paths[2], 50).await;

    // Nothing has read the probe since: by its record, Central has it.
    let central = setup.start().await;
    let report = upload(&setup, &central, &package).await;
    assert!(report.contains("Nothing to do"), "the record alone says identical: {report}");

    let ca = setup.pki.ca_file();
    let args = ["upload", "--verify", package.to_str().unwrap(), "-e", &central.address, "--ca", ca.to_str().unwrap()];
    let (ok, stdout, stderr) = central_cli(&args, &central.admin_token).await;
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("1 stored"), "the damaged copy is sent again: {stdout}\n{stderr}");
    assert!(stderr.contains("found 1 of its stored copies damaged"), "{stderr}");
    let (module_version, file_name) = paths[2].split_once('/').unwrap();
    let collector = central.collector(&setup.pki, Some(&setup.pki.collector));
    assert!(collector.fetch(module_version, file_name).await.unwrap().bytes == spec.probe_bytes(&paths[2]));
    let (status, stdout, stderr) = verify_over_the_api(&setup, &central).await;
    assert_eq!(status, 0, "repaired: {stdout}\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_version_with_no_probes_is_no_all_clear() {
    let setup = Setup::new(Kind::Packs);
    let package = setup.dir.path().join("support-pkg-2.5.0.zip");
    spec().write(&package).unwrap();
    let central = setup.start().await;
    upload(&setup, &central, &package).await;
    let ca = setup.pki.ca_file();
    let args = ["verify", "-e", &central.address, "--ca", ca.to_str().unwrap(), "--module-version", "9.9.9"];
    let (status, stdout, stderr) = central_cli_status(&args, &central.view_token).await;
    assert_eq!(status, 2, "{stdout}\n{stderr}");
    assert!(stderr.contains("no probes for module version 9.9.9"), "{stderr}");
    central.stop().await;
    let (status, stdout, stderr) = setup.verify_offline(&["--module-version", "9.9.9"]).await;
    assert_eq!(status, 2, "{stdout}\n{stderr}");
    assert!(stderr.contains("no probes for module version 9.9.9"), "{stderr}");
    let (status, _, stderr) = setup.verify_offline(&["--module-version", "2.5.0"]).await;
    assert_eq!(status, 0, "{stderr}");
}
