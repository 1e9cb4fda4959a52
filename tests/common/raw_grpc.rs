//! gRPC spoken by hand over HTTP/2 and TLS, as a client generated from
//! proto/ in any language (or a hostile one) puts it on the wire: any bytes
//! as a message, streams that are never read.

#![allow(dead_code)] // each test file uses a different part of it

use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::common::TestPki;

/// A raw HTTP/2 client over TLS, speaking gRPC by hand as a client
/// generated from proto/ in any language would put it on the wire.
pub async fn raw_http2(address: &str, pki: &TestPki, with_certificate: bool) -> h2::client::SendRequest<Bytes> {
    let tls = tls_connect(address, pki, with_certificate).await;
    // A small window: the client buffers little of what it never reads.
    drive_after_settings(16 * 1024, tls).await
}

/// A raw HTTP/2 client that grants no flow-control window to any stream
/// (SETTINGS_INITIAL_WINDOW_SIZE = 0 from its first frame, never a
/// WINDOW_UPDATE): the server may send headers, and not one byte of data.
pub async fn raw_http2_zero_window(
    address: &str,
    pki: &TestPki,
    with_certificate: bool,
) -> h2::client::SendRequest<Bytes> {
    let tls = tls_connect(address, pki, with_certificate).await;
    drive_after_settings(0, tls).await
}

/// Opens HTTP/2 with this stream window, hands the connection to a task
/// and returns once the server's SETTINGS have been applied. Until then h2
/// assumes no stream limit, so streams opened at once would all go out,
/// and the server would refuse those beyond its limit, then (past h2's
/// 1,024 refusals) close the connection with ENHANCE_YOUR_CALM. The server
/// sends SETTINGS before it reads anything, so once a PING's answer is
/// back, they have been applied.
async fn drive_after_settings(
    initial_window_size: u32,
    tls: tokio_rustls::client::TlsStream<TcpStream>,
) -> h2::client::SendRequest<Bytes> {
    let (sender, mut connection) =
        h2::client::Builder::new().initial_window_size(initial_window_size).handshake(tls).await.unwrap();
    let mut ping_pong = connection.ping_pong().expect("a new connection's ping_pong");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    ping_pong.ping(h2::Ping::opaque()).await.unwrap();
    sender.ready().await.unwrap()
}

/// An HTTP/2 connection whose connection half nobody drives: after the
/// preface it neither reads nor answers anything until the caller polls it.
pub async fn raw_http2_undriven(
    address: &str,
    pki: &TestPki,
) -> (h2::client::SendRequest<Bytes>, h2::client::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>) {
    let tls = tls_connect(address, pki, true).await;
    h2::client::handshake(tls).await.unwrap()
}

/// A TLS connection with the Collector's certificate and nothing spoken on
/// it yet.
pub async fn raw_tls(address: &str, pki: &TestPki) -> tokio_rustls::client::TlsStream<TcpStream> {
    tls_connect(address, pki, true).await
}

async fn tls_connect(
    address: &str,
    pki: &TestPki,
    with_certificate: bool,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    central_probes::server::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(pki.ca.cert_pem.as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = if with_certificate {
        let cert = CertificateDer::from_pem_slice(pki.collector.cert_pem.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(pki.collector.key_pem.as_bytes()).unwrap();
        builder.with_client_auth_cert(vec![cert], key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(address).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// A gRPC message frame: no compression, length, message.
pub fn grpc_frame(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Bytes::from(frame)
}

/// One gRPC call made by hand: `body` as the request (any bytes), the
/// status the server ends it with.
pub async fn raw_grpc_call(
    sender: &h2::client::SendRequest<Bytes>,
    method: &str,
    token: Option<&str>,
    body: Bytes,
) -> tonic::Status {
    let (response, _stream) = send_grpc_request(sender, method, token, body, true).await;
    grpc_status(response).await
}

/// Starts a gRPC call by hand and sends `body` without ending the request:
/// the answer to come, and the request stream, to send more on, reset, or
/// leave silent.
pub async fn start_grpc_call(
    sender: &h2::client::SendRequest<Bytes>,
    method: &str,
    token: Option<&str>,
    body: Bytes,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    send_grpc_request(sender, method, token, body, false).await
}

async fn send_grpc_request(
    sender: &h2::client::SendRequest<Bytes>,
    method: &str,
    token: Option<&str>,
    body: Bytes,
    end_of_stream: bool,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let mut request = http::Request::post(format!("https://localhost{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut sender = sender.clone().ready().await.unwrap();
    let (response, mut stream) = sender.send_request(request.body(()).unwrap(), false).unwrap();
    stream.send_data(body, end_of_stream).unwrap();
    (response, stream)
}

/// The status a call started by `start_grpc_call` ends with.
pub async fn grpc_status(response: h2::client::ResponseFuture) -> tonic::Status {
    let response = response.await.unwrap();
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    tonic::Status::from_header_map(&trailers).expect("a grpc-status in the trailers")
}

/// Sends `body` on `stream` as the server's flow-control window allows:
/// once the last byte is granted a window, the server has taken in all of
/// it but at most its receive window.
pub async fn send_as_window_allows(stream: &mut h2::SendStream<Bytes>, mut body: Bytes) {
    while !body.is_empty() {
        stream.reserve_capacity(body.len());
        let capacity = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await.unwrap().unwrap();
        stream.send_data(body.split_to(capacity.min(body.len())), false).unwrap();
    }
}
