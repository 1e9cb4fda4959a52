//! Where GetProbe finds a probe: a chain of sources asked in order. The
//! next source is asked only when one says "not found"; any error ends the
//! search (a source that is down must not hide behind a later one).

use std::sync::Arc;

use probe_api::names::ProbePath;
use probe_api::v1::ProbeSource as ApiSource;

use crate::error::Result;
use crate::store::{ProbeReader, ProbeStore};

/// A probe found by a source, ready to stream.
pub struct Found {
    pub reader: ProbeReader,
    pub source: ApiSource,
}

#[tonic::async_trait]
pub trait ProbeSource: Send + Sync + 'static {
    /// The probe at `path`, or `None` if this source does not have it.
    async fn find(&self, path: &ProbePath) -> Result<Option<Found>>;
}

/// Probes from uploaded support packages.
pub struct UploadedProbes(pub Arc<dyn ProbeStore>);

#[tonic::async_trait]
impl ProbeSource for UploadedProbes {
    async fn find(&self, path: &ProbePath) -> Result<Option<Found>> {
        let reader = self.0.open(path).await?;
        Ok(reader.map(|reader| Found { reader, source: ApiSource::UploadedPackage }))
    }
}

/// Sources asked in order until one has the probe.
#[derive(Clone, Default)]
pub struct SourceChain(Vec<Arc<dyn ProbeSource>>);

impl SourceChain {
    pub fn new(sources: Vec<Arc<dyn ProbeSource>>) -> Self {
        SourceChain(sources)
    }

    pub async fn find(&self, path: &ProbePath) -> Result<Option<Found>> {
        for source in &self.0 {
            if let Some(found) = source.find(path).await? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
}

/// API label of a source, for metrics and logs.
pub fn source_label(source: ApiSource) -> &'static str {
    match source {
        ApiSource::UploadedPackage => "uploaded_package",
        ApiSource::Upstream => "upstream",
        ApiSource::UpstreamCache => "upstream_cache",
        ApiSource::Unspecified => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic::Code;

    /// A source that answers as told and counts how often it was asked.
    struct Scripted {
        answer: std::result::Result<bool, Code>,
        asked: AtomicUsize,
    }

    #[tonic::async_trait]
    impl ProbeSource for Scripted {
        async fn find(&self, _: &ProbePath) -> Result<Option<Found>> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            match self.answer {
                Ok(false) => Ok(None),
                Ok(true) => Ok(Some(Found {
                    reader: ProbeReader {
                        probe: crate::store::StoredProbe {
                            path: ProbePath::parse("2.5.0/collector-5.4.0.ko.gz").unwrap(),
                            size: 0,
                            sha256: probe_api::digest::Sha256Digest::of(b""),
                            crc32: Some(0),
                            signature: None,
                        },
                        chunks: Box::pin(tokio_stream::empty()),
                    },
                    source: ApiSource::Upstream,
                })),
                Err(code) => Err(Error::new(code, "down")),
            }
        }
    }

    fn scripted(answer: std::result::Result<bool, Code>) -> Arc<Scripted> {
        Arc::new(Scripted { answer, asked: AtomicUsize::new(0) })
    }

    async fn ask(chain: &[Arc<Scripted>]) -> Result<bool> {
        let chain = SourceChain::new(chain.iter().map(|s| s.clone() as Arc<dyn ProbeSource>).collect());
        let path = ProbePath::parse("2.5.0/collector-5.4.0.ko.gz").unwrap();
        Ok(chain.find(&path).await?.is_some())
    }

    #[tokio::test]
    async fn later_sources_are_asked_only_after_a_miss() {
        let (first, second) = (scripted(Ok(true)), scripted(Ok(true)));
        assert!(ask(&[first.clone(), second.clone()]).await.unwrap());
        assert_eq!((first.asked.load(Ordering::SeqCst), second.asked.load(Ordering::SeqCst)), (1, 0));

        let (miss, hit) = (scripted(Ok(false)), scripted(Ok(true)));
        assert!(ask(&[miss.clone(), hit.clone()]).await.unwrap());
        assert_eq!(hit.asked.load(Ordering::SeqCst), 1);

        assert!(!ask(&[scripted(Ok(false)), scripted(Ok(false))]).await.unwrap());
    }

    #[tokio::test]
    async fn an_error_stops_the_search() {
        let (down, hit) = (scripted(Err(Code::Unavailable)), scripted(Ok(true)));
        assert_eq!(ask(&[down, hit.clone()]).await.unwrap_err().code, Code::Unavailable);
        assert_eq!(hit.asked.load(Ordering::SeqCst), 0);
    }
}
