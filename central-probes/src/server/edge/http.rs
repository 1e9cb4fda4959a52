//! Plain HTTP for the routes that are not gRPC: one-line text answers, and
//! a raw body read that gives up on a client that sends nothing.

use std::convert::Infallible;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tonic::Code;

use crate::error::{Error, Result};

/// A plain-text answer: `message` and a newline.
pub fn text(status: StatusCode, message: &str) -> Response<tonic::body::Body> {
    let body = Full::new(Bytes::from(format!("{message}\n"))).map_err(|never: Infallible| match never {});
    let mut response = Response::new(tonic::body::Body::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The error that ends an upload that received nothing for `idle`.
pub fn idle_error(idle: Duration) -> Error {
    Error::new(
        Code::DeadlineExceeded,
        format!(
            "the upload received nothing for {} (Central's --upload-idle-timeout) and was ended",
            humantime::format_duration(idle)
        ),
    )
}

/// The next data of the body; `None` at its end. DEADLINE_EXCEEDED
/// (`idle_error`) when the body brings nothing for `idle`, CANCELLED when
/// it breaks off.
pub async fn next_data<B>(body: &mut B, idle: Duration) -> Result<Option<Bytes>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    // One deadline for the whole wait: a frame without bytes, whatever
    // the HTTP layer hands on, does not restart it.
    let deadline = tokio::time::Instant::now() + idle;
    while let Some(frame) = tokio::time::timeout_at(deadline, body.frame()).await.map_err(|_| idle_error(idle))? {
        let frame = frame.map_err(|e| Error::new(Code::Cancelled, format!("the body broke off: {e}")))?;
        if let Ok(mut data) = frame.into_data()
            && data.has_remaining()
        {
            return Ok(Some(data.copy_to_bytes(data.remaining())));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use http_body_util::StreamBody;

    #[tokio::test]
    async fn empty_frames_do_not_restart_the_idle_deadline() {
        let frames = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some((Ok::<_, std::io::Error>(Frame::data(Bytes::new())), ()))
        });
        let mut body = StreamBody::new(Box::pin(frames));
        let read =
            tokio::time::timeout(Duration::from_secs(20), next_data(&mut body, Duration::from_millis(200))).await;
        let error = read.expect("still waiting after 20 s of empty frames").unwrap_err();
        assert_eq!(error.code, Code::DeadlineExceeded, "{error}");
    }
}
