//! Staging and committing in a pack: a probe's record is appended to a
//! leased pack as its bytes arrive (on the thread that hashes them, see
//! `backend::Stage::Blocking`), completed (its signature and header) when
//! they are all in, and committed by writing its stamp and handing the
//! index change to the group commit. Removals append a tombstone the same
//! way.

use std::io;
use std::sync::Arc;

use probe_api::names::ProbePath;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::store::backend::{BlockingStaging, Staged};
use crate::store::{CommitOutcome, Decision, StoredProbe, overwrite_rule, report_taken};

use super::direct::RecordWriter;
use super::index::{Change, Loc};
use super::packs::{InFlight, Lease};
use super::record::{HEADER_LEN, stamp, tombstone};
use super::state::{Inner, durable, unix_now};

pub(super) struct PackStaging {
    inner: Arc<Inner>,
    path: ProbePath,
    /// Taken at the first write, on the lane that writes the record: files
    /// created ahead of their lane hold no pack. Dropped unfinished, the
    /// lease cuts the pack back.
    started: Option<(Lease, RecordWriter)>,
}

impl PackStaging {
    pub(super) fn new(inner: &Arc<Inner>, path: &ProbePath) -> PackStaging {
        PackStaging { inner: inner.clone(), path: path.clone(), started: None }
    }

    /// The record, started in a leased pack (its path written after the
    /// room for the header) if it is not yet.
    fn started(&mut self) -> Result<&mut (Lease, RecordWriter)> {
        if self.started.is_none() {
            let lease = self.inner.packs.lease().map_err(|e| Error::io("starting a pack", e))?;
            let at = lease.start + HEADER_LEN;
            let mut record = RecordWriter::new(&lease.target(), at);
            let path = self.path.to_string();
            record.write(&lease.target(), path.as_bytes()).map_err(|e| Error::io(format!("writing {path}"), e))?;
            self.started = Some((lease, record));
        }
        Ok(self.started.as_mut().expect("started"))
    }
}

impl BlockingStaging for PackStaging {
    fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let path = self.path.clone();
        let (lease, record) = self.started()?;
        record.write(&lease.target(), chunk).map_err(|e| Error::io(format!("writing {path}"), e))
    }

    fn finish(mut self: Box<Self>) -> Result<Box<dyn Staged>> {
        self.started()?;
        let PackStaging { inner, path, started } = *self;
        let (lease, record) = started.expect("started");
        let end = record.finish(&lease.target()).map_err(|e| Error::io(format!("writing {path}"), e))?;
        Ok(Box::new(PackStaged { inner, path, lease: Some(lease), bytes_end: end, record: None, in_flight: None }))
    }
}

/// A record written but for its header (`lease` still held), or whole and
/// waiting for its commit (`record`).
pub(super) struct PackStaged {
    inner: Arc<Inner>,
    path: ProbePath,
    lease: Option<Lease>,
    bytes_end: u64,
    /// The completed record's location and its end.
    record: Option<(Loc, u64)>,
    /// Held from the record's completion to its commit's end.
    in_flight: Option<InFlight>,
}

#[tonic::async_trait]
impl Staged for PackStaged {
    async fn existing(&self) -> Result<Option<StoredProbe>> {
        Ok(self.inner.index().decided(&self.path).map(|loc| loc.stored(&self.path)))
    }

    async fn prepare(&mut self, probe: &StoredProbe) -> Result<()> {
        let crc32 = probe.crc32.ok_or_else(|| Error::internal(format!("{}: no CRC-32 to store", probe.path)))?;
        let lease = self.lease.take().expect("prepared once");
        let signature = probe.signature.clone().unwrap_or_default();
        let signature_len = u32::try_from(signature.len())
            .map_err(|_| Error::invalid_argument(format!("{}: the signature is too long", probe.path)))?;
        let loc = Loc {
            pack: lease.id(),
            offset: lease.start,
            seq: 0,
            size: probe.size,
            sha256: probe.sha256,
            crc32,
            stored_at: unix_now(),
            signature: probe.signature.clone(),
        };
        let header = loc.header(&self.path).encode(self.path.to_string().as_bytes(), &signature);
        let bytes_end = self.bytes_end;
        // Written here, into the page cache (no blocking thread for a few
        // hundred bytes); the group commit makes them durable.
        let io_error = |what: &str| {
            let what = format!("writing the {what} of {}", self.path);
            move |e| Error::io(what, e)
        };
        lease.faults().write_at(lease.file(), &signature, bytes_end).map_err(io_error("signature"))?;
        lease.faults().write_at(lease.file(), &header, lease.start).map_err(io_error("header"))?;
        let end = bytes_end + u64::from(signature_len);
        // Counted before the pack is given back, and so before compaction
        // could pick it.
        self.in_flight = Some(self.inner.packs.record_in_flight(lease.id()));
        lease.keep(end);
        self.record = Some((loc, end));
        Ok(())
    }

    async fn commit(
        self: Box<Self>,
        _probe: StoredProbe,
        overwrite: bool,
        taken: Option<oneshot::Sender<bool>>,
    ) -> Result<CommitOutcome> {
        let PackStaged { inner, path, record, in_flight, .. } = *self;
        let (loc, end) = record.expect("prepared before the commit");
        // A decision under the lock and a stamp into a cached page: no
        // blocking thread needed.
        let decided = decide_and_submit(&inner, path, loc, end, overwrite)?;
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
    overwrite: bool,
) -> Result<(CommitOutcome, Option<Submitted>)> {
    inner.failed()?;
    fn content(loc: &Loc) -> crate::store::Content<'_> {
        (loc.size, loc.sha256, loc.signature.as_deref())
    }
    let mut index = inner.index();
    let outcome = match overwrite_rule(index.decided(&path).map(content), content(&loc), overwrite) {
        // The record stays unstamped: dead, skipped by any scan.
        Decision::Keep(outcome) => return Ok((outcome, None)),
        Decision::Write(outcome) => outcome,
    };
    loc.seq = index.take_seq();
    let file = inner.packs.file(loc.pack).ok_or_else(|| Error::internal(format!("{path}: its pack is gone")))?;
    let (stamp, at) = stamp(loc.offset, loc.seq);
    inner.faults.write_at(&file, &stamp, loc.offset + at).map_err(|e| Error::io(format!("committing {path}"), e))?;
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
