//! The database schema and its versioned migrations, applied at start-up
//! under an advisory lock so that replicas starting at once apply each
//! migration exactly once. A database migrated by a newer Central is
//! refused: this binary cannot know what the newer schema means.

use tokio_postgres::Client;
use tonic::Code;

use crate::error::{Error, Result};

/// Migration `i` takes the schema from version `i` to `i + 1`.
///
/// Version 1, probes: `probes` holds one row per visible probe; its bytes are the rows
/// of `probe_chunks` with its `blob`, in `seq` order, each at most
/// `CHUNK_ROW` bytes. A replaced probe gets a new blob, so a reader in a
/// repeatable-read transaction keeps reading the old rows. Paths compare
/// byte by byte (`COLLATE "C"`), the API's listing order. Version 2: API
/// tokens (their SHA-256 only), shared by every replica. Version 3: the
/// misses of every replica (`store::misses`; times in Unix seconds, client
/// ids as their 64 bits). Version 4: each probe's minisign signature, NULL
/// for an unsigned probe, written in the row's one statement with the probe.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE probes (
        path text COLLATE "C" PRIMARY KEY,
        module_version text COLLATE "C" NOT NULL,
        size bigint NOT NULL,
        sha256 bytea NOT NULL,
        crc32 bigint,
        blob bigint NOT NULL,
        stored_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX probes_by_module_version ON probes (module_version, path);
    CREATE SEQUENCE probe_blobs;
    CREATE TABLE probe_chunks (
        blob bigint NOT NULL,
        seq integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (blob, seq)
    );
    CREATE TABLE settings (
        name text PRIMARY KEY,
        value bytea NOT NULL
    );
"#,
    r#"
    CREATE TABLE api_tokens (
        name text PRIMARY KEY,
        role text NOT NULL,
        sha256 bytea NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );
"#,
    r#"
    CREATE TABLE probe_misses (
        path text COLLATE "C" PRIMARY KEY,
        requests bigint NOT NULL,
        clients bigint[] NOT NULL,
        first_seen bigint NOT NULL,
        last_seen bigint NOT NULL,
        resolved_at bigint,
        resolved_by text
    );
    CREATE INDEX probe_misses_by_last_seen ON probe_misses (last_seen);
"#,
    r#"
    ALTER TABLE probes ADD COLUMN signature bytea;
"#,
];

/// The schema version this binary writes and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Any constant both replicas agree on: the key of the migration lock.
const MIGRATION_LOCK: i64 = 0x6b70_726f_6265_7331; // "kprobes1"

/// Brings the database to `SCHEMA_VERSION`, or refuses one that is newer.
pub async fn migrate(client: &mut Client) -> Result<()> {
    let db_error = |what: &'static str| move |e: tokio_postgres::Error| super::connection::db_error(what, e);
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db_error("locking migrations"))?;
    let migrated = apply(client).await;
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    migrated?;
    unlocked.map_err(db_error("unlocking migrations"))?;
    Ok(())
}

async fn apply(client: &mut Client) -> Result<()> {
    let db_error = |what: &'static str| move |e: tokio_postgres::Error| super::connection::db_error(what, e);
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS kprobes_schema (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(db_error("creating the schema table"))?;
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM kprobes_schema", &[])
        .await
        .map_err(db_error("reading the schema version"))?;
    let current: i32 = row.get(0);
    if current > SCHEMA_VERSION {
        return Err(Error::new(
            Code::FailedPrecondition,
            format!(
                "the database has schema version {current}, newer than this Central's {SCHEMA_VERSION}: \
                 run a Central at least as new as the one that migrated it"
            ),
        ));
    }
    for (version, migration) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let next = version as i32 + 1;
        let transaction = client.transaction().await.map_err(db_error("starting a migration"))?;
        transaction.batch_execute(migration).await.map_err(db_error("applying a migration"))?;
        transaction
            .execute("INSERT INTO kprobes_schema (version) VALUES ($1)", &[&next])
            .await
            .map_err(db_error("recording a migration"))?;
        transaction.commit().await.map_err(db_error("committing a migration"))?;
    }
    Ok(())
}
