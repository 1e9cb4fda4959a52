//! Central's connections, from `accept` to the last HTTP/2 frame, with every
//! resource a client can hold bounded.
//!
//! tonic's own server cannot bound what a hostile client holds: it has no
//! handshake deadline by default, spins on EMFILE, and does not expose the
//! per-stream send buffer. So Central runs its own accept loop and serves
//! each connection with hyper directly, every request going to one
//! `edge::Handler`, the route table:
//! - a connection cap (and EMFILE/ENFILE) evicts connections still in
//!   their TLS handshake first, oldest first, since a silent client sits
//!   there; when none is, the new connection is closed at once;
//! - the TLS handshake has a deadline;
//! - HTTP/2 advertises a stream limit, pings idle peers, and buffers at most
//!   `SEND_BUFFER` per stream beyond what is on the wire;
//! - a connection with no request for the idle timeout is closed gracefully;
//! - each request carries its connection (`ConnectionHandle`, as the
//!   slots' `Connection`), through which `ProbeSlots` closes connections
//!   whose client stopped reading.

mod accept;
pub mod handle;
mod service;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;
use tracing::{debug, info};

pub use accept::raise_descriptor_limit;
pub use handle::ConnectionHandle;

use accept::{AcceptBackoff, Registration, Registry};
use service::{ConnectionService, asker_of};

use crate::server::edge::Handler;
use crate::server::edge::layers::Activity;

/// Bytes HTTP/2 may buffer for one stream beyond its flow-control window:
/// with unread streams this, plus one chunk, is what each one holds.
const SEND_BUFFER: usize = 64 * 1024;
/// Bytes a client may send on one stream before Central has taken them: an
/// upload's data waiting for the disk sits here: small enough to keep an
/// upload's memory low, large enough for a link of 50 ms round trip
/// (BENCHMARKS.md, "Receiving an upload").
const RECEIVE_STREAM_WINDOW: u32 = 4 << 20;
/// Descriptors kept free of connections for store files, probe reads and
/// upload temp files, besides one per probe stream slot.
const DESCRIPTOR_RESERVE: u64 = 128;

/// The limits of `serve`; `Default` holds the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// A TLS handshake not finished by then closes the connection.
    pub handshake_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval on a quiet connection, and how long the answer
    /// may take before the connection is closed.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Connections at once; `None` derives it from the descriptor limit.
    pub max_connections: Option<usize>,
    /// Streams one HTTP/2 connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// GetProbe streams in flight over all connections.
    pub max_probe_streams: usize,
    /// How long a GetProbe waits for a free slot before UNAVAILABLE.
    pub probe_stream_wait: Duration,
    /// A client that reads nothing of a probe stream for this long loses
    /// its connection.
    pub send_timeout: Duration,
    /// An upload (UploadProbes, the product's route) that receives nothing
    /// for this long is ended as interrupted; the files committed before
    /// stay.
    pub upload_idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connections: None,
            max_concurrent_streams: 100,
            max_probe_streams: 128,
            probe_stream_wait: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            upload_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Serves `table` over TLS on `listener` until `shutdown` completes, then
/// stops accepting, lets requests in flight finish and returns when every
/// connection has closed.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    table: Arc<dyn Handler>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let descriptors = raise_descriptor_limit();
    let derived = descriptors.saturating_sub(DESCRIPTOR_RESERVE + limits.max_probe_streams as u64).max(16) as usize;
    let max_connections = limits.max_connections.unwrap_or(derived);
    info!(descriptors, max_connections, "open descriptor limit");

    let mut builder = auto::Builder::new(TokioExecutor::new());
    // HTTP/1.1 only for the HTTPS probe route; a client that sends no
    // complete request head in time is closed like a slow handshake.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.handshake_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(RECEIVE_STREAM_WINDOW)
        .initial_connection_window_size(probe_api::transport::CONNECTION_WINDOW)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_send_buf_size(SEND_BUFFER)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    let context = Arc::new(ConnectionContext {
        builder,
        acceptor: TlsAcceptor::from(tls),
        table,
        limits,
        registry: Arc::new(Registry::default()),
    });

    let (stop, stopping) = watch::channel(false);
    // Each connection task holds a sender; all are gone once the last ends.
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    let mut out_of_descriptors = AcceptBackoff::default();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) if matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                let evicted = context.registry.evict_oldest_handshake();
                tokio::time::sleep(out_of_descriptors.failed(evicted, &error)).await;
                continue;
            }
            Err(error) => {
                debug!(%error, "accept failed");
                continue;
            }
        };
        out_of_descriptors.succeeded();
        if context.registry.len() >= max_connections && !context.registry.evict_oldest_handshake() {
            debug!(max_connections, "at the connection limit: closing a new connection");
            continue;
        }
        let (handle, registration) = context.registry.register();
        tokio::spawn(context.clone().run(tcp, handle, registration, stopping.clone(), alive.clone()));
    }
    drop(listener);
    info!(connections = context.registry.len(), "stopped accepting; waiting for connections to finish");
    let _ = stop.send(true);
    drop(alive);
    let _ = all_closed.recv().await;
}

struct ConnectionContext {
    builder: auto::Builder<TokioExecutor>,
    acceptor: TlsAcceptor,
    table: Arc<dyn Handler>,
    limits: ConnectionLimits,
    registry: Arc<Registry>,
}

impl ConnectionContext {
    async fn run(
        self: Arc<Self>,
        tcp: TcpStream,
        handle: ConnectionHandle,
        registration: Registration,
        mut stopping: watch::Receiver<bool>,
        _alive: mpsc::Sender<()>,
    ) {
        let _ = tcp.set_nodelay(true);
        let handshake = tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(tcp));
        let tls = tokio::select! {
            result = handshake => match result {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    debug!(%error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!("TLS handshake timed out");
                    return;
                }
            },
            () = handle.closed() => return,
            _ = stopping.wait_for(|stop| *stop) => return,
        };
        registration.handshake_done();
        let activity = Arc::new(Activity::default());
        let connect_info = tls.connect_info();
        let service = ConnectionService {
            table: self.table.clone(),
            asker: asker_of(&connect_info),
            connect_info,
            connection: Arc::new(handle.clone()),
            activity: activity.clone(),
        };
        let connection = self.builder.serve_connection(TokioIo::new(tls), service);
        let mut connection = std::pin::pin!(connection);
        let mut idle_check = tokio::time::interval(self.limits.idle_timeout.min(Duration::from_secs(1)));
        let mut draining = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        debug!(%error, "connection ended with an error");
                    }
                    break;
                }
                () = handle.closed() => {
                    debug!(id = handle.id(), "connection closed by Central");
                    break;
                }
                _ = stopping.wait_for(|stop| *stop), if !draining => {
                    connection.as_mut().graceful_shutdown();
                    draining = true;
                }
                _ = idle_check.tick(), if !draining => {
                    if activity.idle_for() >= self.limits.idle_timeout {
                        debug!(id = handle.id(), "closing an idle connection");
                        connection.as_mut().graceful_shutdown();
                        draining = true;
                    }
                }
            }
        }
        drop(registration);
    }
}
