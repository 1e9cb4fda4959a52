//! The threads that hash what uploads write, and write it for a backend
//! that stages by blocking writes (the pack store and the per-file store):
//! one long-lived thread per core (a lane), each running the jobs given to
//! it in the order they came.
//!
//! A thread per file would mean tens of threads per upload when the network
//! is ahead of the disk, and switching between them and waking them costs
//! more than the work (BENCHMARKS.md, "Hashing and writing an upload").
//!
//! A file keeps the lane it was given, so its chunks are taken in order. A
//! chunk is queued only once it has arrived, so a slow uploader never holds
//! a lane up. The queue of a lane is bounded in bytes: a writer waits while
//! it is over `HIGH` and is woken when the lane has worked it down to
//! `LOW` (once, not per chunk).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;

use tokio::sync::Notify;
use tracing::error;

/// Bytes queued on one lane above which a writer waits.
const HIGH: u64 = 4 << 20;
/// ... and below which the waiting writers go on.
const LOW: u64 = 2 << 20;

type Job = Box<dyn FnOnce() + Send>;

/// The lanes of one store; jobs are given out to the least loaded.
/// Dropped, it waits for the jobs queued: they may hold what the store
/// holds (a pack staging holds the store's directory lock), and a store
/// closed is closed whole.
pub(crate) struct Lanes {
    lanes: Vec<Lane>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: AtomicUsize,
}

/// One lane's queue, to which a file's jobs go; cheap to clone.
#[derive(Clone)]
pub(crate) struct Lane {
    jobs: mpsc::Sender<(u64, Job)>,
    backlog: Arc<Backlog>,
}

/// The bytes queued on a lane, and its waiting writers.
#[derive(Default)]
struct Backlog {
    bytes: AtomicU64,
    room: Notify,
}

/// How many lanes a store has: one per core.
pub(crate) fn count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl Lanes {
    pub(crate) fn new() -> Lanes {
        let (lanes, threads) = (0..count()).map(|_| Lane::spawn()).unzip();
        Lanes { lanes, threads, next: AtomicUsize::new(0) }
    }

    /// The lane with the fewest bytes queued; among equals, the next in turn
    /// (so that one upload's files spread over the cores).
    pub(crate) fn pick(&self) -> Lane {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let lanes = self.lanes.len();
        let lane = (0..lanes)
            .map(|i| &self.lanes[(start + i) % lanes])
            .min_by_key(|lane| lane.backlog.bytes.load(Ordering::Relaxed))
            .expect("at least one lane");
        lane.clone()
    }
}

impl Drop for Lanes {
    /// The store's writers (each holding a lane) are gone by now: they
    /// hold the store. So the threads end once their queues are empty.
    fn drop(&mut self) {
        self.lanes.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Lane {
    fn spawn() -> (Lane, std::thread::JoinHandle<()>) {
        let (jobs, queue) = mpsc::channel::<(u64, Job)>();
        let backlog = Arc::new(Backlog::default());
        let worked = backlog.clone();
        // The thread ends when the store and every writer have let go.
        let thread = std::thread::Builder::new()
            .name("probe-hashing".into())
            .spawn(move || {
                while let Ok((bytes, job)) = queue.recv() {
                    // A job that panics fails its own file only.
                    if std::panic::catch_unwind(AssertUnwindSafe(job)).is_err() {
                        error!("a hashing job panicked");
                    }
                    worked.done(bytes);
                }
            })
            .expect("starting a hashing thread");
        (Lane { jobs, backlog }, thread)
    }

    /// Queues `job`, which holds `bytes` bytes, after waiting for room.
    /// False if the lane is gone (its thread died).
    pub(crate) async fn run(&self, bytes: u64, job: impl FnOnce() + Send + 'static) -> bool {
        self.backlog.room_for_more().await;
        self.run_now(bytes, job)
    }

    /// Queues `job` without waiting: for what holds no bytes.
    pub(crate) fn run_now(&self, bytes: u64, job: impl FnOnce() + Send + 'static) -> bool {
        self.backlog.bytes.fetch_add(bytes, Ordering::SeqCst);
        if self.jobs.send((bytes, Box::new(job))).is_err() {
            self.backlog.done(bytes);
            return false;
        }
        true
    }
}

impl Backlog {
    async fn room_for_more(&self) {
        loop {
            if self.bytes.load(Ordering::SeqCst) <= HIGH {
                return;
            }
            let notified = self.room.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            // Drained to LOW between the check and `enable`: not told.
            if self.bytes.load(Ordering::SeqCst) <= HIGH {
                return;
            }
            notified.await;
        }
    }

    fn done(&self, bytes: u64) {
        let before = self.bytes.fetch_sub(bytes, Ordering::SeqCst);
        if before > LOW && before - bytes <= LOW {
            self.room.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    #[tokio::test]
    async fn a_lanes_jobs_run_in_the_order_they_came() {
        let lanes = Lanes::new();
        let lane = lanes.pick();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..1000 {
            let seen = seen.clone();
            assert!(lane.run(1 << 16, move || seen.lock().unwrap().push(i)).await);
        }
        let (done, finished) = tokio::sync::oneshot::channel();
        lane.run_now(0, move || done.send(()).unwrap());
        finished.await.unwrap();
        assert_eq!(*seen.lock().unwrap(), (0..1000).collect::<Vec<_>>());
        assert_eq!(lane.backlog.bytes.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_writer_waits_while_the_lane_is_over_its_bound_and_goes_on_when_it_drains() {
        let lanes = Lanes::new();
        let lane = lanes.pick();
        let (release, held) = std::sync::mpsc::channel::<()>();
        // The lane is busy: what follows queues up behind this job.
        lane.run_now(0, move || held.recv().unwrap());
        for _ in 0..=HIGH / (1 << 20) {
            assert!(lane.run(1 << 20, || ()).await);
        }
        let waiting = tokio::spawn({
            let lane = lane.clone();
            async move { lane.run(1 << 20, || ()).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "over the bound, a writer waits");
        release.send(()).unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn a_job_that_panics_leaves_the_lane_running() {
        let lanes = Lanes::new();
        let lane = lanes.pick();
        lane.run_now(0, || panic!("a failing job"));
        let (done, finished) = tokio::sync::oneshot::channel();
        assert!(lane.run(10, move || done.send(()).unwrap()).await);
        finished.await.unwrap();
    }

    #[test]
    fn dropping_the_lanes_waits_for_the_jobs_queued() {
        let lanes = Lanes::new();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for lane in &lanes.lanes {
            lane.run_now(0, || std::thread::sleep(Duration::from_millis(100)));
        }
        let flag = done.clone();
        lanes.pick().run_now(0, move || flag.store(true, Ordering::SeqCst));
        drop(lanes);
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn files_spread_over_the_lanes_that_are_equally_loaded() {
        let lanes = Lanes::new();
        let picked: std::collections::HashSet<_> =
            (0..lanes.lanes.len()).map(|_| Arc::as_ptr(&lanes.pick().backlog)).collect();
        assert_eq!(picked.len(), lanes.lanes.len());
    }
}
