//! The state machine of one `UploadProbes` stream.
//!
//! Messages must come as: options, then per file a header, its chunks and a
//! trailer. Each file's bytes go straight into a store writer; once its
//! trailer arrives, its verification and commit run in the background while
//! the next file streams in (at most the store's `max_pending_commits` at once).
//! Verification runs in parallel, but each commit waits for the one before
//! it, so files take effect in stream order and none after a file that
//! failed: the stream ends at its first error, as the proto promises. At
//! the end, or at the first error, every started commit is awaited, so the
//! response (or the error) speaks of durable files only; `UploadEnd` keeps
//! what was committed before an error, for the log and the audit.
//!
//! An upload whose client stops sending is ended by its reader
//! (`handlers::upload_probes`, `handlers::roxctl_upload`) after `--upload-idle-timeout` with
//! `edge::http::idle_error`; one whose client went away ends with CANCELLED. Both are
//! interrupted uploads (`UploadEnd::interrupted`).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use probe_api::digest::Sha256Digest;
use probe_api::limits::{MAX_FILE_SIZE, MAX_REQUEST_MESSAGE, MAX_UPLOAD_CHUNK};
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

/// A message, with a chunk in pieces.
enum Incoming {
    Options(UploadOptions),
    Header(FileHeader),
    Chunk(Vec<Bytes>),
    Trailer(FileTrailer),
}

enum State {
    AwaitingOptions,
    BetweenFiles,
    InFile { path: ProbePath, writer: Box<dyn ProbeWriter> },
}

/// One message of an upload stream as the session takes it.
pub enum Part {
    /// A decoded message; `None` for one without content.
    Message(Option<Message>),
    /// The bytes of a chunk message, in the pieces the HTTP/2 frames
    /// carried them (`handlers::upload_probes` reads chunks so, without a copy).
    Chunk(Vec<Bytes>),
}

impl From<UploadProbesRequest> for Part {
    fn from(request: UploadProbesRequest) -> Part {
        Part::Message(request.message)
    }
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
    pub async fn run<S>(self, requests: S) -> Result<UploadProbesResponse>
    where
        S: Stream<Item = Result<Part, tonic::Status>> + Unpin,
    {
        self.run_to_end(requests).await.into_result()
    }

    /// `run`, keeping what was committed before an error.
    pub async fn run_to_end<S>(mut self, mut requests: S) -> UploadEnd
    where
        S: Stream<Item = Result<Part, tonic::Status>> + Unpin,
    {
        let outcome = async {
            while let Some(request) = requests.next().await {
                if self.commit_failed.load(Ordering::SeqCst) {
                    // `drain` reports the failing file.
                    return Ok(());
                }
                let message = match request.map_err(stream_error)? {
                    Part::Message(Some(Message::Chunk(chunk))) => Incoming::Chunk(vec![chunk]),
                    Part::Message(Some(Message::Options(options))) => Incoming::Options(options),
                    Part::Message(Some(Message::FileHeader(header))) => Incoming::Header(header),
                    Part::Message(Some(Message::FileTrailer(trailer))) => Incoming::Trailer(trailer),
                    Part::Chunk(pieces) => Incoming::Chunk(pieces),
                    Part::Message(None) => return Err(Error::invalid_argument("an upload message without content")),
                };
                self.handle(message).await?;
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

    async fn handle(&mut self, message: Incoming) -> Result<()> {
        match (std::mem::replace(&mut self.state, State::BetweenFiles), message) {
            (State::AwaitingOptions, Incoming::Options(options)) => {
                self.overwrite = options.overwrite;
                Ok(())
            }
            (State::AwaitingOptions, _) => {
                Err(Error::invalid_argument("the upload stream must start with an options message"))
            }
            (_, Incoming::Options(_)) => Err(Error::invalid_argument("a second options message")),
            (State::BetweenFiles, Incoming::Header(header)) => self.start_file(header).await,
            (State::BetweenFiles, _) => Err(Error::invalid_argument("file content or trailer without a file header")),
            (State::InFile { path, .. }, Incoming::Header(header)) => {
                Err(Error::invalid_argument(format!("header of {:?} before the trailer of {path}", header.path)))
            }
            (State::InFile { path, mut writer }, Incoming::Chunk(pieces)) => {
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
            (State::InFile { path, mut writer }, Incoming::Trailer(trailer)) => {
                let expected = expected_digests(&path, &trailer)?;
                if trailer.signature.len() > MAX_SIGNATURE_LEN {
                    return Err(Error::invalid_argument(format!(
                        "{path}: a signature of {} bytes is over the limit of {MAX_SIGNATURE_LEN}",
                        trailer.signature.len()
                    )));
                }
                if !trailer.signature.is_empty() {
                    writer.set_signature(trailer.signature);
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

    async fn start_file(&mut self, header: FileHeader) -> Result<()> {
        let path = ProbePath::parse(&header.path)?;
        if header.size > MAX_FILE_SIZE {
            return Err(Error::invalid_argument(format!(
                "{path}: {} bytes is over the limit of {MAX_FILE_SIZE}",
                header.size
            )));
        }
        if !self.seen.insert(path.clone()) {
            return Err(Error::invalid_argument(format!("{path} comes twice in one upload")));
        }
        let writer = self.store.create(path.clone(), header.size).await?;
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

/// The digests a trailer promises: a SHA-256 (empty when absent), a CRC-32,
/// or both; neither is refused when the writer finishes.
fn expected_digests(path: &ProbePath, trailer: &FileTrailer) -> Result<ExpectedDigests> {
    let sha256 = match trailer.sha256.as_str() {
        "" => None,
        hex => Some(Sha256Digest::from_hex(hex).ok_or_else(|| {
            Error::invalid_argument(format!("{path}: the trailer's SHA-256 is not 64 lowercase hex characters"))
        })?),
    };
    Ok(ExpectedDigests { sha256, crc32: trailer.crc32 })
}

/// The error for a message the request stream could not deliver. tonic
/// reports an over-limit message as OUT_OF_RANGE and an undecodable one as
/// INTERNAL; both are the client's mistake and retrying cannot help, so
/// they become RESOURCE_EXHAUSTED and INVALID_ARGUMENT (as which
/// `handlers::upload_probes` reports them itself). DEADLINE_EXCEEDED is a reader's
/// `idle_error`. Anything else is a broken transport.
fn stream_error(status: tonic::Status) -> Error {
    match status.code() {
        Code::DeadlineExceeded => Error::new(Code::DeadlineExceeded, status.message()),
        Code::OutOfRange | Code::ResourceExhausted => Error::new(
            Code::ResourceExhausted,
            format!("an upload message over the limit of {MAX_REQUEST_MESSAGE} bytes: {}", status.message()),
        ),
        Code::Internal | Code::InvalidArgument => {
            Error::invalid_argument(format!("a malformed upload message: {}", status.message()))
        }
        _ => Error::new(Code::Cancelled, format!("the upload stream broke off: {}", status.message())),
    }
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
