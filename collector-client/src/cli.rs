//! `collector-client get-probe`: its flags and environment, and the work
//! they start (kernel name candidates, sources, the retrying chain, the
//! read-only output).

use clap::{Parser, Subcommand, ValueEnum};
use collector_client::candidates::{self, HostFacts};
use collector_client::central::CentralClient;
use collector_client::central_https::CentralHttpsClient;
use collector_client::chain::{self, RetryPolicy};
use collector_client::output;
use collector_client::sources::{BuiltinDir, CentralHttpsSource, CentralSource, ProbeSource};
use probe_api::errors::Context;
use probe_api::names::ModuleVersion;
use probe_api::transport::ClientTls;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(version, about = "Get the kernel probe for this node: built into the image, or from Central")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Find the probe for this node's kernel and write it, decompressed.
    GetProbe(GetProbeArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CollectionMethod {
    /// CO-RE eBPF: the probe is built in and fits every kernel.
    #[value(name = "core_bpf", alias = "core-bpf")]
    CoreBpf,
    /// A kernel-specific eBPF probe.
    Ebpf,
}

#[derive(clap::Args)]
pub struct GetProbeArgs {
    #[arg(long, env = "COLLECTION_METHOD", value_enum, ignore_case = true, default_value = "ebpf")]
    pub collection_method: CollectionMethod,
    /// The Collector's module version, e.g. 2.5.0.
    #[arg(long, env = "MODULE_VERSION")]
    module_version: Option<String>,
    /// A file holding the module version (MODULE_VERSION.txt in the image).
    #[arg(long, conflicts_with = "module_version")]
    module_version_file: Option<PathBuf>,
    /// The kernel release; `uname -r` when not given.
    #[arg(long, env = "KERNEL_VERSION")]
    kernel: Option<String>,
    /// Kernel names to try instead of the derived ones, comma-separated.
    #[arg(long, value_delimiter = ',')]
    kernel_candidates: Vec<String>,
    /// The host's os-release, for distribution-specific names.
    #[arg(long, default_value = "/etc/os-release")]
    os_release: PathBuf,
    /// Directory of probes built into the Collector image.
    #[arg(long)]
    builtin_dir: Option<PathBuf>,
    /// Central's address, HOST:PORT.
    #[arg(long, env = "GRPC_SERVER", requires_all = ["ca", "cert", "key"])]
    central: Option<String>,
    /// Fetch from Central's HTTPS route /kernel-objects/ (what Collectors of
    /// the product this replaces call) instead of GetProbe.
    #[arg(long, requires = "central")]
    central_http: bool,
    /// CA certificate (PEM) that signed Central's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// This Collector's client certificate (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// This Collector's client key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Where to write the decompressed probe (read-only); needed for ebpf.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Bound on one try at Central.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Pause between tries at Central (varied by up to a fifth).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    retry_interval: Duration,
    /// Give up after this long.
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
    retry_budget: Duration,
}

/// What stopped `get-probe`, with its causes.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, Context> {
    std::fs::read(path).map_err(Context::of(format!("reading {what} {}", path.display())))
}

fn host_facts(args: &GetProbeArgs) -> Result<HostFacts, Context> {
    let proc = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
            .map(|s| s.trim().to_owned())
            .map_err(Context::of(format!("reading the kernel {name}")))
    };
    let release = match &args.kernel {
        Some(kernel) => kernel.clone(),
        None => proc("osrelease")?,
    };
    let os_release = std::fs::read_to_string(&args.os_release).map(|t| candidates::parse_os_release(&t));
    let os_release = os_release.unwrap_or_default();
    let minikube_version = match os_release.get("ID").map(String::as_str) {
        Some("buildroot") => std::fs::read_to_string("/etc/VERSION").ok(),
        _ => None,
    };
    Ok(HostFacts { release, version: proc("version").unwrap_or_default(), os_release, minikube_version })
}

pub async fn get_probe(args: GetProbeArgs) -> Result<(), CliError> {
    let module_version = match (&args.module_version, &args.module_version_file) {
        (Some(version), _) => version.clone(),
        (None, Some(file)) => String::from_utf8_lossy(&read(file, "the module version file")?).trim().to_owned(),
        (None, None) => return Err("the ebpf collection method needs --module-version or --module-version-file".into()),
    };
    let module_version = ModuleVersion::parse(&module_version)?;
    let candidates = if args.kernel_candidates.is_empty() {
        candidates::candidates(&host_facts(&args)?)
    } else {
        args.kernel_candidates.clone()
    };
    let mut sources: Vec<Box<dyn ProbeSource>> = Vec::new();
    if let Some(dir) = &args.builtin_dir {
        sources.push(Box::new(BuiltinDir { dir: dir.clone(), uncompressed: false }));
        sources.push(Box::new(BuiltinDir { dir: dir.clone(), uncompressed: true }));
    }
    if let (Some(address), Some(ca), Some(cert), Some(key)) = (&args.central, &args.ca, &args.cert, &args.key) {
        let tls = ClientTls {
            ca_pem: read(ca, "the CA certificate")?,
            identity: Some((read(cert, "the client certificate")?, read(key, "the client key")?)),
        };
        if args.central_http {
            let client = CentralHttpsClient::new(address, &tls, args.connect_timeout)?;
            let request_timeout = args.request_timeout;
            sources.push(Box::new(CentralHttpsSource { address: address.clone(), client, request_timeout }));
        } else {
            let client = CentralClient::new(address, &tls, args.connect_timeout)?;
            let request_timeout = args.request_timeout;
            sources.push(Box::new(CentralSource { address: address.clone(), client, request_timeout }));
        }
    }
    if sources.is_empty() {
        return Err("no source to look in: give --builtin-dir, or --central with --ca, --cert and --key".into());
    }
    let out = args.out.as_ref().ok_or("the ebpf collection method needs --out")?;

    let policy = RetryPolicy { interval: args.retry_interval, budget: args.retry_budget };
    let served = chain::get_probe(&sources, &module_version, &candidates, policy).await?;
    output::write_read_only(out, &served.probe).map_err(Context::of(format!("writing {}", out.display())))?;
    println!(
        "wrote {} ({} bytes) for kernel {}, from {} ({})",
        out.display(),
        served.probe.len(),
        served.candidate,
        served.source,
        served.detail
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
