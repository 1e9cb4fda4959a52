//! The state machine of one upload, whichever API it came through: it
//! takes `UploadEvent`s, which every API's reader makes of its own wire
//! format without re-encoding (UploadProbes' messages, roxctl's body).
//!
//! Events must come as: options, then per file a start, its chunks and an
//! end. Each file's bytes go straight into a store writer; once its
//! end arrives, its verification and commit run in the background while
//! the next file streams in (at most the store's `max_pending_commits` at once).
//! Verification runs in parallel, but each commit waits for the one before
//! it, so files take effect in stream order and none after a file that
//! failed: the stream ends at its first error, as the proto promises. At
//! the end, or at the first error, every started commit is awaited, so the
//! response (or the error) speaks of durable files only; `UploadEnd` keeps
//! what was committed before an error, for the log and the audit.
//!
//! An upload whose client stops sending is ended by its reader after
//! `--upload-idle-timeout` with DEADLINE_EXCEEDED; one whose client went
//! away ends with CANCELLED. Both are interrupted uploads
//! (`UploadEnd::interrupted`). A reader's error ends the stream as it is:
//! the reader says what was wrong with the client's bytes.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use probe_api::digest::Sha256Digest;
use probe_api::limits::{MAX_FILE_SIZE, MAX_UPLOAD_CHUNK};
use probe_api::names::ProbePath;
use probe_api::signing::MAX_SIGNATURE_LEN;
use probe_api::v1::upload_probes_request::Message;
use probe_api::v1::{
    FileHeader, FileOutcome, FileResult, FileTrailer, UploadOptions, UploadProbesRequest, UploadProbesResponse,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::{Stream, StreamExt};
use tonic::Code;

use crate::error::{Error, Result};
use crate::store::{
    CommitGate, CommitOrder, CommitOutcome, Committed, ExpectedDigests, ProbeStore, ProbeWriter, open_gate,
};

/// One event of an upload.
#[derive(Debug)]
pub enum UploadEvent {
    /// How the upload treats files that are stored already.
    Options { overwrite: bool },
    /// A file's path (checked by the session) and size.
    FileStart { path: String, size: u64 },
    /// Bytes of the file, in the pieces the reader received them.
    Chunk(Vec<Bytes>),
    /// The file's digests (a SHA-256 in hex, empty for none; a CRC-32) and
    /// its signature, if any.
    FileEnd { sha256: String, crc32: Option<u32>, signature: Bytes },
}

impl TryFrom<UploadProbesRequest> for UploadEvent {
    type Error = Error;

    fn try_from(request: UploadProbesRequest) -> Result<UploadEvent> {
        Ok(match request.message {
            Some(Message::Options(UploadOptions { overwrite })) => UploadEvent::Options { overwrite },
            Some(Message::FileHeader(FileHeader { path, size })) => UploadEvent::FileStart { path, size },
            Some(Message::Chunk(chunk)) => UploadEvent::Chunk(vec![chunk]),
            Some(Message::FileTrailer(FileTrailer { sha256, crc32, signature })) => {
                UploadEvent::FileEnd { sha256, crc32, signature }
            }
            None => return Err(Error::invalid_argument("an upload message without content")),
        })
    }
}

enum State {
    AwaitingOptions,
    BetweenFiles,
    InFile { path: ProbePath, writer: Box<dyn ProbeWriter> },
}

struct Pending {
    path: ProbePath,
    commit: JoinHandle<Result<Committed>>,
}

/// How an upload stream ended.
pub struct UploadEnd {
    /// The files committed: every file of the stream when `error` is
    /// `None`, else those committed before it.
    pub response: UploadProbesResponse,
    pub error: Option<Error>,
}

impl UploadEnd {
    /// An upload refused before its first file (roxctl's manifest).
    pub fn refused(error: Error) -> UploadEnd {
        UploadEnd { response: UploadProbesResponse::default(), error: Some(error) }
    }

    /// The client stopped sending or went away (rather than sending
    /// something wrong, or the store failing).
    pub fn interrupted(&self) -> bool {
        self.error.as_ref().is_some_and(|error| matches!(error.code, Code::Cancelled | Code::DeadlineExceeded))
    }

    pub fn into_result(self) -> Result<UploadProbesResponse> {
        match self.error {
            None => Ok(self.response),
            Some(error) => Err(error),
        }
    }
}

pub struct UploadSession {
    store: Arc<dyn ProbeStore>,
    state: State,
    overwrite: bool,
    /// Paths seen in this stream: a path twice is a client bug.
    seen: HashSet<ProbePath>,
    pending: VecDeque<Pending>,
    /// Tells the next file's commit whether the last one took effect.
    last_committed: Option<oneshot::Receiver<bool>>,
    /// Set by the first commit that fails, so the stream stops at once
    /// rather than receiving files that could no longer be committed.
    commit_failed: Arc<AtomicBool>,
    /// The error of a commit completed while the stream was still read: it
    /// is of a file before every pending one, so it is the one reported.
    commit_error: Option<Error>,
    response: UploadProbesResponse,
}

impl UploadSession {
    pub fn new(store: Arc<dyn ProbeStore>) -> Self {
        UploadSession {
            store,
            state: State::AwaitingOptions,
            overwrite: false,
            seen: HashSet::new(),
            pending: VecDeque::new(),
            last_committed: None,
            commit_failed: Arc::new(AtomicBool::new(false)),
            commit_error: None,
            response: UploadProbesResponse::default(),
        }
    }

    /// Runs a whole stream. On an error, the files committed before it stay
    /// and the message says how many there were.
    pub async fn run<S>(self, events: S) -> Result<UploadProbesResponse>
    where
        S: Stream<Item = Result<UploadEvent>> + Unpin,
    {
        self.run_to_end(events).await.into_result()
    }

    /// `run`, keeping what was committed before an error.
    pub async fn run_to_end<S>(mut self, mut events: S) -> UploadEnd
    where
        S: Stream<Item = Result<UploadEvent>> + Unpin,
    {
        let outcome = async {
            while let Some(event) = events.next().await {
                if self.commit_failed.load(Ordering::SeqCst) {
                    // `drain` reports the failing file.
                    return Ok(());
                }
                self.take(event?).await?;
            }
            self.end_of_stream()
        }
        .await;
        let committed = self.drain().await;
        // A failed commit is of a file before whatever ended the stream, so
        // it is the first error in stream order.
        let error = match (committed, outcome) {
            (Ok(()), Ok(())) => None,
            (Err(error), _) | (Ok(()), Err(error)) => {
                let committed = self.response.results.len();
                Some(error.context(format!("upload stopped after {committed} finished files")))
            }
        };
        UploadEnd { response: self.response, error }
    }

    async fn take(&mut self, event: UploadEvent) -> Result<()> {
        match (std::mem::replace(&mut self.state, State::BetweenFiles), event) {
            (State::AwaitingOptions, UploadEvent::Options { overwrite }) => {
                self.overwrite = overwrite;
                Ok(())
            }
            (State::AwaitingOptions, _) => {
                Err(Error::invalid_argument("the upload stream must start with an options message"))
            }
            (_, UploadEvent::Options { .. }) => Err(Error::invalid_argument("a second options message")),
            (State::BetweenFiles, UploadEvent::FileStart { path, size }) => self.start_file(&path, size).await,
            (State::BetweenFiles, _) => Err(Error::invalid_argument("file content or trailer without a file header")),
            (State::InFile { path, .. }, UploadEvent::FileStart { path: next, .. }) => {
                Err(Error::invalid_argument(format!("header of {next:?} before the trailer of {path}")))
            }
            (State::InFile { path, mut writer }, UploadEvent::Chunk(pieces)) => {
                let len: usize = pieces.iter().map(Bytes::len).sum();
                if len > MAX_UPLOAD_CHUNK {
                    return Err(Error::new(
                        Code::ResourceExhausted,
                        format!("{path}: a chunk of {len} bytes is over the limit of {MAX_UPLOAD_CHUNK}"),
                    ));
                }
                self.response.bytes_received += len as u64;
                writer.write_pieces(pieces).await?;
                self.state = State::InFile { path, writer };
                Ok(())
            }
            (State::InFile { path, mut writer }, UploadEvent::FileEnd { sha256, crc32, signature }) => {
                let expected = expected_digests(&path, &sha256, crc32)?;
                if signature.len() > MAX_SIGNATURE_LEN {
                    return Err(Error::invalid_argument(format!(
                        "{path}: a signature of {} bytes is over the limit of {MAX_SIGNATURE_LEN}",
                        signature.len()
                    )));
                }
                if !signature.is_empty() {
                    writer.set_signature(signature);
                }
                let gate: CommitGate = match self.last_committed.take() {
                    None => open_gate(),
                    Some(before) => Box::pin(async move { before.await.unwrap_or(false) }),
                };
                let (taken, next_gate) = oneshot::channel();
                let order = CommitOrder { after: gate, taken: Some(taken) };
                let commit = writer.finish_in_order(expected, self.overwrite, order).await?;
                self.last_committed = Some(next_gate);
                let commit_failed = self.commit_failed.clone();
                let commit = tokio::spawn(async move {
                    let outcome = commit.await;
                    if outcome.is_err() {
                        commit_failed.store(true, Ordering::SeqCst);
                    }
                    outcome
                });
                self.pending.push_back(Pending { path, commit });
                if self.pending.len() > self.store.max_pending_commits()
                    && let Err(error) = self.complete_oldest().await
                {
                    // `commit_failed` is set: the stream stops at the next message.
                    self.commit_error.get_or_insert(error);
                }
                Ok(())
            }
        }
    }

    async fn start_file(&mut self, path: &str, size: u64) -> Result<()> {
        let path = ProbePath::parse(path)?;
        if size > MAX_FILE_SIZE {
            return Err(Error::invalid_argument(format!("{path}: {size} bytes is over the limit of {MAX_FILE_SIZE}")));
        }
        if !self.seen.insert(path.clone()) {
            return Err(Error::invalid_argument(format!("{path} comes twice in one upload")));
        }
        let writer = self.store.create(path.clone(), size).await?;
        self.state = State::InFile { path, writer };
        Ok(())
    }

    fn end_of_stream(&mut self) -> Result<()> {
        match &self.state {
            State::AwaitingOptions => Err(Error::invalid_argument("an empty upload stream")),
            State::BetweenFiles => Ok(()),
            State::InFile { path, .. } => {
                Err(Error::invalid_argument(format!("the upload stream ended inside {path}")))
            }
        }
    }

    async fn complete_oldest(&mut self) -> Result<()> {
        let Pending { path, commit } = self.pending.pop_front().expect("a pending commit");
        let Committed { outcome, sha256 } = commit
            .await
            .map_err(|e| Error::internal(format!("committing {path}: {e}")))?
            .map_err(|e| e.context(format!("committing {path}")))?;
        let (outcome, existing) = match outcome {
            CommitOutcome::Stored => (FileOutcome::Stored, None),
            // Written again over a damaged copy: stored, for the uploader.
            CommitOutcome::Repaired => {
                tracing::info!(%path, "a damaged probe was repaired by this upload");
                (FileOutcome::Stored, None)
            }
            CommitOutcome::Identical => (FileOutcome::Identical, None),
            CommitOutcome::Conflict { existing } => (FileOutcome::Conflict, Some(existing)),
            CommitOutcome::Overwritten { previous } => (FileOutcome::Overwritten, Some(previous)),
        };
        let totals = &mut self.response;
        match outcome {
            FileOutcome::Stored => totals.stored_count += 1,
            FileOutcome::Identical => totals.identical_count += 1,
            FileOutcome::Conflict => totals.conflict_count += 1,
            FileOutcome::Overwritten | FileOutcome::Unspecified => totals.overwritten_count += 1,
        }
        totals.results.push(FileResult {
            path: path.to_string(),
            outcome: outcome.into(),
            sha256: sha256.to_hex(),
            existing_sha256: existing.map(|d| d.to_hex()).unwrap_or_default(),
        });
        Ok(())
    }

    /// Waits for every started commit; returns the first error, if any,
    /// after all of them ended.
    async fn drain(&mut self) -> Result<()> {
        let mut first_error = self.commit_error.take();
        while !self.pending.is_empty() {
            if let Err(error) = self.complete_oldest().await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The digests a file's end promises: a SHA-256 (empty when absent), a
/// CRC-32, or both; neither is refused when the writer finishes.
fn expected_digests(path: &ProbePath, sha256: &str, crc32: Option<u32>) -> Result<ExpectedDigests> {
    let sha256 = match sha256 {
        "" => None,
        hex => Some(Sha256Digest::from_hex(hex).ok_or_else(|| {
            Error::invalid_argument(format!("{path}: the trailer's SHA-256 is not 64 lowercase hex characters"))
        })?),
    };
    Ok(ExpectedDigests { sha256, crc32 })
}

/// Helper for tests: the messages that upload one file.
#[cfg(any(test, feature = "testing"))]
pub fn file_messages(path: &str, bytes: &[u8], chunk_size: usize) -> Vec<UploadProbesRequest> {
    use bytes::Bytes;
    let message = |m| UploadProbesRequest { message: Some(m) };
    let mut messages =
        vec![message(Message::FileHeader(FileHeader { path: path.to_owned(), size: bytes.len() as u64 }))];
    messages.extend(bytes.chunks(chunk_size.max(1)).map(|c| message(Message::Chunk(Bytes::copy_from_slice(c)))));
    let sha256 = Sha256Digest::of(bytes).to_hex();
    messages.push(message(Message::FileTrailer(FileTrailer { sha256, crc32: None, signature: Bytes::new() })));
    messages
}

#[cfg(test)]
mod tests;
