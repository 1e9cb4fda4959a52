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

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::transport::ClientTls;

/// Why a request got no HTTP answer.
#[derive(Debug)]
pub struct HttpsError(String);

impl fmt::Display for HttpsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HttpsError {}

fn error(message: impl Into<String>) -> HttpsError {
    HttpsError(message.into())
}

/// An `https://host[:port]/path` URL, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsUrl {
    pub host: String,
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
}

impl HttpsUrl {
    pub fn parse(url: &str) -> Result<HttpsUrl, HttpsError> {
        let rest = url.strip_prefix("https://").ok_or_else(|| error(format!("{url:?} is not an https:// URL")))?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(error("an https:// URL with credentials is not supported"));
        }
        let (host, port) = split_host_port(authority, 443).ok_or_else(|| error(format!("{url:?}: no host")))?;
        Ok(HttpsUrl { host, port, path: path.to_owned() })
    }

    /// This URL with `suffix` (already a valid path, no leading `/`)
    /// appended to its path.
    pub fn join(&self, suffix: &str) -> HttpsUrl {
        let separator = if self.path.ends_with('/') { "" } else { "/" };
        HttpsUrl { path: format!("{}{separator}{suffix}", self.path), ..self.clone() }
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}{}", self.authority(), self.path)
    }
}

/// `host[:port]` or `[v6]:port`, the host without brackets.
fn split_host_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(port) => port.parse().ok()?,
        None => default_port,
    };
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// An HTTP CONNECT proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    host: String,
    port: u16,
    /// `Basic ...`, from `user:password@` in its URL.
    authorization: Option<String>,
}

impl Proxy {
    /// `http://[user:password@]host[:port][/]` (port 80 when absent; a bare
    /// `host:port` is taken as `http://`).
    pub fn parse(url: &str) -> Result<Proxy, HttpsError> {
        let rest = match url.split_once("://") {
            None => url,
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(error(format!("a proxy URL must be http:// (a CONNECT proxy), not {scheme}://")));
            }
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((credentials, host_port)) => (Some(credentials), host_port),
            None => (None, authority),
        };
        let (host, port) = split_host_port(host_port, 80).ok_or_else(|| error("the proxy URL has no host"))?;
        let authorization = credentials.map(|credentials| {
            use base64::Engine;
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(percent_decode(credentials)))
        });
        Ok(Proxy { host, port, authorization })
    }
}

/// Without the credentials.
impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let credentials = if self.authorization.is_some() { "(credentials)@" } else { "" };
        write!(f, "http://{credentials}{}:{}", self.host, self.port)
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `%XX` escapes in URL credentials, as curl reads them.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// Which proxy, if any, a request goes through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxySettings {
    pub proxy: Option<Proxy>,
    /// Hosts reached directly: `no_proxy` entries, lower case, without a
    /// leading dot; `*` for all.
    pub no_proxy: Vec<String>,
}

impl ProxySettings {
    /// From the environment, as curl reads it: `https_proxy`, then
    /// `HTTPS_PROXY`; `no_proxy`, then `NO_PROXY`. An empty value is unset.
    pub fn from_env() -> Result<ProxySettings, HttpsError> {
        let var = |lower: &str, upper: &str| {
            [lower, upper].iter().find_map(|name| std::env::var(name).ok().filter(|value| !value.trim().is_empty()))
        };
        Self::new(var("https_proxy", "HTTPS_PROXY").as_deref(), var("no_proxy", "NO_PROXY").as_deref())
    }

    pub fn new(proxy: Option<&str>, no_proxy: Option<&str>) -> Result<ProxySettings, HttpsError> {
        let proxy = proxy.map(Proxy::parse).transpose()?;
        let no_proxy = no_proxy
            .unwrap_or_default()
            .split(',')
            .map(|entry| entry.trim().trim_start_matches('.').to_ascii_lowercase())
            .filter(|entry| !entry.is_empty())
            .collect();
        Ok(ProxySettings { proxy, no_proxy })
    }

    /// The proxy for `host`: none when `no_proxy` matches it.
    pub fn for_host(&self, host: &str) -> Option<&Proxy> {
        let host = host.to_ascii_lowercase();
        let bypass = self.no_proxy.iter().any(|entry| {
            entry == "*" || host == *entry || host.strip_suffix(entry.as_str()).is_some_and(|sub| sub.ends_with('.'))
        });
        if bypass { None } else { self.proxy.as_ref() }
    }
}

/// The system's CA bundle (PEM): `SSL_CERT_FILE`, else the first of the
/// usual places (Debian and Ubuntu, RHEL and Fedora, Alpine and others).
pub fn system_ca_bundle() -> Result<Vec<u8>, HttpsError> {
    const USUAL: [&str; 3] =
        ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];
    let from_env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let path = from_env
        .or_else(|| USUAL.iter().map(std::path::PathBuf::from).find(|path| path.exists()))
        .ok_or_else(|| error("no system CA bundle found (set SSL_CERT_FILE)"))?;
    std::fs::read(&path).map_err(|e| error(format!("reading the CA bundle {}: {e}", path.display())))
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

/// The largest CONNECT response head read from a proxy.
const MAX_PROXY_RESPONSE: usize = 16 << 10;

impl HttpsClient {
    /// A client trusting `tls.ca_pem` (the system's roots are not used: a
    /// probe source's CA is always given), presenting `tls.identity` if any.
    pub fn new(tls: &ClientTls, proxies: ProxySettings, connect_timeout: Duration) -> Result<HttpsClient, HttpsError> {
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
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
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
            .map_err(|_| error(format!("connecting to {url} took over {:?}", self.connect_timeout)))??;
        let name = self.server_name.clone().unwrap_or_else(|| url.host.clone());
        let server_name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|e| error(format!("{name}: not a TLS server name: {e}")))?;
        let tls = tokio::time::timeout(self.connect_timeout, self.tls.connect(server_name, tcp))
            .await
            .map_err(|_| error(format!("the TLS handshake with {url} took over {:?}", self.connect_timeout)))?
            .map_err(|e| error(format!("the TLS handshake with {url}: {e}")))?;
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
                    .map_err(|e| error(format!("connecting to {}: {e}", url.authority())))?;
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
        }
    }
}

impl Proxy {
    /// A TCP connection to the proxy, tunnelled on to `host`:`port`.
    pub async fn tunnel_to(&self, host: &str, port: u16) -> Result<TcpStream, HttpsError> {
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| error(format!("connecting to the proxy {self}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        tunnel(&mut tcp, self, &authority).await?;
        Ok(tcp)
    }
}

/// Asks `proxy` on `stream` for a tunnel to `authority`.
async fn tunnel<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    proxy: &Proxy,
    authority: &str,
) -> Result<(), HttpsError> {
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(authorization) = &proxy.authorization {
        head += &format!("Proxy-Authorization: {authorization}\r\n");
    }
    head += "\r\n";
    stream.write_all(head.as_bytes()).await.map_err(|e| error(format!("the proxy {proxy}: {e}")))?;
    // Read the response head byte by byte: nothing after it may be taken
    // from the stream, it belongs to the TLS handshake.
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        if response.len() >= MAX_PROXY_RESPONSE {
            return Err(error(format!("the proxy {proxy} sent an over-long answer to CONNECT")));
        }
        let byte = stream.read_u8().await.map_err(|e| error(format!("the proxy {proxy}: {e}")))?;
        response.push(byte);
    }
    let status_line = String::from_utf8_lossy(response.split(|&b| b == b'\r').next().unwrap_or_default()).into_owned();
    let status = status_line.split_whitespace().nth(1).and_then(|code| code.parse::<u16>().ok());
    match status.and_then(|code| StatusCode::from_u16(code).ok()) {
        Some(status) if status.is_success() => Ok(()),
        _ => Err(error(format!("the proxy {proxy} refused a tunnel to {authority}: {status_line}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_path() {
        let url = HttpsUrl::parse("https://bucket.example.com/collector/modules").unwrap();
        assert_eq!((url.host.as_str(), url.port, url.path.as_str()), ("bucket.example.com", 443, "/collector/modules"));
        assert_eq!(url.join("2.5.0/x.o.gz").path, "/collector/modules/2.5.0/x.o.gz");
        let url = HttpsUrl::parse("https://[::1]:8443").unwrap();
        assert_eq!((url.host.as_str(), url.port, url.path.as_str()), ("::1", 8443, "/"));
        assert_eq!(url.join("a").to_string(), "https://[::1]:8443/a");
        for bad in ["http://example.com/", "https://", "https://user:pw@example.com/", "https://h:port/"] {
            assert!(HttpsUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn proxy_credentials_become_basic_authorization_and_are_never_shown() {
        let proxy = Proxy::parse("http://alice:s%40cret@proxy.corp:3128/").unwrap();
        assert_eq!((proxy.host.as_str(), proxy.port), ("proxy.corp", 3128));
        // base64("alice:s@cret")
        assert_eq!(proxy.authorization.as_deref(), Some("Basic YWxpY2U6c0BjcmV0"));
        for shown in [
            proxy.to_string(),
            format!("{proxy:?}"),
            format!("{:?}", ProxySettings { proxy: Some(proxy.clone()), no_proxy: vec![] }),
        ] {
            assert!(!shown.contains("alice") && !shown.contains("cret"), "{shown}");
        }
        assert_eq!(Proxy::parse("proxy.corp:8080").unwrap().to_string(), "http://proxy.corp:8080");
        assert!(Proxy::parse("https://proxy.corp:8443").is_err(), "only CONNECT over plain HTTP");
    }

    #[test]
    fn no_proxy_matches_hosts_and_their_subdomains() {
        let settings =
            ProxySettings::new(Some("http://proxy:3128"), Some("localhost, .internal.corp,10.0.0.7,Example.COM"))
                .unwrap();
        for direct in ["localhost", "a.internal.corp", "internal.corp", "10.0.0.7", "example.com", "x.EXAMPLE.com"] {
            assert!(settings.for_host(direct).is_none(), "{direct} bypasses the proxy");
        }
        for proxied in ["notexample.com", "internal.corp.evil", "10.0.0.70", "storage.googleapis.com"] {
            assert!(settings.for_host(proxied).is_some(), "{proxied} goes through the proxy");
        }
        let everything = ProxySettings::new(Some("http://proxy:3128"), Some("*")).unwrap();
        assert!(everything.for_host("anything").is_none());
        assert!(ProxySettings::new(None, None).unwrap().for_host("anything").is_none());
    }
}
