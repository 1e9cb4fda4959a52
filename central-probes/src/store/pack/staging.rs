//! Staging and committing in a pack: a probe's record is appended as its
//! bytes arrive (on the thread that hashes them, see
//! `backend::Stage::Blocking`) after an appender's last record
//! (`appender.rs`), or in a pack leased for it alone when every appender
//! is in the middle of a record; it is laid out whole (its signature and
//! header) when they are all in, and committed by writing its stamp and
//! handing the index change to the group commit. Removals append a
//! tombstone in a leased pack.

use std::io;
use std::sync::Arc;

use probe_api::names::ProbePath;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::store::backend::{BlockingStaging, FileEnd, Staged};
use crate::store::{CommitOutcome, Decision, StoredProbe, overwrite_rule, report_taken};

use super::appender::{Appended, Appending};
use super::direct_io::RecordWriter;
use super::index::{Change, Loc};
use super::packs::{InFlight, Lease};
use super::record::{HEADER_LEN, stamp, tombstone};
use super::state::{Inner, durable, unix_now};

pub(super) struct PackStaging {
    inner: Arc<Inner>,
    path: ProbePath,
    /// Taken at the first write, on the lane that writes the record: files
    /// created ahead of their lane hold no pack. Dropped unfinished, the
    /// record is cut off again.
    started: Option<Started>,
}

/// Where a record is written: after the last of an appender's records, or,
/// when every appender is in the middle of one, in a pack leased for it
/// alone.
enum Started {
    Appending(Appending),
    Leased(Lease, RecordWriter),
}

impl PackStaging {
    pub(super) fn new(inner: &Arc<Inner>, path: &ProbePath) -> PackStaging {
        PackStaging { inner: inner.clone(), path: path.clone(), started: None }
    }

    /// The record, started (the room for its header, then its path) if it
    /// is not yet.
    fn started(&mut self) -> Result<&mut Started> {
        if self.started.is_none() {
            let path = self.path.to_string();
            let starting = |e| Error::io(format!("starting the record of {path}"), e);
            let mut head = vec![0; HEADER_LEN as usize];
            head.extend_from_slice(path.as_bytes());
            let started = match self.inner.appenders.begin(&head).map_err(starting)? {
                Some(appending) => Started::Appending(appending),
                None => {
                    let lease = self.inner.packs.lease().map_err(starting)?;
                    let mut record = RecordWriter::new(&lease.target(), lease.start);
                    record.write(&lease.target(), &head).map_err(starting)?;
                    Started::Leased(lease, record)
                }
            };
            self.started = Some(started);
        }
        Ok(self.started.as_mut().expect("started"))
    }
}

impl BlockingStaging for PackStaging {
    fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let path = self.path.clone();
        let written = match self.started()? {
            Started::Appending(appending) => appending.write(chunk),
            Started::Leased(lease, record) => record.write(&lease.target(), chunk),
        };
        written.map_err(|e| Error::io(format!("writing {path}"), e))
    }

    /// Lays the whole record out: the signature after the bytes, and the
    /// header (of what was received; a file that fails its checks is never
    /// stamped). A record whose commit is not decided yet is whole, so
    /// that records may follow it.
    fn finish(mut self: Box<Self>, file: FileEnd) -> Result<Box<dyn Staged>> {
        self.started()?;
        let PackStaging { inner, path, started } = *self;
        let signature = file.signature.clone().unwrap_or_default();
        if u32::try_from(signature.len()).is_err() {
            return Err(Error::invalid_argument(format!("{path}: the signature is too long")));
        }
        let (pack, offset) = match started.as_ref().expect("started") {
            Started::Appending(appending) => (appending.pack, appending.start),
            Started::Leased(lease, _) => (lease.id(), lease.start),
        };
        let loc = Loc {
            pack,
            offset,
            seq: 0,
            size: file.len,
            sha256: file.sha256,
            crc32: file.crc32,
            stored_at: unix_now(),
            signature: file.signature,
        };
        let header = loc.header(&path).encode(path.to_string().as_bytes(), &signature);
        let io_error = |e| Error::io(format!("writing {path}"), e);
        // Counted before the pack is given back, and so before compaction
        // could pick it.
        let in_flight = inner.packs.record_in_flight(pack);
        let (end, appended) = match started.expect("started") {
            Started::Appending(appending) => {
                let appended = appending.finish(&signature).map_err(io_error)?;
                inner.appenders.write_at(pack, offset, &header).map_err(io_error)?;
                (appended.end, Some(appended))
            }
            Started::Leased(lease, mut record) => {
                record.write(&lease.target(), &signature).map_err(io_error)?;
                let end = record.finish(&lease.target()).map_err(io_error)?;
                lease.faults().write_at(lease.file(), &header, offset).map_err(io_error)?;
                lease.keep(end);
                (end, None)
            }
        };
        Ok(Box::new(PackStaged { inner, path, loc, end, appended, in_flight }))
    }
}

/// A record written whole, waiting for its commit.
pub(super) struct PackStaged {
    inner: Arc<Inner>,
    path: ProbePath,
    loc: Loc,
    end: u64,
    /// Held until the commit is decided, when the record is an appender's.
    appended: Option<Appended>,
    /// Held from the record's completion to its commit's end.
    in_flight: InFlight,
}

#[tonic::async_trait]
impl Staged for PackStaged {
    async fn existing(&self) -> Result<Option<StoredProbe>> {
        Ok(self.inner.index().decided(&self.path).map(|loc| loc.stored(&self.path)))
    }

    /// The record was laid out whole by `finish`; the group commit makes it
    /// durable.
    async fn prepare(&mut self, probe: &StoredProbe) -> Result<()> {
        let loc = &self.loc;
        if (probe.size, probe.sha256, probe.crc32, probe.signature.as_ref())
            != (loc.size, loc.sha256, Some(loc.crc32), loc.signature.as_ref())
        {
            return Err(Error::internal(format!("{}: the record written is not of this probe", probe.path)));
        }
        Ok(())
    }

    async fn commit(
        self: Box<Self>,
        _probe: StoredProbe,
        overwrite: bool,
        repair: bool,
        taken: Option<oneshot::Sender<bool>>,
    ) -> Result<CommitOutcome> {
        let PackStaged { inner, path, loc, end, appended, in_flight } = *self;
        // A decision under the lock and a stamp into memory or a cached
        // page: no blocking thread needed.
        let decided = decide_and_submit(&inner, path, loc, end, (overwrite, repair))?;
        if let Some(appended) = appended {
            // Decided: stamped and staying, or dead (cut off if last).
            match decided.1 {
                Some(_) => appended.committed(),
                None => drop(appended),
            }
        }
        // Decided: the next file of the upload may take effect meanwhile.
        report_taken(taken);
        let outcome = match decided {
            (outcome, None) => Ok(outcome),
            (outcome, Some(receiver)) => durable(receiver, "a probe").await.map(|()| outcome),
        };
        // Applied to the index (or dropped): compaction may see the pack.
        drop(in_flight);
        outcome
    }
}

type Submitted = oneshot::Receiver<io::Result<()>>;

/// Under the index lock: decides by the overwrite rule against the newest
/// decision on the path; to write, stamps the record and submits it.
fn decide_and_submit(
    inner: &Inner,
    path: ProbePath,
    mut loc: Loc,
    end: u64,
    (overwrite, repair): (bool, bool),
) -> Result<(CommitOutcome, Option<Submitted>)> {
    inner.failed()?;
    fn content(loc: &Loc) -> crate::store::Content<'_> {
        (loc.size, loc.sha256, loc.signature.as_deref())
    }
    let mut index = inner.index();
    let outcome = match overwrite_rule(index.decided(&path).map(content), content(&loc), overwrite, repair) {
        // The record stays unstamped: dead, skipped by any scan.
        Decision::Keep(outcome) => return Ok((outcome, None)),
        Decision::Write(outcome) => outcome,
    };
    loc.seq = index.take_seq();
    let (stamp, at) = stamp(loc.offset, loc.seq);
    let stamped = inner.appenders.write_at(loc.pack, loc.offset + at, &stamp);
    stamped.map_err(|e| Error::io(format!("committing {path}"), e))?;
    let bytes = end - loc.offset;
    let receiver = inner.submit(vec![Change::Put(path.clone(), loc.clone())], vec![(loc.pack, end)], bytes)?;
    index.pending.insert(path, (loc.seq, Some(loc)));
    Ok((outcome, Some(receiver)))
}

/// Appends a tombstone for `path` and submits the removal (the pack's
/// tombstone counted in flight until the guard is dropped); `None` if there
/// is no such probe.
pub(super) fn remove(inner: &Inner, path: &ProbePath) -> Result<Option<(Submitted, InFlight)>> {
    inner.failed()?;
    let mut index = inner.index();
    if index.decided(path).is_none() {
        return Ok(None);
    }
    let seq = index.take_seq();
    let lease = inner.packs.lease().map_err(|e| Error::io("starting a pack", e))?;
    let record = tombstone(path, lease.start, seq, unix_now());
    lease
        .faults()
        .write_at(lease.file(), &record, lease.start)
        .map_err(|e| Error::io(format!("removing {path}"), e))?;
    let (pack, end) = (lease.id(), lease.start + record.len() as u64);
    let in_flight = inner.packs.record_in_flight(pack);
    lease.keep(end);
    let receiver = inner.submit(vec![Change::Remove(path.clone(), seq)], vec![(pack, end)], record.len() as u64)?;
    index.pending.insert(path.clone(), (seq, None));
    Ok(Some((receiver, in_flight)))
}
