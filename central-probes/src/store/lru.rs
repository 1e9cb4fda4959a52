//! Least-recently-used bookkeeping of a cache of probes (the upstream
//! cache on disk, the hot probes in memory): which probes to evict once the
//! cache holds more than its budget.

use std::collections::{BTreeMap, HashMap};

use probe_api::names::ProbePath;

use super::ProbeStore;
use crate::error::Result;

/// Least-recently-used bookkeeping of the cache.
#[derive(Default)]
pub(crate) struct Lru {
    clock: u64,
    by_path: HashMap<ProbePath, (u64, u64)>,
    by_tick: BTreeMap<u64, ProbePath>,
    total: u64,
}

impl Lru {
    /// Everything the cache holds, in no particular recency.
    pub(crate) async fn of(cache: &dyn ProbeStore) -> Result<Self> {
        let mut lru = Lru::default();
        for probe in cache.list(None, None, usize::MAX).await? {
            lru.insert(probe.path, probe.size);
        }
        Ok(lru)
    }

    /// Probes the cache holds.
    pub(crate) fn len(&self) -> usize {
        self.by_path.len()
    }

    pub(crate) fn touch(&mut self, path: &ProbePath) {
        if let Some(&(tick, size)) = self.by_path.get(path) {
            self.by_tick.remove(&tick);
            self.clock += 1;
            self.by_tick.insert(self.clock, path.clone());
            self.by_path.insert(path.clone(), (self.clock, size));
        }
    }

    /// Forgets `path`; true if it was there.
    pub(crate) fn remove(&mut self, path: &ProbePath) -> bool {
        let Some((tick, size)) = self.by_path.remove(path) else { return false };
        self.by_tick.remove(&tick);
        self.total -= size;
        true
    }

    pub(crate) fn insert(&mut self, path: ProbePath, size: u64) {
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
    pub(crate) fn evict_beyond(&mut self, max: u64, keep: &ProbePath) -> Vec<ProbePath> {
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
