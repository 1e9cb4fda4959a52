//! Misses: the probes Collectors asked for that no source had (GetProbe or
//! the HTTPS route answered NOT_FOUND), with how often, by how many
//! distinct clients, and when, so that an admin can tell which support
//! package is missing. A miss is resolved when an upload or the upstream
//! later provides its probe, and opens again if it is missed again.
//!
//! A `MissLog` keeps them across restarts, beside the probes: `file`, a
//! file in the data directory, or the database that replicas share
//! (`store::postgres::DatabaseMisses`), where every replica's misses meet.
//! Requests only touch `MissRecorder`'s in-memory batch; a task merges the
//! batch into the log every second, so a Collector fleet in
//! CrashLoopBackOff costs no write per request. The log is bounded: at most
//! `MAX_MISSES` misses (the one seen longest ago goes first) and
//! `MAX_MISS_CLIENTS` distinct clients counted per miss.

pub mod file;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use probe_api::limits::MAX_MISSES;
use probe_api::names::ProbePath;
use prometheus_client::metrics::gauge::Gauge;
use tracing::warn;

use crate::error::Result;
use crate::store::client_id::ClientId;
// The records live with the store, below the recorder.
pub use crate::store::misses::{Miss, MissLog, Resolved, Resolver, unix_now};

/// The misses of a log in memory, bounded; what a log that keeps them
/// whole (the file) applies changes to.
#[derive(Default)]
pub struct MissTable {
    misses: HashMap<ProbePath, Miss>,
}

impl MissTable {
    pub fn from_misses(misses: impl IntoIterator<Item = Miss>) -> Self {
        let mut table = MissTable::default();
        table.record(misses.into_iter().collect());
        table
    }

    pub fn record(&mut self, seen: Vec<Miss>) {
        for miss in seen {
            match self.misses.get_mut(&miss.path) {
                Some(kept) => kept.merge(&miss),
                None => {
                    self.misses.insert(miss.path.clone(), miss);
                }
            }
        }
        if self.misses.len() > MAX_MISSES {
            let mut by_age: Vec<(u64, ProbePath)> =
                self.misses.values().map(|miss| (miss.last_seen, miss.path.clone())).collect();
            by_age.sort();
            for (_, path) in by_age.into_iter().take(self.misses.len() - MAX_MISSES) {
                self.misses.remove(&path);
            }
        }
    }

    /// Resolves the open misses of `paths`; whether any changed.
    pub fn resolve(&mut self, paths: &[ProbePath], resolved: Resolved) -> bool {
        let mut changed = false;
        for path in paths {
            if let Some(miss) = self.misses.get_mut(path).filter(|miss| miss.resolved.is_none()) {
                miss.resolved = Some(resolved);
                changed = true;
            }
        }
        changed
    }

    pub fn list(&self) -> Vec<Miss> {
        let mut misses: Vec<Miss> = self.misses.values().cloned().collect();
        misses.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then_with(|| a.path.cmp(&b.path)));
        misses
    }
}

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

#[cfg(test)]
mod tests {
    use probe_api::limits::MAX_MISS_CLIENTS;

    use super::*;

    fn path(i: usize) -> ProbePath {
        ProbePath::parse(&format!("2.5.0/collector-ebpf-6.{i}.0.o.gz")).unwrap()
    }

    fn seen(i: usize, client: u64, at: u64) -> Miss {
        Miss::new(path(i), ClientId(client), at)
    }

    #[test]
    fn misses_merge_counts_clients_and_times_and_a_new_miss_reopens_a_resolved_one() {
        let mut table = MissTable::default();
        table.record(vec![seen(1, 1, 100), seen(2, 1, 100)]);
        table.record(vec![Miss { requests: 3, ..seen(1, 2, 150) }]);
        table.record(vec![seen(1, 1, 160)]);
        let first = table.list().into_iter().next().unwrap();
        assert_eq!(first.path, path(1));
        assert_eq!((first.requests, first.clients.len(), first.first_seen, first.last_seen), (5, 2, 100, 160));

        let resolved = Resolved { at: 200, by: Resolver::Upload };
        assert!(table.resolve(&[path(1), path(9)], resolved));
        assert!(!table.resolve(&[path(1)], resolved), "already resolved");
        let listed = table.list();
        assert_eq!(listed.iter().find(|m| m.path == path(1)).unwrap().resolved, Some(resolved));
        assert_eq!(listed.iter().find(|m| m.path == path(2)).unwrap().resolved, None);
        table.record(vec![seen(1, 3, 300)]);
        assert_eq!(table.list()[0].resolved, None, "missed again after it was provided");
    }

    #[test]
    fn the_table_keeps_the_most_recently_seen_misses_and_bounded_clients() {
        let mut table = MissTable::default();
        table.record((0..MAX_MISSES + 10).map(|i| seen(i, 1, i as u64)).collect());
        let kept = table.list();
        assert_eq!(kept.len(), MAX_MISSES);
        assert!(kept.iter().all(|miss| miss.last_seen >= 10), "the ten seen longest ago went");

        let mut table = MissTable::default();
        table.record((0..MAX_MISS_CLIENTS as u64 + 5).map(|c| seen(1, c, 1)).collect());
        let miss = &table.list()[0];
        assert_eq!(miss.clients.len(), MAX_MISS_CLIENTS);
        assert_eq!(miss.requests, MAX_MISS_CLIENTS as u64 + 5);
    }
}
