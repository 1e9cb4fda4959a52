//! A static HTTPS probe bucket as the upstream, laid out as
//! `<base URL>/<module version>/<file name>` (the product's
//! `ROX_COLLECTOR_MODULES_BASE_URL`), optionally with `<file name>.sha256`
//! beside each file.
//!
//! Such a source sends no digest of its own, so before a file is cached
//! Central checks what it can: the declared length against the size limit
//! and against the bytes that came; that the bytes are one complete, valid
//! gzip stream (inflated with a bound as they arrive, the output thrown
//! away); and the SHA-256 in `<file name>.sha256` when the bucket has one.
//! A `<file name>.minisig` beside it is the probe's signature, cached with
//! it (and checked by a Central with trusted keys).
//! 404 is a miss; any other failure is UNAVAILABLE and caches nothing.

use std::io::Write;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use probe_api::digest::{Sha256Digest, Sha256Hasher};
use probe_api::errors::remote_text;
use probe_api::https::{HttpsClient, HttpsUrl};
use probe_api::limits::MAX_FILE_SIZE;
use probe_api::names::ProbePath;
use probe_api::signing::{MAX_SIGNATURE_LEN, SIGNATURE_SUFFIX};
use tonic::Code;

use crate::error::{Error, Result};
use crate::store::{ExpectedDigests, ProbeStore};

/// The most a probe may inflate to while it is checked. Probes are eBPF
/// objects and kernel modules of a few MB; a gzip bomb stops here.
const MAX_INFLATED: u64 = 1 << 30;

/// The largest `.sha256` file read.
const MAX_DIGEST_FILE: usize = 4096;

/// A bucket of probe files over HTTPS.
#[derive(Clone)]
pub struct Bucket {
    client: HttpsClient,
    base: HttpsUrl,
}

impl Bucket {
    pub fn new(client: HttpsClient, base: HttpsUrl) -> Self {
        Bucket { client, base }
    }

    /// Fetches `path` into `cache`: its size, or `None` when the bucket
    /// does not have it.
    pub async fn fetch(&self, path: &ProbePath, cache: &dyn ProbeStore) -> Result<Option<u64>> {
        let url = self.base.join(&path.to_string());
        let digest_url = self.base.join(&format!("{path}.sha256"));
        let signature_url = self.base.join(&format!("{path}{SIGNATURE_SUFFIX}"));
        let (file, digest, signature) = tokio::join!(
            self.get(&url),
            self.published_digest(&digest_url),
            self.small_file(&signature_url, MAX_SIGNATURE_LEN, "a minisign signature")
        );
        let mut response = file?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::GONE => return Ok(None),
            status => return Err(unavailable(format!("{url} answered {status}"))),
        }
        let published = digest?;
        let size = content_length(&response, &url)?;
        let mut writer = cache.create(path.clone(), size).await?;
        if let Some(signature) = signature? {
            writer.set_signature(signature.into());
        }
        let mut gzip = GzipCheck::new();
        let mut hasher = Sha256Hasher::new();
        let mut received = 0u64;
        while let Some(frame) = response.body_mut().frame().await {
            let frame = frame.map_err(|e| unavailable(format!("reading {url}: {e}")))?;
            let Ok(chunk) = frame.into_data() else { continue };
            received += chunk.len() as u64;
            if received > size {
                return Err(unavailable(format!("{url} sent more than its Content-Length of {size} bytes")));
            }
            gzip.write(&chunk).map_err(|why| unavailable(format!("{url} is not a valid gzip file: {why}")))?;
            hasher.update(&chunk);
            writer.write(chunk).await?;
        }
        if received < size {
            return Err(unavailable(format!("{url} ended after {received} of its {size} bytes")));
        }
        gzip.finish().map_err(|why| unavailable(format!("{url} is not a complete gzip file: {why}")))?;
        // Without a published digest, the one computed here still makes the
        // cache check that what it wrote is what arrived.
        let expected = published.unwrap_or_else(|| hasher.finish());
        let committed = writer.finish(ExpectedDigests::from(expected), true).await?.await;
        committed.map_err(|e| match e.code {
            Code::DataLoss | Code::InvalidArgument => unavailable(format!("{url}: {}", e.message)),
            _ => e,
        })?;
        Ok(Some(size))
    }

    /// Whether the bucket has `path`, asked with HEAD: nothing is
    /// downloaded. 404 and 410 are "no"; another status is UNAVAILABLE.
    pub async fn has(&self, path: &ProbePath) -> Result<bool> {
        let url = self.base.join(&path.to_string());
        let response =
            self.client.request(Method::HEAD, &url).await.map_err(|e| unavailable(remote_text(&e.to_string())))?;
        match response.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(false),
            status => Err(unavailable(format!("HEAD {url} answered {status}"))),
        }
    }

    async fn get(&self, url: &HttpsUrl) -> Result<hyper::Response<Incoming>> {
        // The error may quote a proxy's answer to CONNECT.
        self.client.request(Method::GET, url).await.map_err(|e| unavailable(remote_text(&e.to_string())))
    }

    /// The SHA-256 in `url` (`sha256sum` format, or the hex digest alone),
    /// `None` when the bucket has no such file.
    async fn published_digest(&self, url: &HttpsUrl) -> Result<Option<Sha256Digest>> {
        let Some(text) = self.small_file(url, MAX_DIGEST_FILE, "a SHA-256 file").await? else { return Ok(None) };
        let text = String::from_utf8_lossy(&text);
        let hex = text.split_whitespace().next().unwrap_or_default();
        Sha256Digest::from_hex(hex)
            .map(Some)
            .ok_or_else(|| unavailable(format!("{url} does not start with a SHA-256 in hex")))
    }

    /// The bytes of a small file beside a probe (at most `max`, else it is
    /// not `what`), `None` when the bucket has no such file.
    async fn small_file(&self, url: &HttpsUrl, max: usize, what: &str) -> Result<Option<Vec<u8>>> {
        let mut response = self.get(url).await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::GONE | StatusCode::FORBIDDEN => return Ok(None),
            status => return Err(unavailable(format!("{url} answered {status}"))),
        }
        let mut bytes = Vec::new();
        while let Some(frame) = response.body_mut().frame().await {
            let frame = frame.map_err(|e| unavailable(format!("reading {url}: {e}")))?;
            if let Ok(chunk) = frame.into_data() {
                bytes.extend_from_slice(&chunk);
            }
            if bytes.len() > max {
                return Err(unavailable(format!("{url} is over {max} bytes: not {what}")));
            }
        }
        Ok(Some(bytes))
    }
}

fn content_length(response: &hyper::Response<Incoming>, url: &HttpsUrl) -> Result<u64> {
    let size = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
        .ok_or_else(|| unavailable(format!("{url} came without a Content-Length")))?;
    if size > MAX_FILE_SIZE {
        return Err(unavailable(format!("{url} is {size} bytes, over the limit of {MAX_FILE_SIZE} for a probe")));
    }
    Ok(size)
}

fn unavailable(message: String) -> Error {
    Error::new(Code::Unavailable, format!("upstream: {message}"))
}

/// Inflates a gzip stream as it arrives, keeping nothing of the output but
/// its length: one complete member with a matching CRC-32 and length, and
/// nothing after it.
struct GzipCheck {
    decoder: flate2::write::GzDecoder<Bounded>,
}

/// Counts what is written to it; fails past `MAX_INFLATED`.
struct Bounded(u64);

impl Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0 += data.len() as u64;
        if self.0 > MAX_INFLATED {
            return Err(std::io::Error::other(format!("it inflates to over {MAX_INFLATED} bytes")));
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl GzipCheck {
    fn new() -> Self {
        GzipCheck { decoder: flate2::write::GzDecoder::new(Bounded(0)) }
    }

    fn write(&mut self, data: &[u8]) -> std::result::Result<(), String> {
        self.decoder.write_all(data).map_err(|e| match e.kind() {
            std::io::ErrorKind::WriteZero => "bytes after the end of the gzip stream".to_owned(),
            _ => e.to_string(),
        })
    }

    fn finish(mut self) -> std::result::Result<(), String> {
        self.decoder.try_finish().map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "the gzip stream is cut short".to_owned(),
            _ => e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn check(bytes: &[u8], piece: usize) -> std::result::Result<(), String> {
        let mut check = GzipCheck::new();
        for part in bytes.chunks(piece) {
            check.write(part)?;
        }
        check.finish()
    }

    #[test]
    fn a_whole_gzip_stream_passes_in_any_pieces() {
        let file = gzip(&b"an eBPF object".repeat(10_000));
        for piece in [1, 7, 4096, file.len()] {
            assert_eq!(check(&file, piece), Ok(()), "pieces of {piece}");
        }
    }

    #[test]
    fn cut_corrupt_or_padded_streams_fail() {
        let file = gzip(&b"an eBPF object".repeat(10_000));
        let cut = check(&file[..file.len() / 2], 4096).unwrap_err();
        assert!(cut.contains("cut short"), "{cut}");
        assert!(check(&file[..file.len() - 3], 4096).is_err(), "a cut trailer fails too");
        let mut flipped = file.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x40;
        assert!(check(&flipped, 4096).is_err(), "a flipped byte fails the inflate or the CRC-32");
        let mut padded = file.clone();
        padded.extend_from_slice(b"junk");
        assert!(check(&padded, 4096).unwrap_err().contains("after the end"));
        assert!(check(b"not gzip at all", 4096).is_err());
    }
}
