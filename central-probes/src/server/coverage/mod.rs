//! CheckCoverage, the use case: for a module version and a list of nodes
//! (each an ordered list of candidate kernel names, given or derived from
//! the node's facts with the Collector's own code), the candidate each
//! node would be served and its source, in the Collector's order: built
//! into the Collector image, uploaded (not damaged), Central's upstream
//! cache, the upstream (asked, never downloaded), or none.
//!
//! Local sources are looked up for every distinct path at once; the
//! upstream is asked, in batches, only about the paths that come before a
//! node's first locally covered candidate, each path once, so identical
//! candidate lists cost nothing more. With `prefetch`, what only the
//! upstream has is then fetched and stored (`prefetch`).

mod prefetch;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use probe_api::candidates::{HostFacts, candidates};
use probe_api::limits::{MAX_BUILTIN_FILES, MAX_COVERAGE_NODES, MAX_NODE_CANDIDATES};
use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
use probe_api::v1::{
    CheckCoverageRequest, CheckCoverageResponse, CoverageNode, CoverageSource, NodeCoverage, ProbeInfo,
};
use tonic::Code;
use tracing::info;

use crate::error::{Error, Result};
use crate::server::auth::Caller;
use crate::server::upstream::UpstreamSource;
use crate::store::{ProbeStore, StoredProbe};
use prefetch::PrefetchMarks;

/// Answers CheckCoverage over the uploaded probes and the upstream.
pub struct Coverage {
    store: Arc<dyn ProbeStore>,
    upstream: Option<Arc<UpstreamSource>>,
    /// Which stored probes a prefetch brought (`ListProbes` marks them).
    marks: PrefetchMarks,
}

/// Where each distinct path of a check was found, by index of `paths`.
struct Found {
    paths: Vec<ProbePath>,
    sources: Vec<CoverageSource>,
    upstream_requests: u32,
}

impl Coverage {
    /// `data_dir` keeps the record of prefetched probes.
    pub fn new(store: Arc<dyn ProbeStore>, upstream: Option<Arc<UpstreamSource>>, data_dir: &Path) -> Result<Self> {
        Ok(Coverage { store, upstream, marks: PrefetchMarks::open(data_dir)? })
    }

    /// `probe` as ListProbes describes it: marked when a prefetch stored
    /// these very bytes.
    pub fn describe(&self, probe: StoredProbe) -> ProbeInfo {
        let prefetched = self.marks.contains(&probe);
        ProbeInfo { prefetched, ..ProbeInfo::from(probe) }
    }

    /// The answer for every node of `request`. The caller's role has been
    /// checked (`prefetch` needs an admin); its token names it in the audit
    /// line of a prefetch.
    pub async fn check(&self, request: CheckCoverageRequest, caller: &Caller) -> Result<CheckCoverageResponse> {
        let module_version = ModuleVersion::parse(&request.module_version)?;
        let builtin = builtin_names(&request.builtin_files)?;
        if request.nodes.is_empty() || request.nodes.len() > MAX_COVERAGE_NODES {
            return Err(Error::invalid_argument(format!(
                "{} nodes: a check needs 1 to {MAX_COVERAGE_NODES} nodes (split larger fleets)",
                request.nodes.len()
            )));
        }
        // Identical candidate lists are resolved once.
        let mut lists: Vec<Vec<String>> = Vec::new();
        let mut list_of_node = Vec::with_capacity(request.nodes.len());
        let mut known: HashMap<Vec<String>, usize> = HashMap::new();
        for (index, node) in request.nodes.iter().enumerate() {
            let list = node_candidates(node).map_err(|e| e.context(format!("node {index}")))?;
            let next = lists.len();
            let at = *known.entry(list.clone()).or_insert(next);
            if at == next {
                lists.push(list);
            }
            list_of_node.push(at);
        }
        let found = self.find(&module_version, &lists, &builtin).await?;
        let index_of: HashMap<&ProbePath, usize> = found.paths.iter().enumerate().map(|(i, p)| (p, i)).collect();
        let answers: Vec<NodeCoverage> = lists
            .iter()
            .map(|list| {
                let served = list.iter().find_map(|candidate| {
                    let source = found.sources[index_of[&path_of(&module_version, candidate)]];
                    (source != CoverageSource::None).then(|| (candidate.clone(), source))
                });
                let (candidate, source) = served.unwrap_or((String::new(), CoverageSource::None));
                NodeCoverage { candidates: list.clone(), candidate, source: source.into() }
            })
            .collect();
        if answers.iter().all(|a| a.source() == CoverageSource::None) && self.knows_nothing_of(&module_version).await? {
            return Err(Error::new(
                Code::NotFound,
                format!(
                    "no source has any probe of module version {module_version}: Central stores none, and no node's \
                     candidate is built in or at the upstream. Check the module version (the Collector image's \
                     MODULE_VERSION.txt; `central-probes ls --summary` lists those uploaded)"
                ),
            ));
        }
        let mut response = CheckCoverageResponse {
            nodes: list_of_node.iter().map(|&list| answers[list].clone()).collect(),
            upstream_requests: found.upstream_requests,
            ..Default::default()
        };
        if request.prefetch {
            let wanted: Vec<ProbePath> = answers
                .iter()
                .filter(|a| matches!(a.source(), CoverageSource::Upstream | CoverageSource::UpstreamCache))
                .map(|a| path_of(&module_version, &a.candidate))
                .collect();
            if let Some(upstream) = &self.upstream {
                let (prefetched, failures) = prefetch::fetch(&self.store, upstream, &self.marks, wanted).await;
                info!(token = %caller.name, prefetched = prefetched.len(), failed = failures.len(), "probes prefetched");
                (response.prefetched, response.prefetch_failures) = (prefetched, failures);
            }
        }
        Ok(response)
    }

    /// Every distinct path of `lists`, and where it is found.
    async fn find(
        &self,
        module_version: &ModuleVersion,
        lists: &[Vec<String>],
        builtin: &HashSet<String>,
    ) -> Result<Found> {
        let mut seen = HashSet::new();
        let paths: Vec<ProbePath> = lists
            .iter()
            .flatten()
            .map(|candidate| path_of(module_version, candidate))
            .filter(|path| seen.insert(path.clone()))
            .collect();
        let mut sources = vec![CoverageSource::None; paths.len()];
        for (source, path) in sources.iter_mut().zip(&paths) {
            if builtin.contains(path.file_name().as_str()) {
                *source = CoverageSource::Builtin;
            }
        }
        // A probe found damaged is not served: it does not count.
        let stored = self.store.stat_many(&paths).await?;
        for (source, stored) in sources.iter_mut().zip(stored) {
            if *source == CoverageSource::None && stored.is_some_and(|p| !self.store.is_damaged(&p.path)) {
                *source = CoverageSource::Uploaded;
            }
        }
        let Some(upstream) = &self.upstream else { return Ok(Found { paths, sources, upstream_requests: 0 }) };
        for (source, cached) in sources.iter_mut().zip(upstream.cached(&paths).await?) {
            if *source == CoverageSource::None && cached {
                *source = CoverageSource::UpstreamCache;
            }
        }
        // The upstream is asked only about candidates before a list's first
        // locally covered one: a later one would never be asked for.
        let index_of: HashMap<&ProbePath, usize> = paths.iter().enumerate().map(|(i, p)| (p, i)).collect();
        let mut ask: Vec<usize> = Vec::new();
        let mut asking = HashSet::new();
        for list in lists {
            for candidate in list {
                let index = index_of[&path_of(module_version, candidate)];
                if sources[index] != CoverageSource::None {
                    break;
                }
                if asking.insert(index) {
                    ask.push(index);
                }
            }
        }
        if ask.is_empty() {
            return Ok(Found { paths, sources, upstream_requests: 0 });
        }
        let asked: Vec<ProbePath> = ask.iter().map(|&index| paths[index].clone()).collect();
        let answer = upstream.has_probes(&asked).await?;
        for (&index, has) in ask.iter().zip(answer.has) {
            if has {
                sources[index] = CoverageSource::Upstream;
            }
        }
        Ok(Found { paths, sources, upstream_requests: answer.requests })
    }

    /// Whether Central stores no probe of `module_version` at all.
    async fn knows_nothing_of(&self, module_version: &ModuleVersion) -> Result<bool> {
        Ok(self.store.list(Some(module_version), None, 1).await?.is_empty())
    }
}

/// The probe path a candidate's eBPF probe has (checked valid before).
fn path_of(module_version: &ModuleVersion, candidate: &str) -> ProbePath {
    let file_name = ProbeFileName::ebpf(candidate).expect("candidates are checked when read");
    ProbePath::new(module_version.clone(), file_name)
}

/// A node's candidates: as given, or derived from its facts as the
/// Collector derives them; each one a valid probe file name.
fn node_candidates(node: &CoverageNode) -> Result<Vec<String>> {
    let list = if !node.candidates.is_empty() {
        node.candidates.clone()
    } else {
        let facts = node.facts.as_ref().filter(|facts| !facts.kernel.trim().is_empty()).ok_or_else(|| {
            Error::invalid_argument("neither candidates nor facts with a kernel release: give one or the other")
        })?;
        candidates(&HostFacts {
            release: facts.kernel.trim().to_owned(),
            version: facts.uname_v.clone(),
            os_release: facts.os_release.clone().into_iter().collect(),
            hostname: facts.hostname.clone(),
            version_file: Some(facts.etc_version.clone()).filter(|line| !line.is_empty()),
        })
    };
    if list.len() > MAX_NODE_CANDIDATES {
        return Err(Error::invalid_argument(format!(
            "{} candidates; at most {MAX_NODE_CANDIDATES} per node",
            list.len()
        )));
    }
    for candidate in &list {
        ProbeFileName::ebpf(candidate).map_err(|e| Error::invalid_argument(format!("candidate {candidate:?}: {e}")))?;
    }
    Ok(list)
}

/// The built-in probe file names, each as its gzip'd name (an uncompressed
/// built-in serves the same candidate).
fn builtin_names(files: &[String]) -> Result<HashSet<String>> {
    if files.len() > MAX_BUILTIN_FILES {
        return Err(Error::invalid_argument(format!("{} builtin_files; at most {MAX_BUILTIN_FILES}", files.len())));
    }
    files
        .iter()
        .map(|file| {
            let gzipped = if file.ends_with(".gz") { file.clone() } else { format!("{file}.gz") };
            ProbeFileName::parse(&gzipped)
                .map(|name| name.as_str().to_owned())
                .map_err(|e| Error::invalid_argument(format!("builtin file {file:?}: {e}")))
        })
        .collect()
}
