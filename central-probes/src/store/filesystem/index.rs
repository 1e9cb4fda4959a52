//! The in-memory index, built at start-up from the snapshot where it still
//! describes a module directory, and from the probes' headers elsewhere.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::Path;

use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
use tracing::warn;

use crate::error::{Error, Result};

use super::entry::Entry;
use super::format::read_header;
use super::snapshot::Snapshot;

/// Threads reading headers at start-up. With a cold page cache the scan is
/// bound by I/O latency, not CPU: more reads in flight shorten it.
pub(super) const INDEX_THREADS: usize = 16;

/// How the index was built: module directories taken from the snapshot
/// and read from disk.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct LoadStats {
    pub(super) from_snapshot: usize,
    pub(super) from_disk: usize,
}

pub(super) fn load_index(
    probes_dir: &Path,
    mut snapshot: Option<Snapshot>,
) -> Result<(BTreeMap<ProbePath, Entry>, LoadStats)> {
    let read_dir = |dir: &Path| fs::read_dir(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e));
    let mut files = Vec::new();
    let mut index = BTreeMap::new();
    let mut stats = LoadStats::default();
    for module_dir in read_dir(probes_dir)? {
        let module_dir = module_dir.map_err(|e| Error::io("reading probes/", e))?.path();
        let name = module_dir.file_name().unwrap_or_default().to_string_lossy();
        let Ok(module_version) = ModuleVersion::parse(&name) else {
            warn!(path = %module_dir.display(), "ignoring an entry that is not a module version");
            continue;
        };
        if let Some(entries) = snapshot.as_mut().and_then(|s| s.take(module_version.as_str(), &module_dir)) {
            stats.from_snapshot += 1;
            for (file_name, entry) in entries {
                if let Ok(file_name) = ProbeFileName::parse(&file_name) {
                    index.insert(ProbePath::new(module_version.clone(), file_name), entry);
                }
            }
            continue;
        }
        stats.from_disk += 1;
        for file in read_dir(&module_dir)? {
            let file = file.map_err(|e| Error::io("reading probes/", e))?.path();
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            let Ok(file_name) = ProbeFileName::parse(&name) else {
                warn!(path = %file.display(), "ignoring a file that is not a probe");
                continue;
            };
            files.push(ProbePath::new(module_version.clone(), file_name));
        }
    }
    let share = files.len().div_ceil(INDEX_THREADS).max(1);
    let entries: Vec<Vec<(ProbePath, Entry)>> = std::thread::scope(|scope| {
        let readers: Vec<_> = files
            .chunks(share)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .filter_map(|path| {
                            let file = probes_dir.join(path.module_version().as_str()).join(path.file_name().as_str());
                            match File::open(&file).and_then(|f| read_header(&f)) {
                                Ok((entry, _)) => Some((path.clone(), entry)),
                                Err(error) => {
                                    warn!(path = %file.display(), %error, "ignoring an unreadable probe file");
                                    None
                                }
                            }
                        })
                        .collect()
                })
            })
            .collect();
        readers.into_iter().map(|reader| reader.join().expect("a header reader panicked")).collect()
    });
    index.extend(entries.into_iter().flatten());
    Ok((index, stats))
}
