//! Getting the probe: every candidate kernel name in every source, in
//! order, retried with backoff and jitter until a time budget runs out;
//! then a report that says what was tried and what to do.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::time::{Duration, Instant};

use probe_api::names::{ModuleVersion, ProbeFileName, ProbePath};
use tracing::{info, warn};

use crate::limits::MAX_PROBE_SIZE;
use crate::report::{NotServed, Outcome, Tried};
use crate::signatures::{Checked, SignaturePolicy};
use crate::sources::{Lookup, ProbeSource};

/// How long and how often to keep trying.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Pause between rounds, varied by up to a fifth either way.
    pub interval: Duration,
    /// Give up once this much time has passed.
    pub budget: Duration,
}

/// A probe that was found and decompressed.
#[derive(Debug)]
pub struct Served {
    pub probe: Vec<u8>,
    pub candidate: String,
    pub source: String,
    pub detail: String,
    /// It came over the network (not from the image).
    pub remote: bool,
    /// The probe file as the source served it (gzip'd) and its signature:
    /// what the node-local cache keeps, to check again when it is used.
    pub file: Vec<u8>,
    pub signature: Option<Vec<u8>>,
    /// What the signature policy found.
    pub checked: Checked,
}

/// Looks for the probe of the first candidate any source has. A probe from
/// a source over the network is used only if `signatures` accepts it;
/// otherwise that source counts as not having it and the search goes on.
pub async fn get_probe(
    sources: &[Box<dyn ProbeSource>],
    module_version: &ModuleVersion,
    candidates: &[String],
    policy: RetryPolicy,
    signatures: &SignaturePolicy,
) -> Result<Served, NotServed> {
    let started = Instant::now();
    let mut tried: Vec<Tried> = Vec::new();
    let file_names: Vec<(String, Result<ProbeFileName, String>)> =
        candidates.iter().map(|c| (c.clone(), ProbeFileName::ebpf(c).map_err(|e| e.to_string()))).collect();
    for (candidate, name) in &file_names {
        if let Err(why) = name {
            record(&mut tried, format!("collector-ebpf-{candidate}.o.gz"), "-".into(), (Outcome::Invalid, why.clone()));
        }
    }
    let mut round = 0u32;
    let mut remote_answered = false;
    loop {
        for (candidate, name) in &file_names {
            let Ok(file_name) = name else { continue };
            for source in sources.iter().filter(|s| round == 0 || s.worth_retrying()) {
                let lookup = source.lookup(module_version, file_name).await;
                remote_answered |= source.worth_retrying() && !matches!(lookup, Lookup::Failed(..));
                let outcome = match lookup {
                    Lookup::Found { bytes, gzipped, detail, signature } => {
                        let remote = source.worth_retrying();
                        let path = ProbePath::new(module_version.clone(), file_name.clone());
                        // Built-in probes are part of the image, trusted as it is.
                        let checked = match remote {
                            true => signatures.check(&path, &bytes, signature.as_deref()),
                            false => Ok(Checked::Unchecked),
                        };
                        match checked
                            .map_err(|why| format!("signature refused: {why}"))
                            .and_then(|checked| Ok((decompress(&bytes, gzipped)?, checked)))
                        {
                            Ok((probe, checked)) => {
                                let (candidate, source) = (candidate.clone(), source.name());
                                let file = bytes;
                                return Ok(Served {
                                    probe,
                                    candidate,
                                    source,
                                    detail,
                                    remote,
                                    file,
                                    signature,
                                    checked,
                                });
                            }
                            Err(why) => (Outcome::Refused, why),
                        }
                    }
                    Lookup::NotFound(why) => {
                        if round == 0 {
                            info!(%file_name, source = %source.name(), "not found: {why}");
                        }
                        (Outcome::NotFound, why)
                    }
                    Lookup::Failed(kind, why) => {
                        warn!(%file_name, source = %source.name(), "try {} failed: {why}", round + 1);
                        (kind, why)
                    }
                };
                record(&mut tried, file_name.to_string(), source.name(), outcome);
            }
        }
        round += 1;
        let pause = jittered(policy.interval);
        let retryable = sources.iter().any(|s| s.worth_retrying());
        if !retryable || started.elapsed() + pause >= policy.budget {
            break;
        }
        if round == 1 {
            info!(
                "retrying every {:?} for up to {:?}: an admin may upload the probe meanwhile",
                policy.interval, policy.budget
            );
        }
        tokio::time::sleep(pause).await;
    }
    let mut report = NotServed::new(module_version, candidates, tried, started.elapsed());
    report.remote_answered = remote_answered;
    Err(report)
}

fn record(tried: &mut Vec<Tried>, file_name: String, source: String, (kind, outcome): (Outcome, String)) {
    match tried.iter_mut().find(|t| t.file_name == file_name && t.source == source) {
        Some(entry) => {
            (entry.kind, entry.outcome) = (kind, outcome);
            entry.attempts += 1;
        }
        None => tried.push(Tried { file_name, source, outcome, kind, attempts: 1 }),
    }
}

/// `interval` varied by up to a fifth either way, so that many Collectors
/// that failed together do not retry together.
fn jittered(interval: Duration) -> Duration {
    let random = RandomState::new().build_hasher().finish();
    let fraction = (random % 401) as f64 / 1000.0 - 0.2; // -0.2 ..= +0.2
    interval.mul_f64(1.0 + fraction)
}

pub fn decompress(bytes: &[u8], gzipped: bool) -> Result<Vec<u8>, String> {
    if !gzipped {
        return Ok(bytes.to_vec());
    }
    let mut probe = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_PROBE_SIZE + 1)
        .read_to_end(&mut probe)
        .map_err(|e| format!("the probe is not valid gzip: {e}"))?;
    if probe.len() as u64 > MAX_PROBE_SIZE {
        return Err(format!("the probe decompresses to more than {MAX_PROBE_SIZE} bytes"));
    }
    Ok(probe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A source that answers from a script and counts its calls.
    struct Scripted {
        name: &'static str,
        remote: bool,
        /// Candidate release that it has, if any, and from which call on.
        has: Option<(&'static str, u32)>,
        calls: AtomicU32,
        asked: Mutex<Vec<String>>,
    }

    impl Scripted {
        fn new(name: &'static str, remote: bool, has: Option<(&'static str, u32)>) -> Box<Self> {
            Box::new(Scripted { name, remote, has, calls: AtomicU32::new(0), asked: Mutex::new(Vec::new()) })
        }
    }

    #[tonic::async_trait]
    impl ProbeSource for Scripted {
        fn name(&self) -> String {
            self.name.into()
        }
        fn worth_retrying(&self) -> bool {
            self.remote
        }
        async fn lookup(&self, _: &ModuleVersion, file_name: &ProbeFileName) -> Lookup {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            self.asked.lock().unwrap().push(file_name.to_string());
            match self.has {
                Some((kernel, from)) if call >= from && file_name.kernel_release() == kernel => {
                    Lookup::Found { bytes: b"probe".to_vec(), gzipped: false, detail: String::new(), signature: None }
                }
                _ => Lookup::NotFound("no".into()),
            }
        }
    }

    const QUICK: RetryPolicy = RetryPolicy { interval: Duration::from_millis(10), budget: Duration::from_millis(300) };

    fn version() -> ModuleVersion {
        ModuleVersion::parse("2.5.0").unwrap()
    }

    fn kernels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn each_candidate_tries_every_source_in_order() {
        let builtin = Scripted::new("builtin", false, None);
        let central = Scripted::new("central", true, Some(("5.4.0", 0)));
        let sources: Vec<Box<dyn ProbeSource>> = vec![builtin, central];
        let served = get_probe(&sources, &version(), &kernels(&["5.4.0-cos", "5.4.0"]), QUICK, &SignaturePolicy::off())
            .await
            .unwrap();
        assert_eq!((served.candidate.as_str(), served.source.as_str()), ("5.4.0", "central"));
        assert_eq!(served.probe, b"probe");
    }

    #[tokio::test]
    async fn a_built_in_hit_never_asks_a_later_source() {
        let builtin = Scripted::new("builtin", false, Some(("5.4.0", 0)));
        let central = Scripted::new("central", true, Some(("5.4.0", 0)));
        let sources: Vec<Box<dyn ProbeSource>> = vec![builtin, central];
        let served =
            get_probe(&sources, &version(), &kernels(&["5.4.0"]), QUICK, &SignaturePolicy::off()).await.unwrap();
        assert_eq!(served.source, "builtin");
    }

    #[tokio::test]
    async fn remote_sources_are_retried_until_the_probe_appears() {
        let builtin = Scripted::new("builtin", false, None);
        let central = Scripted::new("central", true, Some(("5.4.0", 3)));
        let sources: Vec<Box<dyn ProbeSource>> = vec![builtin, central];
        let served =
            get_probe(&sources, &version(), &kernels(&["5.4.0"]), QUICK, &SignaturePolicy::off()).await.unwrap();
        assert_eq!(served.source, "central");
    }

    #[tokio::test]
    async fn giving_up_reports_every_try_and_what_to_do() {
        let builtin = Scripted::new("builtin", false, None);
        let central = Scripted::new("central", true, None);
        let sources: Vec<Box<dyn ProbeSource>> = vec![builtin, central];
        let started = Instant::now();
        let report =
            get_probe(&sources, &version(), &kernels(&["5.4.0"]), QUICK, &SignaturePolicy::off()).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "bounded by the budget");
        let builtin_tries = report.tried.iter().find(|t| t.source == "builtin").unwrap().attempts;
        let central_tries = report.tried.iter().find(|t| t.source == "central").unwrap().attempts;
        assert_eq!(builtin_tries, 1, "built-in files are looked at once");
        assert!(central_tries > 3, "Central is retried: {central_tries}");
        let text = report.to_string();
        assert!(text.contains("CrashLoopBackOff"), "{text}");
        assert!(text.contains("module version 2.5.0 that covers kernel 5.4.0"), "{text}");
        assert!(text.contains("CORE_BPF"), "{text}");
    }

    #[tokio::test]
    async fn invalid_candidates_are_reported_not_asked() {
        let central = Scripted::new("central", true, None);
        let sources: Vec<Box<dyn ProbeSource>> = vec![central];
        let policy = RetryPolicy { budget: Duration::ZERO, ..QUICK };
        let report = get_probe(&sources, &version(), &kernels(&["x/../5.4"]), policy, &SignaturePolicy::off())
            .await
            .unwrap_err();
        assert_eq!(report.tried.len(), 1);
        assert!(report.tried[0].outcome.contains("invalid"), "{:?}", report.tried);
    }

    #[test]
    fn gzip_is_checked_and_bounded() {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(b"ebpf object").unwrap();
        let gz = encoder.finish().unwrap();
        assert_eq!(decompress(&gz, true).unwrap(), b"ebpf object");
        assert!(decompress(b"not gzip", true).unwrap_err().contains("not valid gzip"));
        assert_eq!(decompress(b"raw", false).unwrap(), b"raw");
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..100 {
            let pause = jittered(Duration::from_secs(5));
            assert!(pause >= Duration::from_secs(4) && pause <= Duration::from_secs(6), "{pause:?}");
        }
    }
}
