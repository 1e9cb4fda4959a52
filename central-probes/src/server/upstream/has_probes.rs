//! Whether the upstream has probes, asked without downloading any: the
//! last source of a coverage check (`server::coverage`). An upstream
//! Central answers GetExistingProbes (its admin API, with the view token
//! of `serve --upstream-token-file`) for a batch of paths at a time; a
//! bucket answers HEAD, a request per path, a few at once; a registry
//! answers from its indexes and shard manifests (`registry`).

use std::collections::HashSet;
use std::sync::Arc;

use probe_api::limits::{COVERAGE_BUCKET_REQUESTS, COVERAGE_UPSTREAM_BATCH, MAX_REQUEST_MESSAGE};
use probe_api::names::ProbePath;
use probe_api::v1::GetExistingProbesRequest;
use probe_api::v1::probe_upload_service_client::ProbeUploadServiceClient;
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::Channel;

use super::bucket::Bucket;
use super::{Client, UpstreamSource, unavailable};
use crate::error::{Error, Result};

/// Which of the asked paths the upstream has, and the requests it took.
pub struct UpstreamAnswer {
    pub has: Vec<bool>,
    pub requests: u32,
}

impl UpstreamSource {
    /// Which of `paths` the upstream cache holds; a copy a read found
    /// damaged does not count (it is fetched again when asked for).
    pub async fn cached(&self, paths: &[ProbePath]) -> Result<Vec<bool>> {
        let stored = self.cache.stat_many(paths).await?;
        Ok(stored.into_iter().map(|probe| probe.is_some_and(|p| !self.cache.is_damaged(&p.path))).collect())
    }

    /// Which of `paths` the upstream has, asked without downloading.
    pub async fn has_probes(&self, paths: &[ProbePath]) -> Result<UpstreamAnswer> {
        let timeout = self.config.fetch_timeout;
        let asked = async {
            match &self.client {
                Client::Grpc(_, channel) => self.existing_in_central(channel, paths).await,
                Client::Bucket(bucket) => existing_in_bucket(bucket, paths).await,
                Client::Registry(registry) => {
                    let (has, requests) = registry.has(paths).await?;
                    Ok(UpstreamAnswer { has, requests })
                }
            }
        };
        tokio::time::timeout(timeout, asked).await.unwrap_or_else(|_| {
            Err(Error::new(
                Code::Unavailable,
                format!("the upstream did not answer which probes it has within {timeout:?}"),
            ))
        })
    }

    /// GetExistingProbes on the upstream Central, the batches at once.
    async fn existing_in_central(&self, channel: &Channel, paths: &[ProbePath]) -> Result<UpstreamAnswer> {
        let Some(token) = self.config.view_token.as_deref() else {
            return Err(Error::new(
                Code::FailedPrecondition,
                "the upstream is another Central: asking it which probes it has needs a view token of its admin \
                 API; start this Central with --upstream-token-file",
            ));
        };
        let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| Error::invalid_argument("the upstream token is not valid metadata (printable ASCII)"))?;
        let client = ProbeUploadServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_REQUEST_MESSAGE)
            .max_encoding_message_size(MAX_REQUEST_MESSAGE);
        let names: Vec<String> = paths.iter().map(ToString::to_string).collect();
        let mut batches = JoinSet::new();
        for batch in names.chunks(COVERAGE_UPSTREAM_BATCH) {
            let mut request = tonic::Request::new(GetExistingProbesRequest { paths: batch.to_vec() });
            request.metadata_mut().insert("authorization", bearer.clone());
            let mut client = client.clone();
            batches.spawn(async move { client.get_existing_probes(request).await });
        }
        let requests = batches.len() as u32;
        let mut found = HashSet::new();
        while let Some(answer) = batches.join_next().await {
            let answer = answer.map_err(|e| Error::internal(format!("asking the upstream: {e}")))?;
            let response = answer.map_err(|status| match status.code() {
                Code::Unauthenticated | Code::PermissionDenied => Error::new(
                    Code::FailedPrecondition,
                    format!(
                        "the upstream Central refused the token of --upstream-token-file: {}",
                        unavailable(&status)
                    ),
                ),
                _ => unavailable(&status),
            })?;
            found.extend(response.into_inner().probes.into_iter().map(|probe| probe.path));
        }
        Ok(UpstreamAnswer { has: names.iter().map(|name| found.contains(name)).collect(), requests })
    }
}

/// HEAD on the bucket for each path, `COVERAGE_BUCKET_REQUESTS` at a time.
async fn existing_in_bucket(bucket: &Bucket, paths: &[ProbePath]) -> Result<UpstreamAnswer> {
    let permits = Arc::new(tokio::sync::Semaphore::new(COVERAGE_BUCKET_REQUESTS));
    let mut heads = JoinSet::new();
    for (index, path) in paths.iter().enumerate() {
        let (bucket, path, permits) = (bucket.clone(), path.clone(), permits.clone());
        heads.spawn(async move {
            let _permit = permits.acquire_owned().await;
            (index, bucket.has(&path).await)
        });
    }
    let mut has = vec![false; paths.len()];
    while let Some(answer) = heads.join_next().await {
        let (index, answer) = answer.map_err(|e| Error::internal(format!("asking the upstream: {e}")))?;
        has[index] = answer?;
    }
    Ok(UpstreamAnswer { has, requests: paths.len() as u32 })
}
