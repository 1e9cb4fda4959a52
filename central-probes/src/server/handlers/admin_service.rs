//! `ProbeUploadService`: the admin-facing RPCs, each a thin adapter: it
//! checks the bearer token's role, calls the use case (`catalog`,
//! `export`, `verify_probes`, `coverage`; UploadProbes is answered by
//! `handlers::upload_probes`) and counts the call under its final status.

use std::sync::Arc;
use std::time::Duration;

use probe_api::v1::probe_upload_service_server::ProbeUploadService;
use probe_api::v1::{
    CheckCoverageRequest, CheckCoverageResponse, DeleteProbesRequest, DeleteProbesResponse, ExportProbesRequest,
    GetExistingProbesRequest, GetExistingProbesResponse, ListMissesRequest, ListMissesResponse,
    ListModuleVersionsRequest, ListModuleVersionsResponse, ListProbesRequest, ListProbesResponse, UploadProbesRequest,
    UploadProbesResponse, VerifyProbesRequest,
};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument};

use crate::error::Result;
use crate::server::auth::{Role, TokenAuth};
use crate::server::catalog::{Catalog, InvalidPaths};
use crate::server::coverage::Coverage;
use crate::server::export::{ExportStream, Exports};
use crate::server::metrics::Metrics;
use crate::server::verify_probes::{Verifications, VerifyStream};
use crate::store::{ProbeStore, probe_info};

pub struct AdminService {
    catalog: Arc<Catalog>,
    auth: TokenAuth,
    metrics: Metrics,
    exports: Exports,
    verifications: Verifications,
    coverage: Arc<Coverage>,
}

impl AdminService {
    /// `record` is the store without its caches, for exports and
    /// verifications; `send_timeout`: an export or verification whose
    /// client takes nothing for this long is ended.
    pub fn new(
        catalog: Arc<Catalog>,
        record: Arc<dyn ProbeStore>,
        auth: TokenAuth,
        metrics: Metrics,
        send_timeout: Duration,
        coverage: Arc<Coverage>,
    ) -> Self {
        let (exports, verifications) =
            (Exports::new(record.clone(), send_timeout), Verifications::new(record, send_timeout));
        AdminService { catalog, auth, metrics, exports, verifications, coverage }
    }

    /// Counts the call under its final status code.
    fn counted<T>(&self, rpc: &'static str, result: Result<T>) -> Result<Response<T>, Status> {
        let code = result.as_ref().map_or_else(|e| e.code, |_| tonic::Code::Ok);
        self.metrics.count_request(rpc, code, "");
        Ok(Response::new(result?))
    }

    async fn existing(&self, request: GetExistingProbesRequest) -> Result<GetExistingProbesResponse> {
        let found = self.catalog.existing(request.paths, InvalidPaths::Refuse).await?;
        Ok(GetExistingProbesResponse {
            probes: found.into_iter().map(|(path, stored)| probe_info(stored, path)).collect(),
        })
    }
}

#[tonic::async_trait]
impl ProbeUploadService for AdminService {
    #[instrument(skip_all, fields(paths = request.get_ref().paths.len()))]
    async fn get_existing_probes(
        &self,
        request: Request<GetExistingProbesRequest>,
    ) -> Result<Response<GetExistingProbesResponse>, Status> {
        let result = match self.auth.authorize(request.metadata(), Role::View) {
            Ok(_) => self.existing(request.into_inner()).await,
            Err(error) => Err(error),
        };
        self.counted("GetExistingProbes", result)
    }

    async fn upload_probes(
        &self,
        _: Request<Streaming<UploadProbesRequest>>,
    ) -> Result<Response<UploadProbesResponse>, Status> {
        // Never called: the route table answers this path with
        // `handlers::upload_probes` before tonic's router, which reads the
        // chunks without tonic's copy. The generated trait still needs the
        // method.
        Err(Status::unimplemented("UploadProbes is served by Central's own reader"))
    }

    #[instrument(skip_all)]
    async fn delete_probes(
        &self,
        request: Request<DeleteProbesRequest>,
    ) -> Result<Response<DeleteProbesResponse>, Status> {
        let client = request.remote_addr().map(|address| address.to_string()).unwrap_or_else(|| "unknown".to_owned());
        let result = match self.auth.caller(request.metadata(), Role::Admin) {
            Ok(caller) => self.catalog.delete(request.into_inner(), &caller, &client).await,
            Err(error) => Err(error),
        };
        self.counted("DeleteProbes", result)
    }

    #[instrument(skip_all)]
    async fn list_probes(&self, request: Request<ListProbesRequest>) -> Result<Response<ListProbesResponse>, Status> {
        let result = match self.auth.authorize(request.metadata(), Role::View) {
            Ok(_) => self.catalog.list(request.into_inner()).await,
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
            Ok(_) => self.catalog.module_versions().await,
            Err(error) => Err(error),
        };
        self.counted("ListModuleVersions", result)
    }

    #[instrument(skip_all)]
    async fn list_misses(&self, request: Request<ListMissesRequest>) -> Result<Response<ListMissesResponse>, Status> {
        let result = match self.auth.authorize(request.metadata(), Role::View) {
            Ok(_) => self.catalog.misses_listed(request.into_inner()).await,
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
