//! The report of a probe not served: what was tried, where, and what each
//! try came to, and advice that fits what went wrong (a source out of
//! reach, TLS, a probe not found or refused). `get-probe` prints it and
//! exits 1, which Kubernetes shows as CrashLoopBackOff. Text from the
//! other end reaches it only through `probe_api::errors::remote_text`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use probe_api::names::ModuleVersion;

use crate::signatures::Mode;

/// What one try in one source came to, for the report's advice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The source answered that it does not have the probe.
    NotFound,
    /// A probe came but was refused: its signature, or bytes that do not
    /// decompress.
    Refused,
    /// No connection: refused, no route, a name that does not resolve.
    Unreachable,
    /// The TLS handshake with Central failed, or Central refused this
    /// node's certificate.
    Tls,
    /// The TLS handshake with the download site failed.
    SiteTls,
    /// Central holds the probe but its stored copy no longer matches what
    /// was uploaded (DATA_LOSS).
    Damaged,
    /// Anything else: a bad reply, an error status, no answer in time.
    Failed,
    /// The candidate is no valid probe name; nothing was asked.
    Invalid,
}

/// The last outcome of one candidate in one source.
#[derive(Clone, Debug)]
pub struct Tried {
    pub file_name: String,
    pub source: String,
    pub outcome: String,
    pub kind: Outcome,
    pub attempts: u32,
}

/// Why no probe was found, as a report for the operator.
#[derive(Debug)]
pub struct NotServed {
    pub module_version: String,
    pub candidates: Vec<String>,
    pub tried: Vec<Tried>,
    pub elapsed: Duration,
    /// Whether any remote source answered at all (said it does not have a
    /// probe, or sent a bad one), rather than none being reachable.
    pub remote_answered: bool,
    /// The signature policy in force, and its refusals by reason.
    pub signature_policy: Mode,
    pub signature_refusals: BTreeMap<&'static str, u64>,
    /// How the download site is reached, when one is set: what the advice
    /// on a failed TLS handshake with it names.
    pub download_site: Option<DownloadSite>,
}

/// What the Collector trusts and goes through to reach its download site.
#[derive(Clone, Debug)]
pub struct DownloadSite {
    /// The URL's host, which the site's certificate must name.
    pub host: String,
    /// The CA bundle trusted for it (`SSL_CERT_FILE (PATH)`, or the
    /// system's bundle and its path).
    pub ca_bundle: String,
    /// The proxy of `https_proxy` it is reached through, credentials left
    /// out.
    pub proxy: Option<String>,
}

impl NotServed {
    /// A report of `tried`; no remote source answered, no signature policy.
    pub fn new(module_version: &ModuleVersion, candidates: &[String], tried: Vec<Tried>, elapsed: Duration) -> Self {
        NotServed {
            module_version: module_version.to_string(),
            candidates: candidates.to_vec(),
            tried,
            elapsed,
            remote_answered: false,
            signature_policy: Mode::Off,
            signature_refusals: BTreeMap::new(),
            download_site: None,
        }
    }

    /// The report as `get-probe -o json` prints it.
    pub fn to_json(&self) -> serde_json::Value {
        let tried: Vec<serde_json::Value> = self
            .tried
            .iter()
            .map(|t| {
                serde_json::json!({
                    "file_name": t.file_name,
                    "source": t.source,
                    "outcome": t.outcome,
                    "attempts": t.attempts,
                })
            })
            .collect();
        serde_json::json!({
            "result": "not_served",
            "module_version": self.module_version,
            "candidates": self.candidates,
            "tried": tried,
            "elapsed_ms": self.elapsed.as_millis() as u64,
            "signature_policy": self.signature_policy.name(),
            "signature_refusals": self.signature_refusals,
        })
    }
}

impl fmt::Display for NotServed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kernel = self.candidates.last().map(String::as_str).unwrap_or("?");
        writeln!(
            f,
            "no probe for kernel {} (module version {}) after {:.0?}.",
            self.candidates.join(" / "),
            self.module_version,
            self.elapsed
        )?;
        writeln!(f, "Tried (last outcome of each):")?;
        for t in &self.tried {
            let times = if t.attempts > 1 { format!(" ({} tries)", t.attempts) } else { String::new() };
            writeln!(f, "  {} from {}: {}{times}", t.file_name, t.source, t.outcome)?;
        }
        writeln!(
            f,
            "The Collector exits with status 1; Kubernetes restarts it, and its pod shows CrashLoopBackOff \
             until a probe is available."
        )?;
        writeln!(f, "What an admin can do:")?;
        let saw = |kind: Outcome| self.tried.iter().any(|t| t.kind == kind);
        if saw(Outcome::Unreachable) {
            writeln!(
                f,
                "  - a source could not be reached (above): check that it runs, that this node is given its \
                 address and port (GRPC_SERVER / --central, MODULE_DOWNLOAD_BASE_URL), and that the node can \
                 reach it (DNS, network policies, https_proxy)"
            )?;
        }
        if saw(Outcome::Tls) {
            writeln!(
                f,
                "  - TLS failed (above): check that --ca is the CA that signed Central's certificate, that \
                 SNI_HOSTNAME (else the address's host) is a name in that certificate, and that --cert and --key \
                 are a client identity issued by Central's cluster CA and still valid"
            )?;
        }
        if saw(Outcome::SiteTls) {
            writeln!(f, "  - {}", site_tls_advice(self.download_site.as_ref()))?;
        }
        if saw(Outcome::Refused) {
            writeln!(
                f,
                "  - a probe was found but refused (above): if its signature was refused, upload the package \
                 signed (central-probes package sign) by a key this node trusts, at a serial not below the \
                 last one this node accepted"
            )?;
        }
        if saw(Outcome::Damaged) {
            writeln!(
                f,
                "  - Central's stored copy of the probe is damaged (above): `central-probes verify` names every \
                 damaged probe, and uploading the package again repairs it"
            )?;
        }
        if saw(Outcome::NotFound) || saw(Outcome::Failed) || saw(Outcome::Damaged) {
            writeln!(
                f,
                "  - upload a kernel support package for module version {} that covers kernel {kernel}:\n    \
                 central-probes collector support-packages upload <support-pkg-{}-*.zip> -e <central address>",
                self.module_version, self.module_version
            )?;
        }
        write!(f, "  - or switch the collection method to CORE_BPF, which needs no kernel-specific probe.")
    }
}

/// What to check when TLS with the download site failed: it is no part of
/// the cluster, so Central's CA and this node's identity play no part.
fn site_tls_advice(site: Option<&DownloadSite>) -> String {
    let Some(site) = site else {
        return "TLS with the download site failed (above): check the CA bundle the Collector trusts \
                (SSL_CERT_FILE, else the system's), and that the site's certificate names its host"
            .to_owned();
    };
    let mut advice = format!(
        "TLS with the download site failed (above): check that {}, the CA bundle this Collector trusts for \
         it, holds the CA that signed the site's certificate (set SSL_CERT_FILE to a bundle that does), and \
         that the certificate names {}",
        site.ca_bundle, site.host
    );
    if let Some(proxy) = &site.proxy {
        advice.push_str(&format!(
            "; requests go through the proxy {proxy} (https_proxy): a proxy that inspects TLS presents a \
             certificate of its own, whose CA must be in that bundle"
        ));
    }
    advice
}

/// The report is the error: `get-probe` prints it and exits 1.
impl std::error::Error for NotServed {}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed_tls(source: &str, kind: Outcome) -> NotServed {
        let module_version = ModuleVersion::parse("2.5.0").unwrap();
        let tried = Tried {
            file_name: "collector-ebpf-6.1.0.o.gz".to_owned(),
            source: source.to_owned(),
            outcome: "the TLS handshake failed: invalid peer certificate: UnknownIssuer".to_owned(),
            kind,
            attempts: 1,
        };
        let mut report = NotServed::new(&module_version, &["6.1.0".to_owned()], vec![tried], Duration::ZERO);
        report.download_site = Some(DownloadSite {
            host: "probes.example.com".to_owned(),
            ca_bundle: "SSL_CERT_FILE (/etc/bundle.pem)".to_owned(),
            proxy: Some("http://proxy.example.com:3128".to_owned()),
        });
        report
    }

    #[test]
    fn tls_failing_with_the_download_site_gets_advice_on_what_the_collector_trusts_for_it() {
        let text = failed_tls("download site https://probes.example.com/", Outcome::SiteTls).to_string();
        assert!(text.contains("TLS with the download site failed (above)"), "{text}");
        assert!(text.contains("check that SSL_CERT_FILE (/etc/bundle.pem), the CA bundle"), "{text}");
        assert!(text.contains("that the certificate names probes.example.com"), "{text}");
        assert!(text.contains("the proxy http://proxy.example.com:3128 (https_proxy)"), "{text}");
        for central_only in ["--ca", "SNI_HOSTNAME", "--cert", "cluster CA"] {
            assert!(!text.contains(central_only), "{central_only}: {text}");
        }
    }

    #[test]
    fn tls_failing_with_central_keeps_its_advice() {
        let text = failed_tls("Central localhost:8443", Outcome::Tls).to_string();
        assert!(text.contains("TLS failed (above): check that --ca is the CA that signed Central's"), "{text}");
        assert!(!text.contains("download site"), "{text}");
    }
}
