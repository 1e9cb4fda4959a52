//! The PostgreSQL backend: probes in ordinary tables of a database that
//! several Centrals share (`schema.rs` has the tables and migrations).
//!
//! A probe's bytes are rows of at most `CHUNK_ROW` bytes, so a probe is
//! written and read in order without being held whole. Each file an upload
//! stages is one transaction on its own pooled connection: its chunk rows
//! are inserted as they arrive, and the commit decides the overwrite rule
//! under a per-path advisory lock and points the path at the new rows in
//! the same transaction. A file is visible exactly when that transaction
//! commits, and reported stored once a group flush of the log has made it
//! durable (`flush.rs`); a replica that dies mid-file leaves nothing, as
//! PostgreSQL rolls back the transaction of a lost connection. Statements
//! are prepared once per connection and cached. A reader reads in a repeatable-read
//! transaction, so a probe replaced or removed meanwhile is still read
//! whole. Connection failures and statement timeouts are UNAVAILABLE: the
//! pool reconnects by itself once the database is back.

mod flush;
mod schema;
#[cfg(any(test, feature = "testing"))]
pub mod test_cluster;
#[cfg(test)]
mod tests;
mod tls;
mod tokens;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use probe_api::digest::Sha256Digest;
use probe_api::errors::chain;
use probe_api::names::{ModuleVersion, ProbePath};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, SimpleQueryMessage};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::error::{Error, Result};
use crate::store::backend::{Backend, Staged, Staging};
use crate::store::read_through::RecordChange;
use crate::store::verified::VerifiedStore;
use crate::store::{CommitOutcome, Decision, ProbeReader, StoredProbe, overwrite_rule, report_taken};
use tracing::warn;

use flush::GroupFlush;

pub use schema::SCHEMA_VERSION;
pub use tokens::DatabaseTokens;

/// Bytes per chunk row: what a writer buffers, and what a reader holds.
pub const CHUNK_ROW: usize = 256 * 1024;

/// Settings of the PostgreSQL store.
#[derive(Clone, Debug)]
pub struct PostgresConfig {
    /// `postgres://USER@HOST:PORT/DB` (or key=value form).
    pub url: String,
    /// Connections at most; each file being uploaded or probe being read
    /// from the database holds one.
    pub max_connections: usize,
    /// Longest a statement may run, and a caller may wait for a connection.
    pub statement_timeout: Duration,
    /// Connect over TLS, verifying the server against these CA certificates
    /// (PEM) and the host name (`tls.rs`); plain TCP when `None`.
    pub ca_pem: Option<Vec<u8>>,
}

/// The PostgreSQL backend behind verification.
pub type PostgresStore = VerifiedStore<PostgresBackend>;

/// Probes in a PostgreSQL database.
pub struct PostgresBackend {
    pool: Pool,
    page_token_key: Vec<u8>,
    flush: Arc<GroupFlush>,
    /// How to open a connection of its own (the change listener's).
    settings: (tokio_postgres::Config, Connector),
}

/// Plain TCP or verified TLS.
#[derive(Clone)]
enum Connector {
    Plain,
    Tls(tls::RustlsConnect),
}

/// The channel every commit and removal notifies with the probe's path.
const CHANGES_CHANNEL: &str = "kprobes_changes";

/// Tells `$1` that `$2` changed, when the transaction commits.
const NOTIFY: &str = "SELECT pg_notify($1, $2)";

impl PostgresStore {
    /// Connects, applies migrations and loads the shared page token key.
    pub async fn connect(config: &PostgresConfig) -> Result<Self> {
        // The database's free space is not Central's to see: no floor.
        Ok(VerifiedStore::new(PostgresBackend::connect(config).await?, 0))
    }
}

/// The error of a database call: UNAVAILABLE when retrying may help (the
/// connection broke, the database is starting or shutting down, a
/// statement ran out of time), INTERNAL otherwise.
fn db_error(what: &str, error: tokio_postgres::Error) -> Error {
    let transient = error.is_closed()
        || error.code().is_none()
        || error.code().is_some_and(|code| {
            [
                SqlState::QUERY_CANCELED,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::T_R_SERIALIZATION_FAILURE,
            ]
            .contains(code)
        });
    let code = if transient { Code::Unavailable } else { Code::Internal };
    Error::new(code, format!("{what}: {}", chain(&error)))
}

/// The connection settings of `config`: statement timeout, TLS.
fn settings(config: &PostgresConfig) -> Result<(tokio_postgres::Config, Connector)> {
    let (url, verify) = tls::take_verify_mode(&config.url);
    let mut pg = tokio_postgres::Config::from_str(&url)
        .map_err(|e| Error::invalid_argument(format!("the database URL: {e}")))?;
    let timeout_ms = config.statement_timeout.as_millis();
    pg.options(format!("-c statement_timeout={timeout_ms}"));
    pg.connect_timeout(config.statement_timeout);
    let connector = match &config.ca_pem {
        Some(ca_pem) => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            Connector::Tls(tls::RustlsConnect::new(ca_pem)?)
        }
        None if verify => {
            return Err(Error::invalid_argument(
                "the database URL asks to verify the server (sslmode=verify-full): give its CA with --database-ca",
            ));
        }
        None => Connector::Plain,
    };
    Ok((pg, connector))
}

/// A bounded pool of connections made with `settings` (those of `config`).
fn make_pool(config: &PostgresConfig, (pg, connector): (tokio_postgres::Config, Connector)) -> Result<Pool> {
    let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
    let manager = match connector {
        Connector::Tls(tls) => Manager::from_config(pg, tls, recycling),
        Connector::Plain => Manager::from_config(pg, NoTls, recycling),
    };
    Pool::builder(manager)
        .max_size(config.max_connections.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.statement_timeout))
        .create_timeout(Some(config.statement_timeout))
        .build()
        .map_err(|e| Error::internal(format!("making the connection pool: {e}")))
}

impl PostgresBackend {
    async fn connect(config: &PostgresConfig) -> Result<Self> {
        let settings = settings(config)?;
        let pool = make_pool(config, settings.clone())?;
        let mut client = get(&pool).await?;
        schema::migrate(&mut client).await?;
        let page_token_key = load_or_create_key(&client).await?;
        Ok(PostgresBackend { pool, page_token_key, flush: Arc::default(), settings })
    }

    /// Changes made through any replica, as they commit: a task listens on
    /// a connection of its own, reconnecting after a loss (each second),
    /// and ends when the receiver is dropped.
    pub fn changes(&self) -> mpsc::Receiver<RecordChange> {
        let (sender, receiver) = mpsc::channel(1024);
        let (mut config, connector) = self.settings.clone();
        // A connection that only waits would notice a silent network
        // partition never; TCP keepalive notices it within about a minute,
        // after which every read is checked again.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        tokio::spawn(async move {
            loop {
                let ended = match &connector {
                    Connector::Plain => listen(&config, NoTls, &sender).await,
                    Connector::Tls(tls) => listen(&config, tls.clone(), &sender).await,
                };
                if let Err(error) = ended {
                    warn!(%error, "lost the database's change notifications; checking every read until they are back");
                }
                if sender.send(RecordChange::Lost).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        receiver
    }

    /// The API tokens of this database.
    pub fn tokens(&self) -> DatabaseTokens {
        DatabaseTokens::new(self.pool.clone())
    }
}

/// A pooled connection, or UNAVAILABLE.
async fn get(pool: &Pool) -> Result<Object> {
    pool.get().await.map_err(|e| Error::new(Code::Unavailable, format!("connecting to the database: {}", chain(&e))))
}

/// The page token key every replica shares: made by the first to start.
async fn load_or_create_key(client: &Object) -> Result<Vec<u8>> {
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).map_err(|e| Error::internal(format!("making a page token key: {e}")))?;
    client
        .execute(
            "INSERT INTO settings (name, value) VALUES ('page_token_key', $1) ON CONFLICT (name) DO NOTHING",
            &[&key.as_slice()],
        )
        .await
        .map_err(|e| db_error("storing the page token key", e))?;
    let row = client
        .query_one("SELECT value FROM settings WHERE name = 'page_token_key'", &[])
        .await
        .map_err(|e| db_error("reading the page token key", e))?;
    Ok(row.get(0))
}

fn stored(row: &Row) -> Result<StoredProbe> {
    let bad = |what: &str| Error::internal(format!("the database holds a bad {what}"));
    let path: String = row.get("path");
    let size: i64 = row.get("size");
    let sha256: Vec<u8> = row.get("sha256");
    let crc32: Option<i64> = row.get("crc32");
    Ok(StoredProbe {
        path: ProbePath::parse(&path).map_err(|_| bad("path"))?,
        size: u64::try_from(size).map_err(|_| bad("size"))?,
        sha256: Sha256Digest(sha256.try_into().map_err(|_| bad("SHA-256"))?),
        crc32: crc32.map(|crc| u32::try_from(crc).map_err(|_| bad("CRC-32"))).transpose()?,
    })
}

/// A connection inside a transaction. Dropped before `commit` or
/// `rollback`, it is taken out of the pool and closed, which makes
/// PostgreSQL roll the transaction back: an open transaction never goes
/// back to the pool.
struct InTransaction {
    client: Option<Object>,
}

impl InTransaction {
    async fn begin(pool: &Pool, begin: &str) -> Result<Self> {
        Ok(Self::begin_returning(pool, begin).await?.0)
    }

    /// Starts a transaction with `statements`, whose last may be a query:
    /// the first value of its first row, as text. One round trip.
    async fn begin_returning(pool: &Pool, statements: &str) -> Result<(Self, Option<String>)> {
        let transaction = InTransaction { client: Some(get(pool).await?) };
        let messages =
            transaction.client().simple_query(statements).await.map_err(|e| db_error("starting a transaction", e))?;
        let value = messages.into_iter().find_map(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        });
        Ok((transaction, value))
    }

    fn client(&self) -> &Object {
        self.client.as_ref().expect("in a transaction")
    }

    async fn end(self, statement: &str) -> Result<()> {
        self.end_keeping(statement).await.map(drop)
    }

    /// Ends the transaction and hands its connection on for more work.
    async fn end_keeping(self, statement: &str) -> Result<Object> {
        let ended = self.client().batch_execute(statement).await;
        self.ended(ended)
    }

    /// The connection of a transaction ended by `statement_result`, or the
    /// error of ending it (the connection is closed then: the transaction
    /// may still be open).
    fn ended(mut self, statement_result: Result<(), tokio_postgres::Error>) -> Result<Object> {
        let client = self.client.take().expect("in a transaction");
        if let Err(error) = statement_result {
            drop(Object::take(client));
            return Err(db_error("ending a transaction", error));
        }
        Ok(client)
    }
}

type Params<'a> = [&'a (dyn ToSql + Sync)];

/// `sql` prepared on `client`, once per connection.
async fn prepare(client: &Object, sql: &str) -> Result<tokio_postgres::Statement> {
    client.prepare_cached(sql).await.map_err(|e| db_error("preparing a statement", e))
}

/// Runs `sql`, prepared once per connection: one round trip, not two.
async fn execute(client: &Object, sql: &str, params: &Params<'_>) -> Result<u64, tokio_postgres::Error> {
    let statement = client.prepare_cached(sql).await?;
    client.execute(&statement, params).await
}

async fn query(client: &Object, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, tokio_postgres::Error> {
    let statement = client.prepare_cached(sql).await?;
    client.query(&statement, params).await
}

async fn query_opt(client: &Object, sql: &str, params: &Params<'_>) -> Result<Option<Row>, tokio_postgres::Error> {
    let statement = client.prepare_cached(sql).await?;
    client.query_opt(&statement, params).await
}

impl Drop for InTransaction {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

const COLUMNS: &str = "path, size, sha256, crc32";

#[tonic::async_trait]
impl Backend for PostgresBackend {
    async fn stat_many(&self, paths: &[ProbePath]) -> Result<Vec<Option<StoredProbe>>> {
        let asked: Vec<String> = paths.iter().map(ToString::to_string).collect();
        let client = get(&self.pool).await?;
        let rows = query(&client, &format!("SELECT {COLUMNS} FROM probes WHERE path = ANY($1)"), &[&asked])
            .await
            .map_err(|e| db_error("looking probes up", e))?;
        let mut found: HashMap<ProbePath, StoredProbe> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let probe = stored(row)?;
            found.insert(probe.path.clone(), probe);
        }
        Ok(paths.iter().map(|path| found.get(path).cloned()).collect())
    }

    async fn list(
        &self,
        module_version: Option<&ModuleVersion>,
        after: Option<&ProbePath>,
        limit: usize,
    ) -> Result<Vec<StoredProbe>> {
        let after = after.map(ToString::to_string);
        let version = module_version.map(|v| v.as_str().to_owned());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = get(&self.pool).await?;
        let rows = query(
            &client,
            &format!(
                "SELECT {COLUMNS} FROM probes
                 WHERE ($1::text IS NULL OR path > $1) AND ($2::text IS NULL OR module_version = $2)
                 ORDER BY path LIMIT $3"
            ),
            &[&after, &version, &limit],
        )
        .await
        .map_err(|e| db_error("listing probes", e))?;
        rows.iter().map(stored).collect()
    }

    async fn open(&self, path: &ProbePath) -> Result<Option<ProbeReader>> {
        let reading = InTransaction::begin(&self.pool, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
        let row = query_opt(
            reading.client(),
            &format!("SELECT {COLUMNS}, blob FROM probes WHERE path = $1"),
            &[&path.to_string()],
        )
        .await
        .map_err(|e| db_error("opening a probe", e))?;
        let Some(row) = row else {
            reading.end("COMMIT").await?;
            return Ok(None);
        };
        let probe = stored(&row)?;
        let blob: i64 = row.get("blob");
        // One chunk read ahead; a reader that goes away drops the receiver,
        // the task stops and its connection is closed.
        let (chunks, receiver) = mpsc::channel(1);
        tokio::spawn(read_chunks(reading, blob, path.clone(), chunks));
        Ok(Some(ProbeReader { probe, chunks: Box::pin(ReceiverStream::new(receiver)) }))
    }

    async fn stage(&self, path: &ProbePath, _size: u64) -> Result<Box<dyn Staging>> {
        // Visible at commit, durable at the group flush that follows it.
        let (writing, blob) = InTransaction::begin_returning(
            &self.pool,
            "BEGIN; SET LOCAL synchronous_commit = off; SELECT nextval('probe_blobs')",
        )
        .await?;
        let blob: i64 = blob
            .and_then(|blob| blob.parse().ok())
            .ok_or_else(|| Error::internal("the database gave no number for a new probe"))?;
        Ok(Box::new(PgStaging {
            writing,
            flush: self.flush.clone(),
            path: path.clone(),
            blob,
            seq: 0,
            pending: BytesMut::new(),
        }))
    }

    async fn remove(&self, path: &ProbePath) -> Result<bool> {
        let removing = InTransaction::begin(&self.pool, "BEGIN").await?;
        let client = removing.client();
        let row = query_opt(client, "DELETE FROM probes WHERE path = $1 RETURNING blob", &[&path.to_string()])
            .await
            .map_err(|e| db_error("removing a probe", e))?;
        let removed = match row {
            None => false,
            Some(row) => {
                let blob: i64 = row.get(0);
                execute(client, "DELETE FROM probe_chunks WHERE blob = $1", &[&blob])
                    .await
                    .map_err(|e| db_error("removing a probe's bytes", e))?;
                notify(client, path).await?;
                true
            }
        };
        removing.end("COMMIT").await?;
        Ok(removed)
    }

    fn page_token_key(&self) -> &[u8] {
        &self.page_token_key
    }

    fn available_bytes(&self) -> Result<u64> {
        Ok(u64::MAX)
    }
}

/// Listens on one connection until it fails: `Live` once listening, then
/// one `Changed` per notification.
async fn listen<T>(config: &tokio_postgres::Config, tls: T, changes: &mpsc::Sender<RecordChange>) -> Result<()>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = config.connect(tls).await.map_err(|e| db_error("connecting to listen", e))?;
    let (paths, mut notified) = mpsc::unbounded_channel::<String>();
    // Polling the connection both runs the client's statements and yields
    // the notifications.
    let driver = tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(note) = message
                && paths.send(note.payload().to_owned()).is_err()
            {
                return;
            }
        }
    });
    let listening = client.batch_execute(&format!("LISTEN {CHANGES_CHANNEL}")).await;
    if let Err(error) = listening {
        driver.abort();
        return Err(db_error("listening for changes", error));
    }
    if changes.send(RecordChange::Live).await.is_err() {
        driver.abort();
        return Ok(());
    }
    while let Some(path) = notified.recv().await {
        let Ok(path) = ProbePath::parse(&path) else { continue };
        if changes.send(RecordChange::Changed(path)).await.is_err() {
            break;
        }
    }
    driver.abort();
    Err(Error::new(Code::Unavailable, "the listening connection ended"))
}

/// Tells every replica's listener that `path` changed, when the
/// transaction of `client` commits.
async fn notify(client: &Object, path: &ProbePath) -> Result<()> {
    execute(client, NOTIFY, &[&CHANGES_CHANNEL, &path.to_string()])
        .await
        .map_err(|e| db_error("notifying a change", e))?;
    Ok(())
}

/// Sends the chunk rows of `blob` in order, then ends the transaction.
async fn read_chunks(reading: InTransaction, blob: i64, path: ProbePath, chunks: mpsc::Sender<Result<Bytes>>) {
    let mut seq = 0i32;
    loop {
        let row =
            query_opt(reading.client(), "SELECT data FROM probe_chunks WHERE blob = $1 AND seq = $2", &[&blob, &seq])
                .await
                .map_err(|e| db_error(&format!("reading {path}"), e));
        let chunk = match row {
            Ok(Some(row)) => Ok(Bytes::from(row.get::<_, Vec<u8>>(0))),
            Ok(None) => break,
            Err(error) => Err(error),
        };
        let failed = chunk.is_err();
        if chunks.send(chunk).await.is_err() || failed {
            return;
        }
        seq += 1;
    }
    if let Err(error) = reading.end("COMMIT").await {
        let _ = chunks.send(Err(error)).await;
    }
}

/// A file being written: chunk rows inserted in its own transaction.
struct PgStaging {
    writing: InTransaction,
    flush: Arc<GroupFlush>,
    path: ProbePath,
    blob: i64,
    seq: i32,
    /// Bytes not yet inserted: less than one row.
    pending: BytesMut,
}

impl PgStaging {
    async fn insert(&mut self, data: &[u8]) -> Result<()> {
        let params: [&(dyn ToSql + Sync); 3] = [&self.blob, &self.seq, &data];
        execute(self.writing.client(), "INSERT INTO probe_chunks (blob, seq, data) VALUES ($1, $2, $3)", &params)
            .await
            .map_err(|e| db_error(&format!("writing {}", self.path), e))?;
        self.seq += 1;
        Ok(())
    }
}

#[tonic::async_trait]
impl Staging for PgStaging {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        self.pending.extend_from_slice(&chunk);
        while self.pending.len() >= CHUNK_ROW {
            let row = self.pending.split_to(CHUNK_ROW);
            self.insert(&row).await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<Box<dyn Staged>> {
        if !self.pending.is_empty() {
            let row = std::mem::take(&mut self.pending);
            self.insert(&row).await?;
        }
        Ok(Box::new(PgStaged { staging: *self }))
    }
}

struct PgStaged {
    staging: PgStaging,
}

#[tonic::async_trait]
impl Staged for PgStaged {
    async fn existing(&self) -> Result<Option<StoredProbe>> {
        let PgStaging { writing, path, .. } = &self.staging;
        let row =
            query_opt(writing.client(), &format!("SELECT {COLUMNS} FROM probes WHERE path = $1"), &[&path.to_string()])
                .await
                .map_err(|e| db_error(&format!("looking up {path}"), e))?;
        row.as_ref().map(stored).transpose()
    }

    /// Nothing to do: the rows become durable with the commit.
    async fn prepare(&mut self, _probe: &StoredProbe) -> Result<()> {
        Ok(())
    }

    async fn commit(
        self: Box<Self>,
        probe: StoredProbe,
        overwrite: bool,
        taken: Option<oneshot::Sender<bool>>,
    ) -> Result<CommitOutcome> {
        let PgStaging { writing, flush, path, blob, .. } = self.staging;
        let client = writing.client();
        let db = |what: &'static str| {
            let path = path.clone();
            move |e| db_error(&format!("{what} {path}"), e)
        };
        let path_text = path.to_string();
        // Statements are prepared first and then sent without waiting for
        // each other's answers (tokio-postgres sends a statement when its
        // future is first polled, `join!` polls in order, and PostgreSQL
        // runs what one connection sends in order): one round trip each for
        // the decision and for the write.
        let lock = prepare(client, "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))").await?;
        let lookup = prepare(client, &format!("SELECT {COLUMNS}, blob FROM probes WHERE path = $1")).await?;
        // Uploads of one path on any replica decide one after the other; the
        // lookup runs after the lock is held, so it sees the last commit.
        let by_path: [&(dyn ToSql + Sync); 1] = [&path_text];
        let (locked, old) = tokio::join!(client.execute(&lock, &by_path), client.query_opt(&lookup, &by_path));
        locked.map_err(db("locking"))?;
        let old = old.map_err(db("looking up"))?;
        let old_blob: Option<i64> = old.as_ref().map(|row| row.get("blob"));
        let old = old.as_ref().map(stored).transpose()?;
        let decision = overwrite_rule(old.map(|o| (o.size, o.sha256)), (probe.size, probe.sha256), overwrite);
        let (outcome, client) = match decision {
            Decision::Keep(outcome) => (outcome, writing.end_keeping("ROLLBACK").await?),
            Decision::Write(outcome) => {
                let size = i64::try_from(probe.size).map_err(|_| Error::invalid_argument("a probe over 2^63 bytes"))?;
                let crc32 = probe.crc32.map(i64::from);
                let sha256 = probe.sha256.0.as_slice();
                let params: [&(dyn ToSql + Sync); 6] =
                    [&path_text, &path.module_version().as_str(), &size, &sha256, &crc32, &blob];
                let insert = prepare(
                    client,
                    "INSERT INTO probes (path, module_version, size, sha256, crc32, blob) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (path) DO UPDATE SET size = $3, sha256 = $4, crc32 = $5, blob = $6, stored_at = now()",
                )
                .await?;
                let delete = prepare(client, "DELETE FROM probe_chunks WHERE blob = $1").await?;
                let notify = prepare(client, NOTIFY).await?;
                // -1 matches no chunk rows.
                let old_blob: [&(dyn ToSql + Sync); 1] = [&old_blob.unwrap_or(-1)];
                let change: [&(dyn ToSql + Sync); 2] = [&CHANGES_CHANNEL, &path_text];
                // COMMIT goes with them: if any of them failed, the
                // transaction is aborted and COMMIT rolls it back.
                let (stored, replaced, notified, committed) = tokio::join!(
                    client.execute(&insert, &params),
                    client.execute(&delete, &old_blob),
                    client.execute(&notify, &change),
                    client.batch_execute("COMMIT"),
                );
                let client = writing.ended(committed)?;
                stored.map_err(db("storing"))?;
                replaced.map_err(db("replacing"))?;
                notified.map_err(db("notifying a change to"))?;
                (outcome, client)
            }
        };
        report_taken(taken);
        // What was kept may be a commit of another upload not flushed yet.
        flush.flush(&client).await?;
        Ok(outcome)
    }
}
