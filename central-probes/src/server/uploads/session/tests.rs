//! The upload state machine against a real store: order, limits, lies.

use super::*;
use crate::store::filesystem::{FilesystemStore, FilesystemStoreConfig};
use bytes::Bytes;
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
    UploadSession::new(store.clone()).run(tokio_stream::iter(messages.into_iter().map(UploadEvent::try_from))).await
}

fn events(messages: Vec<Result<UploadProbesRequest>>) -> impl tokio_stream::Stream<Item = Result<UploadEvent>> + Unpin {
    tokio_stream::iter(messages.into_iter().map(|m| m.and_then(UploadEvent::try_from)))
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
    let mut messages: Vec<Result<_>> = vec![Ok(options(false))];
    messages.extend(file_messages(A, b"complete", 4).into_iter().map(Ok));
    messages.push(Ok(file_messages(B, b"x", 4).remove(0)));
    messages.push(Err(Error::new(Code::Cancelled, "client went away")));
    let error = UploadSession::new(store.clone()).run(events(messages)).await.unwrap_err();
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
        message: Some(Message::FileTrailer(FileTrailer {
            sha256: sha256.to_owned(),
            crc32: None,
            signature: Default::default(),
        })),
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

/// The messages of a file whose trailer carries the digest of other bytes.
fn file_with_wrong_digest(path: &str, bytes: &[u8]) -> Vec<UploadProbesRequest> {
    let mut messages = file_messages(path, bytes, 64 * 1024);
    messages.pop();
    messages.extend(file_messages(path, b"other bytes", 1).pop());
    messages
}

fn kernel_path(i: usize) -> String {
    format!("2.5.0/collector-ebpf-6.{i}.0.o.gz")
}

#[tokio::test]
async fn no_file_after_a_failing_one_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    // A large first file takes longest to verify, so the small valid
    // files after it would be ready first.
    let large: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    let mut messages = vec![options(false)];
    messages.extend(file_with_wrong_digest(A, &large));
    for i in 0..40 {
        messages.extend(file_messages(&kernel_path(i), b"valid", 5));
    }
    let error = run(&store, messages).await.unwrap_err();
    assert_eq!(error.code, Code::DataLoss, "{error}");
    assert!(error.message.contains(A), "the error names the failing file: {error}");
    assert!(error.message.contains("after 0 finished files"), "{error}");
    for i in 0..40 {
        assert!(!stored(&store, &kernel_path(i)).await, "{} must not be stored", kernel_path(i));
    }
    assert!(!stored(&store, A).await);
}

#[tokio::test]
async fn files_before_a_failing_one_are_committed_and_the_error_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let mut messages = vec![options(false)];
    messages.extend(file_messages(A, b"valid", 2));
    messages.extend(file_with_wrong_digest(B, b"corrupt"));
    messages.extend(file_messages(&kernel_path(1), b"valid", 2));
    let error = run(&store, messages).await.unwrap_err();
    assert_eq!(error.code, Code::DataLoss);
    assert!(error.message.contains(B) && error.message.contains("after 1 finished files"), "{error}");
    assert!(stored(&store, A).await);
    assert!(!stored(&store, B).await);
    assert!(!stored(&store, &kernel_path(1)).await);
}

#[tokio::test]
async fn an_oversized_chunk_is_resource_exhausted_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let big = vec![0u8; MAX_UPLOAD_CHUNK + 1];
    let mut messages = vec![options(false)];
    messages.extend(file_messages(A, &big, MAX_UPLOAD_CHUNK + 1));
    let error = run(&store, messages).await.unwrap_err();
    assert_eq!(error.code, Code::ResourceExhausted, "{error}");
    assert!(!stored(&store, A).await);

    let mut at_limit = vec![options(false)];
    at_limit.extend(file_messages(A, &big[..MAX_UPLOAD_CHUNK], MAX_UPLOAD_CHUNK));
    assert_eq!(run(&store, at_limit).await.unwrap().stored_count, 1);
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

/// The messages of one file whose trailer is `trailer`.
fn file_with_trailer(path: &str, bytes: &'static [u8], trailer: FileTrailer) -> Vec<UploadProbesRequest> {
    let mut messages = file_messages(path, bytes, 4);
    messages.pop();
    messages.push(UploadProbesRequest { message: Some(Message::FileTrailer(trailer)) });
    messages
}

#[tokio::test]
async fn a_trailer_may_carry_a_crc32_a_sha256_or_both_and_each_one_given_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let bytes = b"probe bytes";
    let (sha256, crc32) = (Sha256Digest::of(bytes).to_hex(), crc32fast::hash(bytes));
    let trailer = |sha256: &str, crc32: Option<u32>| FileTrailer {
        sha256: sha256.to_owned(),
        crc32,
        signature: Default::default(),
    };

    let mut messages = vec![options(false)];
    messages.extend(file_with_trailer(A, bytes, trailer("", Some(crc32))));
    messages.extend(file_with_trailer(B, bytes, trailer(&sha256, Some(crc32))));
    let response = run(&store, messages).await.unwrap();
    assert_eq!(response.stored_count, 2);
    assert_eq!(response.results[0].sha256, sha256, "Central's own SHA-256 of a file sent with a CRC-32 only");
    let probe = store.stat(&ProbePath::parse(A).unwrap()).await.unwrap().unwrap();
    assert_eq!(probe.crc32, Some(crc32));

    let refused: [(&str, FileTrailer, Code); 4] = [
        ("wrong CRC-32", trailer("", Some(crc32 ^ 1)), Code::DataLoss),
        ("right SHA-256, wrong CRC-32", trailer(&sha256, Some(crc32 ^ 1)), Code::DataLoss),
        ("neither digest", trailer("", None), Code::InvalidArgument),
        ("malformed SHA-256 beside a CRC-32", trailer("abc", Some(crc32)), Code::InvalidArgument),
    ];
    const C: &str = "2.5.0/collector-ebpf-5.6.0.o.gz";
    for (case, trailer, code) in refused {
        let mut messages = vec![options(false)];
        messages.extend(file_with_trailer(C, bytes, trailer));
        let error = run(&store, messages).await.unwrap_err();
        assert_eq!(error.code, code, "{case}: {error}");
        assert!(!stored(&store, C).await, "{case}");
    }
}
