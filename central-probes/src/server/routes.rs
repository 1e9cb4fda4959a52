//! THE route table: which handler answers a request, in match order, the
//! first match winning. Central's own handlers come first (the hot paths
//! whose bytes tonic would copy, and the product's routes); tonic's services
//! (health, reflection, both `ProbeUploadService`s behind their token
//! check) answer the rest, their pre-handler refusals recoded
//! (`edge::recode`). Adding a route is one line here.

use std::sync::Arc;

use probe_api::limits::MAX_REQUEST_MESSAGE;
use probe_api::product::v1::probe_upload_service_server::ProbeUploadServiceServer as ProductServer;
use probe_api::v1::probe_upload_service_server::ProbeUploadServiceServer;
use tonic::codegen::InterceptedService;
use tonic::service::Routes;

use crate::error::{Error, Result};
use crate::server::auth::{Role, TokenAuth};
use crate::server::edge::grpc_web::wants_grpc_web;
use crate::server::edge::recode::RecodeClientErrors;
use crate::server::edge::tonic_routes::TonicRoutes;
use crate::server::edge::{Answer, Call, Handler};
use crate::server::handlers::admin_service::AdminService;
use crate::server::handlers::get_probe::{self, GetProbe};
use crate::server::handlers::kernel_objects::{self, KernelObjects};
use crate::server::handlers::roxctl_existing::{ExistingOverGrpcWeb, ProductUploadService, RoxctlExisting};
use crate::server::handlers::roxctl_upload::{self, RoxctlUpload};
use crate::server::handlers::upload_probes::{self, UploadProbes};
use crate::server::serving::ProbeServing;
use crate::server::uploads::Uploads;

/// What a route matches.
enum Match {
    /// This path exactly.
    Path(&'static str),
    /// Paths starting so.
    Prefix(&'static str),
    /// Requests to be answered in gRPC-web, whatever their path.
    GrpcWeb,
    /// Everything.
    Any,
}

impl Match {
    fn matches(&self, call: &Call) -> bool {
        let path = call.request.uri().path();
        match self {
            Match::Path(exact) => path == *exact,
            Match::Prefix(prefix) => path.starts_with(prefix),
            Match::GrpcWeb => wants_grpc_web(&call.request),
            Match::Any => true,
        }
    }
}

/// The routes, in match order.
pub(crate) struct RouteTable(Vec<(Match, Box<dyn Handler>)>);

impl Handler for RouteTable {
    fn call(&self, call: Call) -> Answer {
        match self.0.iter().find(|(route, _)| route.matches(&call)) {
            Some((_, handler)) => handler.call(call),
            None => unreachable!("the table ends with Match::Any"),
        }
    }
}

/// What the handlers serve.
pub(crate) struct RouteParts {
    pub serving: Arc<ProbeServing>,
    pub admin: Arc<AdminService>,
    pub uploads: Arc<Uploads>,
    pub roxctl: Arc<RoxctlExisting>,
    pub auth: TokenAuth,
}

pub(crate) async fn build(parts: RouteParts) -> Result<RouteTable> {
    let RouteParts { serving, admin, uploads, roxctl, auth } = parts;
    let table: Vec<(Match, Box<dyn Handler>)> = vec![
        (Match::Path(get_probe::PATH), Box::new(GetProbe { serving: serving.clone() })),
        (Match::Prefix(kernel_objects::PREFIX), Box::new(KernelObjects { serving })),
        (Match::Path(upload_probes::PATH), Box::new(UploadProbes(uploads.clone()))),
        (Match::GrpcWeb, Box::new(ExistingOverGrpcWeb(roxctl.clone()))),
        (Match::Path(roxctl_upload::PATH), Box::new(RoxctlUpload(uploads))),
        (Match::Any, Box::new(RecodeClientErrors(TonicRoutes(tonic_routes(admin, roxctl, auth).await?)))),
    ];
    Ok(RouteTable(table))
}

/// tonic's services: health, reflection, and both `ProbeUploadService`s,
/// each behind a token check.
async fn tonic_routes(admin: Arc<AdminService>, roxctl: Arc<RoxctlExisting>, auth: TokenAuth) -> Result<Routes> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // GetProbe is answered beside tonic (`handlers::get_probe`), so its
    // service is named here rather than through a tonic server type.
    health_reporter.set_service_status("kprobes.v1.ProbeService", tonic_health::ServingStatus::Serving).await;
    health_reporter.set_serving::<ProbeUploadServiceServer<AdminService>>().await;
    // Both reflection versions: grpcurl before 1.9 and other older tools
    // speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(probe_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error = |e| Error::internal(format!("building reflection: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;

    let product_grpc = ProductServer::new(ProductUploadService(roxctl))
        .max_decoding_message_size(MAX_REQUEST_MESSAGE)
        .max_encoding_message_size(MAX_REQUEST_MESSAGE);
    let product_auth = auth.clone();
    let product_grpc = InterceptedService::new(product_grpc, move |request: tonic::Request<()>| {
        product_auth.authorize(request.metadata(), Role::View).map_err(tonic::Status::from)?;
        Ok(request)
    });
    let upload = ProbeUploadServiceServer::from_arc(admin)
        .max_decoding_message_size(MAX_REQUEST_MESSAGE)
        .max_encoding_message_size(MAX_REQUEST_MESSAGE);
    // The token is checked before tonic reads the request body: a caller
    // without one cannot make Central buffer a 64 MiB message. Each RPC
    // checks the role it needs on top.
    let upload = InterceptedService::new(upload, move |request: tonic::Request<()>| {
        auth.authorize(request.metadata(), Role::View).map_err(tonic::Status::from)?;
        Ok(request)
    });
    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(upload)
        .add_service(product_grpc);
    Ok(routes.prepare())
}
