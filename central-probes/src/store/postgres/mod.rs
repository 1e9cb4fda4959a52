//! The PostgreSQL backend: probes in ordinary tables of a database that
//! several Centrals share (`schema.rs` has the tables and migrations,
//! `connection.rs` the pool, transactions and statements, `writer.rs` the
//! write path, `changes.rs` the change feed, `misses.rs` the misses of every
//! replica).
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

mod changes;
mod connection;
mod flush;
mod misses;
mod rows;
mod schema;
#[cfg(any(test, feature = "testing"))]
pub mod test_cluster;
#[cfg(test)]
mod tests;
mod tls;
mod tokens;
mod writer;

use writer::PgStaging;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use deadpool_postgres::{Object, Pool};
use probe_api::names::{ModuleVersion, ProbePath};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{Error, Result};
use crate::store::backend::{Backend, Stage};
use crate::store::verified::VerifiedStore;
use crate::store::{ModuleSummary, ProbeReader, StoredProbe};

use connection::{Connector, InTransaction, db_error, execute, get, make_pool, query, query_opt, settings};
use flush::GroupFlush;
use rows::{CHANGES_CHANNEL, COLUMNS, NOTIFY, stored};

pub use connection::PostgresConfig;
pub use misses::DatabaseMisses;
pub use rows::CHUNK_ROW;
pub use schema::SCHEMA_VERSION;
pub use tokens::DatabaseTokens;

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

impl PostgresStore {
    /// Connects, applies migrations and loads the shared page token key.
    pub async fn connect(config: &PostgresConfig) -> Result<Self> {
        // The database's free space is not Central's to see: no floor.
        Ok(VerifiedStore::new(PostgresBackend::connect(config).await?, 0))
    }
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

    /// The misses of every replica on this database.
    pub fn misses(&self) -> DatabaseMisses {
        DatabaseMisses::new(self.pool.clone())
    }

    /// The API tokens of this database.
    pub fn tokens(&self) -> DatabaseTokens {
        DatabaseTokens::new(self.pool.clone())
    }
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

    async fn summaries(&self) -> Result<Vec<ModuleSummary>> {
        let client = get(&self.pool).await?;
        // Path order: "2.5.0-rc1/" before "2.5.0/".
        let rows = query(
            &client,
            "SELECT module_version, count(*) AS probes, sum(size)::bigint AS bytes,
                    floor(extract(epoch FROM max(stored_at)))::bigint AS last_stored
             FROM probes GROUP BY module_version ORDER BY module_version || '/'",
            &[],
        )
        .await
        .map_err(|e| db_error("summing up the probes", e))?;
        let bad = || Error::internal("the database holds a bad module version");
        rows.iter()
            .map(|row| {
                Ok(ModuleSummary {
                    module_version: ModuleVersion::parse(row.get("module_version")).map_err(|_| bad())?,
                    probes: row.get::<_, i64>("probes").unsigned_abs(),
                    bytes: row.get::<_, i64>("bytes").unsigned_abs(),
                    last_stored: u64::try_from(row.get::<_, i64>("last_stored")).ok(),
                })
            })
            .collect()
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

    async fn stage(&self, path: &ProbePath, _size: u64) -> Result<Stage> {
        // Visible at commit, durable at the group flush that follows it.
        let (writing, blob) = InTransaction::begin_returning(
            &self.pool,
            "BEGIN; SET LOCAL synchronous_commit = off; SELECT nextval('probe_blobs')",
        )
        .await?;
        let blob: i64 = blob
            .and_then(|blob| blob.parse().ok())
            .ok_or_else(|| Error::internal("the database gave no number for a new probe"))?;
        Ok(Stage::Async(Box::new(PgStaging::new(writing, self.flush.clone(), path.clone(), blob))))
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

    async fn location(&self, path: &ProbePath) -> String {
        let blob = async {
            let client = get(&self.pool).await?;
            let row = query_opt(&client, "SELECT blob FROM probes WHERE path = $1", &[&path.to_string()])
                .await
                .map_err(|e| db_error("looking a probe up", e))?;
            Ok::<_, Error>(row.map(|row| row.get::<_, i64>(0)))
        };
        match blob.await {
            Ok(Some(blob)) => format!("the database's table probe_chunks, the rows of blob {blob}"),
            Ok(None) => "the database (no row of it any more)".to_owned(),
            Err(error) => format!("the database (its blob could not be looked up: {error})"),
        }
    }

    fn available_bytes(&self) -> Result<u64> {
        Ok(u64::MAX)
    }
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
