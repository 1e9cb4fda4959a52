//! A small HTTPS GET client for plain-HTTPS probe sources: Central's
//! `/kernel-objects/` route (for a Collector) and a static probe bucket (for
//! Central's upstream), directly or through an HTTP CONNECT proxy.
//!
//! One connection per request, HTTP/1.1: a probe is fetched once and then
//! kept, so a pool would save little and the code stays small. Proxies
//! follow curl's conventions: `https_proxy`/`HTTPS_PROXY` name an `http://`
//! proxy (with optional `user:password@`, sent as basic credentials on the
//! CONNECT), `no_proxy`/`NO_PROXY` list hosts reached directly (`*` for
//! all; an entry matches the host and its subdomains; a leading dot is
//! ignored). Credentials never appear in `Display` or `Debug` output.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::client_tls::ClientTls;

pub mod error;
pub mod proxy;
mod url;

pub use error::{HttpsError, Step};
use error::{error, tls_failed, unreachable};
pub use proxy::{Proxy, ProxySettings};
pub use url::HttpsUrl;

/// The system's CA bundle (PEM): `SSL_CERT_FILE`, else the first of the
/// usual places (Debian and Ubuntu, RHEL and Fedora, Alpine and others).
pub fn system_ca_bundle() -> Result<Vec<u8>, HttpsError> {
    system_ca_bundle_file()?.read()
}

/// Where [`system_ca_bundle`] reads the bundle from, and why there: advice
/// on a failed TLS handshake names the file that was trusted.
pub fn system_ca_bundle_file() -> Result<CaBundleFile, HttpsError> {
    const USUAL: [&str; 3] =
        ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];
    if let Some(path) = std::env::var_os("SSL_CERT_FILE") {
        return Ok(CaBundleFile { path: path.into(), from_ssl_cert_file: true });
    }
    let path = USUAL
        .iter()
        .map(std::path::PathBuf::from)
        .find(|path| path.exists())
        .ok_or_else(|| error("no system CA bundle found (set SSL_CERT_FILE)"))?;
    Ok(CaBundleFile { path, from_ssl_cert_file: false })
}

/// A CA bundle file of the system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaBundleFile {
    pub path: std::path::PathBuf,
    /// Named by `SSL_CERT_FILE` rather than found in a usual place.
    pub from_ssl_cert_file: bool,
}

impl CaBundleFile {
    pub fn read(&self) -> Result<Vec<u8>, HttpsError> {
        std::fs::read(&self.path).map_err(|e| error(format!("reading the CA bundle {}: {e}", self.path.display())))
    }
}

/// `SSL_CERT_FILE (PATH)`, or `the system's CA bundle PATH`.
impl std::fmt::Display for CaBundleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.from_ssl_cert_file {
            true => write!(f, "SSL_CERT_FILE ({})", self.path.display()),
            false => write!(f, "the system's CA bundle {}", self.path.display()),
        }
    }
}

/// A TLS connector for HTTP/1.1 that trusts only `tls.ca_pem` and presents
/// `tls.identity`, if any: the HTTPS probe client's and the registry
/// client's.
pub fn tls_connector(tls: &ClientTls) -> Result<tokio_rustls::TlsConnector, HttpsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&tls.ca_pem) {
        let ca = ca.map_err(|e| error(format!("the CA certificate: {e}")))?;
        roots.add(ca).map_err(|e| error(format!("the CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(error("no CA certificate given"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error(format!("TLS settings: {e}")))?
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let certs = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| error(format!("the client certificate: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| error(format!("the client key: {e}")))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| error(format!("the client identity: {e}")))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Sends GET and HEAD requests over TLS.
#[derive(Clone)]
pub struct HttpsClient {
    tls: tokio_rustls::TlsConnector,
    proxies: ProxySettings,
    connect_timeout: Duration,
    /// The TLS name and `Host` to use instead of the URL's host, which is
    /// then only where to connect.
    server_name: Option<String>,
}

impl HttpsClient {
    /// A client trusting `tls.ca_pem` (the system's roots are not used: a
    /// probe source's CA is always given), presenting `tls.identity` if any.
    pub fn new(tls: &ClientTls, proxies: ProxySettings, connect_timeout: Duration) -> Result<HttpsClient, HttpsError> {
        let tls = tls_connector(tls)?;
        Ok(HttpsClient { tls, proxies, connect_timeout, server_name: None })
    }

    /// Connects to the URL's host but names `server_name` in TLS and in
    /// `Host` (curl's `--connect-to`), when given.
    pub fn with_server_name(self, server_name: Option<&str>) -> HttpsClient {
        HttpsClient { server_name: server_name.map(str::to_owned), ..self }
    }

    /// The proxy a request to `url` would go through, if any.
    pub fn proxy_for(&self, url: &HttpsUrl) -> Option<&Proxy> {
        self.proxies.for_host(&url.host)
    }

    /// Sends `GET` (or `HEAD`) for `url` and returns the answer, whatever
    /// its status, with its body still to be read.
    pub async fn request(&self, method: http::Method, url: &HttpsUrl) -> Result<Response<Incoming>, HttpsError> {
        let tcp = tokio::time::timeout(self.connect_timeout, self.connect(url))
            .await
            .map_err(|_| unreachable(format!("connecting to {url} took over {:?}", self.connect_timeout)))??;
        let name = self.server_name.clone().unwrap_or_else(|| url.host.clone());
        let server_name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|e| error(format!("{name}: not a TLS server name: {e}")))?;
        let tls = tokio::time::timeout(self.connect_timeout, self.tls.connect(server_name, tcp))
            .await
            .map_err(|_| tls_failed(format!("the TLS handshake with {url} took over {:?}", self.connect_timeout)))?
            .map_err(|e| tls_failed(format!("the TLS handshake with {url}: {e}")))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| error(format!("HTTP with {url}: {e}")))?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(&url.path)
            .header(http::header::HOST, HttpsUrl { host: name, ..url.clone() }.authority())
            .header(http::header::USER_AGENT, concat!("kprobes/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())
            .map_err(|e| error(format!("{url}: {e}")))?;
        sender.send_request(request).await.map_err(|e| error(format!("{url}: {e}")))
    }

    /// A TCP connection to `url`'s host, or through the proxy to it.
    async fn connect(&self, url: &HttpsUrl) -> Result<TcpStream, HttpsError> {
        match self.proxy_for(url) {
            Some(proxy) => proxy.tunnel_to(&url.host, url.port).await,
            None => {
                let tcp = TcpStream::connect((url.host.as_str(), url.port))
                    .await
                    .map_err(|e| unreachable(format!("connecting to {}: {e}", url.authority())))?;
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
        }
    }
}
