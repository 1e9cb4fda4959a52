//! Misses as they are kept: a probe asked for and not found, with its
//! requests, distinct clients and times, how it was resolved, and the
//! `MissLog` that keeps them across restarts (a file, `misses::file`, or
//! the shared database, `store::postgres::DatabaseMisses`). What records
//! them as requests happen is `misses::MissRecorder`.

use std::collections::BTreeSet;
use std::time::SystemTime;

use probe_api::limits::MAX_MISS_CLIENTS;
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

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
