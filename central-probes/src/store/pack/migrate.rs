//! Converting a data directory of the per-file layout (`probes/<module
//! version>/<file>`, each a header and the probe's bytes) at start: every
//! probe is appended to a pack, a batch of 64 MiB at a time made durable
//! and logged like an upload's; only when all are in the packs is
//! `probes/` renamed away and removed. A conversion killed at any step
//! leaves `probes/` whole and starts again at the next start, skipping
//! what the packs already hold.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::UNIX_EPOCH;

use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
use tracing::{error, info, warn};

use crate::store::filesystem::format::read_header;

use super::group_commit::make_durable;
use super::index::{Change, Loc};
use super::journal::Log;
use super::record::stamp_into;
use super::state::Inner;

/// Bytes appended between two batch commits.
const BATCH_BYTES: usize = 64 << 20;

/// Converts `data_dir/probes`, if there is one; how many probes it moved.
pub(super) fn migrate(inner: &Inner, log: &mut Log, data_dir: &Path) -> io::Result<usize> {
    let probes_dir = data_dir.join("probes");
    let migrated_dir = data_dir.join("probes.migrated");
    if !probes_dir.exists() {
        finish(inner, data_dir, &migrated_dir)?;
        return Ok(0);
    }
    let mut moved = 0;
    let mut lease = inner.packs.lease()?;
    let mut at = lease.start;
    // `at` is where the batch being gathered goes; `lease.start` where the
    // last durable one ended.
    let mut batch: Vec<u8> = Vec::new();
    let mut changes = Vec::new();
    for (path, file_path) in probe_files(&probes_dir)? {
        let (file, (entry, offset)) = match File::open(&file_path).and_then(|f| read_header(&f).map(|h| (f, h))) {
            Ok(read) => read,
            Err(error) => {
                warn!(path = %file_path.display(), %error, "not converting an unreadable probe file");
                continue;
            }
        };
        let same = |loc: &Loc| loc.size == entry.size && loc.sha256 == entry.sha256 && loc.signature == entry.signature;
        if inner.index().visible.get(&path).is_some_and(same) {
            continue;
        }
        let mut bytes = vec![0u8; entry.size as usize];
        file.read_exact_at(&mut bytes, offset)?;
        let crc32 = crc32fast::hash(&bytes);
        if entry.crc32.is_some_and(|recorded| recorded != crc32) {
            error!(path = %file_path.display(), "not converting a probe file whose bytes do not match its CRC-32");
            continue;
        }
        let stored_at = file.metadata()?.modified()?.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let signature = entry.signature.clone().unwrap_or_default();
        let loc = Loc {
            pack: lease.id(),
            offset: at + batch.len() as u64,
            seq: inner.index().take_seq(),
            size: entry.size,
            sha256: entry.sha256,
            crc32,
            stored_at,
            signature: entry.signature,
        };
        let path_string = path.to_string();
        let mut head = loc.header(&path).encode(path_string.as_bytes(), &signature);
        stamp_into(&mut head, loc.offset, loc.seq);
        batch.extend_from_slice(&head);
        batch.extend_from_slice(path_string.as_bytes());
        batch.extend_from_slice(&bytes);
        batch.extend_from_slice(&signature);
        changes.push(Change::Put(path, loc));
        moved += 1;
        if batch.len() >= BATCH_BYTES {
            at = commit(inner, log, &mut lease, at, &mut batch, &mut changes)?;
        }
    }
    at = commit(inner, log, &mut lease, at, &mut batch, &mut changes)?;
    lease.keep(at);
    // Every probe is durable in the packs: the old layout can go.
    inner.faults.rename(&probes_dir, &migrated_dir)?;
    inner.faults.sync_dir(data_dir)?;
    finish(inner, data_dir, &migrated_dir)?;
    info!(probes = moved, "converted the per-file probe store to packs");
    Ok(moved)
}

/// Appends a batch to the pack, makes it durable as the group commit does,
/// and applies it.
fn commit(
    inner: &Inner,
    log: &mut Log,
    lease: &mut super::packs::Lease,
    at: u64,
    batch: &mut Vec<u8>,
    changes: &mut Vec<Change>,
) -> io::Result<u64> {
    if batch.is_empty() {
        return Ok(at);
    }
    inner.faults.write_at(lease.file(), batch, at)?;
    let end = at + batch.len() as u64;
    make_durable(inner, log, &BTreeMap::from([(lease.id(), end)]), changes.iter())?;
    let mut index = inner.index();
    index.apply(Change::PackEnd(lease.id(), end));
    changes.drain(..).for_each(|change| index.apply(change));
    batch.clear();
    lease.start = end;
    Ok(end)
}

/// Removes what is left of the old layout once its probes are in packs.
fn finish(inner: &Inner, data_dir: &Path, migrated_dir: &Path) -> io::Result<()> {
    if migrated_dir.exists() {
        fs::remove_dir_all(migrated_dir)?;
    }
    for leftover in ["index.snapshot", "tmp"] {
        let path = data_dir.join(leftover);
        if path.is_dir() {
            fs::remove_dir_all(&path)?;
        } else if path.exists() {
            inner.faults.remove_file(&path)?;
        }
    }
    Ok(())
}

/// Every probe file under `probes_dir`, in path order.
fn probe_files(probes_dir: &Path) -> io::Result<Vec<(ProbePath, std::path::PathBuf)>> {
    let mut files = Vec::new();
    for module_dir in fs::read_dir(probes_dir)? {
        let module_dir = module_dir?.path();
        let Some(version) = module_dir.file_name().and_then(|n| n.to_str()).and_then(|n| ModuleVersion::parse(n).ok())
        else {
            continue;
        };
        for file in fs::read_dir(&module_dir)? {
            let file = file?.path();
            let Some(name) = file.file_name().and_then(|n| n.to_str()).and_then(|n| ProbeFileName::parse(n).ok())
            else {
                continue;
            };
            files.push((ProbePath::new(version.clone(), name), file));
        }
    }
    files.sort();
    Ok(files)
}
