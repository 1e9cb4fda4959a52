//! `CheckCoverage` with `prefetch`: every probe a node would be served from
//! the upstream (or its cache, which evicts) is fetched now, through the
//! usual upstream source (one fetch per probe however many ask, the same
//! checks and signature rules), and stored as an uploaded probe is: it
//! stays until deleted and serves Collectors once the upstream is gone.
//!
//! Which stored probes came this way is kept in `prefetched.tsv` in the
//! data directory (a line of SHA-256 and path per probe, replaced whole), so
//! that `ls` can tell them apart. A mark holds for the bytes fetched: an
//! upload of other bytes under the path ends it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use probe_api::v1::PrefetchFailure;
use tokio_stream::StreamExt;
use tracing::warn;

use crate::error::{Error, Result};
use crate::server::sources::ProbeSource;
use crate::server::upstream::UpstreamSource;
use crate::store::{CommitOutcome, ExpectedDigests, ProbeStore, StoredProbe};

const FILE: &str = "prefetched.tsv";

/// The record of prefetched probes: path to the SHA-256 fetched.
pub(super) struct PrefetchMarks {
    file: PathBuf,
    marks: Mutex<BTreeMap<String, Sha256Digest>>,
}

impl PrefetchMarks {
    /// The marks kept in `data_dir`; none before the first prefetch. A line
    /// that does not parse is skipped with a warning: a mark is a label,
    /// and a damaged file must not keep Central down.
    pub(super) fn open(data_dir: &Path) -> Result<Self> {
        let file = data_dir.join(FILE);
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(format!("reading {}", file.display()), e)),
        };
        let mut marks = BTreeMap::new();
        for line in text.lines().filter(|line| !line.is_empty()) {
            match line.split_once('\t').and_then(|(digest, path)| Some((Sha256Digest::from_hex(digest)?, path))) {
                Some((digest, path)) => drop(marks.insert(path.to_owned(), digest)),
                None => warn!(file = %file.display(), %line, "skipping a line that is not a prefetch mark"),
            }
        }
        Ok(PrefetchMarks { file, marks: Mutex::new(marks) })
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Sha256Digest>> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `probe`'s bytes are those a prefetch stored.
    pub(super) fn contains(&self, probe: &StoredProbe) -> bool {
        self.marks().get(&probe.path.to_string()) == Some(&probe.sha256)
    }

    /// Marks `fetched` and writes the record whole.
    fn add(&self, fetched: &[(ProbePath, Sha256Digest)]) -> Result<()> {
        let text = {
            let mut marks = self.marks();
            marks.extend(fetched.iter().map(|(path, digest)| (path.to_string(), *digest)));
            marks.iter().map(|(path, digest)| format!("{}\t{path}\n", digest.to_hex())).collect::<String>()
        };
        crate::private_file::replace(&self.file, text.as_bytes())
            .map_err(|e| Error::io(format!("writing {}", self.file.display()), e))
    }
}

/// Fetches each of `paths` from the upstream and stores it: the paths
/// stored, and those that could not be, with why (both in path order).
pub(super) async fn fetch(
    store: &Arc<dyn ProbeStore>,
    upstream: &UpstreamSource,
    marks: &PrefetchMarks,
    mut paths: Vec<ProbePath>,
) -> (Vec<String>, Vec<PrefetchFailure>) {
    paths.sort();
    paths.dedup();
    let (mut stored, mut failures) = (Vec::new(), Vec::new());
    for path in paths {
        match fetch_one(store, upstream, &path).await {
            Ok(digest) => stored.push((path, digest)),
            Err(error) => {
                warn!(%path, %error, "prefetch failed");
                failures.push(PrefetchFailure { path: path.to_string(), reason: error.message });
            }
        }
    }
    if let Err(error) = marks.add(&stored) {
        // The probes are stored all the same; only `ls` loses the label.
        warn!(%error, "could not record which probes were prefetched");
    }
    (stored.into_iter().map(|(path, _)| path.to_string()).collect(), failures)
}

/// One probe from the upstream into the store: its SHA-256.
async fn fetch_one(store: &Arc<dyn ProbeStore>, upstream: &UpstreamSource, path: &ProbePath) -> Result<Sha256Digest> {
    let found = upstream.find(path).await?.ok_or_else(|| {
        Error::new(tonic::Code::NotFound, "the upstream no longer has it (or it was refused)".to_owned())
    })?;
    let mut reader = found.reader;
    let probe = reader.probe.clone();
    let mut writer = store.create(path.clone(), probe.size).await?;
    if let Some(signature) = probe.signature.clone() {
        writer.set_signature(signature);
    }
    while let Some(chunk) = reader.chunks.next().await {
        writer.write(chunk?).await?;
    }
    let committed = writer.finish(ExpectedDigests::from(probe.sha256), false).await?.await?;
    match committed.outcome {
        CommitOutcome::Conflict { .. } => Err(Error::new(
            tonic::Code::AlreadyExists,
            "Central stores other bytes under this path (uploaded meanwhile); they were kept",
        )),
        _ => Ok(committed.sha256),
    }
}
