//! Reading a GetProbe reply as the API defines it: a header first, then
//! chunks holding exactly the announced number of bytes. Central's upstream
//! source and the Collector both read replies through this one reader, so
//! they refuse the same broken replies.

use bytes::Bytes;
use tonic::Streaming;

use crate::digest::Sha256Digest;
use crate::v1::get_probe_response::Message;
use crate::v1::{GetProbeResponse, ProbeHeader};

/// Why a reply could not be read.
#[derive(Debug)]
pub enum ReplyError {
    /// The server ended the call with an error status.
    Status(tonic::Status),
    /// The reply broke the protocol: no header first, a second header, a
    /// malformed digest, too many or too few bytes, a size over the limit.
    BadReply(String),
}

impl ReplyError {
    /// The gRPC code, `DataLoss` for a reply that broke the protocol or
    /// failed verification.
    pub fn code(&self) -> tonic::Code {
        match self {
            ReplyError::Status(status) => status.code(),
            ReplyError::BadReply(_) => tonic::Code::DataLoss,
        }
    }
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyError::Status(status) => f.write_str(&crate::transport::describe(status)),
            ReplyError::BadReply(why) => write!(f, "bad reply: {why}"),
        }
    }
}

impl std::error::Error for ReplyError {}

/// A GetProbe reply whose header has been read and checked.
pub struct ProbeReply {
    stream: Streaming<GetProbeResponse>,
    header: ProbeHeader,
    sha256: Sha256Digest,
    received: u64,
}

impl ProbeReply {
    /// Reads the header: it must come first, carry a well-formed SHA-256,
    /// and announce at most `max_size` bytes.
    pub async fn start(mut stream: Streaming<GetProbeResponse>, max_size: u64) -> Result<Self, ReplyError> {
        let bad = |why: String| Err(ReplyError::BadReply(why));
        let header = match stream.message().await.map_err(ReplyError::Status)? {
            Some(GetProbeResponse { message: Some(Message::Header(header)) }) => header,
            _ => return bad("the reply did not start with a header".into()),
        };
        let Some(sha256) = Sha256Digest::from_hex(&header.sha256) else {
            return bad(format!("malformed SHA-256 {:?} in the header", header.sha256));
        };
        if header.size > max_size {
            return bad(format!("a size of {} bytes, over the limit of {max_size}", header.size));
        }
        Ok(ProbeReply { stream, header, sha256, received: 0 })
    }

    pub fn header(&self) -> &ProbeHeader {
        &self.header
    }

    /// The size the header announced.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// The SHA-256 the header announced; the caller checks the bytes.
    pub fn sha256(&self) -> Sha256Digest {
        self.sha256
    }

    /// The next chunk, or `None` once exactly the announced bytes came.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ReplyError> {
        let bad = |why: String| Err(ReplyError::BadReply(why));
        match self.stream.message().await.map_err(ReplyError::Status)? {
            Some(GetProbeResponse { message: Some(Message::Chunk(chunk)) }) => {
                self.received += chunk.len() as u64;
                if self.received > self.header.size {
                    return bad(format!("more bytes than the {} in the header", self.header.size));
                }
                Ok(Some(chunk))
            }
            Some(_) => bad("a second header".into()),
            None if self.received != self.header.size => {
                bad(format!("{} bytes received, {} announced", self.received, self.header.size))
            }
            None => Ok(None),
        }
    }
}
