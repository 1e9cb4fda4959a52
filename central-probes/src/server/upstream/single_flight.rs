//! One run of a fetch for all who ask for the same key at once: the first
//! caller runs it, the others wait on the same cell. If that caller goes
//! away mid-fetch, a waiting one takes over. A finished run is forgotten,
//! so the next miss runs anew.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

type Cell<V> = Arc<OnceCell<V>>;

pub(super) struct SingleFlight<K, V> {
    in_flight: Mutex<HashMap<K, Cell<V>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight { in_flight: Mutex::new(HashMap::new()) }
    }
}

impl<K: Clone + Eq + Hash, V: Clone> SingleFlight<K, V> {
    /// The value of `fetch` for `key`, run once for all concurrent callers.
    pub(super) async fn run<F: Future<Output = V>>(&self, key: &K, fetch: impl FnOnce() -> F) -> V {
        let cell = self.lock().entry(key.clone()).or_default().clone();
        let guard = Forget { flight: self, key, cell: cell.clone() };
        let value = cell.get_or_init(fetch).await.clone();
        drop(guard);
        value
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Cell<V>>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a finished run from the map, also when the caller that waited
/// for it is cancelled.
struct Forget<'a, K: Clone + Eq + Hash, V: Clone> {
    flight: &'a SingleFlight<K, V>,
    key: &'a K,
    cell: Cell<V>,
}

impl<K: Clone + Eq + Hash, V: Clone> Drop for Forget<'_, K, V> {
    fn drop(&mut self) {
        // An unfinished cell stays: other callers may still be waiting on it
        // and one of them will finish it.
        if self.cell.initialized() {
            let mut map = self.flight.lock();
            if map.get(self.key).is_some_and(|cell| Arc::ptr_eq(cell, &self.cell)) {
                map.remove(self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_a_later_one_runs_again() {
        let flight = Arc::new(SingleFlight::<u32, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..10)
            .map(|_| {
                let (flight, runs) = (flight.clone(), runs.clone());
                tokio::spawn(async move {
                    flight
                        .run(&7, || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            42
                        })
                        .await
                })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap(), 42);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(flight.run(&7, || async { 43 }).await, 43, "a finished run is forgotten");
    }

    #[tokio::test]
    async fn a_cancelled_first_caller_is_taken_over_by_a_waiting_one() {
        let flight = Arc::new(SingleFlight::<u32, u32>::default());
        let first = tokio::spawn({
            let flight = flight.clone();
            async move { flight.run(&1, std::future::pending::<u32>).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = tokio::spawn({
            let flight = flight.clone();
            async move { flight.run(&1, || async { 5 }).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap(), 5);
    }
}
