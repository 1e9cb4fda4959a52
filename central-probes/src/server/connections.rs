//! Central's connections, from `accept` to the last HTTP/2 frame, with every
//! resource a client can hold bounded.
//!
//! tonic's own server cannot bound what a hostile client holds: it has no
//! handshake deadline by default, spins on EMFILE, and does not expose the
//! per-stream send buffer. So Central runs its own accept loop and serves
//! each connection with hyper directly, the gRPC services being tonic
//! `Routes`:
//! - a connection cap (and EMFILE/ENFILE) evicts connections still in
//!   their TLS handshake first, oldest first, since a silent client sits
//!   there; when none is, the new connection is closed at once;
//! - the TLS handshake has a deadline;
//! - HTTP/2 advertises a stream limit, pings idle peers, and buffers at most
//!   `SEND_BUFFER` per stream beyond what is on the wire;
//! - a connection with no request for the idle timeout is closed gracefully;
//! - each request carries the `ConnectionHandle` of its connection, through
//!   which `ProbeSlots` closes connections whose client stopped reading.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tonic::Code;
use tonic::codegen::Service;
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tracing::{debug, info, warn};

/// Bytes HTTP/2 may buffer for one stream beyond its flow-control window:
/// with unread streams this, plus one chunk, is what each one holds.
const SEND_BUFFER: usize = 64 * 1024;
/// Descriptors kept free of connections for store files, probe reads and
/// upload temp files, besides one per probe stream slot.
const DESCRIPTOR_RESERVE: u64 = 128;

/// The limits of `serve`; `Default` holds the documented defaults.
#[derive(Clone, Debug)]
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
        }
    }
}

/// One connection as requests and the accept loop see it.
#[derive(Clone)]
pub struct ConnectionHandle(Arc<HandleShared>);

struct HandleShared {
    id: u64,
    closed: AtomicBool,
    close: Notify,
}

impl ConnectionHandle {
    fn new(id: u64) -> Self {
        ConnectionHandle(Arc::new(HandleShared { id, closed: AtomicBool::new(false), close: Notify::new() }))
    }

    /// A handle of no accepted connection (requests that did not come
    /// through `serve`, and tests); closing it affects nothing else.
    pub fn detached() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(u64::MAX / 2);
        Self::new(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Closes the connection at once, streams in flight included.
    pub fn close(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
        self.0.close.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::SeqCst)
    }

    async fn closed(&self) {
        self.0.close.notified().await;
    }
}

/// Live connections, by id (the oldest first), and whether each is still
/// in its handshake.
#[derive(Default)]
struct Registry {
    connections: Mutex<BTreeMap<u64, (ConnectionHandle, bool)>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, (ConnectionHandle, bool)>> {
        self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Closes the oldest connection still in its handshake, if any.
    fn evict_oldest_handshake(&self) -> bool {
        let mut connections = self.lock();
        let Some(id) = connections.iter().find(|(_, (_, handshaking))| *handshaking).map(|(id, _)| *id) else {
            return false;
        };
        let (handle, _) = connections.remove(&id).expect("just found");
        handle.close();
        true
    }
}

/// Removes its connection from the registry when the connection ends.
struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// Raises the soft limit of open descriptors to the hard limit and returns
/// the soft limit in force.
pub fn raise_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid rlimit to write into.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: `raised` is a valid rlimit; raising up to the hard limit
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    // rlim_t is u64 on Linux but not everywhere.
    #[allow(clippy::useless_conversion)]
    u64::from(limit.rlim_cur)
}

/// Serves `routes` over TLS on `listener` until `shutdown` completes, then
/// stops accepting, lets requests in flight finish and returns when every
/// connection has closed.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    routes: Routes,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let descriptors = raise_descriptor_limit();
    let derived = descriptors.saturating_sub(DESCRIPTOR_RESERVE + limits.max_probe_streams as u64).max(16) as usize;
    let max_connections = limits.max_connections.unwrap_or(derived);
    info!(descriptors, max_connections, "open descriptor limit");

    let mut builder = auto::Builder::new(TokioExecutor::new()).http2_only();
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(probe_api::transport::STREAM_WINDOW)
        .initial_connection_window_size(probe_api::transport::CONNECTION_WINDOW)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_send_buf_size(SEND_BUFFER)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    let context = Arc::new(ConnectionContext {
        builder,
        acceptor: TlsAcceptor::from(tls),
        routes: routes.prepare(),
        limits,
        registry: Arc::new(Registry::default()),
    });

    let (stop, stopping) = watch::channel(false);
    // Each connection task holds a sender; all are gone once the last ends.
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    let mut next_id = 0u64;
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
        next_id += 1;
        let handle = ConnectionHandle::new(next_id);
        context.registry.lock().insert(next_id, (handle.clone(), true));
        let registration = Registration { registry: context.registry.clone(), id: next_id };
        tokio::spawn(context.clone().run(tcp, handle, registration, stopping.clone(), alive.clone()));
    }
    drop(listener);
    info!(connections = context.registry.len(), "stopped accepting; waiting for connections to finish");
    let _ = stop.send(true);
    drop(alive);
    let _ = all_closed.recv().await;
}

/// How often running out of descriptors is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Pauses of the accept loop while the process is out of descriptors, and
/// a log line at most every `WARN_EVERY`, not one per attempt.
#[derive(Default)]
struct AcceptBackoff {
    /// Failures since the last successful accept: the pause grows with them.
    consecutive: u32,
    /// Failures not yet reported in a log line.
    unreported: u64,
    last_warning: Option<Instant>,
}

impl AcceptBackoff {
    fn failed(&mut self, evicted: bool, error: &std::io::Error) -> Duration {
        self.unreported += 1;
        if self.last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            warn!(
                %error,
                refused_accepts = self.unreported,
                "out of file descriptors: closing connections still in their handshake, oldest first"
            );
            self.last_warning = Some(Instant::now());
            self.unreported = 0;
        }
        self.consecutive += 1;
        if evicted {
            // The evicted connection frees its descriptor once its task runs.
            return Duration::from_millis(1);
        }
        Duration::from_millis(5 << self.consecutive.min(8)).min(Duration::from_secs(1))
    }

    fn succeeded(&mut self) {
        self.consecutive = 0;
    }
}

struct ConnectionContext {
    builder: auto::Builder<TokioExecutor>,
    acceptor: TlsAcceptor,
    routes: Routes,
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
        if let Some((_, handshaking)) = self.registry.lock().get_mut(&registration.id) {
            *handshaking = false;
        }
        let activity = Arc::new(Activity::default());
        let service = ConnectionService {
            routes: self.routes.clone(),
            connect_info: tls.connect_info(),
            handle: handle.clone(),
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

/// Requests in flight on a connection and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    since: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity { in_flight: AtomicUsize::new(0), since: Mutex::new(Instant::now()) }
    }
}

impl Activity {
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.since.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).elapsed()
    }

    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }
}

/// One request in flight, until its response body is done or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.since.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

type ConnectInfo = <tokio_rustls::server::TlsStream<TcpStream> as Connected>::ConnectInfo;

/// The HTTP service of one connection: tonic's routes, with the connection's
/// TLS facts (for `peer_certs`) and handle in every request.
#[derive(Clone)]
struct ConnectionService {
    routes: Routes,
    connect_info: ConnectInfo,
    handle: ConnectionHandle,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.connect_info.clone());
        request.extensions_mut().insert(self.handle.clone());
        let in_flight = self.activity.start();
        let mut routes = self.routes.clone();
        Box::pin(async move {
            let mut response = routes.call(request).await?;
            recode_client_errors(response.headers_mut());
            Ok(response.map(|body| tonic::body::Body::new(TrackedBody { body, _in_flight: in_flight })))
        })
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

/// tonic answers a request message over the size limit with OUT_OF_RANGE
/// and one that does not decode with INTERNAL, before any handler runs.
/// Both are the client's mistake, and INTERNAL would read as "retry": the
/// API documents RESOURCE_EXHAUSTED and INVALID_ARGUMENT. Central's own
/// handlers never answer OUT_OF_RANGE, and their INTERNAL messages never
/// start like prost's decode error.
fn recode_client_errors(headers: &mut http::HeaderMap) {
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
