//! The floor of an upload's receive path on this machine: a server on the
//! same TLS (rustls, ring) and HTTP stack (hyper, with Central's HTTP/2
//! windows) as Central, that only reads request bodies, and with `--sha256`
//! also hashes them as Central does. A `curl -T` of the package into it,
//! timed in the sink's own CPU, is what receiving the bytes costs before
//! any gRPC decoding, store write or fsync; `bench/run.sh` measures it in
//! the same run as the upload.
//!
//! Each request is answered `200` with "<bytes> <sha256 or -> <HTTP version>"
//! once its body has been read, and the sink prints the same line on stdout.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use probe_api::digest::Sha256Hasher;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Serves until killed, printing "listening on ADDRESS" first.
pub async fn run(listen: &str, cert: &Path, key: &Path, sha256: bool) {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let mut config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(listen).await.unwrap();
    println!("listening on {}", listener.local_addr().unwrap());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(probe_api::transport::CONNECTION_WINDOW);
    let builder = Arc::new(builder);
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = tcp.set_nodelay(true);
        let (acceptor, builder) = (acceptor.clone(), builder.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let service = hyper::service::service_fn(move |request| drain(request, sha256));
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

async fn drain(request: Request<Incoming>, sha256: bool) -> Result<Response<Full<Bytes>>, Infallible> {
    let version = request.version();
    let mut body = request.into_body();
    let mut hasher = sha256.then(Sha256Hasher::new);
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            bytes += data.len() as u64;
            if let Some(hasher) = hasher.as_mut() {
                hasher.update(data);
            }
        }
    }
    let digest = hasher.map_or_else(|| "-".to_owned(), |h| h.finish().to_string());
    let line = format!("{bytes} {digest} {version:?}\n");
    print!("{line}");
    Ok(Response::new(Full::new(Bytes::from(line))))
}
