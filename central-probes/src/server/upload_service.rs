//! `ProbeUploadService`: the admin-facing RPCs. Each RPC checks the bearer
//! token, then calls an inner function returning the crate's `Error`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use probe_api::limits::{
    DEFAULT_PAGE_SIZE, MAX_DELETE_MODULE_VERSIONS, MAX_DELETED_PROBES, MAX_EXISTING_PATHS, MAX_PAGE_SIZE,
};
use probe_api::names::{ModuleVersion, ProbePath};
use probe_api::v1::probe_upload_service_server::ProbeUploadService;
use probe_api::v1::{
    CheckCoverageRequest, CheckCoverageResponse, DeleteProbesRequest, DeleteProbesResponse, ExportProbesRequest,
    GetExistingProbesRequest, GetExistingProbesResponse, ListMissesRequest, ListMissesResponse,
    ListModuleVersionsRequest, ListModuleVersionsResponse, ListProbesRequest, ListProbesResponse, ModuleVersionSummary,
    ProbeMiss, StoreSpace, UploadProbesRequest, UploadProbesResponse, VerifyProbesRequest,
};
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument};

use crate::error::{Error, Result};
use crate::server::auth::{Caller, Role, TokenAuth};
use crate::server::coverage::Coverage;
use crate::server::export::{ExportStream, Exports};
use crate::server::metrics::{AuditLabels, Metrics};
use crate::server::page_token::PageTokens;
use crate::server::upload_record::{Uploader, record_upload_end};
use crate::server::upload_session::{Part, UploadSession};
use crate::server::verify_probes::{Verifications, VerifyStream};
use crate::store::misses::Miss;
use crate::store::misses::recorder::MissRecorder;
use crate::store::{ModuleSummary, ProbeStore, StoredProbe, probe_info};

pub struct UploadService {
    store: Arc<dyn ProbeStore>,
    misses: Arc<MissRecorder>,
    auth: TokenAuth,
    metrics: Metrics,
    page_tokens: PageTokens,
    exports: Exports,
    verifications: Verifications,
    /// ListModuleVersions reads the whole store: one at a time, so that
    /// callers cannot make Central read it many times at once.
    summarizing: tokio::sync::Mutex<()>,
    /// An upload whose body brings nothing for this long is ended.
    upload_idle_timeout: Duration,
    /// CheckCoverage, and the prefetch marks of ListProbes.
    coverage: Arc<Coverage>,
}

impl UploadService {
    /// `send_timeout`: an export or verification whose client takes
    /// nothing for this long is ended; `upload_idle_timeout`: the same for
    /// an upload whose client sends nothing.
    /// `record` is `store` without its caches, for exports and verifications.
    // The service's parts, each built once by `Central::open`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn ProbeStore>,
        record: Arc<dyn ProbeStore>,
        misses: Arc<MissRecorder>,
        auth: TokenAuth,
        metrics: Metrics,
        send_timeout: Duration,
        upload_idle_timeout: Duration,
        coverage: Arc<Coverage>,
    ) -> Self {
        let page_tokens = PageTokens::new(store.page_token_key());
        let (exports, verifications) =
            (Exports::new(record.clone(), send_timeout), Verifications::new(record, send_timeout));
        let summarizing = Default::default();
        UploadService {
            store,
            misses,
            auth,
            metrics,
            page_tokens,
            exports,
            verifications,
            summarizing,
            upload_idle_timeout,
            coverage,
        }
    }

    /// How long an upload's body may bring nothing before it is ended.
    pub fn upload_idle_timeout(&self) -> Duration {
        self.upload_idle_timeout
    }

    /// Counts the call under its final status code.
    fn counted<T>(&self, rpc: &'static str, result: Result<T>) -> Result<Response<T>, Status> {
        let code = result.as_ref().map_or_else(|e| e.code, |_| tonic::Code::Ok);
        self.metrics.count_request(rpc, code, "");
        Ok(Response::new(result?))
    }

    async fn get_existing(&self, request: GetExistingProbesRequest) -> Result<GetExistingProbesResponse> {
        if request.paths.len() > MAX_EXISTING_PATHS {
            return Err(Error::invalid_argument(format!(
                "{} paths asked for; at most {MAX_EXISTING_PATHS} per call",
                request.paths.len()
            )));
        }
        let parsed = request.paths.iter().map(|p| ProbePath::parse(p)).collect::<Result<Vec<_>, _>>()?;
        // A path asked twice is answered once. A valid path's string is its
        // only spelling, so the strings tell duplicates apart and are the
        // answer's paths as they are: a re-upload asks for 16,000 at once.
        let mut seen = HashSet::with_capacity(request.paths.len());
        let first: Vec<bool> = request.paths.iter().map(|path| seen.insert(path.as_str())).collect();
        drop(seen);
        let (asked, paths): (Vec<String>, Vec<ProbePath>) = request
            .paths
            .into_iter()
            .zip(parsed)
            .zip(first)
            .filter_map(|(asked, first)| first.then_some(asked))
            .unzip();
        // A probe found damaged is left out, for the uploader to send it.
        let stored =
            self.store.stat_many(&paths).await?.into_iter().map(|s| s.filter(|s| !self.store.is_damaged(&s.path)));
        let probes =
            asked.into_iter().zip(stored).filter_map(|(path, stored)| Some(probe_info(stored?, path))).collect();
        Ok(GetExistingProbesResponse { probes })
    }

    async fn list(&self, request: ListProbesRequest) -> Result<ListProbesResponse> {
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
}

impl UploadService {
    /// UploadProbes, for tonic's request stream and for Central's own
    /// (`upload_direct`, which answers every UploadProbes call Central
    /// serves): the caller must be an admin; `client` is its address, for
    /// the log.
    #[instrument(name = "upload_probes", skip_all)]
    pub async fn upload<S>(
        &self,
        metadata: &MetadataMap,
        client: String,
        parts: S,
    ) -> Result<UploadProbesResponse, Status>
    where
        S: Stream<Item = Result<Part, Status>> + Send + Unpin + 'static,
    {
        let caller = match self.auth.caller(metadata, Role::Admin) {
            Ok(caller) => caller,
            Err(error) => return self.counted("UploadProbes", Err(error)).map(Response::into_inner),
        };
        // The upload runs to its end in a task of its own: when its client
        // goes away, this call is dropped, and the upload is still logged
        // and audited with what it committed.
        let (store, metrics, misses) = (self.store.clone(), self.metrics.clone(), self.misses.clone());
        let upload = tokio::spawn(async move {
            let end = UploadSession::new(store).run_to_end(parts).await;
            let uploader = Uploader { caller: &caller, client: &client, via: "UploadProbes" };
            record_upload_end(&metrics, &misses, &uploader, &end).await;
            let code = end.error.as_ref().map_or(tonic::Code::Ok, |error| error.code);
            metrics.count_request("UploadProbes", code, "");
            end.into_result()
        });
        let result = upload.await.unwrap_or_else(|e| Err(Error::internal(format!("the upload's task failed: {e}"))));
        Ok(result?)
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

    async fn delete(
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
}

impl UploadService {
    async fn module_versions(&self) -> Result<ListModuleVersionsResponse> {
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

    async fn misses_listed(&self, request: ListMissesRequest) -> Result<ListMissesResponse> {
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

#[tonic::async_trait]
impl ProbeUploadService for UploadService {
    #[instrument(skip_all, fields(paths = request.get_ref().paths.len()))]
    async fn get_existing_probes(
        &self,
        request: Request<GetExistingProbesRequest>,
    ) -> Result<Response<GetExistingProbesResponse>, Status> {
        let result = match self.auth.authorize(request.metadata(), Role::View) {
            Ok(_) => self.get_existing(request.into_inner()).await,
            Err(error) => Err(error),
        };
        self.counted("GetExistingProbes", result)
    }

    async fn upload_probes(
        &self,
        request: Request<Streaming<UploadProbesRequest>>,
    ) -> Result<Response<UploadProbesResponse>, Status> {
        let client = request.remote_addr().map(|address| address.to_string()).unwrap_or_else(|| "unknown".to_owned());
        let (metadata, _, messages) = request.into_parts();
        let parts = messages.map(|message| message.map(Part::from));
        self.upload(&metadata, client, parts).await.map(Response::new)
    }

    #[instrument(skip_all)]
    async fn delete_probes(
        &self,
        request: Request<DeleteProbesRequest>,
    ) -> Result<Response<DeleteProbesResponse>, Status> {
        let client = request.remote_addr().map(|address| address.to_string()).unwrap_or_else(|| "unknown".to_owned());
        let result = match self.auth.caller(request.metadata(), Role::Admin) {
            Ok(caller) => self.delete(request.into_inner(), &caller, &client).await,
            Err(error) => Err(error),
        };
        self.counted("DeleteProbes", result)
    }

    #[instrument(skip_all)]
    async fn list_probes(&self, request: Request<ListProbesRequest>) -> Result<Response<ListProbesResponse>, Status> {
        let result = match self.auth.authorize(request.metadata(), Role::View) {
            Ok(_) => self.list(request.into_inner()).await,
            Err(error) => Err(error),
        };
        self.counted("ListProbes", result)
    }

    #[instrument(skip_all)]
    async fn list_module_versions(
        &self,
        request: Request<ListModuleVersionsRequest>,
    ) -> Result<Response<ListModuleVersionsResponse>, Status> {
        let result = match self.auth.authorize(request.metadata(), Role::View) {
            Ok(_) => self.module_versions().await,
            Err(error) => Err(error),
        };
        self.counted("ListModuleVersions", result)
    }

    #[instrument(skip_all)]
    async fn list_misses(&self, request: Request<ListMissesRequest>) -> Result<Response<ListMissesResponse>, Status> {
        let result = match self.auth.authorize(request.metadata(), Role::View) {
            Ok(_) => self.misses_listed(request.into_inner()).await,
            Err(error) => Err(error),
        };
        self.counted("ListMisses", result)
    }

    #[instrument(skip_all, fields(nodes = request.get_ref().nodes.len()))]
    async fn check_coverage(
        &self,
        request: Request<CheckCoverageRequest>,
    ) -> Result<Response<CheckCoverageResponse>, Status> {
        let needed = if request.get_ref().prefetch { Role::Admin } else { Role::View };
        let result = match self.auth.caller(request.metadata(), needed) {
            Ok(caller) => self.coverage.check(request.into_inner(), &caller).await,
            Err(error) => Err(error),
        };
        self.counted("CheckCoverage", result)
    }

    type ExportProbesStream = ExportStream;

    #[instrument(skip_all)]
    async fn export_probes(
        &self,
        request: Request<ExportProbesRequest>,
    ) -> Result<Response<Self::ExportProbesStream>, Status> {
        let client = request.remote_addr().map(|address| address.to_string()).unwrap_or_else(|| "unknown".to_owned());
        let result = match self.auth.caller(request.metadata(), Role::View) {
            Ok(caller) => {
                let request = request.into_inner();
                info!(token = %caller.name, role = %caller.role, client, module_versions = ?request.module_versions, "export started");
                self.exports.start(request)
            }
            Err(error) => Err(error),
        };
        self.counted("ExportProbes", result)
    }

    type VerifyProbesStream = VerifyStream;

    #[instrument(skip_all)]
    async fn verify_probes(&self, request: Request<VerifyProbesRequest>) -> Result<Response<VerifyStream>, Status> {
        let result = self.auth.caller(request.metadata(), Role::View).and_then(|caller| {
            info!(token = %caller.name, module_versions = ?request.get_ref().module_versions, "verification started");
            self.verifications.start(request.into_inner())
        });
        self.counted("VerifyProbes", result)
    }
}
