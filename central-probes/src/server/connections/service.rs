//! The HTTP service of one connection: each request, with the connection's
//! TLS facts in its extensions (tonic's `peer_certs`, `remote_addr`),
//! becomes a `Call` to the route table, counted in flight for the idle
//! timeout (`edge::layers`).

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tonic::transport::server::Connected;

use crate::server::edge::layers::{Activity, Tracked};
use crate::server::edge::{Call, Handler};
use crate::server::serving::Asker;
use crate::server::serving::slots::Connection;
use crate::store::client_id::ClientId;

pub type ConnectInfo = <tokio_rustls::server::TlsStream<TcpStream> as Connected>::ConnectInfo;

/// The client of a TLS connection.
pub(super) fn asker_of(connect_info: &ConnectInfo) -> Asker {
    let certificates = connect_info.peer_certs();
    let certificate = certificates.as_deref().and_then(|certs| certs.first());
    let address = connect_info.get_ref().remote_addr().map(|address| address.ip());
    Asker {
        has_certificate: certificate.is_some(),
        client: ClientId::of(certificate.map(|cert| cert.as_ref()), address),
    }
}

/// The HTTP service of one connection.
#[derive(Clone)]
pub(super) struct ConnectionService {
    /// What answers every request: the route table.
    pub(super) table: Arc<dyn Handler>,
    pub(super) connect_info: ConnectInfo,
    /// Who is asking, for GetProbe and the HTTPS route.
    pub(super) asker: Asker,
    /// The connection, for the probe stream slots.
    pub(super) connection: Arc<dyn Connection>,
    pub(super) activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Tracked;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.connect_info.clone());
        let in_flight = self.activity.start();
        let call = Call {
            request,
            asker: self.asker,
            remote: self.connect_info.get_ref().remote_addr(),
            connection: self.connection.clone(),
        };
        Tracked::new(self.table.call(call), in_flight)
    }
}
