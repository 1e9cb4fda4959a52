//! `central-probes serve`: flags and signals; the server itself is
//! `central_probes::server`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use central_probes::server::{
    BatchLimits, Central, CentralConfig, CompactionLimits, ConnectionLimits, DatabaseConfig, PostgresConfig,
    StoreLayout, TlsMaterial, UpstreamConfig, UpstreamKind,
};
use clap::Args;
use probe_api::https::{Proxy, ProxySettings};
use probe_api::transport::ClientTls;
use tracing::{info, warn};

use super::{CliError, parse_size, read};

#[derive(Args)]
#[command(
    after_help = "  https_proxy    the HTTP CONNECT proxy to the upstream, else HTTPS_PROXY (--upstream-proxy overrides both)
  no_proxy       upstream hosts reached without the proxy, else NO_PROXY
  SSL_CERT_FILE  the CA bundle for --upstream-url and --upstream-oci without --upstream-ca"
)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (the log says which).
    #[arg(long, env = "CENTRAL_LISTEN", default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// A file of minisign public keys: uploads and upstream probes whose
    /// signature is missing or does not verify by one of them are refused
    /// (README, "Signed probes").
    #[arg(long, env = "CENTRAL_TRUSTED_KEYS")]
    trusted_keys: Option<PathBuf>,
    /// Where probes and API token hashes are kept.
    #[arg(long, env = "CENTRAL_DATA_DIR")]
    data_dir: PathBuf,
    /// How the data directory keeps uploaded probes: `packs` (records
    /// appended to a few large files, one fsync per batch; a directory in
    /// the per-file layout is converted at start) or `files` (a file per
    /// probe, the layout before packs). README, "How the store keeps data
    /// safe".
    #[arg(long, env = "CENTRAL_STORE_LAYOUT", value_enum, default_value = "packs")]
    store_layout: LayoutArg,
    /// With packs: a pack not being appended to whose live probes take
    /// less than this fraction of it (overwrites and removals left the rest
    /// dead) is rewritten in the background; 0 turns compaction off.
    #[arg(long, env = "CENTRAL_COMPACT_BELOW", default_value = "0.5", value_parser = parse_fraction)]
    compact_below: f64,
    /// With packs: how fast compaction may copy (bytes per second, or with
    /// a K/M/G or KiB/MiB/GiB suffix).
    #[arg(long, env = "CENTRAL_COMPACT_RATE", default_value = "64MiB", value_parser = parse_size)]
    compact_rate: u64,
    /// With packs: how often the background compaction looks for packs to
    /// rewrite.
    #[arg(long, env = "CENTRAL_COMPACT_EVERY", default_value = "60s", value_parser = humantime::parse_duration)]
    compact_every: Duration,
    /// With packs: a group commit makes durable at most this many bytes of
    /// records at once (bytes, or with a K/M/G or KiB/MiB/GiB suffix).
    #[arg(long, env = "CENTRAL_COMMIT_BATCH", default_value = "64MiB", value_parser = parse_size)]
    commit_batch: u64,
    /// With packs: how long a group commit waits, after the first commit
    /// that reached it, for more to make durable with the same fsyncs.
    #[arg(long, env = "CENTRAL_COMMIT_WAIT", default_value = "2ms", value_parser = humantime::parse_duration)]
    commit_wait: Duration,
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
    /// The upstream probe server speaking this API's GetProbe (another
    /// Central), https://HOST:PORT, asked when no uploaded package has a
    /// probe.
    #[arg(long, env = "CENTRAL_UPSTREAM", conflicts_with_all = ["upstream_url", "upstream_oci"])]
    upstream: Option<String>,
    /// Instead of --upstream: a static HTTPS probe bucket,
    /// https://HOST[:PORT]/BASE/, holding BASE/<module version>/<file name>
    /// (the product's ROX_COLLECTOR_MODULES_BASE_URL layout).
    #[arg(long, env = "CENTRAL_UPSTREAM_URL", conflicts_with = "upstream_oci")]
    upstream_url: Option<String>,
    #[command(flatten)]
    oci: super::registry::OciUpstreamArgs,
    /// The CA certificates (PEM) trusted for the upstream. Needed with --upstream; for the others
    /// the system's bundle is used when absent (SSL_CERT_FILE, else the usual paths).
    #[arg(long, env = "CENTRAL_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// The HTTP CONNECT proxy for the upstream, http://[USER:PASSWORD@]HOST:PORT;
    /// overrides https_proxy/HTTPS_PROXY (no_proxy/NO_PROXY still apply).
    #[arg(long, env = "CENTRAL_UPSTREAM_PROXY")]
    upstream_proxy: Option<String>,
    /// A client certificate (PEM) for the upstream, if it wants one.
    #[arg(long, env = "CENTRAL_UPSTREAM_CERT", requires = "upstream_key")]
    upstream_cert: Option<PathBuf>,
    #[arg(long, env = "CENTRAL_UPSTREAM_KEY", requires = "upstream_cert")]
    upstream_key: Option<PathBuf>,
    /// A file holding a view token of the upstream Central's admin API, for coverage checks.
    #[arg(long, env = "CENTRAL_UPSTREAM_TOKEN_FILE")]
    upstream_token_file: Option<PathBuf>,
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
    /// Memory for the most requested uploaded probes, served without
    /// touching the disk; least recently used ones are dropped beyond it.
    /// 0 turns it off.
    #[arg(long, env = "CENTRAL_HOT_CACHE_SIZE", default_value = "16MiB", value_parser = parse_size)]
    hot_cache_size: u64,
    /// Keep uploaded probes in this PostgreSQL database, shared by every
    /// replica (postgres://USER@HOST:PORT/DB), instead of the data
    /// directory, which then holds this replica's local copies.
    #[arg(long, env = "CENTRAL_DATABASE_URL")]
    database_url: Option<String>,
    /// Connect to the database over TLS, verifying its certificate against
    /// this CA (PEM) and the host name of the URL (libpq's
    /// sslmode=verify-full).
    #[arg(long, env = "CENTRAL_DATABASE_CA", requires = "database_url")]
    database_ca: Option<PathBuf>,
    /// Database connections at most; each file being uploaded and each
    /// probe being copied from the database holds one.
    #[arg(long, env = "CENTRAL_DATABASE_MAX_CONNECTIONS", default_value_t = 16, requires = "database_url")]
    database_max_connections: usize,
    /// Longest a database statement may run, and a call may wait for a
    /// connection, before the call fails with UNAVAILABLE.
    #[arg(long, env = "CENTRAL_DATABASE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, requires = "database_url")]
    database_timeout: Duration,
    /// Disk for local copies of database probes, least recently used
    /// evicted beyond it.
    #[arg(long, env = "CENTRAL_DATABASE_CACHE_SIZE", default_value = "2GiB", value_parser = parse_size, requires = "database_url")]
    database_cache_size: u64,
    /// Never contact the upstream (no outbound connection at all).
    #[arg(long, env = "ROX_OFFLINE_MODE")]
    offline: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics and readiness at
    /// http://ADDR/ready.
    #[arg(long, env = "CENTRAL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// What one client may hold of Central (see `connections::ConnectionLimits`).
#[derive(Args)]
pub struct LimitArgs {
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
    /// stream for this long; end an export whose client reads nothing for
    /// this long.
    #[arg(long, env = "CENTRAL_SEND_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    send_timeout: Duration,
    /// End an upload (UploadProbes, or the product's upload route) that
    /// receives nothing for this long, as an interrupted one: the files
    /// committed before it stay, and the log and audit record it.
    #[arg(long, env = "CENTRAL_UPLOAD_IDLE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    upload_idle_timeout: Duration,
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
            upload_idle_timeout: self.upload_idle_timeout,
        }
    }
}

/// A duration above zero (`--upload-idle-timeout 0s` would end every
/// upload before its first byte).
fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("must be more than 0, e.g. 60s".into()),
        parsed => parsed.map_err(|e| e.to_string()),
    }
}

pub async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let tls = TlsMaterial {
        cert_pem: read(&args.tls_cert, "the TLS certificate")?,
        key_pem: read(&args.tls_key, "the TLS key")?,
        client_ca_pem: probe_api::client_tls::read_ca_file(&args.client_ca)?,
    };
    let config = CentralConfig {
        data_dir: args.data_dir.clone(),
        min_free_bytes: args.min_free_space,
        hot_cache_bytes: args.hot_cache_size,
        store_layout: args.store_layout(),
        database: match &args.database_url {
            None => None,
            Some(url) => Some(DatabaseConfig {
                postgres: PostgresConfig {
                    url: url.clone(),
                    max_connections: args.database_max_connections,
                    statement_timeout: args.database_timeout,
                    ca_pem: args.database_ca.as_deref().map(|ca| read(ca, "the database CA")).transpose()?,
                },
                local_copies_bytes: args.database_cache_size,
            }),
        },
        tls,
        allow_anonymous_reads: args.allow_anonymous_reads,
        upstream: upstream_config(&args)?,
        limits: args.limits.limits(),
        trusted_keys: args
            .trusted_keys
            .as_deref()
            .map(probe_api::signing::TrustedKeys::load)
            .transpose()
            .map_err(|e| format!("--trusted-keys: {e}"))?,
    };
    let central = Central::open(config).await.map_err(|e| e.to_string())?;
    if let Some(address) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| format!("listening for metrics on {address}: {e}"))?;
        tokio::spawn(central_probes::server::serve_metrics(central.metrics().clone(), listener));
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
    let server = central.run(listener, async move {
        let _ = server_stopped.wait_for(|stop| *stop).await;
    });
    let grace = args.shutdown_grace;
    tokio::select! {
        result = server => result.map_err(CliError::from),
        _ = async { let _ = stopped.wait_for(|stop| *stop).await; tokio::time::sleep(grace).await } => {
            warn!(?grace, "requests still in flight after the grace period are abandoned; files they were writing stay invisible");
            Ok(())
        }
    }
}

/// The upstream's settings, unless offline or none is configured.
fn upstream_config(args: &ServeArgs) -> Result<Option<UpstreamConfig>, CliError> {
    let kind = match (&args.upstream, &args.upstream_url, args.oci.kind()) {
        (Some(address), _, _) => UpstreamKind::Grpc { address: address.clone() },
        (None, Some(base_url), _) => UpstreamKind::Bucket { base_url: base_url.clone() },
        (None, None, Some(kind)) => kind,
        (None, None, None) => {
            info!("no upstream configured: only uploaded probes are served");
            return Ok(None);
        }
    };
    if args.offline {
        info!("offline mode: the upstream is never contacted");
        return Ok(None);
    }
    let ca_pem = match (&args.upstream_ca, &kind) {
        (Some(ca), _) => probe_api::client_tls::read_ca_file(ca)?,
        (None, UpstreamKind::Grpc { .. }) => return Err("--upstream needs --upstream-ca".into()),
        (None, _) => probe_api::https::system_ca_bundle().map_err(|e| format!("without --upstream-ca: {e}"))?,
    };
    let proxies = ProxySettings::from_env().map_err(|e| format!("https_proxy/no_proxy: {e}"))?;
    let proxies = match &args.upstream_proxy {
        Some(proxy) => {
            ProxySettings { proxy: Some(Proxy::parse(proxy).map_err(|e| format!("--upstream-proxy: {e}"))?), ..proxies }
        }
        None => proxies,
    };
    let identity = match (&args.upstream_cert, &args.upstream_key) {
        (Some(cert), Some(key)) => {
            Some((read(cert, "the upstream client certificate")?, read(key, "the upstream client key")?))
        }
        _ => None,
    };
    Ok(Some(UpstreamConfig {
        kind,
        tls: ClientTls { ca_pem, identity },
        proxies,
        connect_timeout: args.upstream_connect_timeout,
        fetch_timeout: args.upstream_timeout,
        cache_dir: args.data_dir.join("upstream-cache"),
        cache_max_bytes: args.upstream_cache_size,
        min_free_bytes: args.min_free_space,
        not_found_ttl: Duration::from_secs(30),
        view_token: (args.upstream_token_file.as_deref().map(|file| read(file, "the upstream token file")))
            .transpose()?
            .map(|token| String::from_utf8_lossy(&token).trim().to_owned()),
    }))
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

impl ServeArgs {
    fn store_layout(&self) -> StoreLayout {
        match self.store_layout {
            LayoutArg::Packs => StoreLayout::Packs {
                compaction: CompactionLimits {
                    below_live_fraction: self.compact_below,
                    bytes_per_second: self.compact_rate,
                    every: self.compact_every,
                },
                batch: BatchLimits { max_bytes: self.commit_batch, max_delay: self.commit_wait },
            },
            LayoutArg::Files => StoreLayout::Files,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    /// The flags' defaults are written twice, as clap strings here and in
    /// `ConnectionLimits::default` for the library; they must agree.
    #[test]
    fn the_limit_flags_default_to_the_library_defaults() {
        let required = ["--data-dir", "d", "--tls-cert", "c", "--tls-key", "k", "--client-ca", "a"];
        let cli = Cli::try_parse_from(["central-probes", "serve"].into_iter().chain(required)).unwrap();
        let Command::Serve(args) = cli.command else { panic!("not serve") };
        assert_eq!(args.limits.limits(), ConnectionLimits::default());
        assert_eq!(args.store_layout(), StoreLayout::default());
    }
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(fraction) if (0.0..=1.0).contains(&fraction) => Ok(fraction),
        _ => Err(format!("{text:?} is not a fraction from 0 to 1")),
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LayoutArg {
    Packs,
    Files,
}
