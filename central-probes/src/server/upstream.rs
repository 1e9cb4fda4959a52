//! The upstream probe server as a source: on a miss in the uploaded
//! probes, Central fetches the probe from the upstream (through the same
//! `ProbeService.GetProbe` API), verifies it, and keeps it in a bounded
//! on-disk cache, apart from uploaded probes.
//!
//! Concurrent misses for one probe share one upstream fetch: the first
//! caller runs it, the others wait on the same cell. If that caller goes
//! away mid-fetch, a waiting one takes over. "Not found" answers are
//! remembered briefly so a crowd asking for a missing probe does not turn
//! into a crowd of upstream requests. The cache evicts the least recently
//! used probes once it holds more than its budget.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use probe_api::transport::{self, ClientTls};
use probe_api::v1::get_probe_response::Message;
use probe_api::v1::probe_service_client::ProbeServiceClient;
use probe_api::v1::{GetProbeRequest, ProbeSource as ApiSource};
use tokio::sync::OnceCell;
use tonic::Code;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::server::metrics::{Metrics, ResultLabels};
use crate::server::sources::{Found, ProbeSource};
use crate::store::ProbeStore;
use crate::store::filesystem::{FilesystemStore, FilesystemStoreConfig};
use probe_api::limits::MAX_FILE_SIZE;

/// How Central reaches the upstream and keeps what it fetched.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// `https://HOST:PORT` (or `HOST:PORT`).
    pub address: String,
    /// The upstream's CA, and a client identity if the upstream wants one.
    pub tls: ClientTls,
    pub connect_timeout: Duration,
    /// Bound on one whole fetch, connecting included.
    pub fetch_timeout: Duration,
    pub cache_dir: std::path::PathBuf,
    /// Probes beyond this many bytes are evicted, least recently used first.
    pub cache_max_bytes: u64,
    /// The cache refuses to write below this much free disk.
    pub min_free_bytes: u64,
    /// How long a "not found" from the upstream is believed.
    pub not_found_ttl: Duration,
}

type FetchCell = Arc<OnceCell<Result<bool>>>;

pub struct UpstreamSource {
    config: UpstreamConfig,
    client: ProbeServiceClient<Channel>,
    cache: Arc<dyn ProbeStore>,
    lru: Mutex<Lru>,
    /// Fetches under way, by probe: concurrent misses wait on one cell.
    in_flight: Arc<Mutex<HashMap<ProbePath, FetchCell>>>,
    not_found: Mutex<HashMap<ProbePath, Instant>>,
    metrics: Metrics,
}

impl UpstreamSource {
    /// Opens the cache (blocking) and prepares the upstream client; no
    /// connection is made until the first miss.
    pub fn new(config: UpstreamConfig, metrics: Metrics) -> Result<Self> {
        let cache = FilesystemStore::open(&FilesystemStoreConfig {
            data_dir: config.cache_dir.clone(),
            min_free_bytes: config.min_free_bytes,
        })?;
        let channel = transport::channel(&config.address, &config.tls, config.connect_timeout)
            .map_err(|e| Error::invalid_argument(format!("upstream: {e}")))?;
        let client = ProbeServiceClient::new(channel);
        let lru = Lru::of(&cache);

        info!(address = %config.address, cached = lru.by_path.len(), "upstream probe server configured");
        Ok(UpstreamSource {
            config,
            client,
            cache: Arc::new(cache),
            lru: Mutex::new(lru),
            in_flight: Arc::default(),
            not_found: Mutex::default(),
            metrics,
        })
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recently_not_found(&self, path: &ProbePath) -> bool {
        let mut not_found = self.not_found.lock().unwrap_or_else(|p| p.into_inner());
        match not_found.get(path) {
            Some(since) if since.elapsed() < self.config.not_found_ttl => true,
            Some(_) => {
                not_found.remove(path);
                false
            }
            None => false,
        }
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
            Ok(false) => {
                let mut not_found = self.not_found.lock().unwrap_or_else(|p| p.into_inner());
                not_found.insert(path.clone(), Instant::now());
            }
            Err(error) => warn!(%path, %error, "upstream fetch failed"),
            Ok(true) => info!(%path, "fetched from the upstream"),
        }
        fetched
    }

    async fn download(&self, path: &ProbePath) -> Result<bool> {
        let request = GetProbeRequest {
            module_version: path.module_version().to_string(),
            file_name: path.file_name().to_string(),
        };
        let mut stream = match self.client.clone().get_probe(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(false),
            Err(status) => return Err(unavailable(&status)),
        };
        let bad_reply =
            |why: String| Error::new(Code::Unavailable, format!("the upstream sent a bad reply for {path}: {why}"));
        let header = match stream.message().await.map_err(|s| unavailable(&s))? {
            Some(probe_api::v1::GetProbeResponse { message: Some(Message::Header(header)) }) => header,
            _ => return Err(bad_reply("no header first".into())),
        };
        let sha256 = Sha256Digest::from_hex(&header.sha256)
            .ok_or_else(|| bad_reply(format!("malformed SHA-256 {:?}", header.sha256)))?;
        if header.size > MAX_FILE_SIZE {
            return Err(bad_reply(format!("a size of {} bytes", header.size)));
        }
        let mut writer = self.cache.create(path.clone(), header.size).await?;
        while let Some(response) = stream.message().await.map_err(|s| unavailable(&s))? {
            let Some(Message::Chunk(chunk)) = response.message else {
                return Err(bad_reply("a second header".into()));
            };
            writer.write(chunk).await.map_err(|e| bad_reply(e.message))?;
        }
        // The cache verifies size and digest; nothing unverified is kept.
        let commit = writer.finish(sha256, true).await?;
        commit.await.map_err(|e| match e.code {
            Code::DataLoss | Code::InvalidArgument => bad_reply(e.message),
            _ => e,
        })?;

        let evicted = {
            let mut lru = self.lru();
            lru.insert(path.clone(), header.size);
            lru.evict_beyond(self.config.cache_max_bytes, path)
        };
        for old in evicted {
            if let Err(error) = self.cache.remove(&old).await {
                warn!(path = %old, %error, "could not evict a cached probe");
            }
        }
        Ok(true)
    }
}

fn unavailable(status: &tonic::Status) -> Error {
    Error::new(Code::Unavailable, format!("upstream: {}", transport::describe(status)))
}

/// Removes a finished fetch from the in-flight map, also when the caller
/// that waited for it is cancelled.
struct InFlightGuard<'a> {
    map: &'a Mutex<HashMap<ProbePath, FetchCell>>,
    path: &'a ProbePath,
    cell: FetchCell,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        // An unfinished cell stays: other callers may still be waiting on it
        // and one of them will finish it.
        if self.cell.initialized() {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(self.path).is_some_and(|cell| Arc::ptr_eq(cell, &self.cell)) {
                map.remove(self.path);
            }
        }
    }
}

#[tonic::async_trait]
impl ProbeSource for UpstreamSource {
    async fn find(&self, path: &ProbePath) -> Result<Option<Found>> {
        if let Some(reader) = self.cache.open(path).await? {
            self.lru().touch(path);
            self.metrics.upstream_cache_hits.inc();
            return Ok(Some(Found { reader, source: ApiSource::UpstreamCache }));
        }
        if self.recently_not_found(path) {
            return Ok(None);
        }
        let cell = {
            let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(path.clone()).or_default().clone()
        };
        let guard = InFlightGuard { map: &self.in_flight, path, cell: cell.clone() };
        let fetched = cell.get_or_init(|| self.fetch_into_cache(path)).await.clone();
        drop(guard);
        if !fetched? {
            return Ok(None);
        }
        match self.cache.open(path).await? {
            Some(reader) => Ok(Some(Found { reader, source: ApiSource::Upstream })),
            None => Err(Error::new(Code::Unavailable, format!("{path} left the cache before it was served; retry"))),
        }
    }
}

/// Least-recently-used bookkeeping of the cache.
#[derive(Default)]
struct Lru {
    clock: u64,
    by_path: HashMap<ProbePath, (u64, u64)>,
    by_tick: BTreeMap<u64, ProbePath>,
    total: u64,
}

impl Lru {
    /// Everything the cache holds, in no particular recency.
    fn of(cache: &FilesystemStore) -> Self {
        let mut lru = Lru::default();
        for (path, size) in cache.sizes() {
            lru.insert(path, size);
        }
        lru
    }

    fn touch(&mut self, path: &ProbePath) {
        if let Some(&(tick, size)) = self.by_path.get(path) {
            self.by_tick.remove(&tick);
            self.clock += 1;
            self.by_tick.insert(self.clock, path.clone());
            self.by_path.insert(path.clone(), (self.clock, size));
        }
    }

    fn insert(&mut self, path: ProbePath, size: u64) {
        if let Some((tick, old_size)) = self.by_path.remove(&path) {
            self.by_tick.remove(&tick);
            self.total -= old_size;
        }
        self.clock += 1;
        self.by_tick.insert(self.clock, path.clone());
        self.by_path.insert(path, (self.clock, size));
        self.total += size;
    }

    /// Drops the oldest entries until at most `max` bytes remain, never
    /// `keep` (the probe just fetched for a waiting caller).
    fn evict_beyond(&mut self, max: u64, keep: &ProbePath) -> Vec<ProbePath> {
        let mut evicted = Vec::new();
        while self.total > max {
            let Some((&tick, oldest)) = self.by_tick.iter().find(|(_, p)| *p != keep) else {
                break;
            };
            let oldest = oldest.clone();
            self.by_tick.remove(&tick);
            let (_, size) = self.by_path.remove(&oldest).expect("both maps agree");
            self.total -= size;
            evicted.push(oldest);
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(kernel: u32) -> ProbePath {
        ProbePath::parse(&format!("2.5.0/collector-ebpf-5.{kernel}.0.o.gz")).unwrap()
    }

    #[test]
    fn the_least_recently_used_probes_are_evicted_first() {
        let mut lru = Lru::default();
        lru.insert(path(1), 40);
        lru.insert(path(2), 40);
        lru.insert(path(3), 40);
        lru.touch(&path(1));
        assert_eq!(lru.evict_beyond(80, &path(3)), vec![path(2)]);
        lru.insert(path(4), 40);
        assert_eq!(lru.evict_beyond(80, &path(4)), vec![path(3)]);
        assert_eq!(lru.total, 80);
    }

    #[test]
    fn the_probe_just_fetched_is_never_evicted() {
        let mut lru = Lru::default();
        lru.insert(path(1), 100);
        assert!(lru.evict_beyond(10, &path(1)).is_empty());
        lru.insert(path(2), 100);
        assert_eq!(lru.evict_beyond(10, &path(2)), vec![path(1)]);
    }
}
