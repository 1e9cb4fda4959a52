//! Start-up: the index from its snapshot and the logs after it, checked
//! against the packs on disk; or, when the index is missing, damaged or
//! stale, rebuilt from the packs themselves. Either way, what a crash left
//! past the end the log vouches for (records never reported stored, a torn
//! last record) is cut off the packs.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;

use tracing::{info, warn};

use super::faults::Faults;
use super::index::{Change, Index, Loc};
use super::journal;
use super::packs::{pack_id, pack_path};
use super::record::{Kind, read_record};

/// What start-up found.
pub(super) struct Loaded {
    pub(super) index: Index,
    /// Every pack, open, with its length once cut back.
    pub(super) packs: Vec<(u32, File, u64)>,
    /// The generation of the log to start.
    pub(super) next_generation: u64,
    /// Whether the next start would replay much, or the index was rebuilt:
    /// then a snapshot is written now.
    pub(super) wants_snapshot: bool,
    /// Logs a new snapshot makes unneeded.
    pub(super) old_generations: Vec<u64>,
}

/// Changes replayed from logs after which start-up writes a snapshot.
const SNAPSHOT_AFTER_CHANGES: usize = 65_536;

pub(super) fn load(faults: &Faults, index_dir: &Path, packs_dir: &Path) -> io::Result<Loaded> {
    let mut packs = HashMap::new();
    for entry in fs::read_dir(packs_dir)? {
        let entry = entry?;
        let Some(id) = entry.file_name().to_str().and_then(pack_id) else { continue };
        let file = OpenOptions::new().read(true).write(true).open(entry.path())?;
        let len = file.metadata()?.len();
        packs.insert(id, (file, len));
    }
    let snapshot = journal::read_snapshot(index_dir)?;
    let covers = snapshot.as_ref().map_or(0, |s| s.covers);
    let generations = journal::log_generations(index_dir)?;
    let mut index = Index::default();
    let mut replayed = 0;
    let mut damage: Option<String> = None;
    if let Some(snapshot) = snapshot {
        index = Index::from_snapshot(snapshot.changes);
    }
    let newer: Vec<u64> = generations.iter().copied().filter(|&g| g > covers).collect();
    for (n, &generation) in newer.iter().enumerate() {
        let last = n + 1 == newer.len();
        match journal::read_log(index_dir, generation)? {
            Some(log) => {
                if log.torn && !last {
                    damage = Some(format!("index log {generation} is damaged before its end"));
                }
                replayed += log.changes.len();
                log.changes.into_iter().for_each(|change| index.apply(change));
            }
            // Created, but the process died before its start was written.
            None if last => {}
            None => damage = Some(format!("index log {generation} is not a log")),
        }
    }
    let next_generation = generations.last().copied().unwrap_or(0).max(covers) + 1;
    let old_generations: Vec<u64> = generations.iter().copied().filter(|&g| g < next_generation).collect();
    if damage.is_none() {
        damage = check(&index, &packs);
    }
    let no_index = covers == 0 && generations.is_empty() && packs.values().any(|(_, len)| *len > 0);
    let rebuilt = damage.is_some() || no_index;
    if rebuilt {
        let why = damage.unwrap_or_else(|| "there is no index".to_owned());
        warn!(why, "rebuilding the index from the packs");
        index = rebuild(faults, &mut packs)?;
    }
    let mut opened = Vec::new();
    for (id, (file, len)) in packs {
        match index.packs.get(&id) {
            Some(used) => {
                if len > used.durable_end {
                    info!(pack = id, bytes = len - used.durable_end, "cutting off what a crash left unlogged");
                    faults.truncate(&file, used.durable_end)?;
                }
                opened.push((id, file, used.durable_end));
            }
            // Compacted away, or nothing of it was ever logged: it holds no
            // stored probe.
            None => {
                drop(file);
                faults.remove_file(&pack_path(packs_dir, id))?;
            }
        }
    }
    let wants_snapshot = rebuilt || replayed > SNAPSHOT_AFTER_CHANGES;
    Ok(Loaded { index, packs: opened, next_generation, wants_snapshot, old_generations })
}

/// Why the index does not match the packs, if it does not: a pack it names
/// is missing or shorter than the log vouches for, or a pack with records
/// is unknown to it (the index is older than the packs).
fn check(index: &Index, packs: &HashMap<u32, (File, u64)>) -> Option<String> {
    for (id, used) in &index.packs {
        match packs.get(id) {
            None => return Some(format!("pack {id} is missing")),
            Some((_, len)) if *len < used.durable_end => {
                return Some(format!("pack {id} is {len} bytes, shorter than the {} logged", used.durable_end));
            }
            Some(_) => {}
        }
    }
    for (path, loc) in &index.visible {
        if index.packs.get(&loc.pack).is_none_or(|used| loc.offset + loc.record_len(path) > used.durable_end) {
            return Some(format!("{path} is past the logged end of pack {}", loc.pack));
        }
    }
    packs
        .iter()
        .find(|(id, (_, len))| *len > 0 && !index.packs.contains_key(id) && !index.gone.contains(id))
        .map(|(id, _)| format!("pack {id} is not in the index"))
}

/// The index from the packs alone: every committed record, the newest of
/// each path winning; each pack cut back after its last whole record.
fn rebuild(faults: &Faults, packs: &mut HashMap<u32, (File, u64)>) -> io::Result<Index> {
    let mut newest: HashMap<probe_api::names::ProbePath, (u64, Option<Loc>)> = HashMap::new();
    let mut index = Index::default();
    let mut ids: Vec<u32> = packs.keys().copied().collect();
    ids.sort_unstable();
    for id in ids {
        let (file, len) = packs.get_mut(&id).expect("listed");
        let mut offset = 0;
        while let Some(found) = read_record(file, offset, *len)? {
            offset += found.header.record_len();
            let Some(seq) = found.seq else { continue };
            if !found.bytes_intact {
                // Indexed all the same: the newest version of its path is
                // this one, and a read refuses it (DATA_LOSS) where an older
                // version would be served as if nothing were wrong.
                warn!(pack = id, offset = found.offset, path = %found.path, "a committed probe's bytes do not match its CRC-32: damaged");
            }
            index.next_seq = index.next_seq.max(seq + 1);
            if newest.get(&found.path).is_some_and(|(newer, _)| *newer >= seq) {
                continue;
            }
            let loc = (found.header.kind == Kind::Probe).then(|| Loc {
                pack: id,
                offset: found.offset,
                seq,
                size: found.header.size,
                sha256: found.header.sha256,
                crc32: found.header.crc32,
                stored_at: found.header.stored_at,
                signature: found.signature,
            });
            newest.insert(found.path, (seq, loc));
        }
        if offset < *len {
            warn!(pack = id, bytes = *len - offset, "dropping a torn or unfinished end of a pack");
            faults.truncate(file, offset)?;
            *len = offset;
        }
        index.apply(Change::PackEnd(id, offset));
    }
    for (path, (_, loc)) in newest {
        if let Some(loc) = loc {
            index.apply(Change::Put(path, loc));
        }
    }
    Ok(index)
}
