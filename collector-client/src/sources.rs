//! Where a Collector can find a probe, each behind one small trait: the
//! probes built into its image (gzip'd, or uncompressed), Central (by
//! GetProbe, or by its HTTPS route), and a bucket over HTTPS.

use std::path::PathBuf;
use std::time::Duration;

use probe_api::errors::remote_text;
use probe_api::names::{ModuleVersion, ProbeFileName};
use tonic::Code;

use crate::central::{CentralClient, FetchError};
use crate::https_probes::{HttpsFetchError, HttpsProbeClient};
use crate::report::Outcome;

/// What one look-up in one source gave.
#[derive(Debug)]
pub enum Lookup {
    /// The probe; `gzipped` tells whether it still needs decompressing.
    /// `signature`: what the source served as its `.minisig` (sources over
    /// the network only; built-in probes have none and need none).
    Found { bytes: Vec<u8>, gzipped: bool, detail: String, signature: Option<Vec<u8>> },
    /// The source answered that it does not have it.
    NotFound(String),
    /// The source could not answer (unreachable, refused, a bad reply).
    Failed(Outcome, String),
}

#[tonic::async_trait]
pub trait ProbeSource: Send + Sync {
    /// How the source is named in logs and in the final report.
    fn name(&self) -> String;

    /// Whether a later try may give another answer. Built-in files do not
    /// change while the Collector runs; Central may get a package uploaded.
    fn worth_retrying(&self) -> bool;

    async fn lookup(&self, module_version: &ModuleVersion, file_name: &ProbeFileName) -> Lookup;
}

/// Probes built into the Collector image: `<dir>/<file name>` (gzip'd) or,
/// with `uncompressed`, `<dir>/<file name without .gz>`.
pub struct BuiltinDir {
    pub dir: PathBuf,
    pub uncompressed: bool,
}

#[tonic::async_trait]
impl ProbeSource for BuiltinDir {
    fn name(&self) -> String {
        let kind = if self.uncompressed { "uncompressed" } else { "gzip" };
        format!("built-in {} ({kind})", self.dir.display())
    }

    fn worth_retrying(&self) -> bool {
        false
    }

    async fn lookup(&self, _: &ModuleVersion, file_name: &ProbeFileName) -> Lookup {
        let name = file_name.as_str();
        let name = if self.uncompressed { name.strip_suffix(".gz").unwrap_or(name) } else { name };
        let path = self.dir.join(name);
        match tokio::fs::read(&path).await {
            Ok(bytes) => Lookup::Found {
                bytes,
                gzipped: !self.uncompressed,
                detail: path.display().to_string(),
                signature: None,
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Lookup::NotFound(format!("no {}", path.display())),
            Err(e) => Lookup::Failed(Outcome::Failed, format!("reading {}: {e}", path.display())),
        }
    }
}

/// `fetch`'s answer, or a failed look-up once it takes over `timeout`.
async fn bounded<T>(timeout: Duration, fetch: impl Future<Output = T>) -> Result<T, Lookup> {
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| Lookup::Failed(Outcome::Failed, format!("no answer within {timeout:?}")))
}

/// Central, over mutual TLS. Each try is bounded by `request_timeout`.
pub struct CentralSource {
    pub address: String,
    pub client: CentralClient,
    pub request_timeout: Duration,
}

#[tonic::async_trait]
impl ProbeSource for CentralSource {
    fn name(&self) -> String {
        format!("Central {}", self.address)
    }

    fn worth_retrying(&self) -> bool {
        true
    }

    async fn lookup(&self, module_version: &ModuleVersion, file_name: &ProbeFileName) -> Lookup {
        let fetch = self.client.fetch(module_version.as_str(), file_name.as_str());
        match bounded(self.request_timeout, fetch).await {
            Err(timed_out) => timed_out,
            Ok(Ok(probe)) => Lookup::Found {
                bytes: probe.bytes,
                gzipped: true,
                detail: format!("{:?}, SHA-256 {}", probe.source, probe.sha256),
                signature: probe.signature,
            },
            Ok(Err(FetchError::Status(status))) if status.code() == Code::NotFound => {
                Lookup::NotFound(format!("NotFound: {}", remote_text(status.message())))
            }
            Ok(Err(error)) => {
                let (outcome, why) = crate::central::failure(&self.address, &error);
                Lookup::Failed(outcome, why)
            }
        }
    }
}

/// Probes over plain HTTPS: Central's route `/kernel-objects/` (mutual
/// TLS), or a bucket (`MODULE_DOWNLOAD_BASE_URL`). Each try is bounded by
/// `request_timeout`.
pub struct HttpsSource {
    /// How it is named in logs and the report.
    pub name: String,
    pub client: HttpsProbeClient,
    pub request_timeout: Duration,
    /// Also fetch `<file name>.minisig` (when signatures are checked).
    pub with_signatures: bool,
}

#[tonic::async_trait]
impl ProbeSource for HttpsSource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn worth_retrying(&self) -> bool {
        true
    }

    async fn lookup(&self, module_version: &ModuleVersion, file_name: &ProbeFileName) -> Lookup {
        let (version, file) = (module_version.as_str(), file_name.as_str());
        let fetch = async {
            if !self.with_signatures {
                return (self.client.fetch(version, file).await, Ok(None));
            }
            tokio::join!(self.client.fetch(version, file), self.client.fetch_signature(version, file))
        };
        match bounded(self.request_timeout, fetch).await {
            Err(timed_out) => timed_out,
            Ok((Ok(_), Err(error))) => Lookup::Failed(error.outcome(), format!("fetching the signature: {error}")),
            Ok((Ok(probe), Ok(signature))) => {
                let checked = if probe.digest_checked { "matches the Digest header" } else { "no Digest header" };
                Lookup::Found {
                    bytes: probe.bytes,
                    gzipped: true,
                    detail: format!("SHA-256 {} ({checked})", probe.sha256),
                    signature,
                }
            }
            Ok((Err(HttpsFetchError::NotFound(why)), _)) => Lookup::NotFound(why),
            Ok((Err(error), _)) => Lookup::Failed(error.outcome(), error.to_string()),
        }
    }
}
