//! `probe-bench`: the load harness of `bench/run.sh`. One concurrency
//! model for both servers under test: N tokio tasks, each with its own
//! connection (or a new one per request), picking probes at random for a
//! fixed time. Against Central it calls GetProbe over gRPC; against nginx
//! it GETs the same files over HTTP/2; both over mutual TLS. Neither side
//! hashes what it receives, so the servers are compared on equal work.

mod durability;
mod load;
mod roxctl;
mod sink;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use central_probes::admin::chunk_pool::ChunkPool;
use central_probes::admin::package::Package;
use clap::{Parser, Subcommand, ValueEnum};
use load::{Client, load, rustls_config};
use probe_api::transport::ClientTls;
use probe_api::v1::{GetExistingProbesRequest, ListProbesRequest};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    Grpc,
    /// GetProbe through the HTTP/2 client of `https` (no protobuf decoded).
    GrpcPlain,
    /// GetProbe through h2 itself, the request's HEADERS and DATA queued
    /// together, so they go out in one write in all but about 1% of calls
    /// (hyper's client, under tonic and `grpc-plain`, writes the DATA in a
    /// second flush in about a quarter of one-client calls).
    GrpcH2,
    Https,
}

#[derive(clap::Args, Clone)]
struct Tls {
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Writes every probe of a package as a plain file under OUT/<module>/<name>.
    Extract {
        #[arg(long)]
        package: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Random GetProbe calls (gRPC) or GETs of /<module>/<name> (HTTPS).
    Load {
        #[arg(long, value_enum)]
        protocol: Protocol,
        #[arg(long)]
        address: String,
        #[command(flatten)]
        tls: Tls,
        /// Probe paths, one per line.
        #[arg(long)]
        paths: PathBuf,
        #[arg(long)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// A new TCP + TLS connection for every request.
        #[arg(long)]
        new_connection_per_request: bool,
        /// Fetch every path once, in order, instead of random picks for a
        /// time (to warm a cache).
        #[arg(long)]
        each_once: bool,
        /// No TLS session resumption in the plain HTTP/2 client: every new
        /// connection makes a full handshake, as a Collector starting does
        /// (tonic's client, a new one per connection, never resumes).
        #[arg(long)]
        full_handshakes: bool,
    },
    /// Uploads a package as the product's roxctl does: GetExistingProbes of
    /// v1.ProbeUploadService, then POST /api/extensions/probeupload.
    RoxctlUpload {
        #[arg(long)]
        package: PathBuf,
        #[arg(long)]
        address: String,
        #[arg(long)]
        ca: PathBuf,
        /// An admin token.
        #[arg(long)]
        token: String,
    },
    /// Many clients, each on a new connection, ask for one probe at once.
    Fanout {
        #[arg(long)]
        address: String,
        #[command(flatten)]
        tls: Tls,
        #[arg(long)]
        path: String,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
    },
    /// Times GetExistingProbes for the paths of a file, and one ListProbes page.
    Queries {
        #[arg(long)]
        address: String,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        token: String,
        #[arg(long)]
        paths: PathBuf,
    },
    /// Fills a store directly with many small probes over several module versions.
    Fill {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        probes: usize,
        #[arg(long, default_value_t = 6)]
        module_versions: usize,
        /// Also write the paths of the first module version here.
        #[arg(long)]
        paths_out: PathBuf,
    },
    /// CPU time of the Collector's signature check of one probe, beside its SHA-256.
    Verify {
        #[arg(long, default_value_t = 130_000)]
        size: usize,
        #[arg(long, default_value_t = 2000)]
        iterations: usize,
    },
    /// A TLS + HTTP server that only reads request bodies (and hashes them
    /// with --sha256): the floor of an upload's receive path.
    Sink {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        sha256: bool,
    },
    /// Per-file fsync against group commit, on the file system of DIR.
    Durability {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 2000)]
        files: usize,
        #[arg(long, default_value_t = 130_000)]
        size: usize,
        #[arg(long, default_value_t = 64)]
        group: usize,
    },
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn client_tls(tls: &Tls) -> ClientTls {
    ClientTls { ca_pem: read(&tls.ca), identity: Some((read(&tls.cert), read(&tls.key))) }
}

#[tokio::main]
async fn main() {
    central_probes::server::install_crypto_provider();
    match Cli::parse().command {
        Command::Extract { package, out } => extract(&package, &out),
        Command::Load {
            protocol,
            address,
            tls,
            paths,
            concurrency,
            seconds,
            new_connection_per_request,
            each_once,
            full_handshakes,
        } => {
            let paths: Vec<String> = std::fs::read_to_string(&paths).unwrap().lines().map(String::from).collect();
            let mut config = rustls_config(&tls);
            if full_handshakes {
                config.resumption = rustls::client::Resumption::disabled();
            }
            let client = match protocol {
                Protocol::Grpc => Client::Grpc { address, tls: client_tls(&tls) },
                Protocol::GrpcPlain => Client::GrpcPlain { address, config: Arc::new(config) },
                Protocol::GrpcH2 => Client::GrpcH2 { address, config: Arc::new(config) },
                Protocol::Https => Client::Https { address, config: Arc::new(config) },
            };
            load(Arc::new(client), Arc::new(paths), concurrency, seconds, new_connection_per_request, each_once).await;
        }
        Command::Fanout { address, tls, path, clients } => fanout(&address, &client_tls(&tls), &path, clients).await,
        Command::Queries { address, ca, token, paths } => queries(&address, read(&ca), &token, &paths).await,
        Command::Fill { data_dir, probes, module_versions, paths_out } => {
            fill(&data_dir, probes, module_versions, &paths_out).await
        }
        Command::Sink { listen, cert, key, sha256 } => sink::run(&listen, &cert, &key, sha256).await,
        Command::Durability { dir, files, size, group } => durability::run(&dir, files, size, group),
        Command::Verify { size, iterations } => verify::run(size, iterations),
        Command::RoxctlUpload { package, address, ca, token } => {
            roxctl::upload(&package, &address, read(&ca), &token).await
        }
    }
}

fn extract(package: &Path, out: &Path) {
    let mut package = Package::open(package, &Default::default()).unwrap();
    let index = package.index().unwrap();
    let mut pool = ChunkPool::new(1 << 20, 1);
    for probe in &index.probes {
        let dir = out.join(probe.path.module_version().as_str());
        std::fs::create_dir_all(&dir).unwrap();
        let mut bytes = Vec::with_capacity(probe.size as usize);
        package
            .read_entry(probe, &mut pool, |chunk| {
                bytes.extend_from_slice(&chunk);
                Ok(())
            })
            .unwrap();
        std::fs::write(dir.join(probe.path.file_name().as_str()), bytes).unwrap();
    }
    println!("extracted {} probes to {}", index.probes.len(), out.display());
}

async fn fanout(address: &str, tls: &ClientTls, path: &str, clients: usize) {
    let client = Client::Grpc { address: address.to_owned(), tls: tls.clone() };
    let client = Arc::new(client);
    let started = Instant::now();
    let calls: Vec<_> = (0..clients)
        .map(|_| {
            let (client, path, address) = (client.clone(), path.to_owned(), address.to_owned());
            tokio::spawn(async move { client.connect().await?.get(&path, &address).await })
        })
        .collect();
    let mut failed = 0;
    for call in calls {
        if let Err(e) = call.await.unwrap() {
            failed += 1;
            eprintln!("fan-out call: {e}");
        }
    }
    // Machine-readable: milliseconds failures
    println!("{:.0} {failed}", started.elapsed().as_secs_f64() * 1e3);
}

async fn queries(address: &str, ca: Vec<u8>, token: &str, paths: &Path) {
    let mut client = central_probes::admin::client::connect(address, ca, token, Duration::from_secs(5)).unwrap();
    let paths: Vec<String> = std::fs::read_to_string(paths).unwrap().lines().map(String::from).collect();
    // The connection (TCP, TLS, HTTP/2) is made before the clock starts.
    client.list_probes(ListProbesRequest { page_size: 1, ..Default::default() }).await.unwrap();
    let mut existing_ms = Vec::new();
    let mut found = 0;
    for _ in 0..QUERY_ROUNDS {
        let started = Instant::now();
        let response = client.get_existing_probes(GetExistingProbesRequest { paths: paths.clone() }).await.unwrap();
        existing_ms.push(started.elapsed().as_secs_f64() * 1e3);
        found = response.into_inner().probes.len();
    }
    let first_ms = existing_ms[0];
    existing_ms.sort_by(f64::total_cmp);
    let median_ms = existing_ms[QUERY_ROUNDS / 2];
    let started = Instant::now();
    let page = client.list_probes(ListProbesRequest { page_size: 1000, ..Default::default() }).await.unwrap();
    let list_ms = started.elapsed().as_secs_f64() * 1e3;
    // Machine-readable: asked found first_ms median_ms page_len list_ms
    println!("{} {found} {first_ms:.1} {median_ms:.1} {} {list_ms:.1}", paths.len(), page.into_inner().probes.len());
}

/// GetExistingProbes calls timed by `queries`: the first and the median are reported.
const QUERY_ROUNDS: usize = 5;

async fn fill(data_dir: &Path, probes: usize, module_versions: usize, paths_out: &Path) {
    use central_probes::store::ProbeStore;
    use central_probes::store::pack::{PackStore, PackStoreConfig};
    // The layout Central serves by default: what its start-up is measured on.
    let store = PackStore::open(&PackStoreConfig::new(data_dir)).unwrap();
    let per_version = probes.div_ceil(module_versions);
    let mut first_version = Vec::new();
    let mut pending = Vec::new();
    for i in 0..probes {
        let version = format!("2.{}.0", i / per_version);
        let path = format!("{version}/collector-ebpf-5.{}.{}-{}-generic.o.gz", i % 20, i % 7, i);
        if i < per_version {
            first_version.push(path.clone());
        }
        // Small probes: start-up cost depends on the number of files.
        let bytes = Bytes::from(format!("probe {i}").repeat(20));
        let mut writer =
            store.create(probe_api::names::ProbePath::parse(&path).unwrap(), bytes.len() as u64).await.unwrap();
        let digest = probe_api::digest::Sha256Digest::of(&bytes);
        writer.write(bytes).await.unwrap();
        pending.push(writer.finish(digest.into(), false).await.unwrap());
        if pending.len() >= 64 {
            for commit in pending.drain(..) {
                commit.await.unwrap();
            }
        }
    }
    for commit in pending {
        commit.await.unwrap();
    }
    std::fs::write(paths_out, first_version.join("\n")).unwrap();
    println!("stored {probes} probes in {module_versions} module versions");
}
