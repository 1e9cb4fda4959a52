//! `collector-client`: the Collector's probe fetch as a command. This file
//! parses flags and prints results; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use collector_client::central::CentralClient;
use probe_api::names::{ModuleVersion, ProbeFileName};
use probe_api::transport::ClientTls;

#[derive(Parser)]
#[command(version, about = "Fetch the kernel probe for this node from Central")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch the eBPF probe for a kernel from Central over mutual TLS.
    GetProbe {
        #[arg(long, env = "MODULE_VERSION")]
        module_version: String,
        /// The kernel release; `uname -r` when not given.
        #[arg(long, env = "KERNEL_VERSION")]
        kernel: Option<String>,
        /// Central's address, HOST:PORT.
        #[arg(long, env = "GRPC_SERVER")]
        central: String,
        /// CA certificate that signed Central's certificate (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// This Collector's client certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// This Collector's client key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// Where to write the probe.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let Command::GetProbe { module_version, kernel, central, ca, cert, key, out } = Cli::parse().command;
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = runtime.block_on(async {
        let read = |path: &PathBuf| std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()));
        let module_version = ModuleVersion::parse(&module_version).map_err(|e| e.to_string())?;
        let kernel = match kernel {
            Some(kernel) => kernel,
            None => std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .map_err(|e| format!("reading the kernel release: {e}"))?,
        };
        let file_name = ProbeFileName::ebpf(&kernel).map_err(|e| e.to_string())?;
        let tls = ClientTls { ca_pem: read(&ca)?, identity: Some((read(&cert)?, read(&key)?)) };
        let client = CentralClient::new(&central, &tls, Duration::from_secs(2))?;
        let probe = client
            .fetch(module_version.as_str(), file_name.as_str())
            .await
            .map_err(|e| format!("fetching {module_version}/{file_name} from Central: {e}"))?;
        std::fs::write(&out, &probe.bytes).map_err(|e| format!("writing {}: {e}", out.display()))?;
        println!(
            "wrote {} ({} bytes, SHA-256 {}) for kernel {kernel}, served by Central ({:?})",
            out.display(),
            probe.bytes.len(),
            probe.sha256,
            probe.source
        );
        Ok::<_, String>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
