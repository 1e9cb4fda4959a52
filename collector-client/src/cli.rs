//! `collector-client get-probe`: its flags and environment, and the work
//! they start (kernel name candidates, sources, the retrying chain, the
//! read-only output).

use clap::{Parser, Subcommand};
use collector_client::candidates;
use collector_client::candidates::HostFacts;
use collector_client::chain::RetryPolicy;
use collector_client::fetch::{CentralSettings, FetchError, Settings, SignatureSettings, fetch};
use collector_client::host::{self, HostSettings};
use collector_client::signatures::Mode;
use probe_api::errors::Context;
use probe_api::names::ModuleVersion;
use probe_api::signing::TrustedKeys;
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
    #[command(after_help = ENVIRONMENT)]
    GetProbe(Box<GetProbeArgs>),
    /// Print what get-probe would use on this node: the kernel release, the
    /// os-release values and host name it reads, the collection method, the
    /// module version and the kernel name candidates in order. Against an
    /// image's root (--host-root, --os-release, --kernel) it needs no boot.
    Facts(FactsArgs),
}

/// What `get-probe` reads from its environment besides the flags' own
/// variables (shown with each flag).
const ENVIRONMENT: &str = "Also read from the environment:
  https_proxy, HTTPS_PROXY   a CONNECT proxy for the download site (http://HOST:PORT)
  no_proxy, NO_PROXY         hosts reached without the proxy
  SSL_CERT_FILE              the CA bundle that the download site's certificate is checked against
  RUST_LOG                   what is logged to stderr (default: info)

Exit status: 0 when the probe was written (or CORE_BPF needs none), 1 when no probe could be had.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollectionMethod {
    /// CO-RE eBPF: the probe is built in and fits every kernel.
    CoreBpf,
    /// A kernel-specific eBPF probe.
    Ebpf,
}

impl CollectionMethod {
    /// As the product reads `COLLECTION_METHOD`: case and `-`/`_` do not
    /// matter, and anything but EBPF or CORE_BPF is CORE_BPF with a
    /// warning.
    pub fn parse(text: &str) -> CollectionMethod {
        match text.trim().to_ascii_uppercase().replace('-', "_").as_str() {
            "EBPF" => CollectionMethod::Ebpf,
            "CORE_BPF" => CollectionMethod::CoreBpf,
            _ => {
                tracing::warn!(value = text, "unknown collection method: using CORE_BPF");
                CollectionMethod::CoreBpf
            }
        }
    }
}

/// How `get-probe` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A line for people.
    Text,
    /// One JSON object on stdout (docs/operations.md, "Machine-readable output").
    Json,
}

/// Where the Collector image keeps its module version.
const MODULE_VERSION_FILE: &str = "/kernel-modules/MODULE_VERSION.txt";

/// What the Collector derives its kernel names from: the same flags for
/// `get-probe` and `facts`.
#[derive(clap::Args)]
pub struct NodeArgs {
    /// EBPF (a kernel-specific probe) or CORE_BPF (built in, nothing to
    /// fetch); as the product: case-insensitive, anything else is CORE_BPF.
    #[arg(long, env = "COLLECTION_METHOD", default_value = "CORE_BPF")]
    pub collection_method: String,
    /// The Collector's module version, e.g. 2.5.0.
    #[arg(long, env = "MODULE_VERSION")]
    module_version: Option<String>,
    /// A file whose first line is the module version; /kernel-modules/MODULE_VERSION.txt
    /// when neither this nor --module-version is given.
    #[arg(long, conflicts_with = "module_version")]
    module_version_file: Option<PathBuf>,
    /// The kernel release; the kernel's own (uname -r) when not given.
    #[arg(long, env = "KERNEL_VERSION")]
    kernel: Option<String>,
    /// Kernel names to try instead of the derived ones, separated by spaces
    /// (as the product reads KERNEL_CANDIDATES) or commas.
    #[arg(long, env = "KERNEL_CANDIDATES")]
    kernel_candidates: Option<String>,
    /// Where the host's files are mounted in the Collector's container.
    #[arg(long, env = "COLLECTOR_HOST_ROOT", default_value = "/host")]
    host_root: PathBuf,
    /// The node's host name (minikube is recognised by it); else read under
    /// the host root.
    #[arg(long, env = "NODE_HOSTNAME")]
    node_hostname: Option<String>,
    /// An os-release file to read instead of the host root's
    /// etc/os-release (or usr/lib/os-release).
    #[arg(long)]
    os_release: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct GetProbeArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Directory of probes built into the Collector image.
    #[arg(long)]
    builtin_dir: Option<PathBuf>,
    /// Central's address, HOST:PORT.
    #[arg(long, env = "GRPC_SERVER")]
    central: Option<String>,
    /// Fetch from Central's HTTPS route /kernel-objects/ (what Collectors of
    /// the product this replaces call) instead of GetProbe.
    #[arg(long, requires = "central")]
    central_http: bool,
    /// The TLS name of Central when it is reached by another address.
    #[arg(long, env = "SNI_HOSTNAME")]
    sni_hostname: Option<String>,
    /// A bucket tried after Central: https://HOST/BASE holding
    /// BASE/<module version>/<file name>, reached through https_proxy if set.
    #[arg(long, env = "MODULE_DOWNLOAD_BASE_URL")]
    module_download_base_url: Option<String>,
    /// CA certificate (PEM) that signed Central's certificate; by default
    /// where the product's DaemonSet mounts it.
    #[arg(long, default_value = "/var/run/secrets/stackrox.io/certs/ca.pem")]
    ca: PathBuf,
    /// This Collector's client certificate (PEM).
    #[arg(long, default_value = "/var/run/secrets/stackrox.io/certs/cert.pem")]
    cert: PathBuf,
    /// This Collector's client key (PEM).
    #[arg(long, default_value = "/var/run/secrets/stackrox.io/certs/key.pem")]
    key: PathBuf,
    /// Keep probes fetched over the network here, and use one when no
    /// remote source can be reached for the whole retry budget.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// A file of one or more minisign public keys that probes must be
    /// signed by (docs/security.md, "Signed probes").
    #[arg(long, env = "PROBE_TRUSTED_KEYS")]
    trusted_keys: Option<PathBuf>,
    /// required: use only probes whose signature verifies; warn: log and
    /// use them anyway (for migrating); off. Default: required with
    /// --trusted-keys, off without.
    #[arg(long, value_enum)]
    signature_policy: Option<Mode>,
    /// The lowest signature serial accepted, for nodes that have not
    /// accepted any yet.
    #[arg(long, default_value_t = 0)]
    min_serial: u64,
    /// Where the node remembers the highest serial it accepted per probe;
    /// <--cache-dir>/state by default when --cache-dir is given.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// `text`, or `json`: one object on stdout saying what served the probe,
    /// or what was tried.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: OutputFormat,
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

#[derive(clap::Args)]
pub struct FactsArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// `text`, or `json`: one JSON object on one line (what `central-probes
    /// coverage --nodes` reads).
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

/// What stopped `get-probe`, with its causes.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, Context> {
    std::fs::read(path).map_err(Context::of(format!("reading {what} {}", path.display())))
}

impl NodeArgs {
    /// The module version as given, else the first line of its file.
    fn module_version(&self) -> Result<String, Context> {
        if let Some(version) = &self.module_version {
            return Ok(version.clone());
        }
        let file = self.module_version_file.clone().unwrap_or_else(|| PathBuf::from(MODULE_VERSION_FILE));
        let text = String::from_utf8_lossy(&read(&file, "the module version file")?).into_owned();
        Ok(text.lines().next().unwrap_or_default().trim().to_owned())
    }

    /// The host's facts (unless candidates were given, which replace them)
    /// and the kernel name candidates in order.
    fn candidates(&self) -> Result<(Option<HostFacts>, Vec<String>), String> {
        let given = self.kernel_candidates.as_deref().map(candidates::split_candidates).unwrap_or_default();
        if !given.is_empty() {
            return Ok((None, given));
        }
        let settings = HostSettings {
            host_root: self.host_root.clone(),
            kernel_release: self.kernel.clone(),
            node_hostname: self.node_hostname.clone(),
            os_release: self.os_release.clone(),
        };
        let facts = host::read(&settings)?;
        let candidates = candidates::candidates(&facts);
        Ok((Some(facts), candidates))
    }
}

/// `facts`: what `get-probe` would use on this node.
pub fn facts(args: FactsArgs) -> Result<(), CliError> {
    let method = CollectionMethod::parse(&args.node.collection_method);
    // An image pipeline may ask before the image has its module version.
    let module_version = match args.node.module_version() {
        Ok(version) => Some(ModuleVersion::parse(&version)?.to_string()),
        Err(error) => {
            tracing::warn!("module version unknown: {}", probe_api::errors::chain(&error));
            None
        }
    };
    let (host, candidates) = args.node.candidates()?;
    let method = match method {
        CollectionMethod::Ebpf => "EBPF",
        CollectionMethod::CoreBpf => "CORE_BPF",
    };
    let facts = collector_client::facts::to_json(host.as_ref(), method, module_version.as_deref(), &candidates);
    let given = host.is_none();
    match args.output {
        OutputFormat::Json => println!("{facts}"),
        OutputFormat::Text => {
            let show = |value: &serde_json::Value| value.as_str().map(str::to_owned).unwrap_or_else(|| "-".into());
            println!("kernel release      {}", show(&facts["kernel"]));
            println!("uname -v            {}", show(&facts["uname_v"]));
            for (key, value) in facts["os_release"].as_object().into_iter().flatten() {
                println!("os-release {key:<8} {}", show(value));
            }
            println!("host name           {}", show(&facts["hostname"]));
            println!("collection method   {method}");
            println!("module version      {}", show(&facts["module_version"]));
            let from = if given { "given (KERNEL_CANDIDATES)" } else { "derived" };
            println!("candidates, {from}: {}", candidates.join(" "));
        }
    }
    Ok(())
}

pub async fn get_probe(args: GetProbeArgs) -> Result<(), CliError> {
    let module_version = ModuleVersion::parse(&args.node.module_version()?)?;
    let (_, candidates) = args.node.candidates()?;
    tracing::info!(candidates = %candidates.join(" "), "kernel candidates");
    let central = match args.central.as_deref().filter(|address| !address.is_empty()) {
        None => None,
        Some(address) => Some(CentralSettings {
            address: address.to_owned(),
            tls: ClientTls {
                ca_pem: probe_api::client_tls::read_ca_file(&args.ca)?,
                identity: Some((read(&args.cert, "the client certificate")?, read(&args.key, "the client key")?)),
            },
            server_name: args.sni_hostname.clone().filter(|name| !name.is_empty()),
            https_route: args.central_http,
        }),
    };
    let keys = args.trusted_keys.as_deref().map(TrustedKeys::load).transpose()?;
    let signatures = SignatureSettings {
        mode: args.signature_policy.unwrap_or(if keys.is_some() { Mode::Required } else { Mode::Off }),
        keys,
        min_serial: args.min_serial,
        state_dir: args.state_dir.clone().or_else(|| args.cache_dir.as_ref().map(|dir| dir.join("state"))),
    };
    let settings = Settings {
        module_version,
        candidates,
        builtin_dir: args.builtin_dir.clone(),
        central,
        download_base_url: args.module_download_base_url.clone().filter(|url| !url.is_empty()),
        cache_dir: args.cache_dir.clone(),
        signatures,
        connect_timeout: args.connect_timeout,
        request_timeout: args.request_timeout,
        retry: RetryPolicy { interval: args.retry_interval, budget: args.retry_budget },
        out: args.out.clone().ok_or("the ebpf collection method needs --out")?,
    };
    let (module_version, candidates, out) =
        (settings.module_version.clone(), settings.candidates.clone(), settings.out.clone());
    let fetched = match fetch(settings).await {
        Ok(fetched) => fetched,
        Err(FetchError::NotServed(report)) => {
            if args.output == OutputFormat::Json {
                println!("{}", report.to_json());
            }
            return Err(report);
        }
        Err(FetchError::Setup(error)) => return Err(error),
    };
    let (served, verified) = (&fetched.served, fetched.verified);
    let signature_json = verified.map(|v| serde_json::json!({"key_id": v.key_id.to_string(), "serial": v.serial}));
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({
                "result": "served",
                "module_version": module_version.as_str(),
                "kernel": served.candidate,
                "candidates": candidates,
                "source": served.source,
                "detail": served.detail,
                "out": out.display().to_string(),
                "bytes": served.probe.len(),
                "signature_policy": fetched.signature_policy.name(),
                "signature": signature_json,
                "signature_refusals": fetched.signature_refusals,
            })
        ),
        OutputFormat::Text => println!(
            "wrote {} ({} bytes) for kernel {}, from {} ({}{})",
            out.display(),
            served.probe.len(),
            served.candidate,
            served.source,
            served.detail,
            verified.map(|v| format!("; signed by key {} at serial {}", v.key_id, v.serial)).unwrap_or_default()
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    /// Every variable the Collector side reads is named in `--help`.
    #[test]
    fn help_names_every_environment_variable_read() {
        let mut command = super::Cli::command();
        let help = command.find_subcommand_mut("get-probe").unwrap().render_long_help().to_string();
        let read = [
            "COLLECTION_METHOD",
            "MODULE_VERSION",
            "KERNEL_VERSION",
            "KERNEL_CANDIDATES",
            "COLLECTOR_HOST_ROOT",
            "NODE_HOSTNAME",
            "GRPC_SERVER",
            "SNI_HOSTNAME",
            "MODULE_DOWNLOAD_BASE_URL",
            "PROBE_TRUSTED_KEYS",
            "https_proxy",
            "HTTPS_PROXY",
            "no_proxy",
            "NO_PROXY",
            "SSL_CERT_FILE",
            "RUST_LOG",
        ];
        for name in read {
            assert!(help.contains(name), "{name} is not in --help");
        }
    }
}
