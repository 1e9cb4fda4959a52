//! The layer around every call: a request is in flight from its call until
//! its response body is done or dropped, and a connection with none in
//! flight for the idle timeout is closed (`Activity::idle_for`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Response;

use crate::server::edge::Answer;

/// Requests in flight on a connection and when the last one ended.
pub struct Activity {
    in_flight: AtomicUsize,
    since: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity { in_flight: AtomicUsize::new(0), since: Mutex::new(Instant::now()) }
    }
}

impl Activity {
    pub fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.since.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).elapsed()
    }

    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }
}

/// One request in flight, until its response body is done or dropped.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.since.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer whose response body keeps its request in flight.
pub struct Tracked {
    answer: Answer,
    /// Handed to the body once the answer is ready.
    in_flight: Option<InFlight>,
}

impl Tracked {
    pub fn new(answer: Answer, in_flight: InFlight) -> Self {
        Tracked { answer, in_flight: Some(in_flight) }
    }
}

impl Future for Tracked {
    type Output = Result<Response<tonic::body::Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = std::task::ready!(self.answer.as_mut().poll(cx));
        let in_flight = self.in_flight.take().expect("a future is not polled after it is ready");
        Poll::Ready(Ok(response.map(|body| tonic::body::Body::new(TrackedBody { body, _in_flight: in_flight }))))
    }
}

/// A response body that marks its request finished when it is dropped.
struct TrackedBody {
    body: tonic::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
