//! The state machine of one `UploadProbes` stream.
//!
//! Messages must come as: options, then per file a header, its chunks and a
//! trailer. Each file's bytes go straight into a store writer; once its
//! trailer verifies, its commit runs in the background while the next file
//! streams in (at most `MAX_PENDING_COMMITS` at once). At the end, or at the
//! first error, every started commit is awaited, so the response (or the
//! error) speaks of durable files only.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use probe_api::v1::upload_probes_request::Message;
use probe_api::v1::{FileHeader, FileOutcome, FileResult, UploadProbesRequest, UploadProbesResponse};
use tokio_stream::{Stream, StreamExt};
use tonic::Code;

use crate::error::{Error, Result};
use crate::store::{CommitOutcome, PendingCommit, ProbeStore, ProbeWriter};

/// Largest probe file accepted in one upload.
pub const MAX_FILE_SIZE: u64 = 4 << 30;
/// Verified files whose fsync and rename may be in flight at once. Enough to
/// hide fsync latency behind the network; few enough to bound open files.
const MAX_PENDING_COMMITS: usize = 32;

enum State {
    AwaitingOptions,
    BetweenFiles,
    InFile { path: ProbePath, writer: Box<dyn ProbeWriter> },
}

struct Pending {
    path: ProbePath,
    sha256: Sha256Digest,
    commit: PendingCommit,
}

pub struct UploadSession {
    store: Arc<dyn ProbeStore>,
    state: State,
    overwrite: bool,
    /// Paths seen in this stream: a path twice is a client bug.
    seen: HashSet<ProbePath>,
    pending: VecDeque<Pending>,
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
            response: UploadProbesResponse::default(),
        }
    }

    /// Runs a whole stream. On an error, the files committed before it stay
    /// and the message says how many there were.
    pub async fn run<S>(mut self, mut requests: S) -> Result<UploadProbesResponse>
    where
        S: Stream<Item = Result<UploadProbesRequest, tonic::Status>> + Unpin,
    {
        let outcome = async {
            while let Some(request) = requests.next().await {
                let request = request.map_err(|status| {
                    Error::new(Code::Cancelled, format!("the upload stream broke off: {}", status.message()))
                })?;
                let message =
                    request.message.ok_or_else(|| Error::invalid_argument("an upload message without content"))?;
                self.handle(message).await?;
            }
            self.end_of_stream()
        }
        .await;
        let committed = self.drain().await;
        match (outcome, committed) {
            (Ok(()), Ok(())) => Ok(self.response),
            (Err(error), _) | (Ok(()), Err(error)) => {
                let committed = self.response.results.len();
                Err(error.context(format!("upload stopped after {committed} finished files")))
            }
        }
    }

    async fn handle(&mut self, message: Message) -> Result<()> {
        match (std::mem::replace(&mut self.state, State::BetweenFiles), message) {
            (State::AwaitingOptions, Message::Options(options)) => {
                self.overwrite = options.overwrite;
                Ok(())
            }
            (State::AwaitingOptions, _) => {
                Err(Error::invalid_argument("the upload stream must start with an options message"))
            }
            (_, Message::Options(_)) => Err(Error::invalid_argument("a second options message")),
            (State::BetweenFiles, Message::FileHeader(header)) => self.start_file(header).await,
            (State::BetweenFiles, _) => Err(Error::invalid_argument("file content or trailer without a file header")),
            (State::InFile { path, .. }, Message::FileHeader(header)) => {
                Err(Error::invalid_argument(format!("header of {:?} before the trailer of {path}", header.path)))
            }
            (State::InFile { path, mut writer }, Message::Chunk(chunk)) => {
                self.response.bytes_received += chunk.len() as u64;
                writer.write(chunk).await?;
                self.state = State::InFile { path, writer };
                Ok(())
            }
            (State::InFile { path, writer }, Message::FileTrailer(trailer)) => {
                let sha256 = Sha256Digest::from_hex(&trailer.sha256).ok_or_else(|| {
                    Error::invalid_argument(format!("{path}: the trailer's SHA-256 is not 64 lowercase hex characters"))
                })?;
                let commit = writer.finish(sha256, self.overwrite).await?;
                self.pending.push_back(Pending { path, sha256, commit });
                if self.pending.len() > MAX_PENDING_COMMITS {
                    self.complete_oldest().await?;
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
        let Pending { path, sha256, commit } = self.pending.pop_front().expect("a pending commit");
        let outcome = commit.await.map_err(|e| e.context(format!("committing {path}")))?;
        let (outcome, existing) = match outcome {
            CommitOutcome::Stored => (FileOutcome::Stored, None),
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
        let mut first_error = None;
        while !self.pending.is_empty() {
            if let Err(error) = self.complete_oldest().await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Helper for tests and clients: the messages that upload one file.
pub fn file_messages(path: &str, bytes: &[u8], chunk_size: usize) -> Vec<UploadProbesRequest> {
    let message = |m| UploadProbesRequest { message: Some(m) };
    let mut messages =
        vec![message(Message::FileHeader(FileHeader { path: path.to_owned(), size: bytes.len() as u64 }))];
    messages.extend(bytes.chunks(chunk_size.max(1)).map(|c| message(Message::Chunk(Bytes::copy_from_slice(c)))));
    let sha256 = Sha256Digest::of(bytes).to_hex();
    messages.push(message(Message::FileTrailer(probe_api::v1::FileTrailer { sha256 })));
    messages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::filesystem::{FilesystemStore, FilesystemStoreConfig};
    use probe_api::v1::{FileTrailer, UploadOptions};

    const A: &str = "2.5.0/collector-ebpf-5.4.0.o.gz";
    const B: &str = "2.5.0/collector-ebpf-5.5.0.o.gz";

    fn store(dir: &std::path::Path) -> Arc<dyn ProbeStore> {
        let config = FilesystemStoreConfig { data_dir: dir.to_owned(), min_free_bytes: 0 };
        Arc::new(FilesystemStore::open(&config).unwrap())
    }

    fn options(overwrite: bool) -> UploadProbesRequest {
        UploadProbesRequest { message: Some(Message::Options(UploadOptions { overwrite })) }
    }

    fn chunk(bytes: &'static [u8]) -> UploadProbesRequest {
        UploadProbesRequest { message: Some(Message::Chunk(Bytes::from_static(bytes))) }
    }

    async fn run(store: &Arc<dyn ProbeStore>, messages: Vec<UploadProbesRequest>) -> Result<UploadProbesResponse> {
        UploadSession::new(store.clone()).run(tokio_stream::iter(messages.into_iter().map(Ok))).await
    }

    async fn stored(store: &Arc<dyn ProbeStore>, path: &str) -> bool {
        store.stat(&ProbePath::parse(path).unwrap()).await.unwrap().is_some()
    }

    #[tokio::test]
    async fn a_well_formed_stream_stores_every_file_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let mut messages = vec![options(false)];
        messages.extend(file_messages(A, b"probe a", 3));
        messages.extend(file_messages(B, b"", 3));
        let response = run(&store, messages).await.unwrap();
        assert_eq!(response.stored_count, 2);
        assert_eq!(response.bytes_received, 7);
        assert_eq!(response.results[0].path, A);
        assert_eq!(response.results[1].outcome, FileOutcome::Stored as i32);

        let mut again = vec![options(false)];
        again.extend(file_messages(A, b"probe a", 3));
        again.extend(file_messages(B, b"changed", 3));
        let response = run(&store, again).await.unwrap();
        assert_eq!((response.identical_count, response.conflict_count), (1, 1));
        assert!(!response.results[1].existing_sha256.is_empty());
    }

    #[tokio::test]
    async fn out_of_order_messages_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let header = file_messages(A, b"x", 1).remove(0);
        let trailer = file_messages(A, b"x", 1).pop().unwrap();
        let cases: Vec<(&str, Vec<UploadProbesRequest>)> = vec![
            ("empty", vec![]),
            ("no options first", file_messages(A, b"x", 1)),
            ("second options", vec![options(false), options(true)]),
            ("chunk outside a file", vec![options(false), chunk(b"x")]),
            ("trailer outside a file", vec![options(false), trailer.clone()]),
            ("header inside a file", vec![options(false), header.clone(), header.clone()]),
            ("empty message", vec![options(false), UploadProbesRequest { message: None }]),
        ];
        for (case, messages) in cases {
            let error = run(&store, messages).await.unwrap_err();
            assert_eq!(error.code, Code::InvalidArgument, "{case}: {error}");
        }
        assert!(!stored(&store, A).await);
    }

    #[tokio::test]
    async fn a_truncated_stream_keeps_the_finished_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let mut messages = vec![options(false)];
        messages.extend(file_messages(A, b"complete", 4));
        let mut second = file_messages(B, b"incomplete", 4);
        second.truncate(2);
        messages.extend(second);
        let error = run(&store, messages).await.unwrap_err();
        assert_eq!(error.code, Code::InvalidArgument);
        assert!(error.message.contains("after 1 finished files"), "{error}");
        assert!(stored(&store, A).await);
        assert!(!stored(&store, B).await);
    }

    #[tokio::test]
    async fn a_broken_client_stream_keeps_the_finished_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let mut messages: Vec<Result<_, tonic::Status>> = vec![Ok(options(false))];
        messages.extend(file_messages(A, b"complete", 4).into_iter().map(Ok));
        messages.push(Ok(file_messages(B, b"x", 4).remove(0)));
        messages.push(Err(tonic::Status::cancelled("client went away")));
        let error = UploadSession::new(store.clone()).run(tokio_stream::iter(messages)).await.unwrap_err();
        assert_eq!(error.code, Code::Cancelled);
        assert!(stored(&store, A).await);
        assert!(!stored(&store, B).await);
    }

    #[tokio::test]
    async fn lying_sizes_and_digests_store_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let header =
            |size| UploadProbesRequest { message: Some(Message::FileHeader(FileHeader { path: A.to_owned(), size })) };
        let trailer = |sha256: &str| UploadProbesRequest {
            message: Some(Message::FileTrailer(FileTrailer { sha256: sha256.to_owned() })),
        };
        let good = file_messages(A, b"abc", 10).pop().unwrap();
        let wrong_digest = file_messages(A, b"abd", 10).pop().unwrap();
        let cases = vec![
            ("more bytes than declared", vec![options(false), header(2), chunk(b"abc")], Code::InvalidArgument),
            (
                "fewer bytes than declared",
                vec![options(false), header(4), chunk(b"abc"), good.clone()],
                Code::InvalidArgument,
            ),
            ("wrong digest", vec![options(false), header(3), chunk(b"abc"), wrong_digest], Code::DataLoss),
            ("malformed digest", vec![options(false), header(3), chunk(b"abc"), trailer("ABC")], Code::InvalidArgument),
            ("too large", vec![options(false), header(MAX_FILE_SIZE + 1)], Code::InvalidArgument),
            (
                "invalid path",
                vec![
                    options(false),
                    UploadProbesRequest {
                        message: Some(Message::FileHeader(FileHeader { path: "../etc/passwd".into(), size: 1 })),
                    },
                ],
                Code::InvalidArgument,
            ),
        ];
        for (case, messages, code) in cases {
            let error = run(&store, messages).await.unwrap_err();
            assert_eq!(error.code, code, "{case}: {error}");
        }
        assert!(!stored(&store, A).await);
    }

    #[tokio::test]
    async fn the_same_path_twice_in_one_stream_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let mut messages = vec![options(false)];
        messages.extend(file_messages(A, b"one", 4));
        messages.extend(file_messages(A, b"two", 4));
        let error = run(&store, messages).await.unwrap_err();
        assert_eq!(error.code, Code::InvalidArgument);
        assert!(stored(&store, A).await, "the first copy was complete and stays");
    }
}
