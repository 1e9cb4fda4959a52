//! Central under hostile clients, through the `central-probes serve` binary
//! so that its memory, threads, CPU time and descriptors can be read from
//! /proc: streams opened and never read, silent TCP connections,
//! half-sent ClientHellos, a process out of descriptors, uploads that
//! stall or whose client goes away. Meanwhile a well-behaved Collector must
//! still get its probe. And an upstream whose text tries to forge lines.

#[path = "common/cli.rs"]
mod cli;
mod common;
#[path = "common/raw_grpc.rs"]
mod raw_grpc;
#[path = "common/served.rs"]
mod served;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use central_probes::store::ProbeStore;
use central_probes::store::filesystem::{FilesystemStore, FilesystemStoreConfig};
use collector_client::central::CentralClient;
use common::TestPki;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use raw_grpc::{
    grpc_frame, grpc_status, raw_grpc_call, raw_http2, raw_http2_undriven, raw_http2_zero_window,
    send_as_window_allows, start_grpc_call,
};
use served::{Served, serve, serve_with_descriptor_limit};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const LARGE: &str = "2.5.0/collector-ebpf-6.1.0-large.o.gz";
const MEDIUM: &str = "2.5.0/collector-ebpf-6.1.0-medium.o.gz";
const SMALL: &str = "2.5.0/collector-ebpf-6.1.0-small.o.gz";

fn bytes_of(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Puts a 4 MiB, a 1 MiB and a 4 KiB probe into the store before Central
/// starts.
async fn fill(data_dir: &Path) {
    let config = FilesystemStoreConfig { data_dir: data_dir.to_owned(), min_free_bytes: 0 };
    let store = FilesystemStore::open(&config).unwrap();
    for (path, bytes) in [(LARGE, bytes_of(4 << 20, 1)), (MEDIUM, bytes_of(1 << 20, 2)), (SMALL, bytes_of(4096, 3))] {
        let mut writer = store.create(ProbePath::parse(path).unwrap(), bytes.len() as u64).await.unwrap();
        for chunk in bytes.chunks(256 * 1024) {
            writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        writer.finish(Sha256Digest::of(&bytes).into(), false).await.unwrap().await.unwrap();
    }
}

/// One field of /proc/PID/status, in its own unit (kB for memory).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Peak RSS (MiB) and thread count of Central over a few samples.
async fn sample_peak(pid: u32, over: Duration) -> (u64, u64) {
    let (mut rss, mut threads) = (0, 0);
    let deadline = Instant::now() + over;
    while Instant::now() < deadline {
        rss = rss.max(proc_status(pid, "VmRSS:") / 1024);
        threads = threads.max(proc_status(pid, "Threads:"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (rss, threads)
}

/// Streams that are held open, never read.
type Unread = Vec<(h2::client::ResponseFuture, h2::SendStream<Bytes>)>;

/// Opens `count` GetProbe streams for `path` and never reads them. Beyond
/// the server's stream limit, h2 queues them on the client side.
fn open_unread_get_probes(sender: &h2::client::SendRequest<Bytes>, count: usize, path: &str) -> Unread {
    let (module_version, file_name) = path.split_once('/').unwrap();
    let request = probe_api::v1::GetProbeRequest { module_version: module_version.into(), file_name: file_name.into() };
    let body = grpc_frame(&request);
    (0..count)
        .map(|_| {
            let request = http::Request::post("https://localhost/kprobes.v1.ProbeService/GetProbe")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (response, mut stream) = sender.clone().send_request(request, false).unwrap();
            stream.send_data(body.clone(), true).unwrap();
            (response, stream)
        })
        .collect()
}

/// A Collector fetches the 1 MiB probe on a fresh connection; returns how
/// long it took, or what went wrong within 20 s.
async fn collector_fetch(served: &Served, pki: &TestPki) -> Result<Duration, String> {
    collector_fetch_of(served, pki, MEDIUM, 1 << 20).await
}

/// A Collector fetches `path`, of `len` bytes, on a fresh connection.
async fn collector_fetch_of(served: &Served, pki: &TestPki, path: &str, len: usize) -> Result<Duration, String> {
    let tls = pki.tls_with(Some(&pki.collector));
    let client = CentralClient::new(&served.address, &tls, Duration::from_secs(5)).unwrap();
    let started = Instant::now();
    let (module_version, file_name) = path.split_once('/').unwrap();
    match tokio::time::timeout(Duration::from_secs(20), client.fetch(module_version, file_name)).await {
        Ok(Ok(probe)) if probe.bytes.len() == len => Ok(started.elapsed()),
        Ok(Ok(probe)) => Err(format!("{} bytes instead of {len}", probe.bytes.len())),
        Ok(Err(error)) => Err(format!("failed after {:?}: {error}", started.elapsed())),
        Err(_) => Err("no probe after 20 s".into()),
    }
}

/// Holds the attack open while a Collector fetches, and checks the bounds
/// the issue sets: RSS under 128 MiB, fewer than 64 threads, the Collector
/// served in under a second.
async fn unread_streams_are_bounded(connections: usize, streams_each: usize, anonymous: bool) {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path()).await;
    let extra: &[&str] = if anonymous { &["--allow-anonymous-reads"] } else { &[] };
    let served = serve(&pki, dir.path(), extra);
    let pid = served.child.id();
    let (rss_before, threads_before) = (proc_status(pid, "VmRSS:") / 1024, proc_status(pid, "Threads:"));

    let mut attack = Vec::new();
    for _ in 0..connections {
        let sender = raw_http2(&served.address, &pki, !anonymous).await;
        attack.push((open_unread_get_probes(&sender, streams_each, LARGE), sender));
    }
    // Long enough for every stream to start and stall.
    let (rss_attack, threads_attack) = sample_peak(pid, Duration::from_secs(2)).await;
    let fetch = collector_fetch(&served, &pki).await;
    let (rss_after, threads_after) = sample_peak(pid, Duration::from_millis(500)).await;
    let rss = rss_attack.max(rss_after);
    let threads = threads_attack.max(threads_after);
    println!(
        "{connections} connection(s) x {streams_each} unread streams{}: RSS {rss_before} -> {rss} MiB, threads \
         {threads_before} -> {threads}, a Collector's 1 MiB fetch: {fetch:?}",
        if anonymous { " (anonymous reads)" } else { "" }
    );
    assert!(rss < 128, "Central's RSS reached {rss} MiB");
    assert!(threads < 64, "Central ran {threads} threads");
    let fetch = fetch.unwrap();
    assert!(fetch < Duration::from_secs(1), "the Collector waited {fetch:?}");
    drop(attack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_unread_streams_on_one_connection_hold_bounded_memory_and_a_collector_is_served() {
    unread_streams_are_bounded(1, 2000, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_anonymous_streams_over_twenty_connections_hold_bounded_memory_and_a_collector_is_served() {
    unread_streams_are_bounded(20, 100, true).await;
}

/// 2,000 GetProbe streams for the 4 MiB probe from clients that grant no
/// window (SETTINGS_INITIAL_WINDOW_SIZE = 0, never a WINDOW_UPDATE), over
/// as many connections as Central's stream limit requires, held while a
/// Collector fetches a small and a 1 MiB probe on fresh connections: each
/// must be served in under 2 s, Central's RSS must grow by less than
/// 128 MiB, and every descriptor must be released when the attacker goes.
async fn zero_window_streams_do_not_lock_collectors_out(anonymous: bool) {
    const STREAMS: usize = 2000;
    const PER_CONNECTION: usize = 100;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path()).await;
    let per_connection = PER_CONNECTION.to_string();
    let mut extra = vec!["--max-concurrent-streams", per_connection.as_str()];
    if anonymous {
        extra.push("--allow-anonymous-reads");
    }
    let served = serve(&pki, dir.path(), &extra);
    let pid = served.child.id();
    let rss_before = proc_status(pid, "VmRSS:") / 1024;
    let descriptors_before = open_descriptors(pid);

    let mut attack = Vec::new();
    for _ in 0..STREAMS / PER_CONNECTION {
        let sender = raw_http2_zero_window(&served.address, &pki, !anonymous).await;
        attack.push((open_unread_get_probes(&sender, PER_CONNECTION, LARGE), sender));
    }
    // Every slot taken by a stream that could never send a byte, and long
    // enough for each to count as stalled.
    let (rss_attack, _) = sample_peak(pid, Duration::from_secs(2)).await;
    let small = collector_fetch_of(&served, &pki, SMALL, 4096).await;
    let medium = collector_fetch(&served, &pki).await;
    let (rss_after, _) = sample_peak(pid, Duration::from_millis(500)).await;
    let rss = rss_attack.max(rss_after);
    let descriptors_attack = open_descriptors(pid);

    drop(attack);
    let released_by = Instant::now() + Duration::from_secs(10);
    while open_descriptors(pid) > descriptors_before && Instant::now() < released_by {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let descriptors_after = open_descriptors(pid);
    println!(
        "{STREAMS} zero-window streams over {} connections{}: a Collector's 4 KiB fetch {small:?}, 1 MiB fetch \
         {medium:?}; RSS {rss_before} -> {rss} MiB; descriptors {descriptors_before} -> {descriptors_attack} during, \
         {descriptors_after} after",
        STREAMS / PER_CONNECTION,
        if anonymous { " without certificates (anonymous reads)" } else { "" }
    );
    for (what, fetch) in [("4 KiB", small), ("1 MiB", medium)] {
        let fetch = fetch.unwrap_or_else(|error| panic!("the {what} probe: {error}"));
        assert!(fetch < Duration::from_secs(2), "the Collector waited {fetch:?} for the {what} probe");
    }
    assert!(rss < rss_before + 128, "Central's RSS grew from {rss_before} to {rss} MiB");
    assert!(
        descriptors_after <= descriptors_before,
        "Central holds {descriptors_after} descriptors after the attacker left, {descriptors_before} before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_streams_with_certificates_do_not_lock_collectors_out() {
    zero_window_streams_do_not_lock_collectors_out(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_streams_without_certificates_under_anonymous_reads_do_not_lock_collectors_out() {
    zero_window_streams_do_not_lock_collectors_out(true).await;
}

/// Raises this process's descriptor limit to its hard limit; returns it.
fn raise_own_descriptor_limit() -> u64 {
    central_probes::server::connections::raise_descriptor_limit()
}

/// Whether the server closed a socket it was given: a read sees the end
/// (or a reset) rather than waiting.
fn closed_by_peer(socket: &std::net::TcpStream) -> bool {
    socket.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    match (&*socket).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// A Collector retrying as collector-client does (a connect timeout per
/// try, then a pause) until its probe comes; returns how long it took.
async fn retrying_collector(served: &Served, pki: &TestPki, retry_interval: Duration) -> Duration {
    let started = Instant::now();
    let (module_version, file_name) = MEDIUM.split_once('/').unwrap();
    loop {
        let client =
            CentralClient::new(&served.address, &pki.tls_with(Some(&pki.collector)), Duration::from_secs(2)).unwrap();
        match tokio::time::timeout(Duration::from_secs(5), client.fetch(module_version, file_name)).await {
            Ok(Ok(probe)) => {
                assert_eq!(probe.bytes.len(), 1 << 20);
                return started.elapsed();
            }
            Ok(Err(error)) => println!("try failed: {error}"),
            Err(_) => println!("try timed out"),
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the Collector never got through");
        tokio::time::sleep(retry_interval).await;
    }
}

/// 1,100 silent TCP connections and 20 half-sent ClientHellos against a
/// Central limited to 1,024 descriptors: it must not spin, must close them
/// within the handshake timeout, and must serve a Collector meanwhile.
async fn silent_connections_are_shed(extra: &[&str], expect_descriptor_exhaustion: bool) {
    if raise_own_descriptor_limit() < 4096 {
        println!("SKIPPED: this process may not open the 1,100+ sockets the test needs");
        return;
    }
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path()).await;
    let handshake_timeout = Duration::from_secs(3);
    let mut args = vec!["--handshake-timeout", "3s"];
    args.extend_from_slice(extra);
    let served = serve_with_descriptor_limit(&pki, dir.path(), &args, Some(1024));
    let pid = served.child.id();

    let mut silent = Vec::new();
    for _ in 0..1100 {
        match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(&served.address)).await {
            Ok(Ok(socket)) => silent.push(socket),
            _ => break,
        }
    }
    for _ in 0..20 {
        let mut socket = TcpStream::connect(&served.address).await.unwrap();
        // A TLS record header announcing a ClientHello that never comes.
        socket.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]).await.unwrap();
        silent.push(socket);
    }
    let attacked_at = Instant::now();
    let connected = silent.len();

    let ticks_before = cpu_ticks(pid);
    let measured_from = Instant::now();
    let served_in = retrying_collector(&served, &pki, Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(measured_from.elapsed())).await;
    let ticks = cpu_ticks(pid) - ticks_before;
    // SAFETY: sysconf with a valid name.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_share = ticks as f64 / ticks_per_second / measured_from.elapsed().as_secs_f64();

    let sockets: Vec<std::net::TcpStream> = silent.into_iter().map(|s| s.into_std().unwrap()).collect();
    tokio::time::sleep((handshake_timeout + Duration::from_secs(1)).saturating_sub(attacked_at.elapsed())).await;
    let still_open = sockets.iter().filter(|s| !closed_by_peer(s)).count();
    let log: Vec<String> = served.log.try_iter().collect();
    println!(
        "{connected} silent connections (20 with half a ClientHello) {extra:?}: Central used {:.0}% of a core, \
         a retrying Collector was served after {served_in:?}, {still_open} still open after the handshake timeout, \
         Central holds {} descriptors",
        cpu_share * 100.0,
        open_descriptors(pid)
    );
    assert!(connected >= 1100, "only {connected} connections could be made; Central's log:\n{}", log.join("\n"));
    assert!(cpu_share < 0.5, "Central spun at {:.0}% of a core", cpu_share * 100.0);
    assert!(served_in < handshake_timeout + Duration::from_secs(1) + Duration::from_secs(2));
    assert_eq!(still_open, 0, "silent connections outlived the handshake timeout");
    let warnings = log.iter().filter(|line| line.contains("out of file descriptors")).count();
    // With the cap below the limit, descriptors run out only when evicted
    // connections close later than new ones arrive; either way it is
    // logged once, not per refused accept.
    let expected = if expect_descriptor_exhaustion { 1..=1 } else { 0..=1 };
    assert!(expected.contains(&warnings), "{warnings} warnings of running out of descriptors:\n{}", log.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_beyond_the_connection_cap_are_shed_oldest_handshake_first() {
    silent_connections_are_shed(&[], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_beyond_the_descriptor_limit_do_not_spin_the_accept_loop() {
    // A cap above the descriptor limit: accept itself fails with EMFILE.
    silent_connections_are_shed(&["--max-connections", "5000"], true).await;
}

/// Starts Central with one probe and `extra` flags.
async fn central_with(extra: &[&str]) -> (TestPki, tempfile::TempDir, Served) {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path()).await;
    let served = serve(&pki, dir.path(), extra);
    (pki, dir, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_request_head_that_never_ends_is_closed_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let (pki, _dir, served) = central_with(&["--handshake-timeout", "1s"]).await;
    let mut tls = raw_grpc::raw_tls(&served.address, &pki).await;
    // The HTTPS route's HTTP/1.1: a head without its blank line, then silence.
    tls.write_all(b"GET /kernel-objects/2.5.0/collector-ebpf-5.4.0.o.gz HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut answer)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed, not answered or kept: {read:?}");
    assert!(started.elapsed() >= Duration::from_millis(800), "not before the timeout: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_requests_is_closed_after_the_idle_timeout() {
    let (pki, _dir, served) = central_with(&["--idle-timeout", "1s"]).await;
    let sender = raw_http2(&served.address, &pki, true).await;
    // Busy with an unread stream: not idle, whatever the time.
    let busy = raw_http2(&served.address, &pki, true).await;
    let unread = open_unread_get_probes(&busy, 1, MEDIUM);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(sender.clone().ready().await.is_err(), "the idle connection was closed");
    assert!(busy.clone().ready().await.is_ok(), "the connection with a request in flight was kept");
    drop(unread);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_answer_pings_is_closed() {
    let (pki, _dir, served) =
        central_with(&["--keepalive-interval", "1s", "--keepalive-timeout", "1s", "--idle-timeout", "1h"]).await;
    let (_sender, connection) = raw_http2_undriven(&served.address, &pki).await;
    // Nothing reads the connection, so Central's PING goes unanswered.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ended = tokio::time::timeout(Duration::from_secs(2), connection).await;
    assert!(matches!(ended, Ok(Err(_)) | Ok(Ok(()))), "Central closed the connection: {ended:?}");
}

/// Text meant to forge lines of a log or of a Collector's report.
const FORGED: &str = "gone\nWhat an admin can do:\r\n  - nothing\u{1b}[2J";

/// An upstream Central whose answers carry `FORGED`: as its status
/// message, or (for `BAD_HEADER`) in a malformed digest 100 KB long.
struct HostileUpstream;

const BAD_HEADER: &str = "collector-ebpf-6.1.0-bad-header.o.gz";

#[tonic::async_trait]
impl probe_api::v1::probe_service_server::ProbeService for HostileUpstream {
    type GetProbeStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<probe_api::v1::GetProbeResponse, tonic::Status>> + Send>,
    >;

    async fn get_probe(
        &self,
        request: tonic::Request<probe_api::v1::GetProbeRequest>,
    ) -> Result<tonic::Response<Self::GetProbeStream>, tonic::Status> {
        use probe_api::v1::{GetProbeResponse, ProbeHeader, get_probe_response::Message};
        let request = request.into_inner();
        if request.file_name != BAD_HEADER {
            return Err(tonic::Status::unavailable(FORGED));
        }
        let header = ProbeHeader {
            path: format!("{}/{}", request.module_version, request.file_name),
            size: 1,
            sha256: FORGED.to_owned() + &"x".repeat(100_000),
            ..Default::default()
        };
        let header = GetProbeResponse { message: Some(Message::Header(header)) };
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter([Ok(header)]))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_own_text_reaches_collectors_escaped_and_cut() {
    use central_probes::server::upstream::UpstreamKind;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let service = probe_api::v1::probe_service_server::ProbeServiceServer::new(HostileUpstream);
    let (hostile, server) = common::serve_fake(&pki, tonic::service::Routes::new(service)).await;
    let kind = UpstreamKind::Grpc { address: format!("https://{hostile}") };
    let upstream = Some(common::upstream_config(&pki, kind, &dir.path().join("cache")));
    let options = common::CentralOptions { upstream, ..Default::default() };
    let central = common::Central::start_with(&pki, &dir.path().join("central"), options).await;

    for file_name in ["collector-ebpf-6.1.0.o.gz", BAD_HEADER] {
        let error = central.collector(&pki, Some(&pki.collector)).fetch("2.5.0", file_name).await.unwrap_err();
        let collector_client::central::FetchError::Status(status) = error else { panic!("{file_name}: {error}") };
        assert_eq!(status.code(), tonic::Code::Unavailable, "{file_name}: {status:?}");
        let message = status.message();
        assert!(!message.chars().any(char::is_control), "{file_name}: {message:?}");
        assert!(message.contains(r"gone\nWhat an admin can do:\r\n"), "{file_name}: {message:?}");
        assert!(message.len() < 1_000, "{file_name}: the upstream's text is cut: {} bytes", message.len());
    }
    central.stop().await;
    server.abort();
}

const UPLOAD: &str = "/kprobes.v1.ProbeUploadService/UploadProbes";
const FIRST: &str = "2.5.0/collector-ebpf-6.1.0-first.o.gz";
const SECOND: &str = "2.5.0/collector-ebpf-6.1.0-second.o.gz";

/// An UploadProbes body of `messages` after the options.
fn upload_body(messages: Vec<probe_api::v1::UploadProbesRequest>) -> Bytes {
    use probe_api::v1::upload_probes_request::Message;
    use probe_api::v1::{UploadOptions, UploadProbesRequest};
    let options = UploadProbesRequest { message: Some(Message::Options(UploadOptions::default())) };
    std::iter::once(options).chain(messages).map(|message| grpc_frame(&message)).collect::<Vec<_>>().concat().into()
}

/// All of `FIRST`, then `SECOND`'s header and 10 of its 100 bytes.
fn upload_broken_inside_second() -> Bytes {
    use central_probes::server::uploads::file_messages;
    let mut messages = file_messages(FIRST, &bytes_of(5000, 7), 1000);
    messages.extend(file_messages(SECOND, &bytes_of(100, 8), 10).into_iter().take(2));
    upload_body(messages)
}

/// An admin token for the Central about to start on `data_dir`.
fn admin_token(data_dir: &Path) -> String {
    use central_probes::server::auth::{Role, TokenFile};
    TokenFile::in_data_dir(data_dir).create(Role::Admin, "uploader").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_ended_keeping_the_files_before_it_and_the_next_upload_works() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let token = admin_token(dir.path());
    let served = serve(&pki, dir.path(), &["--upload-idle-timeout", "1s"]);
    let sender = raw_http2(&served.address, &pki, false).await;
    // The client sends part of the second file, then nothing, and stays.
    let (response, _stalled) = start_grpc_call(&sender, UPLOAD, Some(&token), upload_broken_inside_second()).await;
    let guard = Duration::from_secs(60);
    let status = tokio::time::timeout(guard, grpc_status(response)).await.expect("the stalled upload was ended");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    let message = status.message();
    assert!(message.contains("received nothing for 1s") && message.contains("after 1 finished files"), "{message}");
    let line = served.log_line("upload interrupted");
    assert!(line.contains("stored=1") && line.contains("DeadlineExceeded"), "{line}");
    let listed = cli::listed(&served.address, &pki.ca_file(), &token).await;
    assert_eq!(listed, [FIRST], "the file before the stall is kept");

    let next = upload_body(central_probes::server::uploads::file_messages(SECOND, &bytes_of(100, 8), 10));
    let status = raw_grpc_call(&sender, UPLOAD, Some(&token), next).await;
    assert_eq!(status.code(), tonic::Code::Ok, "the next upload works: {status:?}");
    assert_eq!(cli::listed(&served.address, &pki.ca_file(), &token).await, [FIRST, SECOND]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_client_goes_away_is_logged_and_audited_with_what_it_committed() {
    use central_probes::server::uploads::file_messages;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let token = admin_token(dir.path());
    // Commits wait, so the client goes away while the first file's is under way.
    let served = serve(&pki, dir.path(), &["--metrics-listen", "127.0.0.1:0", "--commit-wait", "3s"]);
    let (sender, connection) = raw_http2_undriven(&served.address, &pki).await;
    let driver = tokio::spawn(connection);
    let first = upload_body(file_messages(FIRST, &bytes_of(5000, 7), 1000));
    let (_response, mut stream) = start_grpc_call(&sender, UPLOAD, Some(&token), first).await;
    // 5 of the second file's 8 MiB: more than Central's window, so once all
    // is sent, Central has read past the first file's trailer.
    let second = file_messages(SECOND, &bytes_of(8 << 20, 8), 1 << 20);
    let second: Vec<Bytes> = second.iter().take(6).map(grpc_frame).collect();
    send_as_window_allows(&mut stream, second.concat().into()).await;
    // As a killed client: the connection closes with nothing more said.
    driver.abort();

    let line = served.log_line("upload interrupted");
    assert!(line.contains("stored=1") && line.contains("token=uploader"), "{line}");
    let listed = cli::listed(&served.address, &pki.ca_file(), &token).await;
    assert_eq!(listed, [FIRST], "the file before the break is kept");
    let metrics = served.metrics().await;
    let changes = "central_probes_changes_by_token_total";
    assert_eq!(served::metric(&metrics, changes, r#"action="upload_interrupted""#), Some(1), "{metrics}");
    let stored = served::metric(&metrics, "central_probes_upload_files_total", r#"outcome="stored""#);
    assert_eq!(stored, Some(1), "{metrics}");
}
