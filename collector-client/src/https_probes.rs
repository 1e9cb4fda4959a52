//! Probes over plain HTTPS, the way Collectors of the product this replaces
//! fetch them: one GET of `<base>/<module version>/<file name>`, from
//! Central's route `/kernel-objects/` over mutual TLS, or from a static
//! bucket (`MODULE_DOWNLOAD_BASE_URL`, through the proxy of the
//! environment). The body is checked against `Content-Length` when there is
//! one and, when the server sends one, the SHA-256 in the `Digest` header.

use std::time::Duration;

use base64::Engine;
use http_body_util::BodyExt;
use probe_api::digest::{Sha256Digest, Sha256Hasher};
use probe_api::errors::remote_text;
use probe_api::https::{HttpsClient, HttpsError, HttpsUrl, Proxy, ProxySettings, Step};
use probe_api::signing::{MAX_SIGNATURE_LEN, SIGNATURE_SUFFIX};
use probe_api::transport::ClientTls;

use crate::limits::MAX_PROBE_FILE;
use crate::report::Outcome;

/// Why a fetch over HTTPS gave no probe.
#[derive(Debug)]
pub enum HttpsFetchError {
    /// 404: no source of Central has it.
    NotFound(String),
    /// Anything else: unreachable, refused, a bad or short answer; what
    /// kind of trouble it was.
    Failed(Outcome, String),
}

impl HttpsFetchError {
    /// What kind of trouble it was, for the report's advice.
    pub fn outcome(&self) -> Outcome {
        match self {
            HttpsFetchError::NotFound(_) => Outcome::NotFound,
            HttpsFetchError::Failed(outcome, _) => *outcome,
        }
    }
}

impl std::fmt::Display for HttpsFetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpsFetchError::NotFound(why) | HttpsFetchError::Failed(_, why) => f.write_str(why),
        }
    }
}

/// A request that got no HTTP answer, as a failure of its kind; a failed
/// TLS handshake as `tls`.
fn unanswered(url: &impl std::fmt::Display, error: HttpsError, tls: Outcome) -> HttpsFetchError {
    let outcome = match error.step() {
        Step::Connect => Outcome::Unreachable,
        Step::Tls => tls,
        Step::Other => Outcome::Failed,
    };
    HttpsFetchError::Failed(outcome, format!("{url}: {error}"))
}

impl std::error::Error for HttpsFetchError {}

/// A probe fetched over HTTPS: its bytes and their SHA-256, and whether
/// Central vouched for that digest.
#[derive(Debug)]
pub struct HttpsProbe {
    pub bytes: Vec<u8>,
    pub sha256: Sha256Digest,
    pub digest_checked: bool,
}

/// How much of an error answer's body is shown.
const ERROR_TEXT: usize = 500;

#[derive(Clone)]
pub struct HttpsProbeClient {
    client: HttpsClient,
    base: HttpsUrl,
    /// What a failed TLS handshake is: with Central or with a download
    /// site, whose advice differs.
    tls_outcome: Outcome,
}

impl HttpsProbeClient {
    /// Central's route at `address` (`host:port`, or an `https://` URL),
    /// reached directly (it is inside the cluster), with `server_name` as
    /// its TLS name when given (`SNI_HOSTNAME`).
    pub fn central(
        address: &str,
        tls: &ClientTls,
        connect_timeout: Duration,
        server_name: Option<&str>,
    ) -> Result<Self, HttpsError> {
        let url = if address.starts_with("https://") { address.to_owned() } else { format!("https://{address}") };
        let base = HttpsUrl::parse(&url)?;
        let client = HttpsClient::new(tls, ProxySettings::default(), connect_timeout)?.with_server_name(server_name);
        let base = HttpsUrl { path: "/kernel-objects/".to_owned(), ..base };
        Ok(HttpsProbeClient { client, base, tls_outcome: Outcome::Tls })
    }

    /// A bucket at `base_url`, trusted by the CAs of `tls`, through the
    /// proxy of the environment.
    pub fn bucket(base_url: &str, tls: &ClientTls, connect_timeout: Duration) -> Result<Self, HttpsError> {
        let client = HttpsClient::new(tls, ProxySettings::from_env()?, connect_timeout)?;
        Ok(HttpsProbeClient { client, base: HttpsUrl::parse(base_url)?, tls_outcome: Outcome::SiteTls })
    }

    /// Where the probes are.
    pub fn base(&self) -> &HttpsUrl {
        &self.base
    }

    /// The proxy requests go through, if any.
    pub fn proxy(&self) -> Option<&Proxy> {
        self.client.proxy_for(&self.base)
    }

    pub async fn fetch(&self, module_version: &str, file_name: &str) -> Result<HttpsProbe, HttpsFetchError> {
        let url = self.base.join(&format!("{module_version}/{file_name}"));
        let failed = |why: String| HttpsFetchError::Failed(Outcome::Failed, format!("{url}: {why}"));
        let mut response =
            self.client.request(http::Method::GET, &url).await.map_err(|e| unanswered(&url, e, self.tls_outcome))?;
        let status = response.status();
        if status != http::StatusCode::OK {
            // The start of an error body says why; the rest is left unread,
            // since a server may send any amount.
            let mut body = Vec::new();
            while body.len() < ERROR_TEXT {
                match response.body_mut().frame().await {
                    Some(Ok(frame)) => body.extend_from_slice(&frame.into_data().unwrap_or_default()),
                    _ => break,
                }
            }
            body.truncate(ERROR_TEXT);
            let why = format!("HTTP {status}: {}", remote_text(String::from_utf8_lossy(&body).trim()));
            return Err(if status == http::StatusCode::NOT_FOUND {
                HttpsFetchError::NotFound(why)
            } else {
                failed(why)
            });
        }
        // Without a Content-Length (a chunked answer), the size limit bounds it.
        let declared =
            response.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let size = declared.unwrap_or(MAX_PROBE_FILE);
        if size > MAX_PROBE_FILE {
            return Err(failed(format!("{size} bytes, over the limit of {MAX_PROBE_FILE}")));
        }
        let published = match response.headers().get("digest") {
            None => None,
            Some(value) => Some(
                sha256_of_digest_header(value.to_str().unwrap_or_default())
                    .ok_or_else(|| failed(format!("a Digest header without a SHA-256: {value:?}")))?,
            ),
        };
        // The declared size is only a claim: grow as bytes arrive.
        let mut bytes = Vec::with_capacity(size.min(16 << 20) as usize);
        let mut hasher = Sha256Hasher::new();
        while let Some(frame) = response.body_mut().frame().await {
            let frame = frame.map_err(|e| failed(format!("reading the body: {e}")))?;
            let Ok(chunk) = frame.into_data() else { continue };
            if bytes.len() as u64 + chunk.len() as u64 > size {
                return Err(failed(format!("more than {size} bytes")));
            }
            hasher.update(&chunk);
            bytes.extend_from_slice(&chunk);
        }
        if declared.is_some() && (bytes.len() as u64) < size {
            return Err(failed(format!("{} of its {size} bytes came", bytes.len())));
        }
        let sha256 = hasher.finish();
        if let Some(published) = published
            && published != sha256
        {
            return Err(failed(format!("SHA-256 {sha256} does not match the Digest header's {published}")));
        }
        Ok(HttpsProbe { bytes, sha256, digest_checked: published.is_some() })
    }

    /// The probe's signature, `<file name>.minisig` beside it: `None` when
    /// the server has none (404, or 403 as buckets answer for a missing
    /// object). At most `MAX_SIGNATURE_LEN + 1` bytes are read, so that an
    /// oversized one is refused as such.
    pub async fn fetch_signature(
        &self,
        module_version: &str,
        file_name: &str,
    ) -> Result<Option<Vec<u8>>, HttpsFetchError> {
        let url = self.base.join(&format!("{module_version}/{file_name}{SIGNATURE_SUFFIX}"));
        let failed = |why: String| HttpsFetchError::Failed(Outcome::Failed, format!("{url}: {why}"));
        let mut response =
            self.client.request(http::Method::GET, &url).await.map_err(|e| unanswered(&url, e, self.tls_outcome))?;
        match response.status() {
            http::StatusCode::OK => {}
            http::StatusCode::NOT_FOUND | http::StatusCode::FORBIDDEN | http::StatusCode::GONE => return Ok(None),
            status => return Err(failed(format!("HTTP {status}"))),
        }
        let mut bytes = Vec::new();
        while bytes.len() <= MAX_SIGNATURE_LEN {
            match response.body_mut().frame().await {
                Some(Ok(frame)) => bytes.extend_from_slice(&frame.into_data().unwrap_or_default()),
                Some(Err(e)) => return Err(failed(format!("reading the body: {e}"))),
                None => break,
            }
        }
        bytes.truncate(MAX_SIGNATURE_LEN + 1);
        Ok(Some(bytes))
    }
}

/// The SHA-256 in a `Digest` header (RFC 3230: `sha-256=<base64>`, among
/// other algorithms separated by commas).
fn sha256_of_digest_header(value: &str) -> Option<Sha256Digest> {
    value.split(',').find_map(|entry| {
        let (algorithm, encoded) = entry.trim().split_once('=')?;
        if !algorithm.eq_ignore_ascii_case("sha-256") {
            return None;
        }
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
        Some(Sha256Digest(bytes.try_into().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sha256_is_found_among_the_digests() {
        let sha = Sha256Digest::of(b"probe");
        let encoded = base64::engine::general_purpose::STANDARD.encode(sha.0);
        assert_eq!(sha256_of_digest_header(&format!("sha-256={encoded}")), Some(sha));
        assert_eq!(sha256_of_digest_header(&format!("md5=abc, SHA-256={encoded}")), Some(sha));
        assert_eq!(sha256_of_digest_header("md5=abc"), None);
        assert_eq!(sha256_of_digest_header("sha-256=not base64!"), None);
        assert_eq!(sha256_of_digest_header("sha-256=YWJj"), None, "three bytes are not a SHA-256");
    }
}
