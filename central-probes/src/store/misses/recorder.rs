//! `MissRecorder`: misses recorded as requests happen, in a batch in
//! memory that a task merges into the `MissLog` every second, and resolved
//! when an upload or the upstream provides their probe.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use probe_api::limits::MAX_MISSES;
use probe_api::names::ProbePath;
use prometheus_client::metrics::gauge::Gauge;
use tracing::warn;

use super::{Miss, MissLog, Resolved, Resolver, unix_now};
use crate::error::Result;
use crate::store::client_id::ClientId;

/// Collects misses as they happen and merges them into the log in batches.
pub struct MissRecorder {
    batch: Mutex<HashMap<ProbePath, Miss>>,
    log: Arc<dyn MissLog>,
    /// One merge at a time, so that a resolution follows the misses
    /// before it.
    merging: tokio::sync::Mutex<()>,
    /// The paths of open misses (the log's and the batch's), so that
    /// serving and uploading a probe nobody missed costs no log access.
    open: Mutex<HashSet<ProbePath>>,
    open_misses: Gauge,
}

impl MissRecorder {
    pub fn new(log: Arc<dyn MissLog>, open_misses: Gauge) -> Self {
        MissRecorder {
            batch: Mutex::new(HashMap::new()),
            log,
            merging: tokio::sync::Mutex::new(()),
            open: Mutex::new(HashSet::new()),
            open_misses,
        }
    }

    /// A recorder of `log`'s misses, knowing which are open.
    pub async fn open(log: Arc<dyn MissLog>, open_misses: Gauge) -> Result<Self> {
        let recorder = MissRecorder::new(log, open_misses);
        recorder.count_open().await?;
        Ok(recorder)
    }

    /// `client` asked for `path` and no source had it.
    pub fn missed(&self, path: &ProbePath, client: ClientId) {
        let now = unix_now();
        self.open.lock().expect("not poisoned").insert(path.clone());
        let mut batch = self.batch.lock().expect("not poisoned");
        if let Some(miss) = batch.get_mut(path) {
            miss.merge(&Miss::new(path.clone(), client, now));
        } else if batch.len() < MAX_MISSES {
            // A batch holds at most as many paths as the log keeps.
            batch.insert(path.clone(), Miss::new(path.clone(), client, now));
        }
    }

    /// Merges the batch into the log.
    pub async fn flush(&self) -> Result<()> {
        let _merging = self.merging.lock().await;
        self.flush_locked().await
    }

    async fn flush_locked(&self) -> Result<()> {
        if self.merge_batch().await? {
            self.count_open().await?;
        }
        Ok(())
    }

    /// Records the batch in the log; whether it held anything.
    async fn merge_batch(&self) -> Result<bool> {
        let batch: Vec<Miss> = std::mem::take(&mut *self.batch.lock().expect("not poisoned")).into_values().collect();
        if batch.is_empty() {
            return Ok(false);
        }
        self.log.record(batch).await?;
        Ok(true)
    }

    async fn count_open(&self) -> Result<Vec<Miss>> {
        let misses = self.log.list().await?;
        let mut open: HashSet<ProbePath> =
            misses.iter().filter(|miss| miss.resolved.is_none()).map(|miss| miss.path.clone()).collect();
        self.open_misses.set(open.len() as i64);
        // Misses of the batch are open too, though not in the log yet.
        open.extend(self.batch.lock().expect("not poisoned").keys().cloned());
        *self.open.lock().expect("not poisoned") = open;
        Ok(misses)
    }

    /// `by` provided these probes: their misses, the batch's included, are
    /// resolved.
    pub async fn resolve(&self, paths: &[ProbePath], by: Resolver) -> Result<()> {
        let _merging = self.merging.lock().await;
        self.merge_batch().await?;
        // Another replica may have recorded misses since this one looked.
        self.count_open().await?;
        let missed: Vec<ProbePath> = {
            let open = self.open.lock().expect("not poisoned");
            paths.iter().filter(|path| open.contains(*path)).cloned().collect()
        };
        if missed.is_empty() {
            return Ok(());
        }
        self.log.resolve(&missed, Resolved { at: unix_now(), by }).await?;
        self.count_open().await.map(drop)
    }

    /// `resolve` in the background, for a probe being served: serving does
    /// not wait for the log.
    pub fn provided(self: &Arc<Self>, path: ProbePath, by: Resolver) {
        if !self.open.lock().expect("not poisoned").contains(&path) {
            return;
        }
        let recorder = self.clone();
        tokio::spawn(async move {
            if let Err(error) = recorder.resolve(&[path], by).await {
                warn!(%error, "could not mark a miss resolved");
            }
        });
    }

    /// Every miss, the batch's included.
    pub async fn list(&self) -> Result<Vec<Miss>> {
        let _merging = self.merging.lock().await;
        self.merge_batch().await?;
        self.count_open().await
    }

    /// Merges the batch every `every` until the recorder is dropped
    /// elsewhere, and every tenth time learns which misses are open (other
    /// replicas of a shared log record some); a failed merge is logged and
    /// its misses are lost (they are a diagnosis, not data).
    pub fn merge_every(self: &Arc<Self>, every: Duration) {
        let recorder = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for tick in 1u64.. {
                ticks.tick().await;
                let Some(recorder) = recorder.upgrade() else { return };
                let merged = match tick % 10 {
                    0 => recorder.list().await.map(drop),
                    _ => recorder.flush().await,
                };
                if let Err(error) = merged {
                    warn!(%error, "could not record misses");
                }
            }
        });
    }
}

/// A miss as ListMisses answers it.
impl From<&Miss> for probe_api::v1::ProbeMiss {
    fn from(miss: &Miss) -> Self {
        probe_api::v1::ProbeMiss {
            path: miss.path.to_string(),
            module_version: miss.path.module_version().to_string(),
            file_name: miss.path.file_name().to_string(),
            requests: miss.requests,
            distinct_clients: miss.clients.len() as u32,
            first_seen_unix: miss.first_seen as i64,
            last_seen_unix: miss.last_seen as i64,
            resolved_unix: miss.resolved.map_or(0, |r| r.at as i64),
            resolved_by: miss.resolved.map(|r| r.by.as_str().to_owned()).unwrap_or_default(),
        }
    }
}
