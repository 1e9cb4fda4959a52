//! The support-package upload (`central-probes upload`), over the admin
//! client.
//!
//! An upload reads the package's central directory and asks Central which
//! probes it has. A file Central has with the size and CRC-32 of its
//! package entry, and a signature by the same key at the same serial as
//! the package's (or none in both), is the same file and is not read; one
//! with another size, CRC-32 or signature differs and is sent only with
//! `--overwrite`. Each file's signature entry goes in its trailer. Only files Central
//! stored without a CRC-32 (by an older Central), or every file Central has
//! under `--verify`, are read and hashed (SHA-256, on every core) to decide;
//! `--verify` also has Central read its stored copies first, so that a
//! damaged one is sent again.
//! Then one sequential pass over the package on a blocking thread streams
//! what is to be sent, with each entry's CRC-32 from the central directory
//! in its trailer: the uploader computes no digest of its own, and the zip
//! reader's CRC-32 check refuses a corrupt entry before its trailer goes
//! out, so Central keeps nothing of it. The RPC starts only once there is
//! something to send.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use probe_api::digest::{Sha256Digest, Sha256Hasher};
use probe_api::limits::COLLECTOR_MAX_PROBE_FILE;
use probe_api::v1::upload_probes_request::Message;
use probe_api::v1::{FileHeader, FileTrailer, UploadOptions, UploadProbesRequest, UploadProbesResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::admin::checksum;
use crate::admin::chunk_pool::ChunkPool;
use crate::admin::client::AdminClient;
use crate::admin::error::{AdminError, PackageError};
use crate::admin::existing::{Action, check_stored_copies, decide, existing_probes};
use crate::admin::package::{Package, PackageIndex, PackageProbe, PackageReads};
use crate::admin::progress::Progress;
use crate::admin::signatures;

/// Bytes per chunk message: most probes fit in one.
pub const UPLOAD_CHUNK: usize = 1 << 20;
/// Messages queued between the package reader and the network.
const UPLOAD_QUEUE: usize = 8;

#[derive(Clone, Debug)]
pub struct UploadRequest {
    pub package: PathBuf,
    pub overwrite: bool,
    /// The package's published SHA-256: checked over the whole file before
    /// anything is sent.
    pub checksum: Option<Sha256Digest>,
    /// Compare every file Central has by SHA-256 (reading it from the
    /// package) instead of by size and CRC-32.
    pub verify: bool,
}

/// What an upload did.
#[derive(Debug, Default)]
pub struct UploadReport {
    pub probes_in_package: usize,
    /// Entries under kernel-modules/ that are not probes.
    pub unrecognised: Vec<String>,
    /// Files Central had with the same content.
    pub identical: usize,
    /// Files whose content differs from Central's and that were kept as
    /// Central has them (no --overwrite).
    pub conflicts: Vec<String>,
    pub files_sent: usize,
    pub bytes_sent: u64,
    /// Bytes read from the package file: its directory, and the entries
    /// that were hashed or sent (compressed, as stored in the zip).
    pub package_bytes_read: u64,
    /// Central's answer; `None` when nothing had to be sent.
    pub response: Option<UploadProbesResponse>,
    pub elapsed: Duration,
}

/// The planning facts printed before the transfer starts.
#[derive(Debug)]
pub struct UploadPlan {
    pub probes_in_package: usize,
    pub new_files: usize,
    pub new_bytes: u64,
    /// Files Central has that must be read and compared by SHA-256.
    pub to_compare: usize,
    /// Files Central has, decided by size and CRC-32 without reading them.
    pub decided_from_directory: usize,
    /// Under `--verify`: Central's stored copies found damaged (of the
    /// package's module versions), sent again among the new files.
    pub damaged_in_central: u64,
    /// Probes of the package larger than a Collector receives: stored, but
    /// no node can load them.
    pub too_large_for_collectors: Vec<String>,
}

/// What the reading thread found while streaming.
#[derive(Default)]
struct StreamTally {
    identical: usize,
    conflicts: Vec<String>,
    files_sent: usize,
    bytes_sent: u64,
}

pub async fn upload(
    client: &mut AdminClient,
    request: &UploadRequest,
    on_plan: impl FnOnce(&UploadPlan) -> Progress,
) -> Result<UploadReport, AdminError> {
    let started = Instant::now();
    if let Some(expected) = request.checksum {
        let package = request.package.clone();
        tokio::task::spawn_blocking(move || checksum::verify_package(&package, expected))
            .await
            .map_err(|e| AdminError::Internal(format!("checking the package: {e}")))??;
    }
    let package_path = request.package.clone();
    let reads = PackageReads::default();
    let package_reads = reads.clone();
    let (package, index) = tokio::task::spawn_blocking(move || {
        let mut package = Package::open(&package_path, &package_reads)?;
        let mut index = package.index()?;
        signatures::read_signatures(&mut package, &mut index)?;
        Ok::<_, PackageError>((package, index))
    })
    .await
    .map_err(|e| AdminError::Internal(format!("reading the package: {e}")))??;
    if index.probes.is_empty() {
        return Err(AdminError::NoProbes { package: request.package.clone() });
    }
    let damaged_in_central = if request.verify { check_stored_copies(client, &index).await? } else { 0 };
    let existing = existing_probes(client, &index).await?;
    let actions: Vec<Action> = index
        .probes
        .iter()
        .map(|probe| decide(probe, existing.get(&probe.path.to_string()), request.verify))
        .collect::<Result<_, AdminError>>()?;
    let plan = UploadPlan {
        probes_in_package: index.probes.len(),
        new_files: actions.iter().filter(|a| matches!(a, Action::Send)).count(),
        new_bytes: index
            .probes
            .iter()
            .zip(&actions)
            .filter(|(_, a)| matches!(a, Action::Send))
            .map(|(p, _)| p.size)
            .sum(),
        to_compare: actions.iter().filter(|a| matches!(a, Action::Compare(_))).count(),
        decided_from_directory: actions.iter().filter(|a| matches!(a, Action::Identical | Action::Differs)).count(),
        damaged_in_central,
        too_large_for_collectors: index
            .probes
            .iter()
            .filter(|p| p.size > COLLECTOR_MAX_PROBE_FILE)
            .map(|p| p.path.to_string())
            .collect(),
    };
    let to_read: u64 = index
        .probes
        .iter()
        .zip(&actions)
        .filter(|(_, a)| match a {
            Action::Send | Action::Compare(_) => true,
            Action::Differs => request.overwrite,
            Action::Identical => false,
        })
        .map(|(p, _)| p.size)
        .sum();
    let progress = Arc::new(on_plan(&plan));
    progress.start(to_read);
    let actions = compare_digests(&request.package, &index.probes, actions, &progress, &reads).await?;

    let (sender, mut receiver) = mpsc::channel(UPLOAD_QUEUE);
    let overwrite = request.overwrite;
    let PackageIndex { probes, unrecognised, .. } = index;
    let reader_progress = progress.clone();
    let reader = tokio::task::spawn_blocking(move || {
        stream_package(package, &probes, &actions, overwrite, &sender, &reader_progress)
    });

    // Start the call only when the first message arrives: an upload with
    // nothing new makes no UploadProbes call at all.
    let response = match receiver.recv().await {
        None => None,
        Some(first) => {
            let messages = tokio_stream::StreamExt::chain(tokio_stream::once(first), ReceiverStream::new(receiver));
            Some(client.upload_probes(messages).await)
        }
    };
    let tally = reader.await.map_err(|e| AdminError::Internal(format!("reading the package: {e}")))?;
    progress.finish();
    let (tally, response) = match (tally, response) {
        // A reading error explains a broken stream better than the
        // server's "ended inside a file".
        (Err(StreamError::Read(error)), _) => return Err(error.into()),
        (_, Some(Err(status))) => return Err(AdminError::rpc("upload failed")(status)),
        (Err(StreamError::CallEnded), _) => return Err(AdminError::CallEnded),
        (Ok(tally), response) => (tally, response.map(|r| r.expect("errors handled above").into_inner())),
    };
    let mut conflicts = tally.conflicts;
    if let Some(response) = &response {
        // Central is the authority: it may have seen a conflict this client
        // could not (another upload racing this one).
        conflicts.extend(
            response
                .results
                .iter()
                .filter(|r| r.outcome == probe_api::v1::FileOutcome::Conflict as i32)
                .map(|r| r.path.clone()),
        );
    }
    Ok(UploadReport {
        probes_in_package: plan.probes_in_package,
        unrecognised,
        identical: tally.identical + response.as_ref().map_or(0, |r| r.identical_count as usize),
        conflicts,
        files_sent: tally.files_sent,
        bytes_sent: tally.bytes_sent,
        package_bytes_read: reads.bytes(),
        response,
        elapsed: started.elapsed(),
    })
}

/// The one pass over the package, on a blocking thread.
fn stream_package(
    mut package: Package,
    probes: &[PackageProbe],
    actions: &[Action],
    overwrite: bool,
    sender: &mpsc::Sender<UploadProbesRequest>,
    progress: &Progress,
) -> Result<StreamTally, StreamError> {
    let mut tally = StreamTally::default();
    // Enough for every message the queue holds, the one tonic is encoding
    // and the one being read: then `take` never waits on the network.
    let mut pool = ChunkPool::new(UPLOAD_CHUNK, UPLOAD_QUEUE + 2);
    let mut options_sent = false;
    let send = |message: Message| {
        sender
            .blocking_send(UploadProbesRequest { message: Some(message) })
            // The receiver is gone only when the call failed; its error is
            // the one to report, so this one just stops the thread.
            .map_err(|_| StreamError::CallEnded)
    };
    for (probe, action) in probes.iter().zip(actions) {
        let send_it = match action {
            Action::Send => true,
            Action::Differs => overwrite,
            Action::Identical => {
                tally.identical += 1;
                continue;
            }
            Action::Compare(_) => unreachable!("compared before streaming"),
        };
        if !send_it {
            tally.conflicts.push(probe.path.to_string());
            continue;
        }
        if !options_sent {
            send(Message::Options(UploadOptions { overwrite }))?;
            options_sent = true;
        }
        send(Message::FileHeader(FileHeader { path: probe.path.to_string(), size: probe.size }))?;
        let mut send_error = None;
        package
            .read_entry(probe, &mut pool, |chunk| {
                progress.inc(chunk.len() as u64);
                send(Message::Chunk(chunk.into_bytes())).map_err(|e| {
                    send_error = Some(e);
                    std::io::Error::other("stopped")
                })
            })
            .map_err(|e| {
                send_error.take().unwrap_or_else(|| {
                    StreamError::Read(PackageError::Read { path: probe.path.to_string(), source: e })
                })
            })?;

        // The zip reader checked the entry's bytes against this CRC-32 (an
        // error above otherwise); Central checks what it received.
        let signature = probe.signature.clone().unwrap_or_default();
        send(Message::FileTrailer(FileTrailer { sha256: String::new(), crc32: Some(probe.crc32), signature }))?;
        tally.files_sent += 1;
        tally.bytes_sent += probe.size;
    }
    Ok(tally)
}

/// Replaces every `Compare` by `Identical` or `Differs`, hashing the
/// entries on one thread per core, each over a contiguous share of them.
async fn compare_digests(
    package: &std::path::Path,
    probes: &[PackageProbe],
    mut actions: Vec<Action>,
    progress: &Arc<Progress>,
    reads: &PackageReads,
) -> Result<Vec<Action>, AdminError> {
    let to_compare: Vec<usize> = (0..probes.len()).filter(|&i| matches!(actions[i], Action::Compare(_))).collect();
    if to_compare.is_empty() {
        return Ok(actions);
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
    let share = to_compare.len().div_ceil(threads);
    let mut workers = Vec::new();
    for indices in to_compare.chunks(share) {
        let entries: Vec<(usize, PackageProbe)> = indices.iter().map(|&i| (i, probes[i].clone())).collect();
        let package = package.to_owned();
        let progress = progress.clone();
        let reads = reads.clone();
        workers.push(tokio::task::spawn_blocking(move || {
            let mut package = Package::open(&package, &reads)?;
            // Each chunk is hashed and dropped before the next is read.
            let mut pool = ChunkPool::new(UPLOAD_CHUNK, 1);
            entries
                .into_iter()
                .map(|(i, probe)| Ok((i, hash_entry(&mut package, &mut pool, &probe, &progress)?)))
                .collect::<Result<Vec<_>, PackageError>>()
        }));
    }
    for worker in workers {
        for (i, ours) in worker.await.map_err(|e| AdminError::Internal(format!("hashing the package: {e}")))?? {
            if let Action::Compare(theirs) = actions[i] {
                actions[i] = if ours == theirs { Action::Identical } else { Action::Differs };
            }
        }
    }
    Ok(actions)
}

/// Why the pass over the package stopped.
enum StreamError {
    /// The package could not be read.
    Read(PackageError),
    /// The call went away (its own error says why).
    CallEnded,
}

fn hash_entry(
    package: &mut Package,
    pool: &mut ChunkPool,
    probe: &PackageProbe,
    progress: &Progress,
) -> Result<Sha256Digest, PackageError> {
    let mut hasher = Sha256Hasher::new();
    package
        .read_entry(probe, pool, |chunk| {
            hasher.update(&chunk);
            progress.inc(chunk.len() as u64);
            Ok(())
        })
        .map_err(|source| PackageError::Read { path: probe.path.to_string(), source })?;
    Ok(hasher.finish())
}
