//! HTTPS/1.1 to registries with connections kept and reused.
//!
//! `probe_api::https` opens one connection per request, which suits a probe
//! fetched once; a push makes three requests per blob for up to ~16,000
//! blobs, where a TLS handshake each would cost more than the transfer.
//! So this keeps a small pool of idle HTTP/1.1 connections per host: a
//! connection goes back to the pool only once its answer was read to the
//! end (hyper closes one whose body was dropped unread), and is taken again
//! only if hyper says it is ready. Proxies are reached as `probe_api::https`
//! reaches them (`HTTPS_PROXY`/`NO_PROXY`, CONNECT tunnels). hyper-util's
//! pooled client would do the same but needs a connector type of its own
//! around the TLS stream and the proxy tunnel; this is shorter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use probe_api::client_tls::ClientTls;
use probe_api::https::{HttpsUrl, ProxySettings, tls_connector};
use tokio::net::TcpStream;

use super::error::{OciResult, invalid, unavailable};

/// Idle connections kept per host.
const MAX_IDLE_PER_HOST: usize = 32;

type Sender = SendRequest<Full<Bytes>>;

/// TLS, proxies, timeouts and the pool of idle connections.
#[derive(Clone)]
pub struct Connections {
    tls: tokio_rustls::TlsConnector,
    proxies: ProxySettings,
    connect_timeout: Duration,
    /// How long to wait for the head of an answer.
    answer_timeout: Duration,
    idle: Arc<Mutex<HashMap<String, Vec<Sender>>>>,
}

impl Connections {
    /// Trusting the CA certificates in `ca_pem`.
    pub fn new(
        ca_pem: &[u8],
        proxies: ProxySettings,
        connect_timeout: Duration,
        answer_timeout: Duration,
    ) -> OciResult<Self> {
        let tls = ClientTls { ca_pem: ca_pem.to_vec(), identity: None };
        let tls = tls_connector(&tls).map_err(|e| invalid(format!("the registry CA: {e}")))?;
        Ok(Connections { tls, proxies, connect_timeout, answer_timeout, idle: Default::default() })
    }

    /// Sends `request` to `url`'s host and returns the answer's head; its
    /// body is read through the `Answer`.
    pub async fn send(&self, url: &HttpsUrl, request: Request<Full<Bytes>>) -> OciResult<Answer> {
        let key = format!("{}:{}", url.host, url.port);
        let mut sender = match self.idle_sender(&key).await {
            Some(sender) => sender,
            None => self.connect(url).await?,
        };
        let what = format!("{} {url}", request.method());
        let response = tokio::time::timeout(self.answer_timeout, sender.send_request(request))
            .await
            .map_err(|_| unavailable(format!("{what}: no answer within {:?}", self.answer_timeout)))?
            .map_err(|e| unavailable(format!("{what}: {e}")))?;
        let (head, body) = response.into_parts();
        Ok(Answer {
            status: head.status,
            headers: head.headers,
            body,
            idle_timeout: self.answer_timeout,
            lease: Lease { sender: Some(sender), key, idle: self.idle.clone(), ended: false },
        })
    }

    async fn idle_sender(&self, key: &str) -> Option<Sender> {
        loop {
            let mut sender = self.idle.lock().unwrap_or_else(|p| p.into_inner()).get_mut(key)?.pop()?;
            if sender.is_closed() {
                continue;
            }
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), sender.ready()).await {
                return Some(sender);
            }
        }
    }

    async fn connect(&self, url: &HttpsUrl) -> OciResult<Sender> {
        let authority = format!("{}:{}", url.host, url.port);
        let tcp = tokio::time::timeout(self.connect_timeout, async {
            match self.proxies.for_host(&url.host) {
                Some(proxy) => proxy.tunnel_to(&url.host, url.port).await.map_err(|e| unavailable(e.to_string())),
                None => {
                    let tcp = TcpStream::connect((url.host.as_str(), url.port))
                        .await
                        .map_err(|e| unavailable(format!("connecting to {authority}: {e}")))?;
                    let _ = tcp.set_nodelay(true);
                    Ok(tcp)
                }
            }
        })
        .await
        .map_err(|_| unavailable(format!("connecting to {authority} took over {:?}", self.connect_timeout)))??;
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| invalid(format!("{}: not a TLS server name: {e}", url.host)))?;
        let tls = tokio::time::timeout(self.connect_timeout, self.tls.connect(name, tcp))
            .await
            .map_err(|_| unavailable(format!("the TLS handshake with {authority} took over {:?}", self.connect_timeout)))?
            .map_err(|e| {
                unavailable(format!("the TLS handshake with {authority}: {e} (is the registry's CA given with --registry-ca or --upstream-ca?)"))
            })?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unavailable(format!("HTTP with {authority}: {e}")))?;
        tokio::spawn(connection);
        Ok(sender)
    }
}

/// A connection lent to one request: back into the pool once the answer
/// was read to the end.
struct Lease {
    sender: Option<Sender>,
    key: String,
    idle: Arc<Mutex<HashMap<String, Vec<Sender>>>>,
    ended: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let (true, Some(sender)) = (self.ended, self.sender.take()) {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let senders = idle.entry(std::mem::take(&mut self.key)).or_default();
            if senders.len() < MAX_IDLE_PER_HOST {
                senders.push(sender);
            }
        }
    }
}

/// An answer whose body is still to be read.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    /// The longest wait for the next piece of the body: a registry that
    /// stalls mid-blob fails the read instead of holding it forever.
    idle_timeout: Duration,
    lease: Lease,
}

impl Answer {
    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> OciResult<Option<Bytes>> {
        let stalled = || unavailable(format!("an answer stalled for over {:?}", self.idle_timeout));
        while let Some(frame) =
            tokio::time::timeout(self.idle_timeout, self.body.frame()).await.map_err(|_| stalled())?
        {
            let frame = frame.map_err(|e| unavailable(format!("reading an answer: {e}")))?;
            if let Ok(data) = frame.into_data()
                && !data.is_empty()
            {
                return Ok(Some(data));
            }
        }
        self.lease.ended = true;
        Ok(None)
    }

    /// The whole body, or an error past `max` bytes (`what` names it).
    pub async fn bytes(mut self, max: usize, what: &str) -> OciResult<Vec<u8>> {
        let mut bytes = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            if bytes.len() + chunk.len() > max {
                return Err(invalid(format!("{what} is over {max} bytes")));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// The body as text for an error message (at most a few KiB, escaped).
    pub async fn error_text(self) -> String {
        let text = self.bytes(8 << 10, "an error answer").await.unwrap_or_default();
        probe_api::errors::remote_text(String::from_utf8_lossy(&text).trim())
    }

    /// A header as text, if present and printable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}
