//! Any sequence of upload messages, as a gRPC request body, through the
//! reader UploadProbes uses (`edge::grpc_stream::MessagePieces` with
//! `upload_probes::LIMITS`) into the upload
//! state machine and a real store: it must end with a response or a clear
//! error, never panic, and never leave a file in tmp/ behind.
//!
//! Input format: repeated [u16 little-endian length][encoded UploadProbesRequest];
//! each message that decodes is framed as gRPC frames it, and whatever
//! follows the last one goes into the body as it is, so the reader's own
//! parsing of lengths and chunk fields meets arbitrary bytes too. Each
//! message is split across two HTTP/2 frames at a point its length
//! chooses, as a client's frames may split it.
#![no_main]

mod common;

use std::convert::Infallible;
use std::sync::OnceLock;

use bytes::Bytes;
use central_probes::server::edge::grpc_stream::MessagePieces;
use central_probes::server::handlers::upload_probes::{LIMITS, event_of};
use central_probes::server::uploads::UploadSession;
use common::World;
use http_body::Frame;
use libfuzzer_sys::fuzz_target;
use probe_api::v1::UploadProbesRequest;
use prost::Message;
use tokio_stream::StreamExt;

/// The request body: the messages that decode, gRPC-framed, then the rest.
fn body(mut data: &[u8]) -> Vec<Bytes> {
    let mut frames = Vec::new();
    while data.len() >= 2 {
        let len = u16::from_le_bytes([data[0], data[1]]) as usize;
        let Some(body) = data.get(2..2 + len) else { break };
        let Ok(message) = UploadProbesRequest::decode(body) else { break };
        let encoded = message.encode_to_vec();
        let mut framed = Vec::with_capacity(5 + encoded.len());
        framed.push(0);
        framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        framed.extend_from_slice(&encoded);
        let mut framed = Bytes::from(framed);
        let cut = (3 + encoded.len() % 7).min(framed.len());
        frames.push(framed.split_to(cut));
        frames.push(framed);
        data = &data[2 + len..];
    }
    frames.push(Bytes::copy_from_slice(data));
    frames.retain(|frame| !frame.is_empty());
    frames
}

fuzz_target!(|data: &[u8]| {
    static WORLD: OnceLock<World> = OnceLock::new();
    let world = WORLD.get_or_init(World::new);
    let frames = body(data).into_iter().map(|frame| Ok::<_, Infallible>(Frame::data(frame)));
    let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
    let events = MessagePieces::new(body, LIMITS).map(event_of);
    let _ = world.runtime.block_on(UploadSession::new(world.store.clone()).run(events));
    world.assert_no_temporary_file();
});
