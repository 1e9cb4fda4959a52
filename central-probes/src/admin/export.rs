//! `central-probes export`: stored probes, streamed from Central over the
//! API (ExportProbes), written as a support package in the product's layout
//! (`kernel-modules/<module version>/<file name>`) that `upload` takes on
//! another Central.
//!
//! The network side receives and a blocking thread writes the zip, with a
//! few messages queued between them: memory stays bounded whatever the
//! package's size. The writer checks each probe against what Central says of
//! it (its size, and its CRC-32, or its SHA-256 for a probe stored without
//! one) before the package is finished. The package is written under a
//! temporary name and renamed into place once complete and fsync'd, so a
//! failed or interrupted export never leaves a package that looks whole.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use probe_api::digest::{Sha256Digest, Sha256Hasher};
use probe_api::names::ProbePath;
use probe_api::signing::SIGNATURE_SUFFIX;
use probe_api::v1::export_probes_response::Message;
use probe_api::v1::{ExportProbesRequest, ProbeInfo};
use tokio::sync::mpsc;
use zip::ZipWriter;
use zip::write::SimpleFileOptions;

use crate::admin::client::AdminClient;
use crate::admin::error::AdminError;

/// Messages queued between the network and the zip writer.
const QUEUE: usize = 16;

/// What an export wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportReport {
    pub probes: u64,
    pub bytes: u64,
    /// The module versions of the exported probes, in order.
    pub module_versions: Vec<String>,
}

/// Exports the probes of `module_versions` (all when empty) into a support
/// package at `out`, replacing any file there only once the package is
/// complete. A module version Central has no probes of fails the export,
/// and nothing is written.
pub async fn export(
    client: &mut AdminClient,
    module_versions: Vec<String>,
    out: &Path,
) -> Result<ExportReport, AdminError> {
    let partial = partial_path(out);
    let file = File::create(&partial).map_err(|source| AdminError::Output { path: partial.clone(), source })?;
    let (sender, receiver) = mpsc::channel(QUEUE);
    let writer_partial = partial.clone();
    let writer = tokio::task::spawn_blocking(move || write_package(file, receiver, &writer_partial));
    let asked = module_versions.clone();
    let received = receive(client, module_versions, sender).await;
    // The writer ends once the sender is gone: with what was received, or
    // early with its own error.
    let written = writer.await.map_err(|e| AdminError::Internal(format!("the package writer failed: {e}")))?;
    // An empty stream that ends OK is Central's answer for module versions
    // it has no probes of (they are not an error of the API).
    let report = received.and(written).and_then(|report| {
        AdminError::unless_held(&asked, &report.module_versions)?;
        match report.probes {
            0 => Err(AdminError::NothingStored),
            _ => Ok(report),
        }
    });
    match report {
        Ok(report) => {
            std::fs::rename(&partial, out).map_err(|source| AdminError::Output { path: out.to_owned(), source })?;
            sync_parent(out);
            Ok(report)
        }
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            Err(error)
        }
    }
}

/// Where the package is written until it is complete: beside `out`, so
/// that the rename is atomic.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_owned();
    name.push(".partial");
    out.with_file_name(name)
}

/// Makes the rename durable; a filesystem that cannot sync a directory
/// has nothing better to offer.
fn sync_parent(out: &Path) {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
}

/// Passes the stream's messages to the writer, in order.
async fn receive(
    client: &mut AdminClient,
    module_versions: Vec<String>,
    writer: mpsc::Sender<Message>,
) -> Result<(), AdminError> {
    let mut stream = client
        .export_probes(ExportProbesRequest { module_versions })
        .await
        .map_err(AdminError::rpc("exporting probes"))?
        .into_inner();
    while let Some(message) = stream.message().await.map_err(AdminError::rpc("exporting probes"))? {
        let Some(message) = message.message else {
            return Err(AdminError::BadReply("an export message with no content".into()));
        };
        if writer.send(message).await.is_err() {
            // The writer stopped on an error of its own, which it returns.
            return Ok(());
        }
    }
    Ok(())
}

/// The probe being written, and what its bytes must match.
struct Current {
    info: ProbeInfo,
    received: u64,
    crc32: crc32fast::Hasher,
    /// Only for a probe without a CRC-32.
    sha256: Option<Sha256Hasher>,
}

impl Current {
    fn new(info: ProbeInfo) -> Self {
        let sha256 = info.crc32.is_none().then(Sha256Hasher::new);
        Current { info, received: 0, crc32: crc32fast::Hasher::new(), sha256 }
    }

    fn update(&mut self, chunk: &Bytes) -> Result<(), AdminError> {
        self.received += chunk.len() as u64;
        if self.received > self.info.size {
            return Err(self.mismatch(format!("more than its {} bytes", self.info.size)));
        }
        self.crc32.update(chunk);
        if let Some(sha256) = &mut self.sha256 {
            sha256.update(chunk);
        }
        Ok(())
    }

    /// Checks the probe's bytes once all have come, and gives its
    /// signature back (empty when unsigned).
    fn check(mut self) -> Result<Bytes, AdminError> {
        if self.received != self.info.size {
            return Err(self.mismatch(format!("{} bytes, not {}", self.received, self.info.size)));
        }
        let crc32 = self.crc32.clone().finalize();
        if let Some(expected) = self.info.crc32
            && crc32 != expected
        {
            return Err(self.mismatch(format!("CRC-32 {crc32:08x}, not {expected:08x}")));
        }
        if let Some(sha256) = self.sha256.take().map(Sha256Hasher::finish)
            && Sha256Digest::from_hex(&self.info.sha256) != Some(sha256)
        {
            return Err(self.mismatch(format!("SHA-256 {sha256}, not {}", self.info.sha256)));
        }
        Ok(self.info.signature)
    }

    fn mismatch(&self, what: String) -> AdminError {
        AdminError::BadReply(format!("{}: Central sent {what}", self.info.path))
    }
}

/// Starts writing back what has been written, every `WRITEBACK_EVERY`
/// bytes, without waiting for it: the final fsync of a package of gigabytes
/// then has little left to wait for. (The kernel would otherwise hold it
/// all dirty until the fsync: its background writeback starts at a tenth of
/// the machine's memory.)
struct Writeback {
    fd: std::os::fd::RawFd,
    written: u64,
    started: u64,
}

const WRITEBACK_EVERY: u64 = 32 << 20;

impl Writeback {
    fn of(file: &File) -> Self {
        Writeback { fd: std::os::fd::AsRawFd::as_raw_fd(file), written: 0, started: 0 }
    }

    /// `bytes` more were written (roughly: the zip's own headers are not
    /// counted, and the range need not be exact).
    fn wrote(&mut self, bytes: u64) {
        self.written += bytes;
        if self.written - self.started >= WRITEBACK_EVERY {
            // SAFETY: the file outlives this (the zip writer owns it until
            // the package is finished), and the call only starts writeback
            // of a range; a failure costs speed only, so it is ignored.
            unsafe {
                libc::sync_file_range(
                    self.fd,
                    self.started as libc::off64_t,
                    (self.written - self.started) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.started = self.written;
        }
    }
}

/// Writes the package from the stream's messages (blocking).
fn write_package(file: File, mut messages: mpsc::Receiver<Message>, path: &Path) -> Result<ExportReport, AdminError> {
    let io_error = |source| AdminError::Output { path: path.to_owned(), source };
    let zip_error = |error: zip::result::ZipError| io_error(std::io::Error::other(error));
    let mut writeback = Writeback::of(&file);
    // Smaller than a chunk: chunks are written straight from the network's
    // buffers, and only the zip's small headers are gathered.
    let mut zip = ZipWriter::new(BufWriter::with_capacity(64 << 10, file));
    // Probes are gzip files already: deflating them again gains nothing.
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut report = ExportReport::default();
    let mut current: Option<Current> = None;
    // A probe's signature goes in the entry after it, once its bytes checked.
    let finish = |zip: &mut ZipWriter<_>, done: Current| -> Result<(), AdminError> {
        let path = done.info.path.clone();
        let signature = done.check()?;
        if !signature.is_empty() {
            zip.start_file(format!("kernel-modules/{path}{SIGNATURE_SUFFIX}"), options).map_err(zip_error)?;
            zip.write_all(&signature).map_err(io_error)?;
        }
        Ok(())
    };
    while let Some(message) = messages.blocking_recv() {
        match message {
            Message::FileHeader(info) => {
                if let Some(done) = current.take() {
                    finish(&mut zip, done)?;
                }
                let path = ProbePath::parse(&info.path)
                    .map_err(|e| AdminError::BadReply(format!("an exported probe has an invalid path: {e}")))?;
                let version = path.module_version().to_string();
                if report.module_versions.last() != Some(&version) {
                    report.module_versions.push(version);
                }
                let options = options.large_file(info.size >= u64::from(u32::MAX));
                zip.start_file(format!("kernel-modules/{path}"), options).map_err(zip_error)?;
                report.probes += 1;
                report.bytes += info.size;
                current = Some(Current::new(info));
            }
            Message::Chunk(chunk) => {
                let Some(probe) = current.as_mut() else {
                    return Err(AdminError::BadReply("probe bytes before any file header".into()));
                };
                probe.update(&chunk)?;
                zip.write_all(&chunk).map_err(io_error)?;
                writeback.wrote(chunk.len() as u64);
            }
        }
    }
    if let Some(done) = current.take() {
        finish(&mut zip, done)?;
    }
    let file = zip.finish().map_err(zip_error)?.into_inner().map_err(|e| io_error(e.into_error()))?;
    file.sync_all().map_err(io_error)?;
    Ok(report)
}
