//! The PostgreSQL backend against a throwaway cluster: the store suite, and
//! what only a shared database has (replicas racing, schema versions).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use tokio_postgres::NoTls;
use tonic::Code;

use super::test_cluster::TestCluster;
use super::*;
use crate::store::{CommitOutcome, ProbeStore};

fn config(url: &str) -> PostgresConfig {
    PostgresConfig { url: url.to_owned(), max_connections: 8, statement_timeout: Duration::from_secs(10), ca_pem: None }
}

async fn store(url: &str) -> PostgresStore {
    PostgresStore::connect(&config(url)).await.unwrap()
}

fn path(kernel: usize) -> ProbePath {
    ProbePath::parse(&format!("2.5.0/collector-ebpf-5.{kernel}.0.o.gz")).unwrap()
}

async fn raw_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

struct PgFixture {
    url: String,
}

fn pg_fixture() -> PgFixture {
    PgFixture { url: TestCluster::get().new_database() }
}

#[tonic::async_trait]
impl crate::store::conformance::StoreFixture for PgFixture {
    async fn open(&self) -> Arc<dyn ProbeStore> {
        Arc::new(store(&self.url).await)
    }

    /// A replica that inserted chunk rows and its probe row, then lost its
    /// connection before the commit.
    async fn leave_a_crashed_write(&self) {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await.unwrap();
        let connection = tokio::spawn(connection);
        client.batch_execute("BEGIN").await.unwrap();
        let blob: i64 = client.query_one("SELECT nextval('probe_blobs')", &[]).await.unwrap().get(0);
        client.execute("INSERT INTO probe_chunks (blob, seq, data) VALUES ($1, 0, 'half')", &[&blob]).await.unwrap();
        client
            .execute(
                "INSERT INTO probes (path, module_version, size, sha256, blob) VALUES ($1, '2.5.0', 100, '', $2)",
                &[&path(6).to_string(), &blob],
            )
            .await
            .unwrap();
        connection.abort();
        drop(client);
    }

    async fn leftovers(&self) -> usize {
        let client = raw_client(&self.url).await;
        let orphans: i64 = client
            .query_one(
                "SELECT count(*) FROM probe_chunks c WHERE NOT EXISTS (SELECT 1 FROM probes p WHERE p.blob = c.blob)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        orphans as usize
    }
}

crate::store_conformance_tests!(pg_fixture());

#[tonic::async_trait]
impl crate::store::damage_suite::DamageFixture for PgFixture {
    /// Flips a bit in the chunk row that holds byte `at`.
    async fn flip_a_byte(&self, path: &ProbePath, at: u64) {
        let client = raw_client(&self.url).await;
        let (seq, offset) = ((at / CHUNK_ROW as u64) as i32, (at % CHUNK_ROW as u64) as i32);
        let flipped = client
            .execute(
                "UPDATE probe_chunks SET data = set_byte(data, $3, get_byte(data, $3) # 16)
                 WHERE blob = (SELECT blob FROM probes WHERE path = $1) AND seq = $2",
                &[&path.to_string(), &seq, &offset],
            )
            .await
            .unwrap();
        assert_eq!(flipped, 1);
    }

    fn remembers_damage(&self) -> bool {
        false
    }
}

crate::store_damage_tests!(pg_fixture());

async fn put(
    store: &dyn ProbeStore,
    p: &ProbePath,
    bytes: &[u8],
    overwrite: bool,
) -> crate::error::Result<CommitOutcome> {
    let mut writer = store.create(p.clone(), bytes.len() as u64).await?;
    writer.write(Bytes::copy_from_slice(bytes)).await?;
    Ok(writer.finish(Sha256Digest::of(bytes).into(), overwrite).await?.await?.outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_on_one_path_store_it_once_and_share_the_page_token_key() {
    let url = TestCluster::get().new_database();
    let (a, b) = (store(&url).await, store(&url).await);
    assert_eq!(a.page_token_key(), b.page_token_key());
    for round in 0..10 {
        let p = path(100 + round);
        let (first, second) = tokio::join!(put(&a, &p, b"from a", false), put(&b, &p, b"from b!", false));
        let mut outcomes = [first.unwrap(), second.unwrap()];
        outcomes.sort_by_key(|o| matches!(o, CommitOutcome::Stored));
        assert!(
            matches!(outcomes, [CommitOutcome::Conflict { .. }, CommitOutcome::Stored]),
            "round {round}: {outcomes:?}"
        );
        let stored = a.stat(&p).await.unwrap().unwrap();
        assert!(stored.sha256 == Sha256Digest::of(b"from a") || stored.sha256 == Sha256Digest::of(b"from b!"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_migrated_by_a_newer_central_is_refused_clearly() {
    let url = TestCluster::get().new_database();
    drop(store(&url).await);
    let client = raw_client(&url).await;
    client.execute("INSERT INTO kprobes_schema (version) VALUES ($1)", &[&(SCHEMA_VERSION + 1)]).await.unwrap();
    let error = PostgresStore::connect(&config(&url)).await.err().expect("refused");
    assert_eq!(error.code, Code::FailedPrecondition);
    assert!(error.message.contains("newer than this Central"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_at_once_migrate_once() {
    let url = TestCluster::get().new_database();
    let stores = futures_join_all((0..4).map(|_| {
        let config = config(&url);
        async move { PostgresStore::connect(&config).await }
    }))
    .await;
    assert!(
        stores.iter().all(Result::is_ok),
        "{:?}",
        stores.iter().filter_map(|s| s.as_ref().err()).collect::<Vec<_>>()
    );
    let client = raw_client(&url).await;
    let applied: i64 = client.query_one("SELECT count(*) FROM kprobes_schema", &[]).await.unwrap().get(0);
    assert_eq!(applied, i64::from(SCHEMA_VERSION));
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for task in tasks {
        outputs.push(task.await.unwrap());
    }
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_verifies_the_server_against_the_given_ca() {
    let ca = crate::pki::CertificateAuthority::new("database CA").unwrap();
    let server = ca.issue_server(&["127.0.0.1", "localhost"]).unwrap();
    let cluster = TestCluster::private_with_tls(&server.cert_pem, &server.key_pem);
    let url = cluster.new_database();
    let with_ca = |ca_pem: &str, url: &str| PostgresConfig { ca_pem: Some(ca_pem.as_bytes().to_vec()), ..config(url) };
    let store = PostgresStore::connect(&with_ca(&ca.cert_pem, &format!("{url}?sslmode=verify-full"))).await.unwrap();
    put(&store, &path(1), b"over TLS", false).await.unwrap();
    // The session really is encrypted.
    let client = get(&store.backend().pool).await.unwrap();
    let ssl: bool =
        client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(ssl);

    let other = crate::pki::CertificateAuthority::new("another CA").unwrap();
    let error = PostgresStore::connect(&with_ca(&other.cert_pem, &url)).await.err().expect("an untrusted server");
    assert_eq!(error.code, Code::Unavailable);
    assert!(error.message.to_lowercase().contains("certificate"), "{error}");

    let error = PostgresStore::connect(&config(&format!("{url}?sslmode=verify-full"))).await.err().expect("no CA");
    assert_eq!(error.code, Code::InvalidArgument);
    assert!(error.message.contains("--database-ca"), "{error}");
}

/// A file reported stored is in the flushed log, although its own commit
/// was asynchronous (`flush.rs`): the group flush after it covers it. The
/// WAL writer is told to flush almost never, so nothing else would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_reported_stored_is_in_the_flushed_log() {
    let cluster = TestCluster::private_with_settings("-c wal_writer_delay=10000 -c wal_writer_flush_after=1000000");
    let url = cluster.new_database();
    let store = store(&url).await;
    let client = raw_client(&url).await;
    client.batch_execute("CREATE EXTENSION pg_walinspect").await.unwrap();
    for kernel in 0..3 {
        let start: String = client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
        assert_eq!(put(&store, &path(kernel), b"durable", false).await.unwrap(), CommitOutcome::Stored);
        let xid: String = client
            .query_one("SELECT xmin::text FROM probes WHERE path = $1", &[&path(kernel).to_string()])
            .await
            .unwrap()
            .get(0);
        let flushed_commits: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn())
                 WHERE resource_manager = 'Transaction' AND record_type = 'COMMIT' AND xid::text = $2",
                &[&start, &xid],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(flushed_commits, 1, "the commit of file {kernel} (transaction {xid}) is not flushed");
    }
}
