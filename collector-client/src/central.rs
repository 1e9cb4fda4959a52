//! A client of Central's `ProbeService` with the Collector's identity.

use std::time::Duration;

use probe_api::digest::{Sha256Digest, Sha256Hasher};
use probe_api::errors::remote_text;
use probe_api::probe_stream::ProbeReply;
use probe_api::transport::{self, ClientTls, Unreached};
use probe_api::v1::probe_service_client::ProbeServiceClient;
use probe_api::v1::{GetProbeRequest, ProbeSource};
use tonic::Code;
use tonic::transport::Channel;

use crate::limits::MAX_PROBE_FILE;
use crate::report::Outcome;

/// A probe received and verified.
#[derive(Debug)]
pub struct FetchedProbe {
    /// The probe file's bytes (gzip'd, as stored).
    pub bytes: Vec<u8>,
    pub sha256: Sha256Digest,
    pub source: ProbeSource,
    /// The header's signature; `None` when Central sent none.
    pub signature: Option<Vec<u8>>,
}

/// Why a fetch failed: the reader's own error, the verification of the
/// digest included.
pub use probe_api::probe_stream::ReplyError as FetchError;

#[derive(Clone)]
pub struct CentralClient {
    client: ProbeServiceClient<Channel>,
}

impl CentralClient {
    /// A client of Central at `address` (`host:port`). It connects on the
    /// first call.
    pub fn new(address: &str, tls: &ClientTls, connect_timeout: Duration) -> Result<Self, transport::TransportError> {
        Self::named(address, tls, connect_timeout, None)
    }

    /// `new`, naming `server_name` in TLS instead of the address's host
    /// when given (`SNI_HOSTNAME`).
    pub fn named(
        address: &str,
        tls: &ClientTls,
        connect_timeout: Duration,
        server_name: Option<&str>,
    ) -> Result<Self, transport::TransportError> {
        let channel = transport::endpoint_named(address, tls, connect_timeout, server_name)?.connect_lazy();
        Ok(CentralClient { client: ProbeServiceClient::new(channel) })
    }

    /// Fetches `<module_version>/<file_name>` and verifies it.
    pub async fn fetch(&self, module_version: &str, file_name: &str) -> Result<FetchedProbe, FetchError> {
        let request = GetProbeRequest { module_version: module_version.to_owned(), file_name: file_name.to_owned() };
        let stream = self.client.clone().get_probe(request).await.map_err(FetchError::Status)?.into_inner();
        let mut reply = ProbeReply::start(stream, MAX_PROBE_FILE).await?;
        // The header's size is only a claim: grow as bytes arrive rather
        // than reserving what it says.
        let mut bytes = Vec::with_capacity(reply.size().min(16 << 20) as usize);
        let mut hasher = Sha256Hasher::new();
        while let Some(chunk) = reply.next_chunk().await? {
            hasher.update(&chunk);
            bytes.extend_from_slice(&chunk);
        }
        let (sha256, expected) = (hasher.finish(), reply.sha256());
        if sha256 != expected {
            return Err(FetchError::BadReply(format!("SHA-256 {sha256} does not match the header's {expected}")));
        }
        let source = ProbeSource::try_from(reply.header().source).unwrap_or(ProbeSource::Unspecified);
        let signature = Some(reply.header().signature.to_vec()).filter(|s| !s.is_empty());
        Ok(FetchedProbe { bytes, sha256, source, signature })
    }
}

/// What kind of trouble a failed fetch from Central at `address` was, and
/// a line saying it: for a connection that never came up, the address and
/// the system's reason ("Connection refused", a name that does not
/// resolve); for TLS, what was refused (`transport::unreached`). Central's
/// words are escaped.
pub fn failure(address: &str, error: &FetchError) -> (Outcome, String) {
    let FetchError::Status(status) = error else { return (Outcome::Failed, remote_text(&error.to_string())) };
    if status.code() == Code::DataLoss {
        return (Outcome::Damaged, remote_text(&error.to_string()));
    }
    match transport::unreached(address, status) {
        Some((Unreached::Connect, line)) => (Outcome::Unreachable, line),
        Some((Unreached::Tls, line)) => (Outcome::Tls, line),
        None => (Outcome::Failed, remote_text(&error.to_string())),
    }
}
