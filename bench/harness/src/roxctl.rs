//! `probe-bench roxctl-upload`: a support package uploaded the way the
//! product's unmodified `roxctl collector support-packages upload` does it,
//! for the benchmark of Central's product route: GetExistingProbes of
//! `v1.ProbeUploadService`, then one `POST /api/extensions/probeupload`
//! whose body is the serialized manifest followed by every new file's bytes,
//! streamed from the package as it is read.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use central_probes::admin::chunk_pool::ChunkPool;
use central_probes::admin::package::Package;
use hyper::body::{Body, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use probe_api::product::v1::probe_upload_manifest::File;
use probe_api::product::v1::probe_upload_service_client::ProbeUploadServiceClient;
use probe_api::product::v1::{GetExistingProbesRequest, ProbeUploadManifest};
use probe_api::transport::{self, ClientTls};
use prost::Message;
use rustls_pki_types::ServerName;
use tokio::sync::mpsc;

/// The request body: pieces of the package as a reading thread hands them on.
struct Streamed(mpsc::Receiver<Bytes>);

impl Body for Streamed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|piece| piece.map(|piece| Ok(Frame::data(piece))))
    }
}

/// Uploads `package` to Central at `address`; prints seconds, bytes sent,
/// the HTTP status and the files sent.
pub async fn upload(package: &Path, address: &str, ca_pem: Vec<u8>, token: &str) {
    let started = Instant::now();
    let mut opened = Package::open(package, &Default::default()).unwrap();
    let index = opened.index().unwrap();
    let entries: Vec<File> = index
        .probes
        .iter()
        .map(|probe| File { name: probe.path.to_string(), size: probe.size as i64, crc32: probe.crc32 })
        .collect();

    let tls = ClientTls { ca_pem: ca_pem.clone(), identity: None };
    let channel = transport::channel(address, &tls, Duration::from_secs(5)).unwrap();
    let mut client = ProbeUploadServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let mut request = tonic::Request::new(GetExistingProbesRequest {
        files_to_check: entries.iter().map(|entry| entry.name.clone()).collect(),
    });
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let existing = client.get_existing_probes(request).await.unwrap().into_inner().existing_files;
    let sending: Vec<usize> =
        (0..entries.len()).filter(|&i| !existing.iter().any(|e| e.name == entries[i].name)).collect();
    let manifest = ProbeUploadManifest { files: sending.iter().map(|&i| entries[i].clone()).collect() }.encode_to_vec();
    let length = manifest.len() as u64 + sending.iter().map(|&i| entries[i].size as u64).sum::<u64>();

    let (pieces, received) = mpsc::channel::<Bytes>(8);
    let first = Bytes::from(manifest.clone());
    let reader = std::thread::spawn(move || {
        if pieces.blocking_send(first).is_err() {
            return;
        }
        let mut pool = ChunkPool::new(1 << 20, 16);
        for i in sending {
            let probe = &index.probes[i];
            let sent = opened.read_entry(probe, &mut pool, |chunk| {
                pieces.blocking_send(chunk.into_bytes()).map_err(|_| std::io::Error::other("the upload ended"))
            });
            if sent.is_err() {
                return;
            }
        }
    });

    let mut config = crate::load::plain_tls_config(&ca_pem);
    config.alpn_protocols = vec![b"https://alpn.stackrox.io/#pure-grpc".to_vec(), b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host).to_owned();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(host).unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(transport::STREAM_WINDOW)
        .initial_connection_window_size(transport::CONNECTION_WINDOW)
        .handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request =
        hyper::Request::post(format!("https://{address}/api/extensions/probeupload?manifestLen={}", manifest.len()))
            .header("authorization", format!("Bearer {token}"))
            .header("content-length", length)
            .body(Streamed(received))
            .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let text = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
    reader.join().unwrap();
    let files = entries.len() - existing.len();
    println!("{:.2} {length} {} {files}", started.elapsed().as_secs_f64(), status.as_u16());
    if !status.is_success() {
        eprintln!("the upload failed: {status}: {}", String::from_utf8_lossy(&text));
        std::process::exit(1);
    }
}
