//! What is stored, as the admin and the product's APIs ask about it: which
//! of some paths are stored (ONE GetExistingProbes, behind both APIs),
//! pages of probes, the module versions, deleting, and the misses. No
//! wire here: the handlers (`admin_service`, `roxctl_existing`) adapt it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use probe_api::limits::{
    DEFAULT_PAGE_SIZE, MAX_DELETE_MODULE_VERSIONS, MAX_DELETED_PROBES, MAX_EXISTING_PATHS, MAX_PAGE_SIZE,
};
use probe_api::names::{ModuleVersion, ProbePath};
use probe_api::v1::{
    DeleteProbesRequest, DeleteProbesResponse, ListMissesRequest, ListMissesResponse, ListModuleVersionsResponse,
    ListProbesRequest, ListProbesResponse, ModuleVersionSummary, ProbeMiss, StoreSpace,
};
use tracing::info;

use crate::error::{Error, Result};
use crate::server::auth::Caller;
use crate::server::coverage::Coverage;
use crate::server::metrics::{AuditLabels, Metrics};
use crate::server::page_token::PageTokens;
use crate::store::misses::Miss;
use crate::store::misses::recorder::MissRecorder;
use crate::store::{ModuleSummary, ProbeStore, StoredProbe};

/// What to do with a path asked about that is not a valid probe path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidPaths {
    /// INVALID_ARGUMENT (this API's GetExistingProbes).
    Refuse,
    /// Leave it out, as unknown (the product's, whose clients ask for
    /// whatever their package holds).
    Skip,
}

pub struct Catalog {
    store: Arc<dyn ProbeStore>,
    misses: Arc<MissRecorder>,
    metrics: Metrics,
    page_tokens: PageTokens,
    /// ListModuleVersions reads the whole store: one at a time, so that
    /// callers cannot make Central read it many times at once.
    summarizing: tokio::sync::Mutex<()>,
    /// Which stored probes a prefetch stored (ListProbes marks them).
    coverage: Arc<Coverage>,
}

impl Catalog {
    pub fn new(
        store: Arc<dyn ProbeStore>,
        misses: Arc<MissRecorder>,
        metrics: Metrics,
        coverage: Arc<Coverage>,
    ) -> Self {
        let page_tokens = PageTokens::new(store.page_token_key());
        Catalog { store, misses, metrics, page_tokens, summarizing: Default::default(), coverage }
    }

    /// The stored probes among the paths `asked`, each with its path as
    /// asked, in the order asked; a path asked twice is answered once, and
    /// a probe found damaged is left out (so that an uploader sends it
    /// again, which repairs it). At most `MAX_EXISTING_PATHS` paths.
    pub async fn existing(&self, asked: Vec<String>, invalid: InvalidPaths) -> Result<Vec<(String, StoredProbe)>> {
        if asked.len() > MAX_EXISTING_PATHS {
            return Err(Error::invalid_argument(format!(
                "{} paths asked for; at most {MAX_EXISTING_PATHS} per call",
                asked.len()
            )));
        }
        // A valid path's string is its only spelling, so the strings tell
        // duplicates apart and are the answer's paths as they are: a
        // re-upload asks for 16,000 at once.
        let mut seen = HashSet::with_capacity(asked.len());
        let first: Vec<bool> = asked.iter().map(|path| seen.insert(path.as_str())).collect();
        drop(seen);
        let (mut names, mut paths) = (Vec::with_capacity(asked.len()), Vec::with_capacity(asked.len()));
        for (name, first) in asked.into_iter().zip(first) {
            let path = match (ProbePath::parse(&name), invalid) {
                (Ok(path), _) => path,
                (Err(_), InvalidPaths::Skip) => continue,
                (Err(error), InvalidPaths::Refuse) => return Err(error.into()),
            };
            if first {
                names.push(name);
                paths.push(path);
            }
        }
        let stored = self.store.stat_many(&paths).await?;
        let found = names.into_iter().zip(stored).filter_map(|(name, stored)| Some((name, stored?)));
        Ok(found.filter(|(_, stored)| !self.store.is_damaged(&stored.path)).collect())
    }

    pub async fn list(&self, request: ListProbesRequest) -> Result<ListProbesResponse> {
        let module_version = match request.module_version.as_str() {
            "" => None,
            v => Some(ModuleVersion::parse(v)?),
        };
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Error::invalid_argument(format!("page_size {n} is over {MAX_PAGE_SIZE}")));
            }
            n => n,
        } as usize;
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(self.page_tokens.check(module_version.as_ref(), token)?),
        };
        // One more than asked tells whether another page follows.
        let mut probes = self.store.list(module_version.as_ref(), after.as_ref(), page_size + 1).await?;
        let next_page_token = if probes.len() > page_size {
            probes.truncate(page_size);
            probes.last().map(|p| self.page_tokens.issue(module_version.as_ref(), &p.path)).unwrap_or_default()
        } else {
            String::new()
        };
        let probes = probes.into_iter().map(|probe| self.coverage.describe(probe)).collect();
        Ok(ListProbesResponse { probes, next_page_token })
    }

    /// What DeleteProbes would delete, in path order.
    async fn delete_targets(&self, request: &DeleteProbesRequest) -> Result<BTreeMap<String, StoredProbe>> {
        if request.paths.is_empty() && request.module_versions.is_empty() {
            return Err(Error::invalid_argument("name the probe paths or module versions to delete"));
        }
        if request.paths.len() > MAX_EXISTING_PATHS || request.module_versions.len() > MAX_DELETE_MODULE_VERSIONS {
            return Err(Error::invalid_argument(format!(
                "at most {MAX_EXISTING_PATHS} paths and {MAX_DELETE_MODULE_VERSIONS} module versions per call"
            )));
        }
        let paths = request.paths.iter().map(|p| ProbePath::parse(p)).collect::<Result<Vec<_>, _>>()?;
        let versions =
            request.module_versions.iter().map(|v| ModuleVersion::parse(v)).collect::<Result<Vec<_>, _>>()?;
        let too_many =
            || Error::invalid_argument(format!("more than {MAX_DELETED_PROBES} probes match: delete them in parts"));
        let mut targets = BTreeMap::new();
        for probe in self.store.stat_many(&paths).await?.into_iter().flatten() {
            targets.insert(probe.path.to_string(), probe);
        }
        for version in &versions {
            let mut after = None;
            loop {
                let page = self.store.list(Some(version), after.as_ref(), MAX_PAGE_SIZE as usize).await?;
                let full = page.len() == MAX_PAGE_SIZE as usize;
                after = page.last().map(|probe| probe.path.clone());
                for probe in page {
                    targets.insert(probe.path.to_string(), probe);
                }
                if targets.len() > MAX_DELETED_PROBES {
                    return Err(too_many());
                }
                if !full {
                    break;
                }
            }
        }
        Ok(targets)
    }

    pub async fn delete(
        &self,
        request: DeleteProbesRequest,
        caller: &Caller,
        client: &str,
    ) -> Result<DeleteProbesResponse> {
        let targets = self.delete_targets(&request).await?;
        let mut response = DeleteProbesResponse::default();
        for probe in targets.into_values() {
            if !request.dry_run && !self.store.remove(&probe.path).await? {
                continue; // deleted meanwhile by another call
            }
            response.deleted_bytes += probe.size;
            response.deleted.push(probe.into());
        }
        let count = response.deleted.len();
        info!(token = %caller.name, role = %caller.role, client, dry_run = request.dry_run, probes = count, bytes = response.deleted_bytes, "probes deleted");
        if !request.dry_run {
            let labels = AuditLabels { token: caller.name.clone(), action: "delete" };
            self.metrics.changes_by_token.get_or_create(&labels).inc_by(count as u64);
        }
        Ok(response)
    }

    pub async fn module_versions(&self) -> Result<ListModuleVersionsResponse> {
        let summaries = {
            let _one_at_a_time = self.summarizing.lock().await;
            self.store.summaries().await?
        };
        let summary_of = |summary: ModuleSummary| ModuleVersionSummary {
            module_version: summary.module_version.to_string(),
            probes: summary.probes,
            bytes: summary.bytes,
            last_stored_unix: summary.last_stored.map_or(0, |at| at as i64),
        };
        let space = self.store.space().map(|(live_bytes, dead_bytes)| StoreSpace { live_bytes, dead_bytes });
        Ok(ListModuleVersionsResponse { module_versions: summaries.into_iter().map(summary_of).collect(), space })
    }

    pub async fn misses_listed(&self, request: ListMissesRequest) -> Result<ListMissesResponse> {
        let misses = self.misses.list().await?;
        let open: Vec<&Miss> = misses.iter().filter(|miss| miss.resolved.is_none()).collect();
        // In path order (`ModuleVersion`'s).
        let versions: BTreeSet<&ModuleVersion> = open.iter().map(|miss| miss.path.module_version()).collect();
        let module_versions_to_upload = versions.into_iter().map(ToString::to_string).collect();
        let listed = misses.iter().filter(|miss| request.include_resolved || miss.resolved.is_none());
        Ok(ListMissesResponse {
            open_count: open.len() as u32,
            module_versions_to_upload,
            misses: listed.map(ProbeMiss::from).collect(),
        })
    }
}
