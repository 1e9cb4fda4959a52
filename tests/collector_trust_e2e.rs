//! End to end: the Collector against hostile or broken peers and a hostile
//! node. What a peer says reaches the crash-loop report escaped; each kind
//! of failure gets the advice that fits it, TLS with a download site its
//! own; an endless answer is cut off in bounded memory; a temporary file
//! left by a killed run never wedges the next one, also as pid 1.

mod common;
#[path = "common/connect_proxy.rs"]
mod connect_proxy;

use std::path::Path;
use std::pin::Pin;

use common::{Central, TestPki};
use connect_proxy::ConnectProxy;
use probe_api::v1::probe_service_server::{ProbeService, ProbeServiceServer};
use probe_api::v1::{GetProbeRequest, GetProbeResponse};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

const MODULE: &str = "2.5.0";
const KERNEL: &str = "5.14.0-284.11.1.el9_2.x86_64";

/// `collector-client get-probe` for KERNEL with this test's identity and
/// `extra`, retried for at most a second: exit code, stderr, and the
/// child's peak resident memory in KiB.
// The child is reaped by wait4, which also gives its peak memory.
#[allow(clippy::zombie_processes)]
fn get_probe(pki: &TestPki, dir: &Path, extra: &[&str], wrapper: &[&str]) -> (i32, String, i64) {
    std::fs::write(dir.join("collector.pem"), &pki.collector.cert_pem).unwrap();
    std::fs::write(dir.join("collector-key.pem"), &pki.collector.key_pem).unwrap();
    let path = |name: &str| dir.join(name).display().to_string();
    let collector = env!("CARGO_BIN_EXE_collector-client");
    let (program, wrapped) = match wrapper {
        [] => (collector, Vec::new()),
        [program, args @ ..] => (*program, [args, &[collector]].concat()),
    };
    let mut command = std::process::Command::new(program);
    command.args(wrapped).args(["get-probe", "--collection-method", "ebpf", "--module-version", MODULE]);
    command.args(["--kernel-candidates", KERNEL]);
    if !extra.contains(&"--ca") {
        command.args(["--ca", &pki.ca_file().display().to_string()]);
    }
    command.args(["--cert", &path("collector.pem"), "--key", &path("collector-key.pem"), "--out", &path("probe.o")]);
    command.args(["--retry-interval", "100ms", "--retry-budget", "1s", "--connect-timeout", "500ms"]).args(extra);
    for name in ["GRPC_SERVER", "MODULE_DOWNLOAD_BASE_URL", "PROBE_TRUSTED_KEYS", "https_proxy", "HTTPS_PROXY"] {
        command.env_remove(name);
    }
    command.env("SSL_CERT_FILE", pki.ca_file());
    let mut child = command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let stderr = std::thread::spawn({
        let mut pipe = child.stderr.take().unwrap();
        move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut pipe, &mut text).unwrap();
            text
        }
    });
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: waits for our own child; status and usage are valid outputs.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    (code, stderr.join().unwrap(), usage.ru_maxrss)
}

/// A Central that answers every GetProbe with this code and message.
struct Saying(Code, &'static str);

#[tonic::async_trait]
impl ProbeService for Saying {
    type GetProbeStream = Pin<Box<dyn Stream<Item = Result<GetProbeResponse, Status>> + Send>>;

    async fn get_probe(&self, _: Request<GetProbeRequest>) -> Result<Response<Self::GetProbeStream>, Status> {
        Err(Status::new(self.0, self.1))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_hostile_central_says_cannot_forge_the_report() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let forged = "gone\nWhat an admin can do:\n  - nothing, all is well\u{1b}[2J\r";
    let routes = tonic::service::Routes::new(ProbeServiceServer::new(Saying(Code::NotFound, forged)));
    let (address, server) = common::serve_fake(&pki, routes).await;
    let (code, stderr, _) = get_probe(&pki, dir.path(), &["--central", &address], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(!stderr.contains("\n  - nothing"), "a line of Central's own: {stderr}");
    assert!(!stderr.contains('\u{1b}') && !stderr.contains('\r'), "{stderr:?}");
    assert!(stderr.contains(r"gone\nWhat an admin can do:\n  - nothing, all is well\u{1b}[2J\r"), "{stderr}");
    assert!(stderr.contains("upload a kernel support package"), "not found: {stderr}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_gets_advice_that_fits_it() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let upload = "upload a kernel support package";

    let (code, stderr, _) = get_probe(&pki, dir.path(), &["--central", "127.0.0.1:1"], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot connect to 127.0.0.1:1: Connection refused"), "{stderr}");
    assert!(stderr.contains("could not be reached") && !stderr.contains(upload), "{stderr}");

    let central = Central::start(&pki, &dir.path().join("central")).await;
    let not_a_ca = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_a_ca, &pki.collector.key_pem).unwrap();
    let extra = ["--central", &central.address, "--ca", &not_a_ca.display().to_string()];
    let (code, stderr, _) = get_probe(&pki, dir.path(), &extra, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("{} holds no PEM certificate", not_a_ca.display())), "{stderr}");

    let other = TestPki::new();
    let foreign_ca = dir.path().join("foreign-ca.pem");
    std::fs::write(&foreign_ca, &other.ca.cert_pem).unwrap();
    let extra = ["--central", &central.address, "--ca", &foreign_ca.display().to_string()];
    let (code, stderr, _) = get_probe(&pki, dir.path(), &extra, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("TLS with {} failed", central.address)), "{stderr}");
    assert!(stderr.contains("TLS failed (above): check that --ca") && !stderr.contains(upload), "{stderr}");

    let (code, stderr, _) = get_probe(&pki, dir.path(), &["--central", &central.address], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(upload) && !stderr.contains("TLS failed"), "{stderr}");
    central.stop().await;

    let damaged = "the stored probe 2.5.0/collector-ebpf-x.o.gz does not match its record";
    let routes = tonic::service::Routes::new(ProbeServiceServer::new(Saying(Code::DataLoss, damaged)));
    let (address, server) = common::serve_fake(&pki, routes).await;
    let (code, stderr, _) = get_probe(&pki, dir.path(), &["--central", &address], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("stored copy of the probe is damaged (above): `central-probes verify`"), "{stderr}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failing_with_a_download_site_is_advised_on_what_the_collector_trusts_for_it() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    // The site's certificate comes from a CA that SSL_CERT_FILE does not hold.
    let bucket = common::https_bucket(&TestPki::new(), dir.path(), dir.path());
    let base = format!("https://localhost:{}/modules", bucket.port);
    let bundle = format!("SSL_CERT_FILE ({})", pki.ca_file().display());
    let central_advice = ["--ca is the CA", "SNI_HOSTNAME", "--cert", "cluster CA"];

    let (code, stderr, _) = get_probe(&pki, dir.path(), &["--module-download-base-url", &base], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("invalid peer certificate"), "{stderr}");
    assert!(stderr.contains(&format!("TLS with the download site failed (above): check that {bundle}")), "{stderr}");
    assert!(stderr.contains("that the certificate names localhost"), "{stderr}");
    assert!(!stderr.contains("https_proxy"), "no proxy is set: {stderr}");
    assert!(central_advice.iter().all(|advice| !stderr.contains(advice)), "{stderr}");

    let proxy = ConnectProxy::start().await;
    let https_proxy = format!("https_proxy=http://{}", proxy.address);
    let (code, stderr, _) = get_probe(&pki, dir.path(), &["--module-download-base-url", &base], &["env", &https_proxy]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("through the proxy http://{} (https_proxy)", proxy.address)), "{stderr}");
    assert!(central_advice.iter().all(|advice| !stderr.contains(advice)), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_answer_from_a_bucket_is_cut_off_in_bounded_memory() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let gib = (1u64 << 30).to_string();
    let bucket = common::https_bucket_with(&pki, dir.path(), dir.path(), &["--endless", &gib]);
    let base = format!("https://localhost:{}/modules", bucket.port);
    let (code, stderr, peak_kib) = get_probe(&pki, dir.path(), &["--module-download-base-url", &base], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(peak_kib < 256 << 10, "peak RSS {peak_kib} KiB");
    assert!(stderr.contains(&format!("more than {} bytes", 32 << 20)), "{stderr}");
    assert!(!dir.path().join("probe.o").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_temporary_file_never_wedges_the_collector_as_pid_1() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let builtin = dir.path().join("builtin");
    std::fs::create_dir(&builtin).unwrap();
    std::fs::write(builtin.join(format!("collector-ebpf-{KERNEL}.o")), b"the probe").unwrap();
    // What a run killed mid-write leaves, under this and the former name
    // (the pid, 1 in a container), one of them a symlink.
    std::fs::write(dir.path().join(".probe.o.tmp"), b"half a probe").unwrap();
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join(".probe.o.1.tmp")).unwrap();
    let builtin = builtin.display().to_string();
    // A new pid namespace makes the Collector pid 1, as in a container.
    let as_pid_1 = ["unshare", "--pid", "--fork"];
    let (code, stderr, _) = get_probe(&pki, dir.path(), &["--builtin-dir", &builtin], &as_pid_1);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read(dir.path().join("probe.o")).unwrap(), b"the probe");
    assert!(!dir.path().join(".probe.o.tmp").exists(), "the leftover is removed");
    assert!(!dir.path().join("elsewhere").exists(), "a symlink is never followed");
    let (code, stderr, _) = get_probe(&pki, dir.path(), &["--builtin-dir", &builtin], &as_pid_1);
    assert_eq!(code, 0, "and again: {stderr}");
}
