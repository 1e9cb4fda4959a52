//! HTTP CONNECT proxies: which one a request goes through (`https_proxy`,
//! `no_proxy`, as curl reads them), and the tunnel through it. Credentials
//! in a proxy URL are sent as basic credentials and never displayed.

use std::fmt;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::error::{HttpsError, error, unreachable};
use super::url::split_host_port;

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

/// The largest CONNECT response head read from a proxy.
const MAX_PROXY_RESPONSE: usize = 16 << 10;

impl Proxy {
    /// A TCP connection to the proxy, tunnelled on to `host`:`port`.
    pub async fn tunnel_to(&self, host: &str, port: u16) -> Result<TcpStream, HttpsError> {
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(format!("connecting to the proxy {self}: {e}")))?;
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
        _ => Err(unreachable(format!(
            "the proxy {proxy} refused a tunnel to {authority}: {}",
            crate::errors::remote_text(&status_line)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
