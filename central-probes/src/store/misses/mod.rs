//! Misses: the probes Collectors asked for that no source had (GetProbe or
//! the HTTPS route answered NOT_FOUND), with how often, by how many
//! distinct clients, and when, so that an admin can tell which support
//! package is missing. A miss is resolved when an upload or the upstream
//! later provides its probe, and opens again if it is missed again.
//!
//! A `MissLog` keeps them across restarts, beside the probes: `file`, a
//! file in the data directory, or the database that replicas share
//! (`store::postgres::DatabaseMisses`), where every replica's misses meet.
//! Requests only touch `MissRecorder`'s in-memory batch (`recorder`); a
//! task merges the batch into the log every second, so a Collector fleet in
//! CrashLoopBackOff costs no write per request. The log is bounded: at most
//! `MAX_MISSES` misses (the one seen longest ago goes first, `MissTable`)
//! and `MAX_MISS_CLIENTS` distinct clients counted per miss.

pub mod file;
pub mod recorder;

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use probe_api::limits::{MAX_MISS_CLIENTS, MAX_MISSES};
use probe_api::names::ProbePath;

use crate::error::Result;
use crate::store::client_id::ClientId;

/// One probe asked for and not found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Miss {
    pub path: ProbePath,
    pub requests: u64,
    /// Distinct clients, at most `MAX_MISS_CLIENTS`.
    pub clients: BTreeSet<ClientId>,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    /// Set once an upload or the upstream provided the probe.
    pub resolved: Option<Resolved>,
}

/// When and how a miss was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Unix seconds.
    pub at: u64,
    pub by: Resolver,
}

/// What provided a missed probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolver {
    Upload,
    Upstream,
}

impl Resolver {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolver::Upload => "upload",
            Resolver::Upstream => "upstream",
        }
    }

    pub fn parse(text: &str) -> Option<Resolver> {
        match text {
            "upload" => Some(Resolver::Upload),
            "upstream" => Some(Resolver::Upstream),
            _ => None,
        }
    }
}

impl Miss {
    /// A first request.
    pub(crate) fn new(path: ProbePath, client: ClientId, now: u64) -> Miss {
        Miss { path, requests: 1, clients: BTreeSet::from([client]), first_seen: now, last_seen: now, resolved: None }
    }

    /// Adds the requests of `later`, which reopens a resolved miss.
    pub(crate) fn merge(&mut self, later: &Miss) {
        self.requests += later.requests;
        for client in &later.clients {
            if self.clients.len() >= MAX_MISS_CLIENTS {
                break;
            }
            self.clients.insert(*client);
        }
        self.first_seen = self.first_seen.min(later.first_seen);
        self.last_seen = self.last_seen.max(later.last_seen);
        self.resolved = None;
    }
}

/// Where misses are kept across restarts.
#[tonic::async_trait]
pub trait MissLog: Send + Sync + 'static {
    /// Merges misses seen since the last call (each path once).
    async fn record(&self, seen: Vec<Miss>) -> Result<()>;

    /// Marks the open misses of these paths resolved; other paths are
    /// ignored.
    async fn resolve(&self, paths: &[ProbePath], resolved: Resolved) -> Result<()>;

    /// Every miss kept, most recently seen first.
    async fn list(&self) -> Result<Vec<Miss>>;
}

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

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
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
