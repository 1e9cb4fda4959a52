//! Compaction: a pack not being appended to whose live records have fallen
//! below a fraction of its length (overwrites and removals left the rest dead) is
//! rewritten. Its live records, and its tombstones of paths still absent
//! (so that a rebuild from the packs keeps them removed), are copied to a
//! pack open for appending at a bounded rate, each keeping its sequence
//! number; the copies are made durable and logged as moves through the
//! group commit like any commit; then the old pack is logged as gone and
//! its file removed. A crash at any step leaves either the old records or
//! durable, logged copies; a reader that opened the old pack keeps its
//! handle and reads it whole.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use super::index::{Change, Loc};
use super::packs::pack_path;
use super::record::{Kind, read_record, stamp_into};
use super::state::Inner;

/// When and how fast compaction runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CompactionLimits {
    /// A sealed pack whose live bytes are below this fraction of its length
    /// is rewritten; 0 turns compaction off.
    pub below_live_fraction: f64,
    /// Bytes copied per second at most.
    pub bytes_per_second: u64,
    /// How often the background compaction looks for packs to rewrite.
    pub every: Duration,
}

impl Default for CompactionLimits {
    fn default() -> Self {
        CompactionLimits { below_live_fraction: 0.5, bytes_per_second: 64 << 20, every: Duration::from_secs(60) }
    }
}

/// Rewrites every pack below the live fraction that is not being appended
/// to; the bytes freed.
pub(super) fn compact(inner: &Arc<Inner>, limits: CompactionLimits) -> io::Result<u64> {
    let mut freed = 0;
    for pack in candidates(inner, limits.below_live_fraction) {
        freed += rewrite(inner, pack, limits.bytes_per_second)?;
    }
    Ok(freed)
}

/// Packs below the live fraction that are sealed, or idle and sealed now
/// (a store whose packs never grew to the target length compacts too); a
/// pack being appended to waits for the next pass.
fn candidates(inner: &Inner, below: f64) -> Vec<u32> {
    let low: Vec<u32> = {
        let index = inner.index();
        let low = |id: &u32| {
            let used = index.packs.get(id);
            used.is_some_and(|used| used.durable_end > 0 && (used.live as f64) < below * used.durable_end as f64)
        };
        inner.packs.ids().into_iter().filter(low).collect()
    };
    low.into_iter()
        .filter(|&id| {
            inner.appenders.release(id);
            inner.packs.seal_if_idle(id)
        })
        .collect()
}

/// Copies what is still needed of `victim` elsewhere, then removes it.
fn rewrite(inner: &Arc<Inner>, victim: u32, bytes_per_second: u64) -> io::Result<u64> {
    let Some(file) = inner.packs.file(victim) else { return Ok(0) };
    let (len, live) = inner.index().packs.get(&victim).map_or((0, 0), |used| (used.durable_end, used.live));
    info!(pack = victim, bytes = len, live, "compacting a pack");
    let started = Instant::now();
    let lease = inner.packs.lease()?;
    let mut at = lease.start;
    let mut moves = Vec::new();
    let mut copied = 0u64;
    let mut offset = 0;
    while let Some(found) = read_record(&file, offset, len)? {
        offset += found.header.record_len();
        let Some(seq) = found.seq else { continue };
        // Whether to copy the record, and for a probe, where the index has it.
        let keep: Option<Option<Loc>> = {
            let index = inner.index();
            match found.header.kind {
                // While the index still points to this very record.
                Kind::Probe => {
                    let live = index.visible.get(&found.path).filter(|loc| loc.pack == victim && loc.seq == seq);
                    live.cloned().map(Some)
                }
                // While its path stays removed, so that a rebuild keeps it so.
                Kind::Tombstone => index.decided(&found.path).is_none().then_some(None),
            }
        };
        let Some(live) = keep else { continue };
        let record_len = found.header.record_len();
        let mut record = vec![0u8; record_len as usize];
        file.read_exact_at(&mut record, found.offset)?;
        stamp_into(&mut record, at, seq);
        lease.faults().write_at(lease.file(), &record, at)?;
        if let Some(loc) = live {
            moves.push(Change::Move(found.path, Loc { pack: lease.id(), offset: at, ..loc }));
        }
        // (The lease's start stays: a failure cuts every copy off again.)
        at += record_len;
        copied += record_len;
        // At most `bytes_per_second`: sleep off any lead over that pace.
        let due = Duration::from_secs_f64(copied as f64 / bytes_per_second.max(1) as f64);
        if let Some(lead) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(lead);
        }
    }
    // A record that does not parse before the durable end is damage in a
    // header: what follows it cannot be found, so the pack is kept whole.
    if offset < len {
        return Err(io::Error::other(format!(
            "pack {victim}: no whole record at offset {offset} of its {len} durable bytes; not compacted"
        )));
    }
    let (new_pack, end) = (lease.id(), at);
    let _in_flight = inner.packs.record_in_flight(new_pack);
    lease.keep(end);
    wait(inner, moves, vec![(new_pack, end)], copied)?;
    wait(inner, vec![Change::PackGone(victim)], Vec::new(), 0)?;
    inner.packs.forget(victim);
    drop(file);
    inner.faults.remove_file(&pack_path(&inner.packs.dir, victim))?;
    inner.faults.sync_dir(&inner.packs.dir)?;
    info!(pack = victim, bytes = len, copied, "compacted a pack");
    Ok(len.saturating_sub(copied))
}

/// Submits changes to the group commit and waits until they are durable.
fn wait(inner: &Inner, changes: Vec<Change>, packs: Vec<(u32, u64)>, bytes: u64) -> io::Result<()> {
    let receiver = inner.submit(changes, packs, bytes).map_err(|e| io::Error::other(e.to_string()))?;
    receiver.blocking_recv().map_err(|_| io::Error::other("the group commit stopped"))?
}
