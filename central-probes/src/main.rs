//! `central-probes`: Central's probe server and its admin CLI. This file
//! parses flags and prints results; the work lives in the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use central_probes::admin_client::{self, UploadReport, UploadRequest};
use central_probes::auth::{Role, TokenAuth, TokenFile};
use central_probes::connections::ConnectionLimits;
use central_probes::metrics::Metrics;
use central_probes::upstream::{UpstreamConfig, UpstreamSource};
use probe_api::transport::ClientTls;

use central_probes::progress::Progress;
use central_probes::server::{self, ServerOptions, TlsMaterial};
use central_probes::store::filesystem::{FilesystemStore, FilesystemStoreConfig};
use clap::{Args, Parser, Subcommand};
use tracing::{info, warn};

#[derive(Parser)]
#[command(version, about = "Kernel probe store and server for Collectors, and its admin tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run Central's probe server.
    Serve(Box<ServeArgs>),
    /// Upload a kernel support package (zip) to Central.
    Upload(UploadArgs),
    /// The documented spelling: `collector support-packages upload`.
    Collector {
        #[command(subcommand)]
        command: CollectorCommand,
    },
    /// List the probes Central stores.
    Ls(LsArgs),
    /// Create, revoke and list API tokens (run where the data directory is).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Development certificates.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Subcommand)]
enum CollectorCommand {
    #[command(name = "support-packages")]
    SupportPackages {
        #[command(subcommand)]
        command: SupportPackagesCommand,
    },
}

#[derive(Subcommand)]
enum SupportPackagesCommand {
    /// Upload a kernel support package (zip) to Central.
    Upload(UploadArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (the log says which).
    #[arg(long, env = "CENTRAL_LISTEN", default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Where probes and API token hashes are kept.
    #[arg(long, env = "CENTRAL_DATA_DIR")]
    data_dir: PathBuf,
    /// Central's TLS certificate (PEM).
    #[arg(long, env = "CENTRAL_TLS_CERT")]
    tls_cert: PathBuf,
    /// Central's TLS private key (PEM).
    #[arg(long, env = "CENTRAL_TLS_KEY")]
    tls_key: PathBuf,
    /// The cluster CA (PEM) that signs Collector client certificates.
    #[arg(long, env = "CENTRAL_CLIENT_CA")]
    client_ca: PathBuf,
    /// Refuse uploads that would leave less free disk space than this
    /// (bytes, or with a K/M/G/T or KiB/MiB/GiB/TiB suffix).
    #[arg(long, env = "CENTRAL_MIN_FREE_SPACE", default_value = "1GiB", value_parser = parse_size)]
    min_free_space: u64,
    /// Serve GetProbe without a client certificate (a public probe server).
    #[arg(long, env = "CENTRAL_ALLOW_ANONYMOUS_READS")]
    allow_anonymous_reads: bool,
    /// After SIGTERM or Ctrl-C, how long requests in flight may take to end
    /// before they are abandoned (an abandoned file is never made visible).
    #[arg(long, env = "CENTRAL_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// The upstream probe server, https://HOST:PORT, asked when no uploaded
    /// package has a probe.
    #[arg(long, env = "CENTRAL_UPSTREAM")]
    upstream: Option<String>,
    /// The CA (PEM) that signed the upstream's certificate.
    #[arg(long, env = "CENTRAL_UPSTREAM_CA", requires = "upstream")]
    upstream_ca: Option<PathBuf>,
    /// A client certificate (PEM) for the upstream, if it wants one.
    #[arg(long, env = "CENTRAL_UPSTREAM_CERT", requires = "upstream_key")]
    upstream_cert: Option<PathBuf>,
    #[arg(long, env = "CENTRAL_UPSTREAM_KEY", requires = "upstream_cert")]
    upstream_key: Option<PathBuf>,
    /// Time allowed to connect to the upstream.
    #[arg(long, env = "CENTRAL_UPSTREAM_CONNECT_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    upstream_connect_timeout: Duration,
    /// Time allowed for one whole fetch from the upstream.
    #[arg(long, env = "CENTRAL_UPSTREAM_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    upstream_timeout: Duration,
    /// Disk space for probes fetched from the upstream; least recently used
    /// ones are evicted beyond it.
    #[arg(long, env = "CENTRAL_UPSTREAM_CACHE_SIZE", default_value = "1GiB", value_parser = parse_size)]
    upstream_cache_size: u64,
    /// Never contact the upstream (no outbound connection at all).
    #[arg(long, env = "ROX_OFFLINE_MODE")]
    offline: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "CENTRAL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// What one client may hold of Central (see `connections::ConnectionLimits`).
#[derive(Args)]
struct LimitArgs {
    /// Close a connection whose TLS handshake has not finished by then.
    #[arg(long, env = "CENTRAL_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// Close a connection with no request in flight for this long.
    #[arg(long, env = "CENTRAL_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Send an HTTP/2 PING on a quiet connection this often...
    #[arg(long, env = "CENTRAL_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    keepalive_interval: Duration,
    /// ...and close it when the answer takes longer than this.
    #[arg(long, env = "CENTRAL_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    keepalive_timeout: Duration,
    /// Connections at once; beyond it, connections still in their handshake
    /// are closed first, else the new one. Default: the open descriptor
    /// limit less what probe reads and the store need.
    #[arg(long, env = "CENTRAL_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Streams one HTTP/2 connection may have open at once.
    #[arg(long, env = "CENTRAL_MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    max_concurrent_streams: u32,
    /// GetProbe streams in flight over all connections.
    #[arg(long, env = "CENTRAL_MAX_PROBE_STREAMS", default_value_t = 128)]
    max_probe_streams: usize,
    /// How long a GetProbe waits for one of those before UNAVAILABLE.
    #[arg(long, env = "CENTRAL_PROBE_STREAM_WAIT", default_value = "10s", value_parser = humantime::parse_duration)]
    probe_stream_wait: Duration,
    /// Close the connection of a client that reads nothing of a probe
    /// stream for this long.
    #[arg(long, env = "CENTRAL_SEND_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    send_timeout: Duration,
}

impl LimitArgs {
    fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            max_connections: self.max_connections,
            max_concurrent_streams: self.max_concurrent_streams,
            max_probe_streams: self.max_probe_streams,
            probe_stream_wait: self.probe_stream_wait,
            send_timeout: self.send_timeout,
        }
    }
}

#[derive(Args)]
struct Endpoint {
    /// Central's address, HOST:PORT.
    #[arg(short = 'e', long = "endpoint", env = "ROX_CENTRAL_ADDRESS")]
    endpoint: String,
    /// The CA certificate (PEM) that signed Central's server certificate.
    #[arg(long, env = "ROX_CA_CERT_FILE")]
    ca: PathBuf,
    /// Give up on the whole command after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
struct UploadArgs {
    /// The support package, a zip file.
    package: PathBuf,
    #[command(flatten)]
    endpoint: Endpoint,
    /// Replace files Central has with different content.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct LsArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Only probes of this module version.
    #[arg(long)]
    module_version: Option<String>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a new API token and print it (the only time it is shown).
    Create {
        #[arg(long, env = "CENTRAL_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, value_enum)]
        role: Role,
        /// A name to revoke it by; defaults to the role and a number.
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke the token with this name; Central refuses it at once.
    Revoke {
        #[arg(long, env = "CENTRAL_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// List token names and roles.
    List {
        #[arg(long, env = "CENTRAL_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Write a development CA, a server certificate for localhost and
    /// 127.0.0.1, and a Collector client certificate.
    Init {
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    // Blocking threads read probe chunks, write uploads and commit them;
    // the bound keeps a flood of requests from growing threads without end
    // (probe streams are bounded by their slots anyway).
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(32).build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => return fail(format!("starting the runtime: {e}")),
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(message),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Serve(args) => serve(*args).await,
        Command::Upload(args)
        | Command::Collector {
            command: CollectorCommand::SupportPackages { command: SupportPackagesCommand::Upload(args) },
        } => upload(args).await,
        Command::Ls(args) => ls(args).await,
        Command::Token { command } => token(command),
        Command::Pki { command: PkiCommand::Init { out } } => {
            central_probes::pki::init(&out).map_err(|e| format!("writing certificates to {}: {e}", out.display()))?;
            println!(
                "wrote ca.pem, ca-key.pem, server.pem, server-key.pem, collector.pem, collector-key.pem to {}",
                out.display()
            );
            Ok(())
        }
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("reading {what} {}: {e}", path.display()))
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let tls = TlsMaterial {
        cert_pem: read(&args.tls_cert, "the TLS certificate")?,
        key_pem: read(&args.tls_key, "the TLS key")?,
        client_ca_pem: read(&args.client_ca, "the client CA")?,
    };
    let config = FilesystemStoreConfig { data_dir: args.data_dir.clone(), min_free_bytes: args.min_free_space };
    let store = tokio::task::spawn_blocking(move || FilesystemStore::open(&config))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("opening the probe store: {e}"))?;
    let metrics = Metrics::new();
    let upstream = upstream_source(&args, &metrics).await?;
    if let Some(address) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| format!("listening for metrics on {address}: {e}"))?;
        tokio::spawn(central_probes::metrics::serve(metrics.clone(), listener));
    }
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.map_err(|e| format!("listening on {}: {e}", args.listen))?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutting down: no new connections; requests in flight may finish");
        let _ = stop.send(true);
    });
    let mut server_stopped = stopped.clone();
    let server = server::run(
        Arc::new(store),
        TokenAuth::new(TokenFile::in_data_dir(&args.data_dir)),
        ServerOptions {
            tls,
            allow_anonymous_reads: args.allow_anonymous_reads,
            upstream,
            metrics,
            limits: args.limits.limits(),
        },
        listener,
        async move {
            let _ = server_stopped.wait_for(|stop| *stop).await;
        },
    );
    let grace = args.shutdown_grace;
    tokio::select! {
        result = server => result.map_err(|e| e.to_string()),
        _ = async { let _ = stopped.wait_for(|stop| *stop).await; tokio::time::sleep(grace).await } => {
            warn!(?grace, "requests still in flight after the grace period are abandoned; files they were writing stay invisible");
            Ok(())
        }
    }
}

/// The upstream source, unless offline or none is configured.
async fn upstream_source(args: &ServeArgs, metrics: &Metrics) -> Result<Option<Arc<UpstreamSource>>, String> {
    let Some(address) = &args.upstream else {
        info!("no upstream configured: only uploaded probes are served");
        return Ok(None);
    };
    if args.offline {
        info!("offline mode: the upstream is never contacted");
        return Ok(None);
    }
    let ca = args.upstream_ca.as_ref().ok_or("--upstream needs --upstream-ca")?;
    let identity = match (&args.upstream_cert, &args.upstream_key) {
        (Some(cert), Some(key)) => {
            Some((read(cert, "the upstream client certificate")?, read(key, "the upstream client key")?))
        }
        _ => None,
    };
    let config = UpstreamConfig {
        address: address.clone(),
        tls: ClientTls { ca_pem: read(ca, "the upstream CA")?, identity },
        connect_timeout: args.upstream_connect_timeout,
        fetch_timeout: args.upstream_timeout,
        cache_dir: args.data_dir.join("upstream-cache"),
        cache_max_bytes: args.upstream_cache_size,
        min_free_bytes: args.min_free_space,
        not_found_ttl: Duration::from_secs(30),
    };
    let metrics = metrics.clone();
    let source = tokio::task::spawn_blocking(move || UpstreamSource::new(config, metrics))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("setting up the upstream: {e}"))?;
    Ok(Some(Arc::new(source)))
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

impl Endpoint {
    /// A client of Central's admin API with the token of `ROX_API_TOKEN`.
    fn connect(&self) -> Result<admin_client::AdminClient, String> {
        let ca = read(&self.ca, "the CA certificate")?;
        admin_client::connect(&self.endpoint, ca, &api_token()?, Duration::from_secs(10))
    }
}

fn api_token() -> Result<String, String> {
    std::env::var("ROX_API_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| "set ROX_API_TOKEN to an API token (central-probes token create)".to_owned())
}

async fn upload(args: UploadArgs) -> Result<(), String> {
    let endpoint = &args.endpoint;
    let mut client = endpoint.connect()?;
    let request = UploadRequest { package: args.package.clone(), overwrite: args.overwrite };
    let upload = admin_client::upload(&mut client, &request, |plan| {
        eprintln!(
            "{}: {} probe files; {} new ({:.1} MiB) to upload; {} already in Central to compare by digest",
            request.package.display(),
            plan.probes_in_package,
            plan.new_files,
            plan.new_bytes as f64 / (1 << 20) as f64,
            plan.to_compare,
        );
        Progress::for_stderr()
    });
    let report = tokio::time::timeout(endpoint.timeout, upload).await.map_err(|_| {
        format!("the upload did not finish within --timeout {}", humantime::format_duration(endpoint.timeout))
    })??;
    print_report(&report);
    Ok(())
}

fn print_report(report: &UploadReport) {
    if !report.unrecognised.is_empty() {
        eprintln!(
            "warning: {} unrecognised entries under kernel-modules/ were skipped (is the package corrupt?): {}",
            report.unrecognised.len(),
            first_few(&report.unrecognised)
        );
    }
    match &report.response {
        None if report.conflicts.is_empty() => {
            println!("Nothing to do: all {} probe files are already in Central.", report.probes_in_package)
        }
        None => println!(
            "Nothing uploaded: {} probe files are already in Central, {} differ from Central's.",
            report.identical,
            report.conflicts.len()
        ),

        Some(response) => {
            let seconds = report.elapsed.as_secs_f64().max(1e-3);
            println!(
                "Uploaded {} files ({:.1} MiB) in {:.1} s ({:.0} MB/s): {} stored, {} overwritten, {} identical, {} kept as they were.",
                report.files_sent,
                report.bytes_sent as f64 / (1 << 20) as f64,
                seconds,
                report.bytes_sent as f64 / seconds / 1e6,
                response.stored_count,
                response.overwritten_count,
                report.identical,
                response.conflict_count,
            );
        }
    }
    if !report.conflicts.is_empty() {
        eprintln!(
            "warning: {} files differ from the ones in Central and were not overwritten: {}. \
             Re-run with --overwrite to replace them.",
            report.conflicts.len(),
            first_few(&report.conflicts)
        );
    }
}

fn first_few(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(10).map(String::as_str).collect();
    match items.len() - shown.len() {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

async fn ls(args: LsArgs) -> Result<(), String> {
    let endpoint = &args.endpoint;
    let mut client = endpoint.connect()?;
    let probes =
        tokio::time::timeout(endpoint.timeout, admin_client::list_all(&mut client, args.module_version.as_deref()))
            .await
            .map_err(|_| "listing did not finish within --timeout".to_owned())??;
    for probe in &probes {
        println!("{}  {:>10}  {}", probe.sha256, probe.size, probe.path);
    }
    eprintln!("{} probes", probes.len());
    Ok(())
}

fn token(command: TokenCommand) -> Result<(), String> {
    match command {
        TokenCommand::Create { data_dir, role, name } => {
            let tokens = TokenFile::in_data_dir(&data_dir);
            let name = match name {
                Some(name) => name,
                None => {
                    let count = tokens.load().map_err(|e| e.to_string())?.len();
                    format!("{role}-{}", count + 1)
                }
            };
            let token = tokens.create(role, &name).map_err(|e| format!("creating a token: {e}"))?;
            eprintln!("created token {name:?} with role {role}; it is shown only now:");
            println!("{token}");
            Ok(())
        }
        TokenCommand::Revoke { data_dir, name } => {
            if TokenFile::in_data_dir(&data_dir).revoke(&name).map_err(|e| e.to_string())? {
                eprintln!("revoked token {name:?}");
                Ok(())
            } else {
                Err(format!("no token named {name:?}"))
            }
        }
        TokenCommand::List { data_dir } => {
            for record in TokenFile::in_data_dir(&data_dir).load().map_err(|e| e.to_string())? {
                println!("{}\t{}", record.name, record.role);
            }
            Ok(())
        }
    }
}

/// Parses `1073741824`, `1G` (10^9), `1GiB` (2^30) and the like.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a size such as 1GiB"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("{text} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("5G"), Ok(5_000_000_000));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
