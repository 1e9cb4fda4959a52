//! `collector-client get-probe`: its flags and environment, and the work
//! they start (kernel name candidates, sources, the retrying chain, the
//! read-only output).

use clap::{Parser, Subcommand};
use collector_client::cache::ProbeCache;
use collector_client::candidates;
use collector_client::central::CentralClient;
use collector_client::chain::{self, RetryPolicy};
use collector_client::host::{self, HostSettings};
use collector_client::https_probes::HttpsProbeClient;
use collector_client::output;
use collector_client::report::{NotServed, Outcome, Tried};
use collector_client::signatures::{Checked, Mode, SignaturePolicy};
use collector_client::sources::{BuiltinDir, CentralSource, HttpsSource, ProbeSource};
use probe_api::errors::Context;
use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
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
    GetProbe(GetProbeArgs),
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
    /// One JSON object on stdout (README: "Machine-readable output").
    Json,
}

/// Where the Collector image keeps its module version.
const MODULE_VERSION_FILE: &str = "/kernel-modules/MODULE_VERSION.txt";

#[derive(clap::Args)]
pub struct GetProbeArgs {
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
    /// signed by (README, "Signed probes").
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

/// What stopped `get-probe`, with its causes.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, Context> {
    std::fs::read(path).map_err(Context::of(format!("reading {what} {}", path.display())))
}

pub async fn get_probe(args: GetProbeArgs) -> Result<(), CliError> {
    let started = std::time::Instant::now();
    let module_version = match (&args.module_version, &args.module_version_file) {
        (Some(version), _) => version.clone(),
        (None, file) => {
            let file = file.clone().unwrap_or_else(|| PathBuf::from(MODULE_VERSION_FILE));
            let text = String::from_utf8_lossy(&read(&file, "the module version file")?).into_owned();
            text.lines().next().unwrap_or_default().trim().to_owned()
        }
    };
    let module_version = ModuleVersion::parse(&module_version)?;
    let given = args.kernel_candidates.as_deref().map(candidates::split_candidates).unwrap_or_default();
    let candidates = if given.is_empty() {
        let settings = HostSettings {
            host_root: args.host_root.clone(),
            kernel_release: args.kernel.clone(),
            node_hostname: args.node_hostname.clone(),
            os_release: args.os_release.clone(),
        };
        candidates::candidates(&host::read(&settings)?)
    } else {
        given
    };
    tracing::info!(candidates = %candidates.join(" "), "kernel candidates");
    let mut sources: Vec<Box<dyn ProbeSource>> = Vec::new();
    if let Some(dir) = &args.builtin_dir {
        sources.push(Box::new(BuiltinDir { dir: dir.clone(), uncompressed: false }));
        sources.push(Box::new(BuiltinDir { dir: dir.clone(), uncompressed: true }));
    }
    let request_timeout = args.request_timeout;
    let kernel =
        candidates.iter().filter_map(|c| Some(ProbePath::new(module_version.clone(), ProbeFileName::ebpf(c).ok()?)));
    let signatures = signature_policy(&args, kernel.collect())?;
    // A probe's signature is fetched only when something checks it.
    let with_signatures = signatures.wants_signatures();
    if let Some(address) = args.central.as_deref().filter(|address| !address.is_empty()) {
        let tls = ClientTls {
            ca_pem: read(&args.ca, "the CA certificate")?,
            identity: Some((read(&args.cert, "the client certificate")?, read(&args.key, "the client key")?)),
        };
        let sni = args.sni_hostname.as_deref().filter(|name| !name.is_empty());
        if args.central_http {
            let client = HttpsProbeClient::central(address, &tls, args.connect_timeout, sni)?;
            let name = format!("Central {}", client.base());
            sources.push(Box::new(HttpsSource { name, client, request_timeout, with_signatures }));
        } else {
            let client = CentralClient::named(address, &tls, args.connect_timeout, sni)?;
            sources.push(Box::new(CentralSource { address: address.to_owned(), client, request_timeout }));
        }
    }
    if let Some(base_url) = args.module_download_base_url.as_deref().filter(|url| !url.is_empty()) {
        let tls = ClientTls { ca_pem: probe_api::https::system_ca_bundle()?, identity: None };
        let client = HttpsProbeClient::bucket(base_url, &tls, args.connect_timeout)?;
        let name = format!("download site {}", client.base());
        sources.push(Box::new(HttpsSource { name, client, request_timeout, with_signatures }));
    }
    if sources.is_empty() {
        return Err("no source to look in: give --builtin-dir, --central (GRPC_SERVER), \
                    or --module-download-base-url (MODULE_DOWNLOAD_BASE_URL)"
            .into());
    }
    let out = args.out.as_ref().ok_or("the ebpf collection method needs --out")?;

    let policy = RetryPolicy { interval: args.retry_interval, budget: args.retry_budget };
    let cache = args.cache_dir.as_deref().map(ProbeCache::new);
    let served = match chain::get_probe(&sources, &module_version, &candidates, policy, &signatures).await {
        Ok(served) => {
            if let Some(cache) = &cache
                && served.remote
                && let Err(error) =
                    cache.keep(&module_version, &served.candidate, &served.file, served.signature.as_deref())
            {
                tracing::warn!(%error, "could not keep the probe in the node-local cache");
            }
            served
        }
        // Only when nothing remote answered: a Central that says "not
        // found" is not overruled by an old copy.
        Err(mut not_served) if !not_served.remote_answered => {
            let cached = cache
                .as_ref()
                .and_then(|cache| cache.serve(&module_version, &candidates, &signatures, &mut not_served));
            let Some(mut served) = cached else {
                return Err(not_served_error(not_served, args.output, &signatures));
            };
            served.detail = format!("no remote source reachable for {:.0?}; SHA-256 verified", not_served.elapsed);
            served
        }
        Err(not_served) => return Err(not_served_error(not_served, args.output, &signatures)),
    };
    let verified = match served.checked {
        Checked::Verified(verified) => Some(verified),
        Checked::Unchecked => None,
    };
    // The serial is on disk before the probe is where the Collector loads
    // it: a crash in between cannot make the node forget it.
    if let Some(verified) = verified {
        let path = ProbePath::new(module_version.clone(), ProbeFileName::ebpf(&served.candidate)?);
        if let Err(why) = signatures.accept(&path, verified.serial) {
            // Another run on the node accepted a higher serial meanwhile.
            let (file_name, source) = (path.file_name().to_string(), served.source);
            let tried = Tried { file_name, source, outcome: why, kind: Outcome::Refused, attempts: 1 };
            let not_served = NotServed {
                module_version: module_version.to_string(),
                candidates,
                tried: vec![tried],
                elapsed: started.elapsed(),
                remote_answered: true,
            };
            return Err(not_served_error(not_served, args.output, &signatures));
        }
    }
    output::write_read_only(out, &served.probe).map_err(Context::of(format!("writing {}", out.display())))?;
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
                "signature_policy": signatures.mode().name(),
                "signature": signature_json,
                "signature_refusals": signatures.refusals(),
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

/// The signature policy the flags ask for.
fn signature_policy(args: &GetProbeArgs, kernel: Vec<ProbePath>) -> Result<SignaturePolicy, CliError> {
    let keys = args.trusted_keys.as_deref().map(TrustedKeys::load).transpose()?;
    let mode = args.signature_policy.unwrap_or(if keys.is_some() { Mode::Required } else { Mode::Off });
    let state_dir = args.state_dir.clone().or_else(|| args.cache_dir.as_ref().map(|dir| dir.join("state")));
    Ok(SignaturePolicy::new(mode, keys, args.min_serial, state_dir.as_deref(), kernel)?)
}

/// The report of a probe not served: also on stdout as JSON when asked.
fn not_served_error(not_served: NotServed, output: OutputFormat, signatures: &SignaturePolicy) -> CliError {
    if output == OutputFormat::Json {
        let tried: Vec<serde_json::Value> = not_served
            .tried
            .iter()
            .map(|t| {
                serde_json::json!({
                    "file_name": t.file_name,
                    "source": t.source,
                    "outcome": t.outcome,
                    "attempts": t.attempts,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "result": "not_served",
                "module_version": not_served.module_version,
                "candidates": not_served.candidates,
                "tried": tried,
                "elapsed_ms": not_served.elapsed.as_millis() as u64,
                "signature_policy": signatures.mode().name(),
                "signature_refusals": signatures.refusals(),
            })
        );
    }
    not_served.into()
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
