//! One repository on a registry, through the distribution API: blobs
//! (HEAD, GET, and PUT after POST, whole or in PATCH chunks) and manifests
//! (HEAD, GET, PUT), authenticated as the registry asks (`auth`).
//!
//! Every error names the registry and says what to do; none shows a
//! credential or a token (they only ever go into request headers).

use std::sync::Mutex;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::Full;
use probe_api::https::HttpsUrl;
use tokio::sync::mpsc;

use super::auth::{Challenge, Credentials, parse_challenge, query_escape, token_of};
use super::error::{OciError, OciErrorKind, OciResult, invalid, unavailable};
use super::http::{Answer, Connections};
use super::reference::Reference;

/// The largest manifest or index read, and the most distribution accepts.
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// The largest token server answer read.
const MAX_TOKEN_ANSWER: usize = 64 << 10;

/// Redirects followed for a blob (storage behind a registry).
const MAX_REDIRECTS: usize = 3;

/// Media types a manifest GET accepts.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A repository and how to reach it.
pub struct Registry {
    reference: Reference,
    connections: Connections,
    credentials: Option<Credentials>,
    /// `repository:PATH:pull` or `...:pull,push`, asked of a token server.
    scope: String,
    /// The `Authorization` value that worked last (Basic, or a token).
    authorization: Mutex<Option<String>>,
}

impl Registry {
    pub fn new(reference: Reference, connections: Connections, credentials: Option<Credentials>, push: bool) -> Self {
        let actions = if push { "pull,push" } else { "pull" };
        let scope = format!("repository:{}:{actions}", reference.repository);
        Registry { reference, connections, credentials, scope, authorization: Mutex::new(None) }
    }

    /// `HOST[:PORT]/PATH`, for messages.
    pub fn name(&self) -> String {
        format!("{}/{}", self.reference.registry, self.reference.repository)
    }

    fn url(&self, suffix: &str) -> HttpsUrl {
        HttpsUrl {
            host: self.reference.host.clone(),
            port: self.reference.port,
            path: format!("/v2/{}/{suffix}", self.reference.repository),
        }
    }

    /// True if the repository has the blob.
    pub async fn has_blob(&self, digest: &str) -> OciResult<bool> {
        let answer = self.send(Method::HEAD, self.url(&format!("blobs/{digest}")), &[], Bytes::new()).await?;
        match answer.status {
            StatusCode::OK | StatusCode::NOT_FOUND => {
                let found = answer.status == StatusCode::OK;
                drain(answer).await;
                Ok(found)
            }
            _ => Err(self.failure(answer, &format!("HEAD of blob {digest}")).await),
        }
    }

    /// The blob's bytes, still to be read (and checked by the caller).
    pub async fn get_blob(&self, digest: &str) -> OciResult<Answer> {
        let mut url = self.url(&format!("blobs/{digest}"));
        for _ in 0..=MAX_REDIRECTS {
            let answer = if url.host == self.reference.host && url.port == self.reference.port {
                self.send(Method::GET, url.clone(), &[], Bytes::new()).await?
            } else {
                // Storage elsewhere gets no registry credentials.
                self.connections.send(&url, plain_request(Method::GET, &url, None, &[], Bytes::new())?).await?
            };
            match answer.status {
                StatusCode::OK => return Ok(answer),
                status if status.is_redirection() => url = self.location(&answer)?,
                StatusCode::NOT_FOUND => {
                    return Err(OciError::new(
                        OciErrorKind::NotFound,
                        format!("{} has no blob {digest}: the artifact is incomplete; push it again", self.name()),
                    ));
                }
                _ => return Err(self.failure(answer, &format!("GET of blob {digest}")).await),
            }
        }
        Err(unavailable(format!("{}: over {MAX_REDIRECTS} redirects for blob {digest}", self.name())))
    }

    /// Uploads a blob whole: POST for an upload, then PUT with its bytes.
    pub async fn put_blob(&self, digest: &str, bytes: Bytes) -> OciResult<()> {
        let location = self.start_upload().await?;
        self.finish_upload(location, digest, bytes).await
    }

    /// Uploads a blob in pieces (each a PATCH), for blobs too large to
    /// hold: `pieces` yields them in order, and ends after the last.
    pub async fn put_blob_chunked(&self, digest: &str, pieces: &mut mpsc::Receiver<OciResult<Bytes>>) -> OciResult<()> {
        let mut location = self.start_upload().await?;
        let mut offset = 0u64;
        while let Some(chunk) = pieces.recv().await.transpose()? {
            let range = format!("{offset}-{}", offset + chunk.len() as u64 - 1);
            let headers =
                [(header::CONTENT_TYPE, "application/octet-stream".to_owned()), (header::CONTENT_RANGE, range)];
            offset += chunk.len() as u64;
            let answer = self.send(Method::PATCH, location.clone(), &headers, chunk).await?;
            if answer.status != StatusCode::ACCEPTED {
                return Err(self.failure(answer, &format!("PATCH of blob {digest}")).await);
            }
            location = self.location(&answer)?;
            drain(answer).await;
        }
        self.finish_upload(location, digest, Bytes::new()).await
    }

    async fn start_upload(&self) -> OciResult<HttpsUrl> {
        let answer = self.send(Method::POST, self.url("blobs/uploads/"), &[], Bytes::new()).await?;
        if answer.status != StatusCode::ACCEPTED {
            return Err(self.failure(answer, "starting a blob upload").await);
        }
        let location = self.location(&answer)?;
        drain(answer).await;
        Ok(location)
    }

    async fn finish_upload(&self, mut location: HttpsUrl, digest: &str, bytes: Bytes) -> OciResult<()> {
        let separator = if location.path.contains('?') { '&' } else { '?' };
        location.path = format!("{}{separator}digest={}", location.path, query_escape(digest));
        let headers = [(header::CONTENT_TYPE, "application/octet-stream".to_owned())];
        let answer = self.send(Method::PUT, location, &headers, bytes).await?;
        if answer.status != StatusCode::CREATED {
            return Err(self.failure(answer, &format!("PUT of blob {digest}")).await);
        }
        drain(answer).await;
        Ok(())
    }

    /// The digest of the manifest `reference` (a tag or digest) names, if
    /// it exists.
    pub async fn manifest_digest(&self, reference: &str) -> OciResult<Option<String>> {
        let headers = [(header::ACCEPT, MANIFEST_ACCEPT.to_owned())];
        let answer =
            self.send(Method::HEAD, self.url(&format!("manifests/{reference}")), &headers, Bytes::new()).await?;
        match answer.status {
            StatusCode::OK => {
                let digest = answer.header("docker-content-digest").map(str::to_owned);
                drain(answer).await;
                Ok(digest)
            }
            StatusCode::NOT_FOUND => {
                drain(answer).await;
                Ok(None)
            }
            _ => Err(self.failure(answer, &format!("HEAD of manifest {reference}")).await),
        }
    }

    /// The manifest `reference` names, with its media type; `None` if the
    /// repository or the tag does not exist.
    pub async fn get_manifest(&self, reference: &str) -> OciResult<Option<(Vec<u8>, String)>> {
        let headers = [(header::ACCEPT, MANIFEST_ACCEPT.to_owned())];
        let answer =
            self.send(Method::GET, self.url(&format!("manifests/{reference}")), &headers, Bytes::new()).await?;
        match answer.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                drain(answer).await;
                return Ok(None);
            }
            _ => return Err(self.failure(answer, &format!("GET of manifest {reference}")).await),
        }
        let media_type = answer.header("content-type").unwrap_or_default().to_owned();
        let what = format!("the manifest {} of {}", reference, self.name());
        let bytes = answer.bytes(MAX_MANIFEST_SIZE, &what).await?;
        Ok(Some((bytes, media_type)))
    }

    /// Stores a manifest under `reference` (a tag or its digest).
    pub async fn put_manifest(&self, reference: &str, media_type: &str, bytes: Bytes) -> OciResult<()> {
        if bytes.len() > MAX_MANIFEST_SIZE {
            return Err(OciError::new(
                OciErrorKind::Refused,
                format!(
                    "the manifest {reference} is {} bytes, over the {MAX_MANIFEST_SIZE} bytes registries accept",
                    bytes.len()
                ),
            ));
        }
        let size = bytes.len();
        let headers = [(header::CONTENT_TYPE, media_type.to_owned())];
        let answer = self.send(Method::PUT, self.url(&format!("manifests/{reference}")), &headers, bytes).await?;
        if answer.status != StatusCode::CREATED {
            let error = self.failure(answer, &format!("PUT of manifest {reference} ({size} bytes)")).await;
            return Err(error);
        }
        drain(answer).await;
        Ok(())
    }

    /// Sends a request with the credentials the registry asked for,
    /// answering one 401 challenge.
    async fn send(
        &self,
        method: Method,
        url: HttpsUrl,
        headers: &[(header::HeaderName, String)],
        body: Bytes,
    ) -> OciResult<Answer> {
        let mut challenged = false;
        loop {
            let authorization = self.authorization.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let request = plain_request(method.clone(), &url, authorization.as_deref(), headers, body.clone())?;
            let answer = self.connections.send(&url, request).await.map_err(|e| e.context(self.name()))?;
            if answer.status != StatusCode::UNAUTHORIZED || challenged {
                return Ok(answer);
            }
            challenged = true;
            let challenge = answer.header("www-authenticate").and_then(parse_challenge);
            drain(answer).await;
            let authorization = match challenge {
                Some(Challenge::Basic) => match &self.credentials {
                    Some(credentials) => credentials.basic(),
                    None => return Err(self.no_credentials()),
                },
                Some(Challenge::Bearer { realm, service, .. }) => self.token(&realm, service.as_deref()).await?,
                None => return Err(self.unauthorized("asks for an authentication scheme not supported")),
            };
            *self.authorization.lock().unwrap_or_else(|p| p.into_inner()) = Some(authorization);
        }
    }

    /// A token from the registry's token server (the Bearer flow).
    async fn token(&self, realm: &str, service: Option<&str>) -> OciResult<String> {
        let mut url = HttpsUrl::parse(realm).map_err(|e| {
            invalid(format!("{}: its token server {}: {e}", self.name(), probe_api::errors::remote_text(realm)))
        })?;
        let separator = if url.path.contains('?') { '&' } else { '?' };
        url.path = format!("{}{separator}scope={}", url.path, query_escape(&self.scope));
        if let Some(service) = service {
            url.path = format!("{}&service={}", url.path, query_escape(service));
        }
        let basic = self.credentials.as_ref().map(Credentials::basic);
        let answer =
            self.connections.send(&url, plain_request(Method::GET, &url, basic.as_deref(), &[], Bytes::new())?).await?;
        match answer.status {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if self.credentials.is_none() => {
                return Err(self.no_credentials());
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(self.unauthorized("'s token server refused the credentials in the auth file: check them"));
            }
            status => return Err(unavailable(format!("{}: its token server answered {status}", self.name()))),
        }
        let bytes = answer.bytes(MAX_TOKEN_ANSWER, "the token server's answer").await?;
        let token =
            token_of(&bytes).ok_or_else(|| unavailable(format!("{}: its token server sent no token", self.name())))?;
        Ok(format!("Bearer {token}"))
    }

    fn no_credentials(&self) -> OciError {
        self.unauthorized(&format!(
            " wants credentials: add \"{}\" to the auth file (--registry-auth-file or REGISTRY_AUTH_FILE)",
            self.reference.registry
        ))
    }

    fn unauthorized(&self, what: &str) -> OciError {
        OciError::new(OciErrorKind::Unauthorized, format!("{}{what}", self.name()))
    }

    /// The error for an unexpected answer to `what`, by its status.
    async fn failure(&self, answer: Answer, what: &str) -> OciError {
        let status = answer.status;
        let text = answer.error_text().await;
        let name = self.name();
        match status {
            StatusCode::UNAUTHORIZED => {
                self.unauthorized(&format!(" refused the credentials in the auth file for {what}: check them ({text})"))
            }
            StatusCode::FORBIDDEN => self.unauthorized(&format!(
                " denied {what}: the user in the auth file lacks the right to this repository ({text})"
            )),
            StatusCode::NOT_FOUND => {
                OciError::new(OciErrorKind::NotFound, format!("{name}: {what}: not found ({text})"))
            }
            StatusCode::PAYLOAD_TOO_LARGE => OciError::new(
                OciErrorKind::Refused,
                format!("{name} refused {what} as too large (registries take manifests of at most 4 MiB): {text}"),
            ),
            status if status.is_client_error() => {
                OciError::new(OciErrorKind::Refused, format!("{name} refused {what} with {status}: {text}"))
            }
            status => unavailable(format!("{name} answered {what} with {status}: {text}; retry later")),
        }
    }

    /// The `Location` of an answer, resolved against the registry.
    fn location(&self, answer: &Answer) -> OciResult<HttpsUrl> {
        let location = answer
            .header("location")
            .ok_or_else(|| unavailable(format!("{}: an answer without its Location", self.name())))?;
        if location.starts_with('/') {
            return Ok(HttpsUrl {
                host: self.reference.host.clone(),
                port: self.reference.port,
                path: location.to_owned(),
            });
        }
        HttpsUrl::parse(location)
            .map_err(|e| unavailable(format!("{}: a Location that is not https: {e}", self.name())))
    }
}

/// A request with `Host`, `User-Agent` and maybe `Authorization`.
fn plain_request(
    method: Method,
    url: &HttpsUrl,
    authorization: Option<&str>,
    headers: &[(header::HeaderName, String)],
    body: Bytes,
) -> OciResult<Request<Full<Bytes>>> {
    let host = if url.port == 443 { url.host.clone() } else { format!("{}:{}", url.host, url.port) };
    let mut request = Request::builder()
        .method(method)
        .uri(&url.path)
        .header(header::HOST, host)
        .header(header::USER_AGENT, concat!("kprobes/", env!("CARGO_PKG_VERSION")))
        .header(header::CONTENT_LENGTH, body.len());
    if let Some(authorization) = authorization {
        request = request.header(header::AUTHORIZATION, authorization);
    }
    for (name, value) in headers {
        request = request.header(name, value);
    }
    request.body(Full::new(body)).map_err(|e| invalid(format!("a request to {}: {e}", url.host)))
}

/// Reads a small answer to its end, so that its connection can be reused.
async fn drain(answer: Answer) {
    let _ = answer.bytes(64 << 10, "an answer").await;
}
