//! The whole fetch as one call, for `get-probe` and any program embedding
//! the Collector side: build the sources [`Settings`] name (built-in
//! directory, Central by GetProbe or its HTTPS route, a download site),
//! look through them for the first candidate any has (retrying within the
//! budget), fall back to the node-local cache only when nothing remote
//! answered, check signatures by the policy, record the accepted serial,
//! keep the probe in the cache, and write it read-only. The caller only
//! configures and reports.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use probe_api::errors::Context;
use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
use probe_api::signing::{TrustedKeys, Verified};
use probe_api::transport::ClientTls;

use crate::cache::ProbeCache;
use crate::central::CentralClient;
use crate::chain::{self, RetryPolicy, Served};
use crate::https_probes::HttpsProbeClient;
use crate::output;
use crate::report::{DownloadSite, NotServed, Outcome, Tried};
use crate::signatures::{Checked, Mode, SignaturePolicy};
use crate::sources::{BuiltinDir, CentralSource, HttpsSource, ProbeSource};

/// Where to look for the probe, how, and where to write it.
pub struct Settings {
    pub module_version: ModuleVersion,
    /// Kernel names to try, in order (`candidates::candidates`).
    pub candidates: Vec<String>,
    /// Probes built into the Collector image.
    pub builtin_dir: Option<PathBuf>,
    pub central: Option<CentralSettings>,
    /// A bucket tried after Central: `https://HOST/BASE`.
    pub download_base_url: Option<String>,
    /// The node-local cache.
    pub cache_dir: Option<PathBuf>,
    pub signatures: SignatureSettings,
    pub connect_timeout: Duration,
    /// Bound on one try at one source.
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
    /// Where the decompressed probe is written, read-only.
    pub out: PathBuf,
}

/// Central and how to reach it.
pub struct CentralSettings {
    /// `HOST:PORT`.
    pub address: String,
    /// The CA that signed Central's certificate and this node's identity.
    pub tls: ClientTls,
    /// Central's TLS name when it is reached by another address.
    pub server_name: Option<String>,
    /// Through its HTTPS route `/kernel-objects/` instead of GetProbe.
    pub https_route: bool,
}

/// What the node accepts (`signatures`).
pub struct SignatureSettings {
    pub mode: Mode,
    pub keys: Option<TrustedKeys>,
    pub min_serial: u64,
    /// Where the accepted serials are kept.
    pub state_dir: Option<PathBuf>,
}

/// A probe written to `Settings::out`.
#[derive(Debug)]
pub struct Fetched {
    pub served: Served,
    /// The signature that was checked, when one was.
    pub verified: Option<Verified>,
    pub signature_policy: Mode,
    /// Signatures refused on the way, by reason.
    pub signature_refusals: BTreeMap<&'static str, u64>,
}

/// Why no probe was written.
#[derive(Debug)]
pub enum FetchError {
    /// The settings cannot work (no source, unreadable keys or state), or
    /// the probe could not be written.
    Setup(Box<dyn std::error::Error + Send + Sync>),
    /// No source had an acceptable probe: the report.
    NotServed(Box<NotServed>),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Setup(error) => write!(f, "{error}"),
            FetchError::NotServed(report) => write!(f, "{report}"),
        }
    }
}

impl std::error::Error for FetchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FetchError::Setup(error) => error.source(),
            FetchError::NotServed(_) => None,
        }
    }
}

fn setup(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> FetchError {
    FetchError::Setup(error.into())
}

/// Finds, checks and writes the probe.
pub async fn fetch(settings: Settings) -> Result<Fetched, FetchError> {
    let started = Instant::now();
    let Settings { module_version, candidates, .. } = &settings;
    let kernel =
        candidates.iter().filter_map(|c| Some(ProbePath::new(module_version.clone(), ProbeFileName::ebpf(c).ok()?)));
    let signature = &settings.signatures;
    let state_dir = signature.state_dir.as_deref();
    let signatures =
        SignaturePolicy::new(signature.mode, signature.keys.clone(), signature.min_serial, state_dir, kernel.collect())
            .map_err(setup)?;
    let (sources, download_site) = sources(&settings, signatures.wants_signatures())?;
    let cache = settings.cache_dir.as_deref().map(ProbeCache::new);
    let not_served = |mut report: NotServed| {
        report.signature_policy = signatures.mode();
        report.signature_refusals = signatures.refusals();
        report.download_site = download_site.clone();
        FetchError::NotServed(Box::new(report))
    };
    let served = match chain::get_probe(&sources, module_version, candidates, settings.retry, &signatures).await {
        Ok(served) => {
            if let Some(cache) = &cache
                && served.remote
                && let Err(error) =
                    cache.keep(module_version, &served.candidate, &served.file, served.signature.as_deref())
            {
                tracing::warn!(%error, "could not keep the probe in the node-local cache");
            }
            served
        }
        // Only when nothing remote answered: a Central that says "not
        // found" is not overruled by an old copy.
        Err(mut report) if !report.remote_answered => {
            let cached = cache.as_ref().and_then(|c| c.serve(module_version, candidates, &signatures, &mut report));
            let Some(mut served) = cached else { return Err(not_served(report)) };
            served.detail = format!("no remote source reachable for {:.0?}; SHA-256 verified", report.elapsed);
            served
        }
        Err(report) => return Err(not_served(report)),
    };
    let verified = match served.checked {
        Checked::Verified(verified) => Some(verified),
        Checked::Unchecked => None,
    };
    // The serial is on disk before the probe is where the Collector loads
    // it: a crash in between cannot make the node forget it.
    if let Some(verified) = verified {
        let path = ProbePath::new(module_version.clone(), ProbeFileName::ebpf(&served.candidate).map_err(setup)?);
        if let Err(why) = signatures.accept(&path, verified.serial) {
            // Another run on the node accepted a higher serial meanwhile.
            let (file_name, source) = (path.file_name().to_string(), served.source);
            let tried = Tried { file_name, source, outcome: why, kind: Outcome::Refused, attempts: 1 };
            let mut report = NotServed::new(module_version, candidates, vec![tried], started.elapsed());
            report.remote_answered = true;
            return Err(not_served(report));
        }
    }
    let out = &settings.out;
    output::write_read_only(out, &served.probe)
        .map_err(Context::of(format!("writing {}", out.display())))
        .map_err(setup)?;
    let (signature_policy, signature_refusals) = (signatures.mode(), signatures.refusals());
    Ok(Fetched { served, verified, signature_policy, signature_refusals })
}

/// The sources to look in, in the order they are asked.
type Sources = Vec<Box<dyn ProbeSource>>;

/// The sources `settings` name, and how the download site is reached when
/// one is named.
fn sources(settings: &Settings, with_signatures: bool) -> Result<(Sources, Option<DownloadSite>), FetchError> {
    let mut sources: Sources = Vec::new();
    if let Some(dir) = &settings.builtin_dir {
        sources.push(Box::new(BuiltinDir { dir: dir.clone(), uncompressed: false }));
        sources.push(Box::new(BuiltinDir { dir: dir.clone(), uncompressed: true }));
    }
    let (connect_timeout, request_timeout) = (settings.connect_timeout, settings.request_timeout);
    if let Some(central) = &settings.central {
        let (address, sni) = (central.address.as_str(), central.server_name.as_deref());
        if central.https_route {
            let client = HttpsProbeClient::central(address, &central.tls, connect_timeout, sni).map_err(setup)?;
            let name = format!("Central {}", client.base());
            sources.push(Box::new(HttpsSource { name, client, request_timeout, with_signatures }));
        } else {
            let client = CentralClient::named(address, &central.tls, connect_timeout, sni).map_err(setup)?;
            sources.push(Box::new(CentralSource { address: address.to_owned(), client, request_timeout }));
        }
    }
    let mut download_site = None;
    if let Some(base_url) = &settings.download_base_url {
        let ca_bundle = probe_api::https::system_ca_bundle_file().map_err(setup)?;
        let tls = ClientTls { ca_pem: ca_bundle.read().map_err(setup)?, identity: None };
        let client = HttpsProbeClient::bucket(base_url, &tls, connect_timeout).map_err(setup)?;
        let name = format!("download site {}", client.base());
        download_site = Some(DownloadSite {
            host: client.base().host.clone(),
            ca_bundle: ca_bundle.to_string(),
            proxy: client.proxy().map(ToString::to_string),
        });
        sources.push(Box::new(HttpsSource { name, client, request_timeout, with_signatures }));
    }
    if sources.is_empty() {
        return Err(setup(
            "no source to look in: give --builtin-dir, --central (GRPC_SERVER), \
             or --module-download-base-url (MODULE_DOWNLOAD_BASE_URL)",
        ));
    }
    Ok((sources, download_site))
}
