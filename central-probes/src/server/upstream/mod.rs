//! The upstream probe server as a source: on a miss in the uploaded
//! probes, Central fetches the probe from the upstream (another Central,
//! through the same `ProbeService.GetProbe` API, or a static HTTPS bucket:
//! `bucket`; or an OCI registry holding pushed support packages:
//! `registry`), directly or through an HTTP CONNECT proxy, verifies it, and
//! keeps it in a bounded on-disk cache, apart from uploaded probes.
//!
//! Concurrent misses for one probe share one upstream fetch
//! (`single_flight`). "Not found" answers are remembered briefly, and
//! boundedly (`not_found`), so a crowd asking for a missing probe does not
//! turn into a crowd of upstream requests. The cache is a probe store like any other, used through the
//! `ProbeStore` trait; `store::lru` evicts its least recently used probes once it
//! holds more than its budget.

mod bucket;
mod checked_by;
mod has_probes;
mod not_found;
mod registry;
mod single_flight;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bucket::Bucket;
use probe_api::errors::remote_text;
use probe_api::https::{HttpsClient, HttpsUrl, ProxySettings};
use probe_api::names::ProbePath;
use probe_api::probe_stream::{ProbeReply, ReplyError};
use probe_api::signing::MAX_SIGNATURE_LEN;
use probe_api::transport::{self, ClientTls};
use probe_api::v1::probe_service_client::ProbeServiceClient;
use probe_api::v1::{GetProbeRequest, ProbeSource as ApiSource};
use registry::RegistryUpstream;
use tonic::Code;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::server::metrics::{Metrics, ResultLabels};
use crate::server::sources::{Found, ProbeSource};
use crate::store::ProbeStore;
use crate::store::lru::Lru;
use not_found::NotFoundAnswers;
use probe_api::limits::MAX_FILE_SIZE;
use single_flight::SingleFlight;

pub use checked_by::forget_cache_checked_otherwise;
pub use not_found::MAX_NOT_FOUND_ANSWERS;

/// Which kind of server the upstream is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamKind {
    /// Anything serving `ProbeService.GetProbe` (another Central):
    /// `https://HOST:PORT` (or `HOST:PORT`).
    Grpc { address: String },
    /// A static HTTPS bucket, `https://HOST[:PORT]/BASE/`, holding
    /// `<BASE>/<module version>/<file name>` (`bucket`).
    Bucket { base_url: String },
    /// An OCI registry repository, `HOST[:PORT]/PATH`, holding support
    /// packages pushed with `package push`, tagged by module version
    /// (`registry`).
    Registry {
        repository: String,
        /// containers-auth.json / Docker config.json with its credentials.
        auth_file: Option<std::path::PathBuf>,
        /// How long a tag's index is used before it is revalidated.
        index_ttl: Duration,
    },
}

/// How Central reaches the upstream and keeps what it fetched.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub kind: UpstreamKind,
    /// The upstream's CA, and a client identity if the upstream wants one.
    pub tls: ClientTls,
    /// The HTTP CONNECT proxy to reach it through, if any.
    pub proxies: ProxySettings,
    pub connect_timeout: Duration,
    /// Bound on one whole fetch, connecting included.
    pub fetch_timeout: Duration,
    /// Where the cache store lives (opened by `Central::open`).
    pub cache_dir: std::path::PathBuf,
    /// Probes beyond this many bytes are evicted, least recently used first.
    pub cache_max_bytes: u64,
    /// The cache refuses to write below this much free disk.
    pub min_free_bytes: u64,
    /// How long a "not found" from the upstream is believed (at most
    /// `MAX_NOT_FOUND_ANSWERS` of them are kept).
    pub not_found_ttl: Duration,
    /// A view token of an upstream Central's admin API: coverage checks ask
    /// it which probes it has (`has_probes`) without downloading them.
    pub view_token: Option<String>,
}

pub struct UpstreamSource {
    config: UpstreamConfig,
    client: Client,
    cache: Arc<dyn ProbeStore>,
    lru: Mutex<Lru>,
    /// Fetches under way, by probe: concurrent misses share one.
    in_flight: SingleFlight<ProbePath, Result<bool>>,
    not_found: Mutex<NotFoundAnswers>,
    metrics: Metrics,
}

impl UpstreamSource {
    /// Prepares the upstream client over `cache`, a store of its own (kept
    /// apart from uploaded probes); no connection is made until the first
    /// miss.
    pub async fn new(config: UpstreamConfig, cache: Arc<dyn ProbeStore>, metrics: Metrics) -> Result<Self> {
        let invalid = |e: &dyn std::fmt::Display| Error::invalid_argument(format!("upstream: {e}"));
        let (client, location) = match &config.kind {
            UpstreamKind::Grpc { address } => {
                let channel = transport::channel_through(address, &config.tls, config.connect_timeout, &config.proxies)
                    .map_err(|e| invalid(&e))?;
                (Client::Grpc(ProbeServiceClient::new(channel.clone()), channel), address.clone())
            }
            UpstreamKind::Bucket { base_url } => {
                let base = HttpsUrl::parse(base_url).map_err(|e| invalid(&e))?;
                let https = HttpsClient::new(&config.tls, config.proxies.clone(), config.connect_timeout)
                    .map_err(|e| invalid(&e))?;
                (Client::Bucket(Bucket::new(https, base)), base_url.clone())
            }
            UpstreamKind::Registry { repository, auth_file, index_ttl } => {
                let reference = crate::oci::Reference::parse(repository, false).map_err(|e| invalid(&e))?;
                let options = crate::oci::RegistryOptions {
                    ca_pem: config.tls.ca_pem.clone(),
                    proxies: config.proxies.clone(),
                    auth_file: auth_file.clone(),
                    connect_timeout: config.connect_timeout,
                    answer_timeout: config.fetch_timeout,
                };
                let registry = options.open(&reference, false).map_err(|e| invalid(&e))?;
                (Client::Registry(Box::new(RegistryUpstream::new(registry, *index_ttl))), repository.clone())
            }
        };
        let lru = Lru::of(cache.as_ref()).await?;
        // The proxy is shown without its credentials.
        let proxy = config.proxies.proxy.as_ref().map(ToString::to_string).unwrap_or_else(|| "none".to_owned());
        info!(upstream = %location, %proxy, cached = lru.len(), "upstream probe source configured");
        Ok(UpstreamSource {
            client,
            cache,
            lru: Mutex::new(lru),
            in_flight: SingleFlight::default(),
            not_found: Mutex::new(NotFoundAnswers::new(
                config.not_found_ttl,
                MAX_NOT_FOUND_ANSWERS,
                metrics.upstream_not_found_answers.clone(),
                metrics.upstream_not_found_evictions.clone(),
            )),
            config,
            metrics,
        })
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn not_found(&self) -> std::sync::MutexGuard<'_, NotFoundAnswers> {
        self.not_found.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recently_not_found(&self, path: &ProbePath) -> bool {
        self.not_found().is_fresh(path, Instant::now())
    }

    /// Makes sure the cache has `path` if the upstream has it: true if so.
    async fn fetch_into_cache(&self, path: &ProbePath) -> Result<bool> {
        // A fetch that finished just before this one started may have
        // filled the cache already.
        if self.cache.stat(path).await?.is_some() {
            return Ok(true);
        }
        if self.recently_not_found(path) {
            return Ok(false);
        }
        let fetched = tokio::time::timeout(self.config.fetch_timeout, self.download(path)).await.unwrap_or_else(|_| {
            Err(Error::new(
                Code::Unavailable,
                format!("the upstream did not deliver {path} within {:?}", self.config.fetch_timeout),
            ))
        });
        let result = match &fetched {
            Ok(true) => "fetched",
            Ok(false) => "not_found",
            Err(_) => "error",
        };
        self.metrics.upstream_fetches.get_or_create(&ResultLabels { result }).inc();
        match &fetched {
            Ok(false) => self.not_found().record(path, Instant::now()),
            Err(error) => warn!(%path, %error, "upstream fetch failed"),
            Ok(true) => info!(%path, "fetched from the upstream"),
        }
        fetched
    }

    async fn download(&self, path: &ProbePath) -> Result<bool> {
        let fetched = match &self.client {
            Client::Grpc(client, _) => self.download_grpc(client, path).await,
            Client::Bucket(bucket) => bucket.fetch(path, self.cache.as_ref()).await,
            Client::Registry(registry) => registry.fetch(path, self.cache.as_ref()).await,
        };
        // The cache refused the probe for its signature (trusted keys).
        let fetched = fetched.map_err(|e| if e.code == Code::FailedPrecondition { refused(e) } else { e })?;
        let Some(size) = fetched else { return Ok(false) };
        let evicted = {
            let mut lru = self.lru();
            lru.insert(path.clone(), size);
            lru.evict_beyond(self.config.cache_max_bytes, path)
        };
        for old in evicted {
            if let Err(error) = self.cache.remove(&old).await {
                warn!(path = %old, %error, "could not evict a cached probe");
            }
        }
        Ok(true)
    }

    /// Fetches `path` with GetProbe into the cache: its size, or `None`
    /// when the upstream does not have it.
    async fn download_grpc(&self, client: &ProbeServiceClient<Channel>, path: &ProbePath) -> Result<Option<u64>> {
        let request = GetProbeRequest {
            module_version: path.module_version().to_string(),
            file_name: path.file_name().to_string(),
        };
        let stream = match client.clone().get_probe(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status) => return Err(unavailable(&status)),
        };
        // `why` may quote the reply (a malformed digest).
        let bad_reply = |why: String| {
            Error::new(Code::Unavailable, format!("the upstream sent a bad reply for {path}: {}", remote_text(&why)))
        };
        let reply_error = |error: ReplyError| match error {
            ReplyError::Status(status) => unavailable(&status),
            ReplyError::BadReply(why) => bad_reply(why),
        };
        let mut reply = ProbeReply::start(stream, MAX_FILE_SIZE).await.map_err(reply_error)?;
        let mut writer = self.cache.create(path.clone(), reply.size()).await?;
        let signature = reply.header().signature.clone();
        if signature.len() > MAX_SIGNATURE_LEN {
            return Err(bad_reply(format!("a signature of {} bytes", signature.len())));
        }
        if !signature.is_empty() {
            writer.set_signature(signature);
        }
        while let Some(chunk) = reply.next_chunk().await.map_err(reply_error)? {
            writer.write(chunk).await.map_err(|e| bad_reply(e.message))?;
        }
        // The cache verifies size and digest; nothing unverified is kept.
        let commit = writer.finish(reply.sha256().into(), true).await?;
        commit.await.map_err(|e| match e.code {
            Code::DataLoss | Code::InvalidArgument => bad_reply(e.message),
            _ => e,
        })?;
        Ok(Some(reply.size()))
    }
}

/// The upstream's client, by kind.
enum Client {
    /// GetProbe's client, and its channel for the admin API's lookups.
    Grpc(ProbeServiceClient<Channel>, Channel),
    Bucket(Bucket),
    Registry(Box<RegistryUpstream>),
}

/// An upstream probe the cache refused for its signature (a Central with
/// trusted keys): not served, and NOT_FOUND says why.
fn refused(error: Error) -> Error {
    Error::new(Code::NotFound, format!("the upstream's probe is not served: {}", error.message))
}

/// The upstream's failure as Central logs it and passes it on to
/// Collectors: its code, its message as the upstream's own text (escaped and
/// cut, so it cannot forge lines of Central's log or of a Collector's
/// report), and why it could not be reached, when it could not.
fn unavailable(status: &tonic::Status) -> Error {
    let mut text = format!("upstream: {:?}: {}", status.code(), remote_text(status.message()));
    let mut cause = std::error::Error::source(status);
    let mut innermost = None;
    while let Some(error) = cause {
        innermost = Some(error.to_string());
        cause = error.source();
    }
    if let Some(why) = innermost {
        let tls = ["Certificate", "certificate", "UnknownCA", "UnknownIssuer"].iter().any(|word| why.contains(word));
        let hint = if tls { "; TLS refused: check --upstream-ca, and --upstream-cert/--upstream-key" } else { "" };
        text.push_str(&format!(" ({}{hint})", remote_text(&why)));
    }
    Error::new(Code::Unavailable, text)
}

#[tonic::async_trait]
impl ProbeSource for UpstreamSource {
    async fn find(&self, path: &ProbePath) -> Result<Option<Found>> {
        // A cached copy a read found damaged is fetched again.
        if self.cache.is_damaged(path) && self.cache.remove(path).await? {
            self.lru().remove(path);
        }
        if let Some(reader) = self.cache.open(path).await? {
            self.lru().touch(path);
            self.metrics.upstream_cache_hits.inc();
            return Ok(Some(Found { reader, source: ApiSource::UpstreamCache }));
        }
        if self.recently_not_found(path) {
            return Ok(None);
        }
        if !self.in_flight.run(path, || self.fetch_into_cache(path)).await? {
            return Ok(None);
        }
        match self.cache.open(path).await? {
            Some(reader) => Ok(Some(Found { reader, source: ApiSource::Upstream })),
            None => Err(Error::new(Code::Unavailable, format!("{path} left the cache before it was served; retry"))),
        }
    }
}
