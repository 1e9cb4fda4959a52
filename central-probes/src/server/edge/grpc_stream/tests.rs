//! `MessagePieces` against prost, on UploadProbes' messages: every message
//! back as it was sent, however the body's frames split the bytes, chunks
//! without a copy, and the errors the proto names.

use super::*;
use http_body::Frame;
use http_body_util::StreamBody;
use probe_api::limits::{MAX_REQUEST_MESSAGE, MAX_UPLOAD_CHUNK};
use probe_api::v1::upload_probes_request::Message;
use probe_api::v1::{FileHeader, FileTrailer, UploadOptions, UploadProbesRequest};
use prost::Message as _;
use tokio_stream::StreamExt;

/// Tag of `UploadProbesRequest.chunk`: field 3, length-delimited.
const CHUNK_TAG: u8 = (3 << 3) | 2;

/// An UploadProbes stream, as its handler reads it.
fn upload_parts<B>(body: B) -> MessagePieces<B, UploadProbesRequest> {
    let limits = StreamLimits {
        max_message: MAX_REQUEST_MESSAGE,
        field_in_pieces: Some((CHUNK_TAG, MAX_UPLOAD_CHUNK)),
        what: "upload",
    };
    MessagePieces::new(body, limits)
}

fn request(message: Message) -> UploadProbesRequest {
    UploadProbesRequest { message: Some(message) }
}

/// `message` as tonic's client puts it on the wire.
fn wire(message: &UploadProbesRequest) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// A body of `bytes` cut at `cuts`, then `tail` (a frame, or an error).
fn body(
    bytes: &[u8],
    cuts: &[usize],
    tail: Option<Result<Frame<Bytes>, std::io::Error>>,
) -> StreamBody<impl Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Unpin> {
    let mut frames = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain([&bytes.len()]) {
        let cut = cut.clamp(start, bytes.len());
        frames.push(Ok(Frame::data(Bytes::copy_from_slice(&bytes[start..cut]))));
        start = cut;
    }
    frames.extend(tail);
    StreamBody::new(tokio_stream::iter(frames))
}

/// Every part, a chunk's pieces joined again, and whether it came in pieces.
async fn decode<B>(parts: MessagePieces<B, UploadProbesRequest>) -> Vec<(Result<UploadProbesRequest, Code>, bool)>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    parts
        .map(|part| match part {
            Ok(Piece::Message(message)) => (Ok(message), false),
            Ok(Piece::Field(pieces)) => (Ok(request(Message::Chunk(pieces.concat().into()))), true),
            Err(error) => (Err(error.code), false),
        })
        .collect()
        .await
}

fn pseudo_random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn the_chunk_tag_is_prosts() {
    let encoded = request(Message::Chunk(Bytes::from_static(b"abc"))).encode_to_vec();
    assert_eq!(encoded[0], CHUNK_TAG);
}

#[tokio::test]
async fn every_message_comes_back_whatever_the_frames_and_chunks_come_in_pieces() {
    let chunk = |len: usize| request(Message::Chunk((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into()));
    // A chunk field followed by another field of the oneof: prost keeps
    // the last, so this is a trailer, and must not be taken as a chunk.
    let mut chunk_then_trailer = request(Message::Chunk(Bytes::from_static(b"xyz"))).encode_to_vec();
    chunk_then_trailer.extend(request(Message::FileTrailer(FileTrailer::default())).encode_to_vec());
    let messages = vec![
        request(Message::Options(UploadOptions { overwrite: true })),
        request(Message::FileHeader(FileHeader { path: "2.5.0/collector-ebpf-5.4.0.o.gz".into(), size: 7 })),
        chunk(0),
        chunk(1),
        chunk(127),
        chunk(128),
        chunk(16_383),
        chunk(1 << 20),
        chunk(MAX_UPLOAD_CHUNK),
        chunk(MAX_UPLOAD_CHUNK + 1),
        UploadProbesRequest::decode(chunk_then_trailer.as_slice()).unwrap(),
        request(Message::FileTrailer(FileTrailer {
            sha256: "ab".repeat(32),
            crc32: Some(7),
            signature: Bytes::from_static(b"untrusted comment: x"),
        })),
        UploadProbesRequest { message: None },
    ];
    let mut bytes = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if i == 10 {
            let mut frame = vec![0u8];
            frame.extend_from_slice(&(chunk_then_trailer.len() as u32).to_be_bytes());
            frame.extend_from_slice(&chunk_then_trailer);
            bytes.extend(frame);
        } else {
            bytes.extend(wire(message));
        }
    }
    // The chunks of at most MAX_UPLOAD_CHUNK come in pieces; the larger one
    // whole, for the session to refuse.
    let in_pieces: Vec<bool> = (0..messages.len()).map(|i| (2..=8).contains(&i)).collect();
    let mut seed = 0x2545_f491_4f6c_dd1d;
    for round in 0..16 {
        // One frame, frames of HTTP/2's default size, and random cuts: tiny
        // over the small messages (splitting every prefix and field header),
        // then anything up to 70 KB.
        let cuts: Vec<usize> = match round {
            0 => vec![],
            1 => (1..=bytes.len() / 16_384).map(|i| i * 16_384).collect(),
            _ => {
                let small = wire(&messages[0]).len() + wire(&messages[1]).len() + 20_000;
                let mut at = 0;
                let mut cuts = Vec::new();
                while at < bytes.len() {
                    at += 1 + (pseudo_random(&mut seed) % if at < small { 7 } else { 70_000 }) as usize;
                    cuts.push(at);
                }
                cuts
            }
        };
        let decoded = decode(upload_parts(body(&bytes, &cuts, None))).await;
        assert_eq!(decoded.len(), messages.len(), "round {round}");
        for (i, ((got, pieces), sent)) in decoded.into_iter().zip(&messages).enumerate() {
            assert_eq!(got.as_ref(), Ok(sent), "round {round}, message {i}");
            assert_eq!(pieces, in_pieces[i], "round {round}, message {i}: in pieces");
        }
    }
}

#[tokio::test]
async fn a_stream_of_whole_messages_ends_cleanly_and_trailers_are_no_data() {
    let bytes = wire(&request(Message::Options(UploadOptions::default())));
    let trailers = Some(Ok(Frame::trailers(http::HeaderMap::new())));
    let decoded = decode(upload_parts(body(&bytes, &[2], trailers))).await;
    assert_eq!(decoded, vec![(Ok(request(Message::Options(UploadOptions::default()))), false)]);
    assert!(decode(upload_parts(body(&[], &[], None))).await.is_empty());
}

#[tokio::test]
async fn bad_bodies_get_the_codes_the_proto_names() {
    let good = wire(&request(Message::Options(UploadOptions::default())));
    let mut compressed = good.clone();
    compressed[0] = 1;
    // Only the prefix of a message over the limit: refused on its length.
    let mut oversized = vec![0u8];
    oversized.extend_from_slice(&((MAX_REQUEST_MESSAGE + 1) as u32).to_be_bytes());
    let truncated = &good[..good.len() - 1];
    let mut not_protobuf = vec![0u8, 0, 0, 0, 2];
    not_protobuf.extend_from_slice(&[0xff, 0xff]);
    for (name, bytes, code) in [
        ("compressed", compressed, Code::InvalidArgument),
        ("oversized", oversized, Code::ResourceExhausted),
        ("truncated", truncated.to_vec(), Code::InvalidArgument),
        ("not protobuf", not_protobuf, Code::InvalidArgument),
    ] {
        let mut all = good.clone();
        all.extend(bytes);
        let decoded = decode(upload_parts(body(&all, &[3], None))).await;
        assert_eq!(decoded.len(), 2, "{name}: one good message, then the error, then nothing");
        assert!(decoded[0].0.is_ok(), "{name}");
        assert_eq!(decoded[1].0, Err(code), "{name}");
    }
    let broken = Some(Err(std::io::Error::other("connection reset")));
    let decoded = decode(upload_parts(body(&good[..4], &[], broken))).await;
    assert_eq!(decoded.len(), 1);
    assert!(decoded[0].0.is_err());
    assert_eq!(decoded[0].0, Err(Code::Cancelled), "a broken body is the client gone");
}

/// A body that sends an empty DATA frame every 20 ms and never ends.
fn empty_frames_for_ever() -> StreamBody<impl Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Unpin> {
    let frames = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Some((Ok(Frame::data(Bytes::new())), ()))
    });
    StreamBody::new(Box::pin(frames))
}

#[tokio::test]
async fn empty_frames_do_not_keep_an_idle_upload_open() {
    let mut parts = upload_parts(empty_frames_for_ever()).ending_after_idle(Duration::from_millis(200));
    let first = tokio::time::timeout(Duration::from_secs(20), parts.next()).await;
    let error = first.expect("the upload is still open after 20 s of empty frames").unwrap().unwrap_err();
    assert_eq!(error.code, Code::DeadlineExceeded, "{error}");
    assert!(parts.next().await.is_none());
}
