//! The request edge: what one request is (`Call`), what answers it
//! (`Handler`), the layers around the route table (`layers`: requests in
//! flight; `recode`: tonic's refusals as the API documents them;
//! `tonic_routes`: tonic's services as one handler), and the wire, nothing
//! but the wire: the gRPC message framing Central reads and writes beside
//! tonic (`grpc`, `grpc_stream`), gRPC-web (`grpc_web`) and plain HTTP
//! answers and body reads (`http`). Nothing here knows a route or a use
//! case: the table (`server::routes`) and the handlers use it.

pub mod grpc;
pub mod grpc_stream;
pub mod grpc_web;
pub mod http;
pub mod layers;
pub mod recode;
pub mod tonic_routes;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use ::http::{Request, Response};
use hyper::body::Incoming;

use crate::server::serving::Asker;
use crate::server::serving::slots::Connection;

/// A handler's answer to one call, to come.
pub type Answer = Pin<Box<dyn Future<Output = Response<tonic::body::Body>> + Send>>;

/// One request, with what its connection knows of the client.
pub struct Call {
    pub request: Request<Incoming>,
    /// Who is asking, for GetProbe and the HTTPS route.
    pub asker: Asker,
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The connection it came on, for the probe stream slots.
    pub connection: Arc<dyn Connection>,
}

impl Call {
    /// The client's address, for the log.
    pub fn client(&self) -> String {
        self.remote.map_or_else(|| "unknown".into(), |address| address.to_string())
    }
}

/// What answers calls: a route's handler, or the route table itself.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, call: Call) -> Answer;
}
