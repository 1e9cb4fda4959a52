//! The clients of one load run: gRPC GetProbe (Central) through tonic, or
//! as plain HTTP/2 requests (the gRPC frame sent, the reply's bytes counted
//! and its grpc-status checked, no protobuf decoded: the HTTPS client's
//! work) through hyper or through h2 itself, or HTTPS GET (nginx, Central's
//! route), each on its own connection or a new one per request, and the
//! loop that drives N of them for a fixed time and reports rate and latency.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use probe_api::transport::{self, ClientTls};
use probe_api::v1::GetProbeRequest;
use probe_api::v1::probe_service_client::ProbeServiceClient;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Tls;

pub(crate) fn rustls_config(tls: &Tls) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&tls.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&tls.cert).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(&tls.key).unwrap();
    let mut config =
        rustls::ClientConfig::builder().with_root_certificates(roots).with_client_auth_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// A TLS client trusting the CA `ca_pem`, presenting no certificate (an
/// admin tool with a token).
pub(crate) fn plain_tls_config(ca_pem: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth()
}

pub(crate) enum Client {
    Grpc {
        address: String,
        tls: ClientTls,
    },
    /// GetProbe over the HTTP/2 client of `Https`.
    GrpcPlain {
        address: String,
        config: Arc<rustls::ClientConfig>,
    },
    /// GetProbe over h2 itself.
    GrpcH2 {
        address: String,
        config: Arc<rustls::ClientConfig>,
    },
    Https {
        address: String,
        config: Arc<rustls::ClientConfig>,
    },
}

/// One connection's worth of client: reused, or made anew per request.
pub(crate) enum Connection {
    Grpc(ProbeServiceClient<tonic::transport::Channel>),
    Http2 { sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>, grpc: bool },
    H2(h2::client::SendRequest<Bytes>),
}

/// The path of GetProbe as an HTTP/2 request.
const GET_PROBE: &str = "kprobes.v1.ProbeService/GetProbe";

impl Client {
    pub(crate) async fn connect(&self) -> Result<Connection, String> {
        match self {
            Client::Grpc { address, tls } => {
                // Connect now, so a per-request connection is timed in full.
                let endpoint = transport::endpoint(address, tls, Duration::from_secs(5)).map_err(|e| e.to_string())?;
                let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
                Ok(Connection::Grpc(ProbeServiceClient::new(channel)))
            }
            Client::GrpcH2 { address, config } => {
                let tls = tls_connect(address, config).await?;
                let (sender, connection) = h2::client::Builder::new()
                    .initial_window_size(transport::STREAM_WINDOW)
                    .initial_connection_window_size(transport::CONNECTION_WINDOW)
                    .handshake(tls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                Ok(Connection::H2(sender))
            }
            Client::GrpcPlain { address, config } | Client::Https { address, config } => {
                let tls = tls_connect(address, config).await?;
                let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .initial_stream_window_size(transport::STREAM_WINDOW)
                    .initial_connection_window_size(transport::CONNECTION_WINDOW)
                    .handshake(TokioIo::new(tls))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                Ok(Connection::Http2 { sender, grpc: matches!(self, Client::GrpcPlain { .. }) })
            }
        }
    }
}

async fn tls_connect(
    address: &str,
    config: &Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(address).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h).to_owned();
    let name = ServerName::try_from(host).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await.map_err(|e| e.to_string())
}

/// The gRPC message frame of a GetProbe request for `path`.
fn get_probe_frame(path: &str) -> Result<Vec<u8>, String> {
    let (module_version, file_name) = path.split_once('/').ok_or("bad path")?;
    let message = GetProbeRequest { module_version: module_version.to_owned(), file_name: file_name.to_owned() };
    let encoded = prost::Message::encode_to_vec(&message);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    frame.extend_from_slice(&encoded);
    Ok(frame)
}

/// The HEADERS of a GetProbe call, with `body`.
fn get_probe_request<B>(address: &str, body: B) -> Result<hyper::Request<B>, String> {
    hyper::Request::post(format!("https://{address}/{GET_PROBE}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .map_err(|e| e.to_string())
}

/// A call's `grpc-status` (from its trailers, or from its headers when it
/// had no body): an error unless it is OK.
fn check_grpc_status(grpc_status: Option<Vec<u8>>) -> Result<(), String> {
    if grpc_status.as_deref() == Some(b"0") {
        return Ok(());
    }
    Err(format!("grpc-status {:?}", grpc_status.map(|s| String::from_utf8_lossy(&s).into_owned())))
}

impl Connection {
    /// Fetches one probe; returns its size.
    pub(crate) async fn get(&mut self, path: &str, address: &str) -> Result<u64, String> {
        match self {
            Connection::Grpc(client) => {
                let (module_version, file_name) = path.split_once('/').ok_or("bad path")?;
                let request =
                    GetProbeRequest { module_version: module_version.to_owned(), file_name: file_name.to_owned() };
                let mut stream = client.get_probe(request).await.map_err(|s| s.to_string())?.into_inner();
                let mut bytes = 0;
                while let Some(message) = stream.message().await.map_err(|s| s.to_string())? {
                    if let Some(probe_api::v1::get_probe_response::Message::Chunk(chunk)) = message.message {
                        bytes += chunk.len() as u64;
                    }
                }
                Ok(bytes)
            }
            Connection::H2(sender) => {
                let mut sender = sender.clone().ready().await.map_err(|e| e.to_string())?;
                let frame = get_probe_frame(path)?;
                let request = get_probe_request(address, ())?;
                let (response, mut stream) = sender.send_request(request, false).map_err(|e| e.to_string())?;
                // Queued before the connection task writes the HEADERS, so h2
                // almost always sends both in one flush.
                stream.send_data(Bytes::from(frame), true).map_err(|e| e.to_string())?;
                let response = response.await.map_err(|e| e.to_string())?;
                if !response.status().is_success() {
                    return Err(format!("HTTP {}", response.status()));
                }
                let mut grpc_status = response.headers().get("grpc-status").map(|v| v.as_bytes().to_vec());
                let mut body = response.into_body();
                let mut bytes = 0;
                while let Some(data) = body.data().await {
                    let data = data.map_err(|e| e.to_string())?;
                    bytes += data.len() as u64;
                    let _ = body.flow_control().release_capacity(data.len());
                }
                if let Some(trailers) = body.trailers().await.map_err(|e| e.to_string())? {
                    grpc_status = trailers.get("grpc-status").map(|v| v.as_bytes().to_vec());
                }
                check_grpc_status(grpc_status)?;
                Ok(bytes)
            }
            Connection::Http2 { sender, grpc } => {
                sender.ready().await.map_err(|e| e.to_string())?;
                let request = if *grpc {
                    get_probe_request(address, Full::new(Bytes::from(get_probe_frame(path)?)))?
                } else {
                    hyper::Request::get(format!("https://{address}/{path}"))
                        .body(Full::new(Bytes::new()))
                        .map_err(|e| e.to_string())?
                };
                let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
                if !response.status().is_success() {
                    return Err(format!("HTTP {}", response.status()));
                }
                // An error without bytes comes as headers only ("Trailers-Only").
                let mut grpc_status = response.headers().get("grpc-status").map(|v| v.as_bytes().to_vec());
                let mut body = response.into_body();
                let mut bytes = 0;
                while let Some(frame) = body.frame().await {
                    match frame.map_err(|e| e.to_string())?.into_data() {
                        Ok(data) => bytes += data.len() as u64,
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                grpc_status = trailers.get("grpc-status").map(|v| v.as_bytes().to_vec());
                            }
                        }
                    }
                }
                if *grpc {
                    check_grpc_status(grpc_status)?;
                }
                Ok(bytes)
            }
        }
    }
}

pub(crate) async fn load(
    client: Arc<Client>,
    paths: Arc<Vec<String>>,
    concurrency: usize,
    seconds: u64,
    per_request: bool,
    each_once: bool,
) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let address = match &*client {
        Client::Grpc { address, .. }
        | Client::GrpcPlain { address, .. }
        | Client::GrpcH2 { address, .. }
        | Client::Https { address, .. } => address.clone(),
    };
    let bytes = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let (client, paths, bytes, errors, address, next) =
            (client.clone(), paths.clone(), bytes.clone(), errors.clone(), address.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (worker as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd);
            let mut connection = None;
            while each_once || Instant::now() < deadline {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let path = if each_once {
                    match paths.get(next.fetch_add(1, Ordering::Relaxed)) {
                        Some(path) => path,
                        None => break,
                    }
                } else {
                    &paths[(state % paths.len() as u64) as usize]
                };
                let begun = Instant::now();
                if per_request || connection.is_none() {
                    connection = client.connect().await.map_err(|e| eprintln!("connect: {e}")).ok();
                }
                let Some(open) = connection.as_mut() else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                match open.get(path, &address).await {
                    Ok(n) => {
                        latencies.push(begun.elapsed());
                        bytes.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("request: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                        connection = None;
                    }
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)));
    let ms = |d: Option<&Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    // One machine-readable line: requests/s MB/s p50_ms p99_ms errors
    println!(
        "{:.0} {:.0} {:.2} {:.2} {}",
        latencies.len() as f64 / elapsed,
        bytes.load(Ordering::Relaxed) as f64 / elapsed / 1e6,
        ms(pct(0.50)),
        ms(pct(0.99)),
        errors.load(Ordering::Relaxed)
    );
}
