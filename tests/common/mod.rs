//! Shared pieces of the end-to-end tests: a generated PKI, Central started
//! in-process on 127.0.0.1:0 over real TLS, and clients of both services.

#![allow(dead_code)] // each test file uses a different part of it

use std::path::{Path, PathBuf};
use std::time::Duration;

use central_probes::admin::client::{self as admin_client, AdminClient};
use central_probes::pki::{CertificateAuthority, CertifiedKey};
use central_probes::server::auth::{Role, TokenFile};
use central_probes::server::metrics::Metrics;
use central_probes::server::upstream::UpstreamConfig;
use central_probes::server::{self, CentralConfig, TlsMaterial};
use collector_client::central::CentralClient;
use probe_api::transport::ClientTls;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The cluster CA, Central's server certificate, a Collector identity, and
/// a Collector identity from an unrelated CA. Also written to files for the
/// CLI.
pub struct TestPki {
    pub ca: CertificateAuthority,
    pub server: CertifiedKey,
    pub collector: CertifiedKey,
    pub foreign_collector: CertifiedKey,
    pub dir: TempDir,
}

impl TestPki {
    pub fn new() -> Self {
        let ca = CertificateAuthority::new("test cluster CA").unwrap();
        let server = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        let collector = ca.issue_client("collector").unwrap();
        let foreign_collector = CertificateAuthority::new("another CA").unwrap().issue_client("collector").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
        TestPki { ca, server, collector, foreign_collector, dir }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn tls_with(&self, identity: Option<&CertifiedKey>) -> ClientTls {
        ClientTls {
            ca_pem: self.ca.cert_pem.clone().into_bytes(),
            identity: identity.map(|id| (id.cert_pem.clone().into_bytes(), id.key_pem.clone().into_bytes())),
        }
    }
}

/// How to start a test Central; `Default` is a plain one.
#[derive(Default)]
pub struct CentralOptions {
    pub min_free_bytes: u64,
    pub allow_anonymous_reads: bool,
    pub upstream: Option<UpstreamConfig>,
    /// Probes in this shared database instead of the data directory.
    pub database: Option<server::DatabaseConfig>,
    pub limits: server::ConnectionLimits,
    /// `--trusted-keys`.
    pub trusted_keys: Option<probe_api::signing::TrustedKeys>,
    /// `--store-layout`.
    pub store_layout: server::StoreLayout,
}

/// Central running in this process.
pub struct Central {
    pub address: String,
    pub data_dir: PathBuf,
    pub admin_token: String,
    pub view_token: String,
    pub metrics: Metrics,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<central_probes::error::Result<()>>>,
}

impl Central {
    pub async fn start(pki: &TestPki, data_dir: &Path) -> Self {
        Self::start_with(pki, data_dir, CentralOptions::default()).await
    }

    pub async fn start_with(pki: &TestPki, data_dir: &Path, options: CentralOptions) -> Self {
        let (admin_token, view_token) = match &options.database {
            None => {
                let tokens = TokenFile::in_data_dir(data_dir);
                let admin = tokens.create(Role::Admin, &format!("admin-{}", unique())).unwrap();
                (admin, tokens.create(Role::View, &format!("view-{}", unique())).unwrap())
            }
            Some(database) => {
                let tokens =
                    central_probes::store::postgres::DatabaseTokens::connect(&database.postgres).await.unwrap();
                let admin = tokens.create(Role::Admin, &format!("admin-{}", unique())).await.unwrap();
                (admin, tokens.create(Role::View, &format!("view-{}", unique())).await.unwrap())
            }
        };
        let tls = TlsMaterial {
            cert_pem: pki.server.cert_pem.clone().into_bytes(),
            key_pem: pki.server.key_pem.clone().into_bytes(),
            client_ca_pem: pki.ca.cert_pem.clone().into_bytes(),
        };
        let config = CentralConfig {
            data_dir: data_dir.to_owned(),
            min_free_bytes: options.min_free_bytes,
            hot_cache_bytes: 16 << 20,
            store_layout: options.store_layout,
            database: options.database,
            tls,
            allow_anonymous_reads: options.allow_anonymous_reads,
            upstream: options.upstream,
            limits: options.limits,
            trusted_keys: options.trusted_keys,
        };
        let central = server::Central::open(config).await.unwrap();
        let metrics = central.metrics().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(central.run(listener, async {
            let _ = stopped.await;
        }));
        Central {
            address,
            data_dir: data_dir.to_owned(),
            admin_token,
            view_token,
            metrics,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Stops the server and re-raises its error or panic, if any.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("Central stops within 30 s")
            .expect("Central's task did not panic")
            .expect("Central ran without error");
    }

    pub fn admin(&self, pki: &TestPki, token: &str) -> AdminClient {
        admin_client::connect(&self.address, pki.ca.cert_pem.clone().into_bytes(), token, Duration::from_secs(5))
            .unwrap()
    }

    pub fn collector(&self, pki: &TestPki, identity: Option<&CertifiedKey>) -> CentralClient {
        CentralClient::new(&self.address, &pki.tls_with(identity), Duration::from_secs(5)).unwrap()
    }
}

impl Drop for Central {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Writes under way or left behind: files in a per-file store's `tmp/`,
/// packs that do not end with a whole record.
pub fn tmp_files(data_dir: &Path) -> usize {
    let files = std::fs::read_dir(data_dir.join("tmp")).map(|d| d.count()).unwrap_or(0);
    files + central_probes::store::pack::inspect::unfinished_packs(data_dir).unwrap()
}

/// Counts the probes stored in `data_dir` (in packs, or as files),
/// asserting that each one is whole: its bytes hash to the digest in its
/// header, and are what the package `spec` describes.
pub fn whole_probes_on_disk(data_dir: &Path, spec: &central_probes::synthetic::PackageSpec) -> usize {
    let mut count = 0;
    for (path, digest, content) in central_probes::store::pack::inspect::probes_on_disk(data_dir).unwrap() {
        assert_eq!(probe_api::digest::Sha256Digest::of(&content), digest, "{path}");
        assert_eq!(content, spec.probe_bytes(&path.to_string()), "{path}");
        count += 1;
    }
    for module in std::fs::read_dir(data_dir.join("probes")).into_iter().flatten() {
        let module = module.unwrap().path();
        for file in std::fs::read_dir(&module).unwrap() {
            let file = file.unwrap().path();
            let (digest, content) = central_probes::store::filesystem::read_probe_file(&file).unwrap();
            assert_eq!(probe_api::digest::Sha256Digest::of(&content), digest, "{}", file.display());
            let path = format!(
                "{}/{}",
                module.file_name().unwrap().to_str().unwrap(),
                file.file_name().unwrap().to_str().unwrap()
            );
            assert_eq!(content, spec.probe_bytes(&path), "{path}");
            count += 1;
        }
    }
    count
}

/// Serves `routes` (a fake of Central or of its upstream) over TLS with
/// Central's test certificate on a free loopback port: its address, and the
/// task to abort at the end.
pub async fn serve_fake(pki: &TestPki, routes: tonic::service::Routes) -> (String, JoinHandle<()>) {
    use tonic::transport::{Identity, Server, ServerTlsConfig};
    server::install_crypto_provider();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(&pki.server.cert_pem, &pki.server.key_pem));
    let server = Server::builder().tls_config(tls).unwrap().add_routes(routes);
    let task = tokio::spawn(async move {
        let _ = server.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)).await;
    });
    (address, task)
}

/// A static HTTPS bucket: Python's file server over TLS with the test
/// server certificate, serving `files`; stopped when dropped.
pub struct HttpsBucket {
    child: std::process::Child,
    pub port: String,
}

impl Drop for HttpsBucket {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an `HttpsBucket` of `files`, its certificate written to `dir`.
pub fn https_bucket(pki: &TestPki, dir: &Path, files: &Path) -> HttpsBucket {
    https_bucket_with(pki, dir, files, &[])
}

/// `https_bucket` with more arguments for the script (`--endless BYTES`).
pub fn https_bucket_with(pki: &TestPki, dir: &Path, files: &Path, extra: &[&str]) -> HttpsBucket {
    let (cert, key) = (dir.join("server.pem"), dir.join("server-key.pem"));
    std::fs::write(&cert, &pki.server.cert_pem).unwrap();
    std::fs::write(&key, &pki.server.key_pem).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/https_bucket.py");
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .args([files, &cert, &key])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let port = line.trim().strip_prefix("listening on ").unwrap().to_owned();
    HttpsBucket { child, port }
}

/// Uploads one file under `path` with `signature` in its trailer,
/// replacing what is there: the call's outcome.
pub async fn upload_signed(
    central: &Central,
    pki: &TestPki,
    path: &str,
    bytes: &[u8],
    signature: Option<&[u8]>,
) -> Result<(), tonic::Status> {
    use probe_api::v1::upload_probes_request::Message;
    use probe_api::v1::{UploadOptions, UploadProbesRequest};
    let options = UploadOptions { overwrite: true };
    let mut messages = vec![UploadProbesRequest { message: Some(Message::Options(options)) }];
    messages.extend(central_probes::server::upload_session::file_messages(path, bytes, 1 << 20));
    if let Some(Message::FileTrailer(trailer)) = &mut messages.last_mut().unwrap().message {
        trailer.signature = signature.unwrap_or_default().to_vec().into();
    }
    central.admin(pki, &central.admin_token).upload_probes(tokio_stream::iter(messages)).await.map(drop)
}

/// The upstream of `kind` as the tests reach it: the test CA, no proxy,
/// quick timeouts, a cache of 1 GiB in `cache_dir`.
pub fn upstream_config(
    pki: &TestPki,
    kind: central_probes::server::upstream::UpstreamKind,
    cache_dir: &Path,
) -> UpstreamConfig {
    UpstreamConfig {
        kind,
        tls: pki.tls_with(None),
        proxies: Default::default(),
        connect_timeout: Duration::from_secs(2),
        fetch_timeout: Duration::from_secs(10),
        cache_dir: cache_dir.to_owned(),
        cache_max_bytes: 1 << 30,
        min_free_bytes: 0,
        not_found_ttl: Duration::from_secs(30),
        view_token: None,
    }
}
