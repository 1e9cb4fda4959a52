//! End to end through the `central-probes serve` binary itself: the bound
//! address in the log, offline mode, and a clean stop on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestPki;
use tonic::Code;

/// A running `central-probes serve` and the address it logged.
struct Served {
    child: Child,
    address: String,
    log: std::sync::mpsc::Receiver<String>,
}

fn serve(pki: &TestPki, data_dir: &Path, extra: &[&str]) -> Served {
    let dir = pki.dir.path();
    std::fs::write(dir.join("server.pem"), &pki.server.cert_pem).unwrap();
    std::fs::write(dir.join("server-key.pem"), &pki.server.key_pem).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_central-probes"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir.to_str().unwrap()])
        .args(["--tls-cert", dir.join("server.pem").to_str().unwrap()])
        .args(["--tls-key", dir.join("server-key.pem").to_str().unwrap()])
        .args(["--client-ca", pki.ca_file().to_str().unwrap()])
        .args(extra)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, log) = std::sync::mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let address = loop {
        let line = log.recv_timeout(Duration::from_secs(20)).expect("Central logs its address");
        if let Some((_, rest)) = line.split_once("listening on ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    Served { child, address, log }
}

impl Served {
    /// Sends SIGTERM and waits for the exit status.
    fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        // SAFETY: kill(2) with a child's pid and a valid signal number.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "Central did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, self.log.try_iter().collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mode_never_contacts_the_upstream_and_sigterm_stops_cleanly() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    // Stands where the upstream would be; it must never see a connection.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    upstream.set_nonblocking(true).unwrap();
    let upstream_url = format!("https://{}", upstream.local_addr().unwrap());
    let ca = pki.ca_file();
    let served = serve(
        &pki,
        &dir.path().join("data"),
        &["--upstream", &upstream_url, "--upstream-ca", ca.to_str().unwrap(), "--offline"],
    );
    assert!(!served.address.ends_with(":0"), "the bound port is logged: {}", served.address);

    let client = collector_client::central::CentralClient::new(
        &served.address,
        &pki.tls_with(Some(&pki.collector)),
        Duration::from_secs(5),
    )
    .unwrap();
    let error = client.fetch("2.5.0", "collector-ebpf-5.4.0.o.gz").await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error}");
    let accepted = upstream.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "no connection to the upstream: {accepted:?}"
    );

    let (status, log) = served.terminate();
    assert!(status.success(), "{status:?}\n{}", log.join("\n"));
    assert!(log.iter().any(|l| l.contains("server stopped")), "{}", log.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_upstream_configured_a_miss_goes_to_it() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_url = format!("https://{}", upstream.local_addr().unwrap());
    let ca = pki.ca_file();
    let served = serve(
        &pki,
        &dir.path().join("data"),
        &["--upstream", &upstream_url, "--upstream-ca", ca.to_str().unwrap(), "--upstream-timeout", "1s"],
    );
    let client = collector_client::central::CentralClient::new(
        &served.address,
        &pki.tls_with(Some(&pki.collector)),
        Duration::from_secs(5),
    )
    .unwrap();
    // The "upstream" accepts but never speaks TLS: the fetch times out.
    let error = client.fetch("2.5.0", "collector-ebpf-5.4.0.o.gz").await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    upstream.set_nonblocking(true).unwrap();
    assert!(upstream.accept().is_ok(), "Central did connect to the upstream");
    let (status, _) = served.terminate();
    assert!(status.success());
}
