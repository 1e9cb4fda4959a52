//! A throwaway PostgreSQL cluster for tests: `initdb` into a temporary
//! directory, `pg_ctl start` on a free loopback port, one fresh database per
//! caller, and `pg_ctl stop` when the process exits. Needs PostgreSQL's
//! server binaries: `PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`,
//! else `PATH` (`.ci/run` installs them). As root, the server runs as the
//! `postgres` user, since `initdb` refuses root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The cluster of this process.
pub struct TestCluster {
    port: u16,
    data_dir: PathBuf,
    bin: PathBuf,
    next_db: AtomicUsize,
    /// Server settings beyond the port and address (TLS).
    extra_options: String,
}

static CLUSTER: OnceLock<TestCluster> = OnceLock::new();

impl TestCluster {
    /// A cluster of the caller's own, stopped when dropped: for tests that
    /// stop and restart the database.
    pub fn private() -> TestCluster {
        TestCluster::start(None, "")
    }

    /// A cluster of the caller's own with these server settings
    /// (`-c name=value ...`).
    pub fn private_with_settings(settings: &str) -> TestCluster {
        TestCluster::start(None, settings)
    }

    /// A cluster of the caller's own that also accepts TLS with this
    /// certificate and key (PEM).
    pub fn private_with_tls(cert_pem: &str, key_pem: &str) -> TestCluster {
        TestCluster::start(Some((cert_pem, key_pem)), "")
    }

    /// The cluster shared by this process's tests, started on first use;
    /// panics with the reason if it cannot.
    pub fn get() -> &'static TestCluster {
        CLUSTER.get_or_init(|| {
            let cluster = TestCluster::start(None, "");
            // SAFETY: registers a plain function to run at exit.
            unsafe { libc::atexit(stop_at_exit) };
            cluster
        })
    }

    /// The URL of a new, empty database.
    pub fn new_database(&self) -> String {
        let name = format!("t{}_{}", std::process::id(), self.next_db.fetch_add(1, Ordering::SeqCst));
        self.run("createdb", &["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", &name]);
        self.url(&name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server (`immediate`: like a crash) or starts it again.
    pub fn stop(&self, mode: &str) {
        self.pg_ctl(&["stop", "-m", mode, "-w"]);
    }

    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-l", &self.data_dir.join("log").to_string_lossy(), "-o", &self.options()]);
    }

    fn start(tls: Option<(&str, &str)>, settings: &str) -> TestCluster {
        let bin = server_binaries();
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::SeqCst);
        let base = std::env::temp_dir().join(format!("kprobes-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("making the cluster directory");
        let data_dir = base.join("data");
        let mut extra_options = format!(" {settings}");
        if is_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        if let Some((cert_pem, key_pem)) = tls {
            let (cert, key) = (base.join("server.crt"), base.join("server.key"));
            std::fs::write(&cert, cert_pem).unwrap();
            std::fs::write(&key, key_pem).unwrap();
            // The server refuses a key others may read, or that is not its own.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            if is_root() {
                for file in [&cert, &key] {
                    let status = Command::new("chown").arg("postgres").arg(file).status().unwrap();
                    assert!(status.success(), "chown postgres {}", file.display());
                }
            }
            extra_options +=
                &format!(" -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}", cert.display(), key.display());
        }
        let cluster = TestCluster { port: free_port(), data_dir, bin, next_db: AtomicUsize::new(0), extra_options };
        let data = cluster.data_dir.to_string_lossy().into_owned();
        cluster.run("initdb", &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"]);
        cluster.start_again();
        cluster
    }

    fn options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{}",
            self.port,
            self.data_dir.display(),
            self.extra_options
        )
    }

    fn pg_ctl(&self, args: &[&str]) {
        let mut all = vec!["-D".to_owned(), self.data_dir.to_string_lossy().into_owned()];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.run("pg_ctl", &all);
    }

    fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let mut command = if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        let output = command.args(args).output().unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
        assert!(
            output.status.success(),
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl TestCluster {
    /// Stops the server if it runs and removes its files.
    fn tear_down(&self) {
        let data = self.data_dir.to_string_lossy().into_owned();
        let _ = std::panic::catch_unwind(|| self.run("pg_ctl", &["-D", &data, "stop", "-m", "immediate"]));
        let _ = std::fs::remove_dir_all(self.data_dir.parent().expect("a base directory"));
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.tear_down();
    }
}

extern "C" fn stop_at_exit() {
    if let Some(cluster) = CLUSTER.get() {
        cluster.tear_down();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn server_binaries() -> PathBuf {
    if let Some(bin) = std::env::var_os("PG_BIN") {
        return PathBuf::from(bin);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| d.ok()).map(|d| d.path().join("bin")).filter(|b| b.join("initdb").exists()).collect()
        })
        .unwrap_or_default();
    versions.sort();
    if let Some(newest) = versions.pop() {
        return newest;
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|dir| Path::new(dir).join("initdb").exists()));
    on_path.expect("PostgreSQL's server binaries (initdb, pg_ctl) are needed: set PG_BIN or install postgresql")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
