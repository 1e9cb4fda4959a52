//! A gRPC request stream read straight from the HTTP/2 body, without the
//! copy tonic makes of every DATA frame into its decode buffer before it
//! decodes a message (what that cost: BENCHMARKS.md, "Receiving an
//! upload"). A message that is one length-delimited field and nothing else
//! (the field named in `StreamLimits::field_in_pieces`, of at most its
//! size) comes out as the pieces of the frames that carried it, for the
//! store to copy once; every other message is gathered and decoded by
//! prost, as tonic would. A client cannot tell the two apart (`tests` feeds
//! both the same bytes in every split).
//!
//! Errors, each ending the stream as the client is told of it: a compressed
//! message (INVALID_ARGUMENT: Central accepts none), a message over
//! `StreamLimits::max_message` (RESOURCE_EXHAUSTED, on its length alone,
//! before its bytes are read), a message that is not valid protobuf or a
//! body that ends inside a message (INVALID_ARGUMENT); a broken body (the
//! client went away) ends the stream as CANCELLED, and a body that brings
//! nothing for the idle timeout as DEADLINE_EXCEEDED (`http::idle_error`).
//! Time the consumer takes does not count as idle: the body is not waited
//! on meanwhile.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use tokio_stream::Stream;
use tonic::Code;

use crate::error::Error;
use crate::server::edge::grpc::PREFIX;
use crate::server::edge::http::idle_error;

/// What a stream may carry.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    /// The largest message, in bytes.
    pub max_message: usize,
    /// The tag of the field whose messages come in pieces, and the largest
    /// such field that does (a larger one is decoded whole).
    pub field_in_pieces: Option<(u8, usize)>,
    /// What the messages are, for errors ("upload": "a malformed upload
    /// message").
    pub what: &'static str,
}

impl StreamLimits {
    fn malformed(&self, why: &str) -> Error {
        Error::invalid_argument(format!("a malformed {} message: {why}", self.what))
    }
}

/// One message of the stream.
#[derive(Debug)]
pub enum Piece<M> {
    /// The bytes of the `field_in_pieces` field of a message that is only
    /// that field, in the pieces the frames carried them.
    Field(Vec<Bytes>),
    /// Any other message, decoded.
    Message(M),
}

/// The messages of a gRPC request body.
pub struct MessagePieces<B, M> {
    body: B,
    limits: StreamLimits,
    /// Bytes received and not handed on yet, in order.
    received: VecDeque<Bytes>,
    /// Their sum.
    buffered: usize,
    body_ended: bool,
    /// The stream ended, at the body's end or at an error.
    done: bool,
    /// The stream ends when the body brings nothing for this long.
    idle_timeout: Option<Duration>,
    /// Armed while the body is waited on; only bytes received disarm it.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    message: PhantomData<fn() -> M>,
}

impl<B, M> MessagePieces<B, M> {
    pub fn new(body: B, limits: StreamLimits) -> Self {
        MessagePieces {
            body,
            limits,
            received: VecDeque::new(),
            buffered: 0,
            body_ended: false,
            done: false,
            idle_timeout: None,
            idle: None,
            message: PhantomData,
        }
    }

    /// Ends the stream with `idle_error` once the body brings nothing for
    /// `timeout`.
    pub fn ending_after_idle(self, timeout: Duration) -> Self {
        MessagePieces { idle_timeout: Some(timeout), ..self }
    }

    /// The next message, once all of its bytes are buffered.
    fn next_piece(&mut self) -> Result<Option<Piece<M>>, Error>
    where
        M: prost::Message + Default,
    {
        if self.buffered < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        self.peek(0, &mut prefix);
        if prefix[0] != 0 {
            return Err(self.limits.malformed("a compressed message: Central accepts no compressed requests"));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.limits.max_message {
            let StreamLimits { max_message, what, .. } = self.limits;
            let article = if what.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
            return Err(Error::new(
                Code::ResourceExhausted,
                format!("{article} {what} message over the limit of {max_message} bytes: a message of {len} bytes"),
            ));
        }
        if self.buffered < PREFIX + len {
            return Ok(None);
        }
        if let Some(field_header) = self.field_header(len) {
            self.take(PREFIX + field_header);
            return Ok(Some(Piece::Field(self.take(len - field_header))));
        }
        self.take(PREFIX);
        let message = match self.take(len).as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            pieces => pieces.concat().into(),
        };
        let message = M::decode(message).map_err(|e| self.limits.malformed(&format!("not valid protobuf: {e}")))?;
        Ok(Some(Piece::Message(message)))
    }

    /// For a message of `len` bytes that is the `field_in_pieces` field and
    /// nothing else, within its size: the length of the field's tag and
    /// length.
    fn field_header(&self, len: usize) -> Option<usize> {
        let (field_tag, max_field) = self.limits.field_in_pieces?;
        let mut head = [0u8; 11];
        let head = &mut head[..len.min(11)];
        self.peek(PREFIX, head);
        let (&tag, mut rest) = head.split_first()?;
        if tag != field_tag {
            return None;
        }
        let varint_len = rest.len();
        let field_len = prost::encoding::decode_varint(&mut rest).ok()?;
        let header = 1 + varint_len - rest.len();
        (field_len == (len - header) as u64 && field_len as usize <= max_field).then_some(header)
    }

    /// Copies buffered bytes from `offset` on into `out`, leaving them
    /// buffered; the caller knows that enough are.
    fn peek(&self, mut offset: usize, out: &mut [u8]) {
        let mut filled = 0;
        for piece in &self.received {
            if filled == out.len() {
                break;
            }
            if offset >= piece.len() {
                offset -= piece.len();
                continue;
            }
            let n = (piece.len() - offset).min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&piece[offset..offset + n]);
            filled += n;
            offset = 0;
        }
    }

    /// Takes the first `len` buffered bytes, as the pieces they came in.
    fn take(&mut self, mut len: usize) -> Vec<Bytes> {
        self.buffered -= len;
        let mut pieces = Vec::new();
        while len > 0 {
            let front = self.received.front_mut().expect("the caller knows that enough are buffered");
            if front.len() <= len {
                len -= front.len();
                pieces.extend(self.received.pop_front());
            } else {
                pieces.push(front.split_to(len));
                len = 0;
            }
        }
        pieces
    }
}

impl<B, M> Stream for MessagePieces<B, M>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    M: prost::Message + Default,
{
    type Item = Result<Piece<M>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.next_piece() {
                Ok(Some(piece)) => return Poll::Ready(Some(Ok(piece))),
                Ok(None) => {}
                Err(error) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(error)));
                }
            }
            if this.body_ended {
                this.done = true;
                let inside = this.buffered > 0;
                return Poll::Ready(inside.then(|| Err(this.limits.malformed("the body ended inside a message"))));
            }
            let polled = Pin::new(&mut this.body).poll_frame(cx);
            let Poll::Ready(polled) = polled else {
                let Some(timeout) = this.idle_timeout else { return Poll::Pending };
                let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.done = true;
                return Poll::Ready(Some(Err(idle_error(timeout))));
            };
            match polled {
                Some(Ok(frame)) => {
                    // Only bytes count as activity, whatever frames the
                    // HTTP layer hands on (h2 drops empty DATA frames
                    // itself; the rule does not lean on that).
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        this.idle = None;
                        this.buffered += data.len();
                        this.received.push_back(data);
                    }
                }
                Some(Err(error)) => {
                    this.done = true;
                    let error: Box<dyn std::error::Error + Send + Sync> = error.into();
                    let what = this.limits.what;
                    return Poll::Ready(Some(Err(Error::new(
                        Code::Cancelled,
                        format!("the {what} stream broke off: {error}"),
                    ))));
                }
                None => this.body_ended = true,
            }
        }
    }
}

#[cfg(test)]
mod tests;
