//! End to end: the HTTPS route `/kernel-objects/<module version>/<file>`
//! that Collectors of the product this replaces call, driven by a real
//! HTTP client (curl) over HTTP/1.1 and HTTP/2 with mutual TLS.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use central_probes::pki::CertifiedKey;
use common::{Central, CentralOptions, TestPki};
use probe_api::digest::Sha256Digest;
use probe_api::v1::upload_probes_request::Message;
use probe_api::v1::{UploadOptions, UploadProbesRequest};

const MODULE: &str = "2.5.0";
const FILE: &str = "collector-ebpf-5.14.0-284.11.1.el9_2.x86_64.o.gz";

/// A gzip'd probe file of about 300 KB: several chunks, several h2 frames.
fn probe_file() -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    let object: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    encoder.write_all(&object).unwrap();
    encoder.finish().unwrap()
}

async fn central_with_probe(pki: &TestPki, dir: &Path, options: CentralOptions) -> (Central, Vec<u8>) {
    let central = Central::start_with(pki, &dir.join("central"), options).await;
    let file = probe_file();
    let mut admin = central.admin(pki, &central.admin_token);
    let mut messages = vec![UploadProbesRequest { message: Some(Message::Options(UploadOptions::default())) }];
    messages.extend(central_probes::server::uploads::file_messages(&format!("{MODULE}/{FILE}"), &file, 64 << 10));
    admin.upload_probes(tokio_stream::iter(messages)).await.unwrap();
    (central, file)
}

/// What curl got.
#[derive(Debug)]
struct Fetched {
    status: u16,
    http_version: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Fetched {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A certificate file and its key file, for curl.
type Identity = (PathBuf, PathBuf);

/// The identity files curl is given.
fn identity_files(dir: &Path, name: &str, identity: &CertifiedKey) -> Identity {
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&cert, &identity.cert_pem).unwrap();
    std::fs::write(&key, &identity.key_pem).unwrap();
    (cert, key)
}

/// Runs curl against Central at `address`: the answer, or curl's exit code
/// and message when there was none (a refused TLS handshake).
fn curl(
    pki: &TestPki,
    address: &str,
    path: &str,
    identity: Option<&Identity>,
    extra: &[&str],
) -> Result<Fetched, String> {
    let out = tempfile::tempdir().unwrap();
    let (body, headers) = (out.path().join("body"), out.path().join("headers"));
    let port = address.rsplit(':').next().unwrap();
    let mut command = Command::new("curl");
    command
        .args(["--silent", "--show-error", "--max-time", "20", "--cacert"])
        .arg(pki.ca_file())
        .arg("--output")
        .arg(&body)
        .arg("--dump-header")
        .arg(&headers)
        .args(["--write-out", "%{http_code} %{http_version}"])
        .args(extra);
    if let Some((cert, key)) = identity {
        command.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let output = command
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .expect("curl is installed (.ci/run installs it)");
    if !output.status.success() {
        return Err(format!("curl exit {:?}: {}", output.status.code(), String::from_utf8_lossy(&output.stderr)));
    }
    let written = String::from_utf8(output.stdout).unwrap();
    let (status, http_version) = written.split_once(' ').unwrap();
    let headers = std::fs::read_to_string(&headers)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Ok(Fetched {
        status: status.parse().unwrap(),
        http_version: http_version.to_owned(),
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_the_collector_certificate_gets_the_exact_bytes_over_http1_and_http2() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (central, file) = central_with_probe(&pki, dir.path(), CentralOptions::default()).await;
    let collector = identity_files(dir.path(), "collector", &pki.collector);
    let sha256 = Sha256Digest::of(&file);
    let path = format!("/kernel-objects/{MODULE}/{FILE}");
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        // The product's CI builds of the Collector add this query string.
        let with_query = format!("{path}?cid=collector");
        let got = tokio::task::block_in_place(|| curl(&pki, &central.address, &with_query, Some(&collector), &[flag]))
            .unwrap();
        assert_eq!((got.status, got.http_version.as_str()), (200, version), "{got:?}");
        assert!(got.body == file, "{flag}: {} bytes, not the {} uploaded", got.body.len(), file.len());
        assert_eq!(got.header("content-type"), Some("application/gzip"));
        assert_eq!(got.header("content-disposition"), Some(format!("attachment; filename=\"{FILE}\"").as_str()));
        assert_eq!(got.header("content-length"), Some(file.len().to_string().as_str()));
        assert_eq!(got.header("etag"), Some(format!("\"{}\"", sha256.to_hex()).as_str()));
        let digest = got.header("digest").unwrap().strip_prefix("sha-256=").unwrap();
        assert_eq!(base64_decode(digest), sha256.0, "{flag}: the Digest header is the SHA-256 in base64");

        let head =
            tokio::task::block_in_place(|| curl(&pki, &central.address, &path, Some(&collector), &[flag, "--head"]))
                .unwrap();
        assert_eq!(head.status, 200, "{head:?}");
        assert_eq!(head.header("content-length"), Some(file.len().to_string().as_str()), "{flag} HEAD");
        assert_eq!(head.header("etag"), got.header("etag"));
    }
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_invalid_names_unauthenticated_callers_and_other_methods_get_their_status() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (central, _) = central_with_probe(&pki, dir.path(), CentralOptions::default()).await;
    let collector = identity_files(dir.path(), "collector", &pki.collector);
    let fetch = |path: &str, identity: Option<&Identity>, extra: &[&str]| {
        tokio::task::block_in_place(|| curl(&pki, &central.address, path, identity, extra))
    };
    let cases: [(&str, Option<&Identity>, &[&str], u16); 6] = [
        ("/kernel-objects/2.5.0/collector-ebpf-9.9.9.o.gz", Some(&collector), &[], 404),
        ("/kernel-objects/2.5.0/not-a-probe.txt", Some(&collector), &[], 400),
        ("/kernel-objects/2.5.0/../etc/passwd", Some(&collector), &["--path-as-is"], 400),
        ("/kernel-objects/2.5.0", Some(&collector), &[], 400),
        (&format!("/kernel-objects/{MODULE}/{FILE}"), None, &[], 401),
        (&format!("/kernel-objects/{MODULE}/{FILE}"), Some(&collector), &["--request", "DELETE"], 405),
    ];
    for (path, identity, extra, status) in cases {
        let got = fetch(path, identity, extra).unwrap();
        assert_eq!(got.status, status, "{path} {extra:?}: {got:?}");
        assert!(!got.body.is_empty(), "{path}: an error says why");
    }
    // A certificate the cluster CA did not sign ends at the TLS handshake.
    let foreign = identity_files(dir.path(), "foreign", &pki.foreign_collector);
    let refused = fetch(&format!("/kernel-objects/{MODULE}/{FILE}"), Some(&foreign), &[]);
    assert!(refused.is_err(), "a foreign certificate was served: {refused:?}");
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_anonymous_reads_allowed_no_certificate_is_needed() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let options = CentralOptions { allow_anonymous_reads: true, ..CentralOptions::default() };
    let (central, file) = central_with_probe(&pki, dir.path(), options).await;
    let path = format!("/kernel-objects/{MODULE}/{FILE}");
    let got = tokio::task::block_in_place(|| curl(&pki, &central.address, &path, None, &[])).unwrap();
    assert_eq!(got.status, 200);
    assert!(got.body == file);
    central.stop().await;
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
}
