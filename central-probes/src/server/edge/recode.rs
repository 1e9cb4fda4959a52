//! tonic answers a request message over the size limit with OUT_OF_RANGE
//! and one that does not decode with INTERNAL, before any handler runs.
//! Both are the client's mistake, and INTERNAL would read as "retry": the
//! API documents RESOURCE_EXHAUSTED and INVALID_ARGUMENT. This layer
//! recodes them around tonic's services. Central's own handlers never
//! answer OUT_OF_RANGE, and their INTERNAL messages never start like
//! prost's decode error.

use http::HeaderValue;
use tonic::Code;

use crate::server::edge::{Answer, Call, Handler};

/// `H`, its answers' pre-handler refusals recoded.
pub struct RecodeClientErrors<H>(pub H);

impl<H: Handler> Handler for RecodeClientErrors<H> {
    fn call(&self, call: Call) -> Answer {
        let answer = self.0.call(call);
        Box::pin(async move {
            let mut response = answer.await;
            recode_client_errors(response.headers_mut());
            response
        })
    }
}

/// Recodes a trailers-only refusal of tonic's in `headers`.
pub fn recode_client_errors(headers: &mut http::HeaderMap) {
    let code = match headers.get("grpc-status").map(HeaderValue::as_bytes) {
        Some(b"11") => Code::ResourceExhausted,
        Some(b"13") => Code::InvalidArgument,
        _ => return,
    };
    let Some(status) = tonic::Status::from_header_map(headers) else { return };
    if code == Code::InvalidArgument && !status.message().starts_with("failed to decode Protobuf message") {
        return;
    }
    let recoded = tonic::Status::new(code, format!("the request message was refused: {}", status.message()));
    let _ = recoded.add_header(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undeliverable_messages_get_codes_that_do_not_say_retry() {
        for (status, code) in [
            (tonic::Status::out_of_range("decoded message length too large"), Some(Code::ResourceExhausted)),
            (
                tonic::Status::internal("failed to decode Protobuf message: invalid wire type"),
                Some(Code::InvalidArgument),
            ),
            (tonic::Status::internal("the store failed"), Some(Code::Internal)),
            (tonic::Status::unknown("connection reset"), Some(Code::Unknown)),
        ] {
            let mut headers = http::HeaderMap::new();
            status.add_header(&mut headers).unwrap();
            recode_client_errors(&mut headers);
            let recoded = tonic::Status::from_header_map(&headers).map(|status| status.code());
            assert_eq!(recoded, code, "{status:?}");
        }
    }
}
