//! Any request of roxctl's upload route (`POST
//! /api/extensions/probeupload?manifestLen=N`: a manifest, then its files'
//! bytes) through the route's body parser into the upload state machine
//! and a real store (`roxctl_upload::receive`). It must end with a
//! response or a clear error, never panic, leave no file in tmp/, and when
//! it succeeds every file of the manifest must be stored with exactly the
//! body's bytes for it.
//!
//! Input format: [u8 flags][u16 little-endian query length][query][body].
//! Flags, bits 0-1: no Content-Length, the body's length, one more, one
//! less; bits 2-4: the size of the body's frames (1 byte to 64 KiB).
#![no_main]

mod common;

use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use central_probes::server::handlers::roxctl_upload::{PATH, receive};
use central_probes::store::ProbeStore;
use common::World;
use http_body::Frame;
use libfuzzer_sys::fuzz_target;
use probe_api::names::ProbePath;
use probe_api::product::v1::ProbeUploadManifest;
use prost::Message;
use tokio_stream::StreamExt;

const FRAME_SIZES: [usize; 8] = [1, 3, 64, 1000, 4096, 16384, 65536, 7];

struct Input<'a> {
    content_length: Option<u64>,
    frame_size: usize,
    query: &'a [u8],
    body: &'a [u8],
}

fn input(data: &[u8]) -> Option<Input<'_>> {
    let (&flags, rest) = data.split_first()?;
    let (query_len, rest) = rest.split_first_chunk::<2>()?;
    let query_len = u16::from_le_bytes(*query_len) as usize;
    let (query, body) = (rest.get(..query_len)?, &rest[query_len..]);
    let len = body.len() as u64;
    let content_length = [None, Some(len), Some(len + 1), len.checked_sub(1)][usize::from(flags & 3)];
    let frame_size = FRAME_SIZES[usize::from((flags >> 2) & 7)];
    Some(Input { content_length, frame_size, query, body })
}

/// What the store holds under `name`, if its chunks all read.
async fn stored(store: &dyn ProbeStore, name: &str) -> Option<Vec<u8>> {
    let path = ProbePath::parse(name).ok()?;
    let reader = store.open(&path).await.ok()??;
    let chunks: Vec<_> = reader.chunks.collect().await;
    Some(chunks.into_iter().collect::<Result<Vec<Bytes>, _>>().ok()?.concat())
}

/// After a successful upload: the manifest (the query's first
/// `manifestLen`, as the route reads it) and every file it lists, stored
/// as the body carried it, the body ending with the last.
async fn check_stored(store: &dyn ProbeStore, query: &str, body: &[u8]) {
    let manifest_len: usize = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("manifestLen="))
        .and_then(|len| len.parse().ok())
        .expect("an upload that succeeded had a manifestLen");
    let manifest = ProbeUploadManifest::decode(&body[..manifest_len]).expect("an upload that succeeded had a manifest");
    let mut at = manifest_len;
    for file in &manifest.files {
        let size = usize::try_from(file.size).expect("a size the route took");
        let sent = &body[at..at + size];
        at += size;
        assert_eq!(stored(store, &file.name).await.as_deref(), Some(sent), "{} as stored", file.name);
    }
    assert_eq!(at, body.len(), "the body went on past its manifest's files");
}

fuzz_target!(|data: &[u8]| {
    static WORLD: OnceLock<World> = OnceLock::new();
    let world = WORLD.get_or_init(World::new);
    let Some(input) = input(data) else { return };
    let Ok(query) = std::str::from_utf8(input.query) else { return };
    let Ok(uri) = http::Uri::try_from(format!("{PATH}?{query}")) else { return };
    let query = uri.query().unwrap_or_default().to_owned();
    let frames: Vec<_> = input
        .body
        .chunks(input.frame_size)
        .map(|piece| Ok::<_, Infallible>(Frame::data(Bytes::copy_from_slice(piece))))
        .collect();
    let mut request = http::Request::post(uri);
    if let Some(length) = input.content_length {
        request = request.header(http::header::CONTENT_LENGTH, length);
    }
    let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
    let request = request.body(body).expect("a valid request");
    world.runtime.block_on(async {
        let end = receive(world.store.clone(), Duration::from_secs(60), request).await;
        if end.error.is_none() {
            check_stored(&*world.store, &query, input.body).await;
        }
    });
    world.assert_no_temporary_file();
});
