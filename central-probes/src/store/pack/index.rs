//! The index of a pack store, in memory: where the newest record of each
//! path is (`visible`: committed and durable), the commits decided but not
//! yet durable (`pending`, which the next decision on the same path sees),
//! and how much of each pack is still live. Every change to it is a
//! `Change`, the same ones the index log records and replays.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;

use crate::store::StoredProbe;

use super::record::{HEADER_LEN, Header, Kind};

/// Where a probe's record is, and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Loc {
    pub(super) pack: u32,
    pub(super) offset: u64,
    pub(super) seq: u64,
    pub(super) size: u64,
    pub(super) sha256: Sha256Digest,
    pub(super) crc32: u32,
    pub(super) stored_at: u64,
    pub(super) signature: Option<Bytes>,
}

impl Loc {
    pub(super) fn record_len(&self, path: &ProbePath) -> u64 {
        HEADER_LEN + path.byte_len() as u64 + self.size + self.signature.as_ref().map_or(0, |s| s.len() as u64)
    }

    pub(super) fn bytes_at(&self, path: &ProbePath) -> u64 {
        self.offset + HEADER_LEN + path.byte_len() as u64
    }

    /// The header of this probe's record.
    pub(super) fn header(&self, path: &ProbePath) -> Header {
        Header {
            kind: Kind::Probe,
            path_len: path.byte_len() as u16,
            size: self.size,
            signature_len: self.signature.as_ref().map_or(0, |s| s.len() as u32),
            crc32: self.crc32,
            sha256: self.sha256,
            stored_at: self.stored_at,
        }
    }

    pub(super) fn stored(&self, path: &ProbePath) -> StoredProbe {
        StoredProbe {
            path: path.clone(),
            size: self.size,
            sha256: self.sha256,
            crc32: Some(self.crc32),
            signature: self.signature.clone(),
        }
    }
}

/// One change to the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Change {
    /// `path` is the record at `Loc`.
    Put(ProbePath, Loc),
    /// Compaction copied `path`'s record to `Loc`, keeping its sequence
    /// number; it takes effect only if that record is still the newest.
    Move(ProbePath, Loc),
    /// `path` was removed by the tombstone with this sequence number.
    Remove(ProbePath, u64),
    /// Everything of the pack up to this offset is durable.
    PackEnd(u32, u64),
    /// The pack was removed (compacted).
    PackGone(u32),
}

/// What the index knows of one pack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct PackUse {
    /// The pack's length that the log vouches for.
    pub(super) durable_end: u64,
    /// Bytes of the records the index points to.
    pub(super) live: u64,
}

#[derive(Default)]
pub(super) struct Index {
    pub(super) visible: BTreeMap<ProbePath, Loc>,
    /// Decided commits (a `None` for a removal) by sequence number.
    pub(super) pending: HashMap<ProbePath, (u64, Option<Loc>)>,
    pub(super) packs: BTreeMap<u32, PackUse>,
    /// Packs compacted away (their files removed, or about to be).
    pub(super) gone: BTreeSet<u32>,
    pub(super) next_seq: u64,
}

impl Index {
    /// The newest decision on `path`: pending if there is one, else what is
    /// visible.
    pub(super) fn decided(&self, path: &ProbePath) -> Option<&Loc> {
        match self.pending.get(path) {
            Some((_, pending)) => pending.as_ref(),
            None => self.visible.get(path),
        }
    }

    /// A new sequence number.
    pub(super) fn take_seq(&mut self) -> u64 {
        self.next_seq = self.next_seq.max(1);
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Applies a durable change; the pending decision it fulfils, if it is
    /// still the newest of its path, is dropped.
    pub(super) fn apply(&mut self, change: Change) {
        match change {
            Change::Put(path, loc) => {
                self.next_seq = self.next_seq.max(loc.seq + 1);
                self.fulfil(&path, loc.seq);
                self.packs.entry(loc.pack).or_default().live += loc.record_len(&path);
                if let Some(old) = self.visible.insert(path.clone(), loc) {
                    self.release(&path, &old);
                }
            }
            Change::Move(path, loc) => {
                if self.visible.get(&path).is_some_and(|old| old.seq == loc.seq) {
                    self.packs.entry(loc.pack).or_default().live += loc.record_len(&path);
                    let old = self.visible.insert(path.clone(), loc).expect("checked");
                    self.release(&path, &old);
                }
            }
            Change::Remove(path, seq) => {
                self.next_seq = self.next_seq.max(seq + 1);
                self.fulfil(&path, seq);
                if let Some(old) = self.visible.remove(&path) {
                    self.release(&path, &old);
                }
            }
            Change::PackEnd(pack, end) => {
                let used = self.packs.entry(pack).or_default();
                used.durable_end = used.durable_end.max(end);
            }
            Change::PackGone(pack) => {
                self.packs.remove(&pack);
                self.gone.insert(pack);
            }
        }
    }

    /// Forgets a pending decision that will not become durable.
    pub(super) fn forget(&mut self, path: &ProbePath, seq: u64) {
        self.fulfil(path, seq);
    }

    fn fulfil(&mut self, path: &ProbePath, seq: u64) {
        if self.pending.get(path).is_some_and(|(pending, _)| *pending == seq) {
            self.pending.remove(path);
        }
    }

    fn release(&mut self, path: &ProbePath, old: &Loc) {
        if let Some(used) = self.packs.get_mut(&old.pack) {
            used.live = used.live.saturating_sub(old.record_len(path));
        }
    }

    /// The index a snapshot describes. Its probes come in path order, so
    /// the map is built in bulk rather than an insert at a time, which
    /// starts a large store faster (BENCHMARKS.md, "Start-up and the
    /// PostgreSQL store").
    pub(super) fn from_snapshot(changes: Vec<Change>) -> Index {
        let mut index = Index::default();
        let mut probes = Vec::with_capacity(changes.len());
        for change in changes {
            match change {
                Change::Put(path, loc) => {
                    index.next_seq = index.next_seq.max(loc.seq + 1);
                    index.packs.entry(loc.pack).or_default().live += loc.record_len(&path);
                    probes.push((path, loc));
                }
                other => index.apply(other),
            }
        }
        index.visible = probes.into_iter().collect();
        index
    }

    /// Every change that rebuilds this index's durable part.
    pub(super) fn durable_changes(&self) -> impl Iterator<Item = Change> + '_ {
        let ends = self.packs.iter().map(|(&pack, used)| Change::PackEnd(pack, used.durable_end));
        let gone = self.gone.iter().map(|&pack| Change::PackGone(pack));
        ends.chain(gone).chain(self.visible.iter().map(|(path, loc)| Change::Put(path.clone(), loc.clone())))
    }
}
