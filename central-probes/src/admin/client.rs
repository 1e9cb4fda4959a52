//! The admin side of the API: a client of `ProbeUploadService` that sends
//! the bearer token with every call, and the listing the commands share.
//! What is built on it lives beside it: the upload (`upload`), the export
//! (`export`).

use std::time::Duration;

use probe_api::limits::MAX_REQUEST_MESSAGE;
use probe_api::transport::{self, ClientTls};
use probe_api::v1::probe_upload_service_client::ProbeUploadServiceClient;
use probe_api::v1::{ListProbesRequest, ProbeInfo};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::admin::error::AdminError;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<Ascii>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type AdminClient = ProbeUploadServiceClient<InterceptedService<Channel, BearerToken>>;

/// A client of Central's admin API.
pub fn connect(
    address: &str,
    ca_pem: Vec<u8>,
    token: &str,
    connect_timeout: Duration,
) -> Result<AdminClient, AdminError> {
    let token = format!("Bearer {}", token.trim()).parse().map_err(|_| AdminError::Token)?;
    let channel = transport::channel(address, &ClientTls { ca_pem, identity: None }, connect_timeout)
        .map_err(AdminError::Connect)?;
    Ok(ProbeUploadServiceClient::with_interceptor(channel, BearerToken(token))
        .max_decoding_message_size(MAX_REQUEST_MESSAGE)
        .max_encoding_message_size(MAX_REQUEST_MESSAGE))
}

/// Every stored probe, optionally of one module version, page by page.
pub async fn list_all(client: &mut AdminClient, module_version: Option<&str>) -> Result<Vec<ProbeInfo>, AdminError> {
    let mut probes = Vec::new();
    let mut page_token = String::new();
    loop {
        let response = client
            .list_probes(ListProbesRequest {
                module_version: module_version.unwrap_or_default().to_owned(),
                page_size: 0,
                page_token,
            })
            .await
            .map_err(AdminError::rpc("listing probes"))?
            .into_inner();
        probes.extend(response.probes);
        if response.next_page_token.is_empty() {
            return Ok(probes);
        }
        page_token = response.next_page_token;
    }
}
