//! Real OCI registries for the tests: Debian's `docker-registry` (the CNCF
//! distribution registry) on a free loopback port, with TLS (the tests'
//! own CA) and htpasswd auth, in a scratch directory of its own, stopped
//! when dropped; and `skopeo`, the copier air-gapped sites mirror with.
//!
//! The binaries come from `DOCKER_REGISTRY_BIN`, `SKOPEO_BIN` and
//! `HTPASSWD_BIN`, else `PATH`; without them a test fails saying how to
//! install them (`.ci/run` does), never skips.

#![allow(dead_code)] // each test file uses a different part of it

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::TestPki;

/// A binary from `variable`, else `name` on PATH; fails saying how to get it.
pub fn tool(variable: &str, name: &str, package: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "the registry tests need `{name}` (Debian's {package}): apt-get install {package}, or set {variable}; \
             .ci/run installs it"
        )
    })
}

/// A running registry.
pub struct TestRegistry {
    child: Child,
    /// `127.0.0.1:PORT`, as references and the auth file name it.
    pub address: String,
    pub user: String,
    pub password: String,
    /// containers-auth.json with this registry's credentials.
    pub auth_file: PathBuf,
    /// `ca.crt` for skopeo's `--*-cert-dir`.
    pub cert_dir: PathBuf,
    pub dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts a registry trusting nobody without the test credentials.
    pub fn start(pki: &TestPki) -> TestRegistry {
        Self::start_with(pki, None)
    }

    /// With `token` (a realm URL and the PEM certificate whose key signs
    /// the tokens), a registry that wants Bearer tokens from that realm
    /// instead of passwords.
    pub fn start_with(pki: &TestPki, token: Option<(&str, &str)>) -> TestRegistry {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (user, password) = ("mirror".to_owned(), format!("pw-{}", std::process::id()));
        let htpasswd = Command::new(tool("HTPASSWD_BIN", "htpasswd", "apache2-utils"))
            .args(["-Bbn", &user, &password])
            .output()
            .unwrap();
        assert!(htpasswd.status.success(), "htpasswd: {}", String::from_utf8_lossy(&htpasswd.stderr));
        std::fs::write(root.join("htpasswd"), &htpasswd.stdout).unwrap();
        std::fs::write(root.join("server.pem"), &pki.server.cert_pem).unwrap();
        std::fs::write(root.join("server-key.pem"), &pki.server.key_pem).unwrap();
        let cert_dir = root.join("certs");
        std::fs::create_dir(&cert_dir).unwrap();
        std::fs::write(cert_dir.join("ca.crt"), &pki.ca.cert_pem).unwrap();
        // The registry takes its port from its config: ask the kernel for
        // a free one first.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address = format!("127.0.0.1:{port}");
        let r = root.display();
        let auth = match token {
            None => format!("auth:\n  htpasswd:\n    realm: test-registry\n    path: {r}/htpasswd\n"),
            Some((realm, signer)) => {
                std::fs::write(root.join("token-signer.pem"), signer).unwrap();
                format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: test-registry\n    issuer: test-issuer\n    \
                     rootcertbundle: {r}/token-signer.pem\n"
                )
            }
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {r}/data\n  delete:\n    enabled: true\n\
             http:\n  addr: {address}\n  secret: test-secret\n  tls:\n    certificate: {r}/server.pem\n    key: {r}/server-key.pem\n{auth}"
        );
        std::fs::write(root.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(root.join("registry.log")).unwrap();
        let child = Command::new(tool("DOCKER_REGISTRY_BIN", "docker-registry", "docker-registry"))
            .arg("serve")
            .arg(root.join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let auth_file = root.join("auth.json");
        std::fs::write(&auth_file, format!(r#"{{"auths": {{"{address}": {{"auth": "{auth}"}}}}}}"#)).unwrap();
        let registry = TestRegistry { child, address, user, password, auth_file, cert_dir, dir };
        registry.wait_until_up();
        registry
    }

    fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.address).is_err() {
            assert!(Instant::now() < deadline, "the registry did not listen:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.cert_dir.join("ca.crt")
    }

    /// What the registry logged (its access log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Requests of its access log whose request line contains `what`
    /// (`"PUT /v2/`, `blobs/uploads`).
    pub fn requests(&self, what: &str) -> usize {
        self.log().lines().filter(|line| line.contains("\" ") && line.contains(what)).count()
    }

    /// Every request it answered so far.
    pub fn request_count(&self) -> usize {
        self.log().lines().filter(|line| line.contains("\"GET /v2/") || line.contains("\"HEAD /v2/")).count()
    }

    /// The blob files it stores.
    pub fn blob_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let blobs = self.dir.path().join("data/docker/registry/v2/blobs/sha256");
        for prefix in std::fs::read_dir(&blobs).into_iter().flatten() {
            for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
                files.push(blob.unwrap().path().join("data"));
            }
        }
        files
    }

    /// The stored file of blob `digest` (`sha256:...`).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir.path().join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `skopeo copy --all` from `source` to `destination` (`docker://` or
/// `oci:` references), with each registry's credentials and CA.
pub fn skopeo_copy(source: (&str, Option<&TestRegistry>), destination: (&str, Option<&TestRegistry>)) {
    let mut command = Command::new(tool("SKOPEO_BIN", "skopeo", "skopeo"));
    command.args(["copy", "--all", "--retry-times", "0"]);
    if let Some(registry) = source.1 {
        command.arg("--src-cert-dir").arg(&registry.cert_dir);
        command.args(["--src-creds", &format!("{}:{}", registry.user, registry.password)]);
    }
    if let Some(registry) = destination.1 {
        command.arg("--dest-cert-dir").arg(&registry.cert_dir);
        command.args(["--dest-creds", &format!("{}:{}", registry.user, registry.password)]);
    }
    // No policy file is installed with the Debian package everywhere.
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(policy.path(), r#"{"default": [{"type": "insecureAcceptAnything"}]}"#).unwrap();
    command.arg("--policy").arg(policy.path());
    let output = command.args([source.0, destination.0]).output().unwrap();
    assert!(
        output.status.success(),
        "skopeo copy {} {}: {}",
        source.0,
        destination.0,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The Python interpreter with the `oras` package: `ORAS_PYTHON`, else the
/// repository's `.venv`; fails saying how to get it.
pub fn oras_python() -> PathBuf {
    let python = std::env::var_os("ORAS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    let ok = Command::new(&python).args(["-c", "import oras.provider"]).output().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the registry tests read the artifact with the `oras` Python package: python3 -m venv .venv && \
         .venv/bin/pip install oras==0.2.43 (.ci/run does), or set ORAS_PYTHON"
    );
    python
}
