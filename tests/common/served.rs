//! `central-probes serve` run as a process, for tests of the binary itself
//! (signals, kill -9, resource limits). Only the tests of the
//! central-probes package can use it: it needs that package's binary.

#![allow(dead_code)] // each test file uses a different part of it

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::TestPki;

/// A running `central-probes serve` and the address it logged.
pub struct Served {
    pub child: Child,
    pub address: String,
    /// What Central logged up to its address.
    pub startup_log: Vec<String>,
    pub log: std::sync::mpsc::Receiver<String>,
    /// Lines `log_line` read past on its way to the one it wanted.
    passed: std::sync::Mutex<Vec<String>>,
}

pub fn serve(pki: &TestPki, data_dir: &Path, extra: &[&str]) -> Served {
    spawn(pki, data_dir, extra, None, &[])
}

/// `serve`, with the open descriptor limit (soft and hard) set to
/// `descriptors` when given.
pub fn serve_with_descriptor_limit(pki: &TestPki, data_dir: &Path, extra: &[&str], descriptors: Option<u64>) -> Served {
    spawn(pki, data_dir, extra, descriptors, &[])
}

/// `serve` with these environment variables (and no proxy settings but
/// these).
pub fn serve_with_env(pki: &TestPki, data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Served {
    spawn(pki, data_dir, extra, None, env)
}

fn spawn(pki: &TestPki, data_dir: &Path, extra: &[&str], descriptors: Option<u64>, env: &[(&str, &str)]) -> Served {
    use std::os::unix::process::CommandExt;
    let dir = pki.dir.path();
    std::fs::write(dir.join("server.pem"), &pki.server.cert_pem).unwrap();
    std::fs::write(dir.join("server-key.pem"), &pki.server.key_pem).unwrap();
    // CENTRAL_PROBES_BIN runs the same test against another build (say, an
    // older one, for before-and-after figures).
    let binary = std::env::var("CENTRAL_PROBES_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_central-probes").into());
    let mut command = Command::new(binary);
    if let Some(descriptors) = descriptors {
        // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit { rlim_cur: descriptors, rlim_max: descriptors };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir.to_str().unwrap()])
        .args(["--tls-cert", dir.join("server.pem").to_str().unwrap()])
        .args(["--tls-key", dir.join("server-key.pem").to_str().unwrap()])
        .args(["--client-ca", pki.ca_file().to_str().unwrap()])
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .envs(env.iter().copied())
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
    let mut seen = Vec::new();
    let address = loop {
        let line = log
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("Central did not log its address ({e}):\n{}", seen.join("\n")));
        seen.push(line.clone());

        if let Some((_, rest)) = line.split_once("listening on ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    Served { child, address, startup_log: seen, log, passed: Default::default() }
}

/// A Central a failed test left running would hold its data directory.
impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// The next line of Central's log that contains `wanted` (within 20 s
    /// of the one before).
    pub fn log_line(&self, wanted: &str) -> String {
        let mut seen = Vec::new();
        loop {
            match self.log.recv_timeout(Duration::from_secs(20)) {
                Ok(line) if line.contains(wanted) => {
                    self.passed.lock().unwrap().extend(seen);
                    return line;
                }
                Ok(line) => seen.push(line),
                Err(e) => panic!("no line with {wanted:?} in Central's log ({e}):\n{}", seen.join("\n")),
            }
        }
    }

    /// Central's metrics, from its `--metrics-listen` endpoint.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Logged at start, maybe after the address, so maybe read past since.
        let passed = self.passed.lock().unwrap().clone();
        let known = self.startup_log.iter().chain(&passed).find(|line| line.contains("metrics on http://")).cloned();
        let line = known.unwrap_or_else(|| self.log_line("metrics on http://"));
        let address = line.split("metrics on http://").nth(1).unwrap().split('/').next().unwrap().to_owned();
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    }

    /// kill -9: no chance to clean up.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
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

/// The value of the line of Prometheus text `metrics` that starts with
/// `name{` and holds `label`.
pub fn metric(metrics: &str, name: &str, label: &str) -> Option<u64> {
    let line = metrics.lines().find(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))?;
    line.rsplit(' ').next()?.parse().ok()
}
