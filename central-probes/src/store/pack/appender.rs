//! Records appended back to back, one lane's after another, and written out
//! in large writes: a direct write per record (most are ~130 KiB) costs a
//! system call and a wait on the disk each, which large writes share
//! (BENCHMARKS.md, "Hashing and writing an upload"). So each appender holds one pack's lease and a page-aligned
//! buffer of what it appended and has not yet written out; it writes the
//! buffer out when it is full (on the lane, while appending) and before the
//! group commit syncs its pack.
//!
//! Every page an appender writes, it writes direct (where the file system
//! allows `O_DIRECT`). A record's stamp is written at its commit, after its
//! bytes: the pages from the oldest record not yet decided are kept in the
//! buffer after a write-out (while they fill at most half of it) and
//! written again with the next, so the stamp lands in memory. A write to a
//! page let go goes through the page cache instead, as a whole page where
//! the page holds the header of such a record (`side_pages.rs`); the
//! appender never writes that page again, so no page is written both ways
//! at once. Every write to a pack after its records (`write_at`) goes
//! through here, for the appender that may hold the page.

use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::warn;

use super::packs::{Lease, Packs};
use super::side_pages::SidePages;

/// What an appender buffers: the largest write the virtual disks here take
/// whole (`max_sectors_kb`).
const CAPACITY: usize = 4 << 20;
/// The alignment `O_DIRECT` needs of offsets, lengths and memory.
const PAGE: u64 = 4096;

/// One appender per lane; a record takes the first one free, starting from
/// its thread's, so that a lane's records follow each other.
pub(super) struct Appenders {
    packs: Arc<Packs>,
    slots: Vec<Arc<Mutex<Appender>>>,
}

#[derive(Default)]
struct Appender {
    lease: Option<Lease>,
    /// `CAPACITY` bytes from a page boundary (allocated at the first record).
    buffer: Vec<u8>,
    /// The pack offset of the buffer's first byte, a page boundary.
    buffered_from: u64,
    /// Where the next record goes; `[buffered_from, end)` is in the buffer.
    end: u64,
    /// The start of the record being appended.
    open: Option<u64>,
    /// Starts of the records appended whole whose commit is not yet
    /// decided, oldest first.
    undecided: VecDeque<u64>,
    /// The end of what was written out: past `end` after a record given
    /// up, until it is cut off.
    written_to: u64,
    /// The pages let go that hold a header of `open` or `undecided`.
    side_pages: SidePages,
}

/// The buffer's page-aligned part (allocated at the first use).
fn aligned(buffer: &mut Vec<u8>) -> &mut [u8] {
    if buffer.is_empty() {
        *buffer = vec![0; CAPACITY + PAGE as usize];
    }
    let skip = buffer.as_ptr().align_offset(PAGE as usize);
    &mut buffer[skip..skip + CAPACITY]
}

fn lock(slot: &Mutex<Appender>) -> MutexGuard<'_, Appender> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Appenders {
    pub(super) fn new(packs: Arc<Packs>, count: usize) -> Appenders {
        Appenders { packs, slots: (0..count.max(1)).map(|_| Arc::default()).collect() }
    }

    /// Starts a record (its header's room, then `head`) in a free appender;
    /// `None` if every one is appending a record already.
    pub(super) fn begin(&self, head: &[u8]) -> io::Result<Option<Appending>> {
        static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);
        thread_local!(static THREAD: usize = NEXT_THREAD.fetch_add(1, Ordering::Relaxed));
        let first = THREAD.with(|thread| *thread);
        for i in 0..self.slots.len() {
            let slot = &self.slots[(first + i) % self.slots.len()];
            let mut appender = lock(slot);
            if appender.open.is_some() {
                continue;
            }
            if appender.lease.is_none() || appender.end >= self.packs.target_len() {
                appender.rotate(&self.packs)?;
            }
            let start = appender.end;
            appender.open = Some(start);
            if let Err(error) = appender.append(&self.packs, head) {
                appender.cut_back(&self.packs, start);
                return Err(error);
            }
            let pack = appender.pack().expect("leased");
            return Ok(Some(Appending { packs: self.packs.clone(), slot: slot.clone(), pack, start, finished: false }));
        }
        Ok(None)
    }

    /// Writes `bytes` at `offset` of pack `pack`, where its records already
    /// are: into the buffer of the appender holding that page, or through
    /// the page cache.
    pub(super) fn write_at(&self, pack: u32, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let holder = self.slots.iter().map(|slot| lock(slot)).find(|appender| appender.pack() == Some(pack));
        let split = holder.as_ref().map_or(bytes.len(), |a| a.buffered_from.saturating_sub(offset) as usize);
        let (through_cache, in_memory) = bytes.split_at(split.min(bytes.len()));
        let mut holder = holder;
        if !through_cache.is_empty() {
            let file = self.packs.file(pack).ok_or_else(|| io::Error::other(format!("pack {pack} is gone")))?;
            match holder.as_mut() {
                Some(appender) => appender.side_pages.write(&self.packs.faults, &file, offset, through_cache)?,
                None => self.packs.faults.write_at(&file, through_cache, offset)?,
            }
        }
        if let Some(mut appender) = holder.filter(|_| !in_memory.is_empty()) {
            if offset + bytes.len() as u64 > appender.end {
                return Err(io::Error::other(format!("a write past the end of pack {pack}'s records")));
            }
            let at = (offset + through_cache.len() as u64 - appender.buffered_from) as usize;
            appender.aligned()[at..at + in_memory.len()].copy_from_slice(in_memory);
        }
        Ok(())
    }

    /// Writes out what is buffered for pack `pack`, before it is synced.
    pub(super) fn write_out(&self, pack: u32) -> io::Result<()> {
        for slot in &self.slots {
            let mut appender = lock(slot);
            if appender.pack() == Some(pack) {
                appender.write_out(&self.packs)?;
            }
        }
        Ok(())
    }

    /// Gives pack `id` back to the pool if an appender holds it with no
    /// record in progress (so that compaction may seal it).
    pub(super) fn release(&self, id: u32) {
        for slot in &self.slots {
            let mut appender = lock(slot);
            if appender.pack() == Some(id) && appender.open.is_none() && appender.undecided.is_empty() {
                // Not written out: it keeps the pack, and the group commit
                // that needs those bytes fails on them.
                let _ = appender.give_back(&self.packs);
            }
        }
    }
}

impl Drop for Appenders {
    /// The store is closing: a record still being appended (its upload
    /// abandoned at shutdown, its `Appending` not yet dropped) is cut off
    /// first, so the pack is given back ending with its last whole record.
    fn drop(&mut self) {
        for slot in &self.slots {
            let mut appender = lock(slot);
            if let Some(open) = appender.open {
                appender.cut_back(&self.packs, open);
            }
            if appender.give_back(&self.packs).is_err() {
                // What was not written out belongs to no commit made
                // durable; what was written is kept.
                if let Some(lease) = appender.lease.take() {
                    let written = appender.buffered_from.max(lease.start);
                    lease.keep(written);
                }
            }
        }
    }
}

impl Appender {
    fn pack(&self) -> Option<u32> {
        self.lease.as_ref().map(Lease::id)
    }

    fn aligned(&mut self) -> &mut [u8] {
        aligned(&mut self.buffer)
    }

    /// Gives the pack back (written out first) and starts a new one. Never
    /// one of the pool: a pack another writer had could get a stamp through
    /// the page cache (`write_at`, finding no appender holding it) while
    /// this one read its last page, and the appender would write the page
    /// back without it.
    fn rotate(&mut self, packs: &Arc<Packs>) -> io::Result<()> {
        self.give_back(packs)?;
        let lease = packs.lease_new()?;
        (self.buffered_from, self.end) = (lease.start, lease.start);
        self.lease = Some(lease);
        Ok(())
    }

    /// Writes the buffer out and gives the pack back; the buffer is never
    /// let go unwritten, as a commit may need its bytes.
    fn give_back(&mut self, packs: &Arc<Packs>) -> io::Result<()> {
        if self.lease.is_some() {
            self.write_out(packs)?;
            self.let_go_at(packs, self.end);
        }
        Ok(())
    }

    /// Gives the pack back to the pool, to be appended to from `end`.
    fn let_go_at(&mut self, packs: &Packs, end: u64) {
        if let Some(lease) = self.lease.take() {
            cut_off_past(packs, &lease, &mut self.written_to, end);
            lease.keep(end);
        }
        self.written_to = 0;
        self.side_pages.clear();
        self.undecided.clear();
        self.open = None;
    }

    /// Buffers the pack from `offset` on (a record given up after its
    /// pages were let go): the bytes before it in its page are read back,
    /// as the page is written whole.
    fn buffer_from(&mut self, offset: u64) -> io::Result<()> {
        let page = offset / PAGE * PAGE;
        let head = (offset - page) as usize;
        if head > 0 {
            let file = self.lease.as_ref().expect("leased").file().clone();
            file.read_exact_at(&mut self.aligned()[..head], page)?;
        }
        (self.buffered_from, self.end) = (page, offset);
        Ok(())
    }

    fn append(&mut self, packs: &Packs, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let used = (self.end - self.buffered_from) as usize;
            if used == CAPACITY {
                self.write_out(packs)?;
                continue;
            }
            let n = bytes.len().min(CAPACITY - used);
            self.aligned()[used..used + n].copy_from_slice(&bytes[..n]);
            self.end += n as u64;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Writes the buffer out, then keeps the pages from the oldest record
    /// not yet decided whose pages fill at most half the buffer, or else
    /// the last partial page.
    fn write_out(&mut self, packs: &Packs) -> io::Result<()> {
        let used = (self.end - self.buffered_from) as usize;
        if used == 0 {
            return Ok(());
        }
        let lease = self.lease.take().expect("leased");
        let at = self.buffered_from;
        let last_page = self.end / PAGE * PAGE;
        // Whole pages direct; the last partial one through the page cache,
        // so that the pack ends at its last record (a later write-out
        // writes it direct, after the kernel wrote the cached copy back).
        let direct_len = lease.direct().map_or(0, |_| (last_page - at) as usize);
        let mut written = Ok(());
        if let (Some(direct), true) = (lease.direct(), direct_len > 0) {
            written = packs.faults.write_at(direct, &self.aligned()[..direct_len], at);
        }
        if written.is_ok() && used > direct_len {
            written = packs.faults.write_at(lease.file(), &self.aligned()[direct_len..used], at + direct_len as u64);
        }
        self.lease = Some(lease);
        written?;
        self.written_to = self.written_to.max(self.end);
        // The records' starts are in order: the first within reach is the
        // oldest kept; older ones get their stamps through the page cache.
        let (buffered_from, end) = (self.buffered_from, self.end);
        let within_reach = |page: &u64| *page >= buffered_from && end - page <= CAPACITY as u64 / 2;
        let pinned = self.undecided.iter().chain(&self.open).map(|start| start / PAGE * PAGE).find(within_reach);
        let keep_from = pinned.map_or(last_page, |page| page.min(last_page));
        let pins = self.undecided.iter().chain(&self.open).copied();
        self.side_pages.keep(aligned(&mut self.buffer), buffered_from, keep_from, pins);
        let skip = (keep_from - self.buffered_from) as usize;
        self.aligned().copy_within(skip..used, 0);
        self.buffered_from = keep_from;
        Ok(())
    }

    /// Drops what was appended from `start` on (a record given up); the
    /// next record goes there.
    fn cut_back(&mut self, packs: &Packs, start: u64) {
        self.open = self.open.filter(|&open| open < start);
        if let Some(lease) = &self.lease {
            cut_off_past(packs, lease, &mut self.written_to, start);
        }
        self.side_pages.forget_from(start);
        if start >= self.buffered_from {
            self.end = start;
        } else if self.buffer_from(start).is_err() {
            // Written out already and not readable back: the pack is given
            // back up to `start` (all before it written), nothing after it.
            self.let_go_at(packs, start);
        }
    }
}

/// Cuts the pack back to `end` if more was written: a pack ends with its
/// last whole record, as when each record had a pack leased for it.
fn cut_off_past(packs: &Packs, lease: &Lease, written_to: &mut u64, end: u64) {
    if *written_to <= end {
        return;
    }
    match packs.faults.truncate(lease.file(), end) {
        Ok(()) => *written_to = end,
        // Harmless: a scan drops it as a torn end, the next record
        // overwrites it.
        Err(error) => warn!(pack = lease.id(), %error, "could not cut a given-up record off a pack"),
    }
}

/// A record being appended.
pub(super) struct Appending {
    packs: Arc<Packs>,
    slot: Arc<Mutex<Appender>>,
    pub(super) pack: u32,
    pub(super) start: u64,
    finished: bool,
}

impl Appending {
    pub(super) fn write(&self, bytes: &[u8]) -> io::Result<()> {
        lock(&self.slot).append(&self.packs, bytes)
    }

    /// Ends the record with `tail`; the record, whole but not decided.
    pub(super) fn finish(mut self, tail: &[u8]) -> io::Result<Appended> {
        let mut appender = lock(&self.slot);
        appender.append(&self.packs, tail)?;
        appender.open = None;
        appender.undecided.push_back(self.start);
        let end = appender.end;
        drop(appender);
        self.finished = true;
        Ok(Appended {
            packs: self.packs.clone(),
            slot: self.slot.clone(),
            pack: self.pack,
            start: self.start,
            end,
            committed: false,
        })
    }
}

impl Drop for Appending {
    fn drop(&mut self) {
        let mut appender = lock(&self.slot);
        if !self.finished && appender.pack() == Some(self.pack) && appender.open == Some(self.start) {
            appender.cut_back(&self.packs, self.start);
        }
    }
}

/// A record appended whole, until its commit is decided: dropped before
/// `committed`, it is cut off again if nothing follows it.
pub(super) struct Appended {
    packs: Arc<Packs>,
    slot: Arc<Mutex<Appender>>,
    pack: u32,
    start: u64,
    pub(super) end: u64,
    committed: bool,
}

impl Appended {
    /// The record is stamped: it stays.
    pub(super) fn committed(mut self) {
        self.committed = true;
    }
}

impl Drop for Appended {
    fn drop(&mut self) {
        let mut appender = lock(&self.slot);
        if appender.pack() != Some(self.pack) {
            return;
        }
        appender.undecided.retain(|&start| start != self.start);
        let appender = &mut *appender;
        appender.side_pages.forget(self.start, appender.undecided.iter().chain(&appender.open).copied());
        if !self.committed && appender.open.is_none() && appender.end == self.end {
            appender.cut_back(&self.packs, self.start);
        }
    }
}
