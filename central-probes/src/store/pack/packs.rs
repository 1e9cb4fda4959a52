//! The pack files (`packs/<id>.pack`): each is appended to by one writer at
//! a time, which leases it from a pool of packs open for appending; a pack
//! grown past the target size is sealed (no longer appended to, so that
//! compaction may rewrite it), and so is an idle one compaction picks. Readers share an open handle of each pack:
//! a reader that opened a pack reads it whole even after compaction
//! removed its file.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tracing::warn;

use super::direct_io::{self, Buffers, Target};
use super::faults::Faults;

/// A pack open for appending.
pub(super) struct Writer {
    pub(super) id: u32,
    pub(super) file: Arc<File>,
    /// The same pack opened for direct writes (`direct_io`), if allowed.
    pub(super) direct: Option<Arc<File>>,
    pub(super) len: u64,
}

pub(super) struct Packs {
    pub(super) dir: PathBuf,
    pub(super) faults: Arc<Faults>,
    /// Every pack, open for reading.
    files: RwLock<HashMap<u32, Arc<File>>>,
    /// Packs open for appending and not leased.
    idle: Mutex<Vec<Writer>>,
    /// Packs open for appending, leased or not.
    open: Mutex<BTreeSet<u32>>,
    /// Records per pack written whole but not yet committed or dropped:
    /// compaction leaves such a pack alone.
    in_flight: Mutex<HashMap<u32, usize>>,
    next_id: AtomicU32,
    /// A pack this long is sealed.
    target_len: u64,
    pub(super) buffers: Buffers,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) fn pack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.pack"))
}

/// The id of a pack file's name.
pub(super) fn pack_id(name: &str) -> Option<u32> {
    name.strip_suffix(".pack")?.parse().ok()
}

impl Packs {
    pub(super) fn new(dir: PathBuf, faults: Arc<Faults>, target_len: u64) -> Packs {
        Packs {
            dir,
            faults,
            files: RwLock::default(),
            idle: Mutex::default(),
            open: Mutex::default(),
            in_flight: Mutex::default(),
            next_id: AtomicU32::new(1),
            target_len,
            buffers: Buffers::default(),
        }
    }

    /// Adds a pack found at start-up, `len` bytes long; it takes appends
    /// again if it is short of the target.
    pub(super) fn add_existing(&self, id: u32, file: File, len: u64) {
        let file = Arc::new(file);
        self.files.write().unwrap_or_else(|p| p.into_inner()).insert(id, file.clone());
        self.next_id.fetch_max(id + 1, Ordering::SeqCst);
        if len < self.target_len {
            let direct = direct_io::open(&pack_path(&self.dir, id)).map(Arc::new);
            lock(&self.open).insert(id);
            lock(&self.idle).push(Writer { id, file, direct, len });
        }
    }

    /// The length at which a pack is sealed.
    pub(super) fn target_len(&self) -> u64 {
        self.target_len
    }

    /// The pack `id`, for reading.
    pub(super) fn file(&self, id: u32) -> Option<Arc<File>> {
        self.files.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Records in flight, in all packs.
    #[cfg(test)]
    pub(super) fn records_in_flight(&self) -> usize {
        lock(&self.in_flight).values().sum()
    }

    /// Counts a record of pack `id` in flight until the guard is dropped.
    pub(super) fn record_in_flight(self: &Arc<Self>, id: u32) -> InFlight {
        *lock(&self.in_flight).entry(id).or_default() += 1;
        InFlight { packs: self.clone(), id }
    }

    /// Seals pack `id` if it is open for appending, not leased and has no
    /// record in flight (so that compaction may rewrite it); whether it is
    /// sealed and free of such records now.
    pub(super) fn seal_if_idle(&self, id: u32) -> bool {
        if lock(&self.in_flight).get(&id).is_some_and(|&n| n > 0) {
            return false;
        }
        let mut idle = lock(&self.idle);
        if let Some(at) = idle.iter().position(|writer| writer.id == id) {
            idle.swap_remove(at);
            lock(&self.open).remove(&id);
        }
        !lock(&self.open).contains(&id)
    }

    /// Every pack's id.
    pub(super) fn ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.files.read().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Forgets a compacted pack (readers that hold it keep their handle).
    pub(super) fn forget(&self, id: u32) {
        self.files.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// A pack to append to, for as long as the lease lives.
    pub(super) fn lease(self: &Arc<Self>) -> io::Result<Lease> {
        let idle = lock(&self.idle).pop();
        let writer = match idle {
            Some(writer) => writer,
            None => self.create()?,
        };
        Ok(self.lease_of(writer))
    }

    /// A new pack to append to, for as long as the lease lives: an
    /// appender's, so that every record in it is the appender's own.
    pub(super) fn lease_new(self: &Arc<Self>) -> io::Result<Lease> {
        Ok(self.lease_of(self.create()?))
    }

    fn lease_of(self: &Arc<Self>, writer: Writer) -> Lease {
        Lease { packs: self.clone(), start: writer.len, writer: Some(writer) }
    }

    fn create(&self) -> io::Result<Writer> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let path = pack_path(&self.dir, id);
        let file = Arc::new(self.faults.create(&path)?);
        let direct = direct_io::open(&path).map(Arc::new);
        // The pack's name is durable before any log entry names it.
        self.faults.sync_dir(&self.dir)?;
        self.files.write().unwrap_or_else(|p| p.into_inner()).insert(id, file.clone());
        lock(&self.open).insert(id);
        Ok(Writer { id, file, direct, len: 0 })
    }

    fn give_back(&self, writer: Writer) {
        if writer.len >= self.target_len {
            lock(&self.open).remove(&writer.id);
        } else {
            lock(&self.idle).push(writer);
        }
    }
}

/// The exclusive right to append to one pack, from `start`. Dropped
/// without `keep`, it cuts the pack back to `start`: what was appended
/// since is gone, as if never written.
pub(super) struct Lease {
    packs: Arc<Packs>,
    writer: Option<Writer>,
    pub(super) start: u64,
}

impl Lease {
    pub(super) fn id(&self) -> u32 {
        self.writer.as_ref().expect("a live lease").id
    }

    pub(super) fn file(&self) -> &Arc<File> {
        &self.writer.as_ref().expect("a live lease").file
    }

    /// The pack opened for direct writes, if the file system allows them.
    pub(super) fn direct(&self) -> Option<&File> {
        self.writer.as_ref().expect("a live lease").direct.as_deref()
    }

    pub(super) fn faults(&self) -> &Faults {
        &self.packs.faults
    }

    /// Where a `RecordWriter` of this pack writes.
    pub(super) fn target(&self) -> Target<'_> {
        let writer = self.writer.as_ref().expect("a live lease");
        Target {
            faults: &self.packs.faults,
            file: &writer.file,
            direct: writer.direct.as_deref(),
            buffers: &self.packs.buffers,
        }
    }

    /// Keeps what was appended, up to `end`, and gives the pack back.
    pub(super) fn keep(mut self, end: u64) {
        let mut writer = self.writer.take().expect("a live lease");
        writer.len = end;
        self.packs.give_back(writer);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(mut writer) = self.writer.take() else { return };
        match self.packs.faults.truncate(&writer.file, self.start) {
            Ok(()) => {
                writer.len = self.start;
                self.packs.give_back(writer);
            }
            Err(error) => {
                // Not appended to again: nothing can follow the unfinished
                // record, which a scan drops as a torn end.
                warn!(pack = writer.id, %error, "could not cut an unfinished record off a pack; sealing it");
                lock(&self.packs.open).remove(&writer.id);
            }
        }
    }
}

/// A record of a pack between its completion and its commit (or its end).
pub(super) struct InFlight {
    packs: Arc<Packs>,
    id: u32,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut in_flight = lock(&self.packs.in_flight);
        if let Some(n) = in_flight.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.id);
            }
        }
    }
}
