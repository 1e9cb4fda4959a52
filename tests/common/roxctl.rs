//! The product's `roxctl collector support-packages upload` as it puts its
//! calls on the wire, built from the bytes its source sends (not from our
//! admin client): TLS offering roxctl's ALPN list, `v1.ProbeUploadService`
//! GetExistingProbes over HTTP/2 gRPC or as its HTTP/1.1 downgrade asks for
//! it, and `POST /api/extensions/probeupload?manifestLen=N` with the
//! serialized manifest followed by every file's bytes, over HTTP/2 or
//! HTTP/1.1.

#![allow(dead_code)] // each test file uses a different part of it

use std::sync::Arc;

use bytes::{Buf, Bytes};
use probe_api::product::v1::probe_upload_manifest::File;
use probe_api::product::v1::{GetExistingProbesRequest, GetExistingProbesResponse, ProbeUploadManifest};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::common::TestPki;
use crate::raw_grpc::grpc_frame;

/// What roxctl offers in ALPN: the product's name for HTTP/2 first.
pub const ROXCTL_ALPN: &[&[u8]] = &[b"https://alpn.stackrox.io/#pure-grpc", b"h2", b"http/1.1"];
/// What the HTTP/1.1 downgrade (`--force-http1`) and the upload route offer.
pub const HTTP1_ALPN: &[&[u8]] = &[b"http/1.1"];

/// A TLS connection to `address` with `alpn` offered and no client
/// certificate (roxctl authenticates with its token), verifying Central
/// under `server_name`.
pub async fn connect(address: &str, pki: &TestPki, alpn: &[&[u8]], server_name: &str) -> TlsStream<TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    central_probes::server::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(pki.ca.cert_pem.as_bytes()).unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(address).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(server_name.to_owned()).unwrap(), tcp)
        .await
        .unwrap()
}

/// The ALPN protocol Central selected.
pub fn selected_alpn(tls: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    tls.get_ref().1.alpn_protocol().map(|p| p.to_vec())
}

/// HTTP/2 over a connection offering roxctl's ALPN list.
pub async fn http2(address: &str, pki: &TestPki) -> h2::client::SendRequest<Bytes> {
    let tls = connect(address, pki, ROXCTL_ALPN, "localhost").await;
    let (sender, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.ready().await.unwrap()
}

/// A package file as roxctl lists it: its manifest entry and its bytes.
#[derive(Clone)]
pub struct PackageFile {
    pub name: String,
    pub bytes: Bytes,
}

impl PackageFile {
    pub fn new(name: &str, bytes: Vec<u8>) -> Self {
        PackageFile { name: name.to_owned(), bytes: Bytes::from(bytes) }
    }

    /// Its manifest entry: size and the zip directory's CRC-32.
    pub fn entry(&self) -> File {
        File { name: self.name.clone(), size: self.bytes.len() as i64, crc32: crc32fast::hash(&self.bytes) }
    }
}

/// The serialized manifest of `files`.
pub fn manifest(entries: Vec<File>) -> Vec<u8> {
    ProbeUploadManifest { files: entries }.encode_to_vec()
}

/// What roxctl decides per file, from GetExistingProbes: the files to send
/// (new ones, and with `overwrite` those whose size or CRC-32 differ).
pub fn to_send(files: &[PackageFile], existing: &[File], overwrite: bool) -> Vec<PackageFile> {
    files
        .iter()
        .filter(|file| match existing.iter().find(|e| e.name == file.name) {
            None => true,
            Some(stored) => overwrite && *stored != file.entry(),
        })
        .cloned()
        .collect()
}

/// gRPC `v1.ProbeUploadService/GetExistingProbes` over HTTP/2, with roxctl's
/// headers; the answer or its status.
pub async fn get_existing(
    sender: &h2::client::SendRequest<Bytes>,
    token: Option<&str>,
    names: &[&str],
) -> Result<Vec<File>, tonic::Status> {
    let mut request = http::Request::post("https://localhost/v1.ProbeUploadService/GetExistingProbes")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "10S");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut sender = sender.clone().ready().await.unwrap();
    let (response, mut stream) = sender.send_request(request.body(()).unwrap(), false).unwrap();
    stream.send_data(request_frame(names), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200, "gRPC answers in HTTP 200");
    if let Some(status) = tonic::Status::from_header_map(response.headers())
        && status.code() != tonic::Code::Ok
    {
        return Err(status);
    }
    let mut body = response.into_body();
    let mut received = Vec::new();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
        received.extend_from_slice(&data);
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    let status = tonic::Status::from_header_map(&trailers).expect("a grpc-status in the trailers");
    if status.code() != tonic::Code::Ok {
        return Err(status);
    }
    Ok(GetExistingProbesResponse::decode(&received[5..]).unwrap().existing_files)
}

/// The request message of GetExistingProbes in its gRPC frame.
fn request_frame(names: &[&str]) -> Bytes {
    grpc_frame(&GetExistingProbesRequest { files_to_check: names.iter().map(|n| n.to_string()).collect() })
}

/// GetExistingProbes as `roxctl --force-http1` sends it: gRPC over
/// HTTP/1.1 with `Accept: application/grpc-web` and `Grpc-Web-Only: true`;
/// the HTTP status, the content type, and the answer or its status from the
/// gRPC-web trailer frame.
pub async fn get_existing_http1(
    address: &str,
    pki: &TestPki,
    token: Option<&str>,
    names: &[&str],
) -> (u16, String, Result<Vec<File>, tonic::Status>) {
    let body = request_frame(names);
    let mut head = format!(
        "POST /v1.ProbeUploadService/GetExistingProbes HTTP/1.1\r\nHost: localhost\r\nContent-Type: \
         application/grpc\r\nAccept: application/grpc\r\nAccept: application/grpc-web\r\nGrpc-Web-Only: \
         true\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    let tls = connect(address, pki, HTTP1_ALPN, "localhost").await;
    let (status, headers, answer) = http1_exchange(tls, head.as_bytes(), Box::new(std::iter::once(body))).await;
    let content_type = header_of(&headers, "content-type");
    let mut answer = Bytes::from(answer);
    let mut message = None;
    let mut trailer = None;
    while answer.remaining() >= 5 {
        let flag = answer.get_u8();
        let len = answer.get_u32() as usize;
        let frame = answer.split_to(len);
        if flag & 0x80 != 0 {
            trailer = Some(String::from_utf8(frame.to_vec()).unwrap());
        } else {
            message = Some(frame);
        }
    }
    let trailer = trailer.expect("a gRPC-web trailer frame");
    let mut trailers = http::HeaderMap::new();
    for line in trailer.split("\r\n").filter(|line| !line.is_empty()) {
        let (name, value) = line.split_once(':').unwrap();
        trailers.insert(http::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(), value.trim().parse().unwrap());
    }
    let grpc = tonic::Status::from_header_map(&trailers).expect("grpc-status in the trailer frame");
    let result = if grpc.code() == tonic::Code::Ok {
        Ok(GetExistingProbesResponse::decode(message.unwrap_or_default()).unwrap().existing_files)
    } else {
        Err(grpc)
    };
    (status, content_type, result)
}

/// How an upload is put on the wire.
pub struct Upload<'a> {
    pub token: Option<&'a str>,
    /// The `manifestLen` of the query; the manifest's own length if `None`.
    pub manifest_len: Option<usize>,
    pub manifest: Vec<u8>,
    /// What follows the manifest, in pieces as they are sent (made as they
    /// are sent, so that a large upload is never held whole).
    pub body: Box<dyn Iterator<Item = Bytes> + Send>,
    /// The bytes `body` yields.
    pub body_len: u64,
    pub length: Length,
    pub method: &'static str,
}

/// The Content-Length an upload declares.
pub enum Length {
    /// Manifest plus body, as roxctl sends it.
    True,
    /// This many bytes, whatever is sent.
    Claimed(u64),
    /// None at all (HTTP/2 without the header; chunked over HTTP/1.1).
    Absent,
}

impl<'a> Upload<'a> {
    /// roxctl's upload of `files` with `token`.
    pub fn of(token: &'a str, files: &[PackageFile]) -> Self {
        let upload = Upload {
            token: Some(token),
            manifest_len: None,
            manifest: manifest(files.iter().map(PackageFile::entry).collect()),
            body: Box::new(std::iter::empty()),
            body_len: 0,
            length: Length::True,
            method: "POST",
        };
        upload.with_body(files.iter().map(|file| file.bytes.clone()).collect())
    }

    /// This upload with `pieces` after the manifest instead.
    pub fn with_body(self, pieces: Vec<Bytes>) -> Self {
        let body_len = pieces.iter().map(|piece| piece.len() as u64).sum();
        Upload { body: Box::new(pieces.into_iter()), body_len, ..self }
    }

    fn path(&self) -> String {
        format!("/api/extensions/probeupload?manifestLen={}", self.manifest_len.unwrap_or(self.manifest.len()))
    }

    fn content_length(&self) -> Option<u64> {
        let true_length = self.manifest.len() as u64 + self.body_len;
        match self.length {
            Length::True => Some(true_length),
            Length::Claimed(length) => Some(length),
            Length::Absent => None,
        }
    }
}

/// The upload over HTTP/2; the HTTP status and the answer's text.
pub async fn upload_http2(sender: &h2::client::SendRequest<Bytes>, upload: Upload<'_>) -> (u16, String) {
    let mut request = http::Request::builder().method(upload.method).uri(format!("https://localhost{}", upload.path()));
    if let Some(token) = upload.token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if let Some(length) = upload.content_length() {
        request = request.header("content-length", length);
    }
    let mut sender = sender.clone().ready().await.unwrap();
    let (response, mut stream) = sender.send_request(request.body(()).unwrap(), false).unwrap();
    let pieces = std::iter::once(Bytes::from(upload.manifest)).chain(upload.body);
    // Sent as the window allows, while the answer may already come (an
    // upload refused early is answered before its body is all sent).
    let sending = async move {
        for piece in pieces {
            let mut piece = piece;
            while !piece.is_empty() {
                stream.reserve_capacity(piece.len().min(1 << 20));
                let Some(Ok(capacity)) = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await else {
                    return;
                };
                if stream.send_data(piece.split_to(capacity.min(piece.len())), false).is_err() {
                    return;
                }
            }
        }
        let _ = stream.send_data(Bytes::new(), true);
    };
    let sender_task = tokio::spawn(sending);
    let answered = answer(response).await;
    sender_task.abort();
    answered
}

/// The upload over HTTP/1.1 (roxctl's HTTP client when Central selects
/// http/1.1); chunked when no length is declared.
pub async fn upload_http1(address: &str, pki: &TestPki, upload: Upload<'_>) -> (u16, String) {
    let mut head = format!("{} {} HTTP/1.1\r\nHost: localhost\r\n", upload.method, upload.path());
    if let Some(token) = upload.token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let chunked = upload.content_length().is_none();
    match upload.content_length() {
        Some(length) => head.push_str(&format!("Content-Length: {length}\r\n")),
        None => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    head.push_str("\r\n");
    let pieces = std::iter::once(Bytes::from(upload.manifest)).chain(upload.body);
    let pieces: Box<dyn Iterator<Item = Bytes> + Send> = if chunked {
        Box::new(
            pieces
                .filter(|piece| !piece.is_empty())
                .flat_map(|piece| [Bytes::from(format!("{:x}\r\n", piece.len())), piece, Bytes::from_static(b"\r\n")])
                .chain([Bytes::from_static(b"0\r\n\r\n")]),
        )
    } else {
        Box::new(pieces)
    };
    let tls = connect(address, pki, HTTP1_ALPN, "localhost").await;
    let (status, _, body) = http1_exchange(tls, head.as_bytes(), pieces).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Sends one HTTP/1.1 request (writing while reading, so that an early
/// answer is read), returns the status, the head's lines and the body
/// (read to the end of the connection or of Content-Length).
async fn http1_exchange(
    tls: TlsStream<TcpStream>,
    head: &[u8],
    body: Box<dyn Iterator<Item = Bytes> + Send>,
) -> (u16, Vec<String>, Vec<u8>) {
    let (mut reader, mut writer) = tokio::io::split(tls);
    let head = head.to_vec();
    let writing = tokio::spawn(async move {
        writer.write_all(&head).await?;
        for piece in body {
            writer.write_all(&piece).await?;
        }
        writer.flush().await?;
        Ok::<_, std::io::Error>(writer)
    });
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 64 << 10];
    let (status, headers, body_start) = loop {
        let n = reader.read(&mut buffer).await.unwrap();
        assert!(n > 0, "the connection closed before an answer: {:?}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buffer[..n]);
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).into_owned();
            let mut lines = head.split("\r\n").map(str::to_owned);
            let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse::<u16>().unwrap();
            break (status, lines.collect::<Vec<_>>(), end + 4);
        }
    };
    let mut answer = received[body_start..].to_vec();
    let length: Option<usize> = header_of(&headers, "content-length").parse().ok();
    let chunked = header_of(&headers, "transfer-encoding").eq_ignore_ascii_case("chunked");
    loop {
        if length.is_some_and(|length| answer.len() >= length) || (chunked && answer.ends_with(b"0\r\n\r\n")) {
            break;
        }
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
        }
    }
    writing.abort();
    if chunked {
        answer = dechunk(&answer);
    }
    (status, headers, answer)
}

fn header_of(headers: &[String], name: &str) -> String {
    headers
        .iter()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
        })
        .unwrap_or_default()
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&body[..end]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&body[end + 2..end + 2 + size]);
        body = &body[end + 2 + size + 2..];
    }
    out
}

/// Starts roxctl's upload of `files` over HTTP/2, as `upload_http2` does,
/// but sends only the manifest and `sent` of the files' bytes and leaves the
/// request open: the answer to come, and the stream, to send more on or to
/// leave silent.
pub async fn start_upload_http2(
    sender: &h2::client::SendRequest<Bytes>,
    token: &str,
    files: &[PackageFile],
    sent: Bytes,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let upload = Upload::of(token, files);
    let request = http::Request::post(format!("https://localhost{}", upload.path()))
        .header("authorization", format!("Bearer {token}"))
        .header("content-length", upload.content_length().expect("roxctl's length"));
    let mut sender = sender.clone().ready().await.unwrap();
    let (response, mut stream) = sender.send_request(request.body(()).unwrap(), false).unwrap();
    stream.send_data([Bytes::from(upload.manifest), sent].concat().into(), false).unwrap();
    (response, stream)
}

/// The HTTP status and text of an answer of the upload route.
pub async fn answer(response: h2::client::ResponseFuture) -> (u16, String) {
    let response = response.await.unwrap();
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
        text.extend_from_slice(&data);
    }
    (status, String::from_utf8_lossy(&text).into_owned())
}
