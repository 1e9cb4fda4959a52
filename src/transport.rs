//! Client connections to Central: TLS with the CA that signed Central's
//! certificate, an optional client identity (a Collector's), and HTTP/2
//! windows sized for bulk transfers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

pub use crate::client_tls::ClientTls;
use crate::client_tls::{CaPemError, check_ca_pem};
use crate::https::error::HttpsError;
use crate::https::proxy::{Proxy, ProxySettings};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Per-stream and per-connection HTTP/2 receive windows of clients.
pub const STREAM_WINDOW: u32 = 16 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;

/// Why a client for an address cannot be made.
#[derive(Debug)]
pub enum TransportError {
    /// `http://`: Central speaks TLS only.
    PlainHttp {
        address: String,
    },
    NotHostPort {
        address: String,
    },
    /// The CA certificates to trust hold none (callers that read them from
    /// a file name it first: `client_tls::read_ca_file`).
    Ca {
        address: String,
        why: CaPemError,
    },
    /// The address or the TLS material is not usable.
    Invalid {
        address: String,
        source: tonic::transport::Error,
    },
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportError::PlainHttp { address } => {
                write!(f, "{address}: Central speaks TLS only; use https:// or plain host:port")
            }
            TransportError::NotHostPort { address } => write!(f, "{address:?} is not HOST:PORT"),
            TransportError::Ca { address, why } => write!(f, "the CA certificate (--ca) given for {address} {why}"),
            TransportError::Invalid { address, .. } => write!(f, "cannot reach {address} with these settings"),
        }
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TransportError::Invalid { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Makes a channel to `address` (`host:port`, optionally with `https://`).
/// It connects lazily, on the first call, within `connect_timeout`.
pub fn channel(address: &str, tls: &ClientTls, connect_timeout: Duration) -> Result<Channel, TransportError> {
    Ok(endpoint(address, tls, connect_timeout)?.connect_lazy())
}

/// `channel`, through an HTTP CONNECT proxy when `proxies` has one for
/// the host of `address`.
pub fn channel_through(
    address: &str,
    tls: &ClientTls,
    connect_timeout: Duration,
    proxies: &ProxySettings,
) -> Result<Channel, TransportError> {
    let endpoint = endpoint(address, tls, connect_timeout)?;
    let host = endpoint.uri().host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
    Ok(match proxies.for_host(&host) {
        None => endpoint.connect_lazy(),
        Some(proxy) => endpoint.connect_with_connector_lazy(Tunnel(proxy.clone())),
    })
}

/// Connects tonic's channel through a proxy; tonic runs TLS on top.
#[derive(Clone)]
struct Tunnel(Proxy);

impl tonic::codegen::Service<http::Uri> for Tunnel {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = HttpsError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, HttpsError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HttpsError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let proxy = self.0.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(443);
            Ok(hyper_util::rt::TokioIo::new(proxy.tunnel_to(&host, port).await?))
        })
    }
}

/// The endpoint behind `channel`, for callers that want to connect now.
pub fn endpoint(address: &str, tls: &ClientTls, connect_timeout: Duration) -> Result<Endpoint, TransportError> {
    endpoint_named(address, tls, connect_timeout, None)
}

/// `endpoint`, naming `server_name` in TLS instead of the address's host
/// when given (the Collector's `SNI_HOSTNAME`).
pub fn endpoint_named(
    address: &str,
    tls: &ClientTls,
    connect_timeout: Duration,
    server_name: Option<&str>,
) -> Result<Endpoint, TransportError> {
    let authority = address.strip_prefix("https://").unwrap_or(address);
    if authority.starts_with("http://") {
        return Err(TransportError::PlainHttp { address: address.to_owned() });
    }
    let host = host_of(authority).ok_or_else(|| TransportError::NotHostPort { address: address.to_owned() })?;
    let host = server_name.map(str::to_owned).unwrap_or(host);
    check_ca_pem(&tls.ca_pem).map_err(|why| TransportError::Ca { address: address.to_owned(), why })?;
    let invalid = |source| TransportError::Invalid { address: address.to_owned(), source };
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem)).domain_name(host);
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(format!("https://{authority}"))
        .map_err(invalid)?
        .tls_config(config)
        .map_err(invalid)?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    Ok(endpoint)
}

/// The host of `host:port` or `[v6]:port`, without brackets.
fn host_of(authority: &str) -> Option<String> {
    let (host, port) = authority.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then(|| host.to_owned())
}

/// A one-line explanation of a failed call, with a hint where the raw
/// status is cryptic. Under TLS 1.3 a refused client certificate surfaces
/// only after the handshake, as a "transport error" or, when the request was
/// already on its way, as a bare "operation was canceled".
pub fn describe(status: &tonic::Status) -> String {
    // The message is the server's text: escaped before it reaches a line.
    let mut text = format!("{:?}: {}", status.code(), crate::errors::remote_text(status.message()));
    let mut source = String::new();
    let mut next = std::error::Error::source(status);
    while let Some(error) = next {
        source = error.to_string();
        next = error.source();
    }
    let certificate_trouble =
        ["Certificate", "UnknownCA", "certificate", "UnknownIssuer"].iter().any(|word| source.contains(word));
    let connection_lost =
        matches!(status.code(), tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled)
            && ["transport error", "operation was canceled"].iter().any(|m| status.message().contains(m));
    if certificate_trouble {
        text.push_str(&format!(
            " ({source}: TLS refused; check that --ca is the CA that signed Central's certificate, \
             and that the client certificate is signed by Central's cluster CA and still valid)"
        ));
    } else if connection_lost {
        text.push_str(&format!(
            " (the connection to Central failed{}: check the address, and that the client certificate, \
             if any, is signed by Central's cluster CA and still valid)",
            if source.is_empty() { String::new() } else { format!(": {source}") }
        ));
    }
    text
}

/// How a call failed before Central could answer it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreached {
    /// No connection: refused, no route, a name that does not resolve, no
    /// answer in time.
    Connect,
    /// The TLS handshake failed, or Central refused the client's
    /// certificate.
    Tls,
}

/// For a call to Central at `address` that never reached it: which kind of
/// failure, and a line that names the address and the reason the system or
/// TLS gave (`cannot connect to ADDR: Connection refused (os error 111)`,
/// `TLS with ADDR failed: invalid peer certificate: UnknownIssuer`). `None`
/// for an answer of Central's. The reason is escaped: a TLS alert is the
/// peer's word. Both sides show connection failures with it.
pub fn unreached(address: &str, status: &tonic::Status) -> Option<(Unreached, String)> {
    use tonic::Code;
    let mut causes = Vec::new();
    let mut next = std::error::Error::source(status);
    while let Some(cause) = next {
        causes.push(cause.to_string());
        next = cause.source();
    }
    let all = format!("{} {}", status.message(), causes.join(" "));
    let tls = ["certificate", "Certificate", "UnknownCA", "UnknownIssuer", "HandshakeFailure", "tls handshake"]
        .iter()
        .any(|word| all.contains(word));
    let transport = matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
        && ["tcp connect error", "dns error", "transport error", "connection error", "timed out"]
            .iter()
            .any(|word| status.message().contains(word));
    let reason = crate::errors::remote_text(causes.last().map_or(status.message(), String::as_str));
    // Under TLS 1.3 a server that refuses the client's certificate does so
    // after the handshake: the call ends cancelled, the connection closed.
    let closed = status.message().contains("operation was canceled") && all.contains("connection closed");
    if closed {
        let why = "the connection closed before an answer, as when Central refuses the client certificate";
        Some((Unreached::Tls, format!("TLS with {address} failed: {why}")))
    } else if tls {
        Some((Unreached::Tls, format!("TLS with {address} failed: {reason}")))
    } else if transport {
        Some((Unreached::Connect, format!("cannot connect to {address}: {reason}")))
    } else {
        None
    }
}

/// [`describe`] for a call to Central at `address` by an admin: a call that
/// never reached Central names the address and the reason, and a failed
/// TLS handshake says what to check.
pub fn describe_at(address: &str, status: &tonic::Status) -> String {
    match unreached(address, status) {
        Some((Unreached::Connect, line)) => line,
        Some((Unreached::Tls, line)) => format!("{line}; check that --ca is the CA that signed Central's certificate"),
        None => describe(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_servers_message_is_escaped() {
        let status = tonic::Status::not_found("gone\nWhat an admin can do:\u{1b}[2J");
        assert_eq!(describe(&status), "NotFound: gone\\nWhat an admin can do:\\u{1b}[2J");
    }

    #[test]
    fn a_call_that_never_reached_central_names_the_address_and_the_escaped_reason() {
        let mut refused = tonic::Status::unavailable("tcp connect error");
        refused.set_source(std::sync::Arc::new(std::io::Error::other("Connection refused\n- all is well")));
        assert_eq!(
            unreached("127.0.0.1:1", &refused),
            Some((Unreached::Connect, "cannot connect to 127.0.0.1:1: Connection refused\\n- all is well".to_owned()))
        );
        let mut tls = tonic::Status::unknown("transport error");
        tls.set_source(std::sync::Arc::new(std::io::Error::other("invalid peer certificate: UnknownIssuer")));
        assert_eq!(
            describe_at("central:443", &tls),
            "TLS with central:443 failed: invalid peer certificate: UnknownIssuer; \
             check that --ca is the CA that signed Central's certificate"
        );
        assert_eq!(unreached("central:443", &tonic::Status::not_found("no such probe")), None);
    }

    #[test]
    fn hosts_are_taken_from_addresses() {
        assert_eq!(host_of("localhost:8443").as_deref(), Some("localhost"));
        assert_eq!(host_of("[::1]:8443").as_deref(), Some("::1"));
        assert_eq!(host_of("localhost"), None);
        assert_eq!(host_of(":8443"), None);
        assert_eq!(host_of("host:port"), None);
    }

    #[test]
    fn a_ca_without_a_certificate_is_refused_before_any_connection() {
        let tls = ClientTls {
            ca_pem: b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n".to_vec(),
            identity: None,
        };
        let error = endpoint("127.0.0.1:8443", &tls, Duration::from_secs(1)).unwrap_err();
        assert_eq!(error.to_string(), "the CA certificate (--ca) given for 127.0.0.1:8443 holds no PEM certificate");
    }
}
