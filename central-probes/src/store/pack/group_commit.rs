//! Group commit: one thread makes the index changes of many commits
//! durable together, with one fsync of each pack they wrote and one of
//! the index log, and only then applies them to the index (visible at
//! once) and answers each. While one batch syncs, the next gathers: a
//! batch is what arrived meanwhile, up to `max_bytes`, waiting up to
//! `max_delay` for more.
//!
//! A failed fsync leaves the disk's state unknown (the kernel may have
//! dropped the dirty pages it could not write), so the store stops taking
//! writes until it is restarted and its log replayed; PostgreSQL does the
//! same.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::Instant;

use tracing::error;

use super::index::Change;
use super::journal::{self, Log};
use super::state::{BatchLimits, Inner, Request};

/// Runs batches until every sender is gone; gives the log back.
pub(super) fn run(inner: Arc<Inner>, requests: Receiver<Request>, mut log: Log) -> Log {
    while let Some(batch) = gather(&requests, inner.batch_limits) {
        let result = commit(&inner, &batch, &mut log);
        let mut index = inner.index();
        if let Ok(ends) = &result {
            ends.iter().for_each(|(&pack, &end)| index.apply(Change::PackEnd(pack, end)));
        }
        if let Err(e) = &result {
            error!(error = %e, "could not make a batch of commits durable; the store takes no more writes");
            inner.failed.store(true, Ordering::SeqCst);
        }
        for request in batch {
            match &result {
                Ok(_) => request.changes.into_iter().for_each(|change| index.apply(change)),
                Err(_) => forget(&mut index, &request.changes),
            }
            let _ = request.done.send(result.as_ref().map(drop).map_err(|e| io::Error::new(e.kind(), e.to_string())));
        }
    }
    log
}

fn forget(index: &mut super::index::Index, changes: &[Change]) {
    for change in changes {
        match change {
            Change::Put(path, loc) => index.forget(path, loc.seq),
            Change::Remove(path, seq) => index.forget(path, *seq),
            _ => {}
        }
    }
}

/// The next batch: blocks for its first request, then takes what comes
/// within the limits. `None` once every sender is gone.
fn gather(requests: &Receiver<Request>, limits: BatchLimits) -> Option<Vec<Request>> {
    let first = requests.recv().ok()?;
    let deadline = Instant::now() + limits.max_delay;
    let mut bytes = first.bytes;
    let mut batch = vec![first];
    while bytes < limits.max_bytes {
        let next = match requests.try_recv() {
            Ok(next) => next,
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => match requests.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(next) => next,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            },
        };
        bytes += next.bytes;
        batch.push(next);
    }
    Some(batch)
}

/// Makes the batch durable (`make_durable`); the packs' new durable ends.
fn commit(inner: &Inner, batch: &[Request], log: &mut Log) -> io::Result<BTreeMap<u32, u64>> {
    let mut ends: BTreeMap<u32, u64> = BTreeMap::new();
    for &(pack, end) in batch.iter().flat_map(|request| &request.packs) {
        let known = ends.entry(pack).or_default();
        *known = (*known).max(end);
    }
    make_durable(inner, log, &ends, batch.iter().flat_map(|request| &request.changes))?;
    Ok(ends)
}

/// What makes changes durable, for the group commit and the conversion of
/// a per-file store alike: an fsync of each pack written (up to its end in
/// `ends`), then the packs' ends and the changes appended to the log and
/// an fsync of it.
pub(super) fn make_durable<'a>(
    inner: &Inner,
    log: &mut Log,
    ends: &BTreeMap<u32, u64>,
    changes: impl Iterator<Item = &'a Change>,
) -> io::Result<()> {
    for &pack in ends.keys() {
        inner.appenders.write_out(pack)?;
        let file = inner.packs.file(pack).ok_or_else(|| io::Error::other(format!("pack {pack} is gone")))?;
        inner.faults.sync(&file)?;
    }
    let mut frames = Vec::with_capacity(256 * ends.len());
    for (&pack, &end) in ends {
        journal::encode(&Change::PackEnd(pack, end), &mut frames);
    }
    for change in changes {
        journal::encode(change, &mut frames);
    }
    log.append(&inner.faults, &frames)
}
