//! Writing a probe into the database: its chunk rows in the file's own
//! transaction as they arrive, then the decision under the path's advisory
//! lock, the probe row and a NOTIFY, committed asynchronously in stream
//! order and reported once a group flush made it durable (`flush.rs`).

use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio_postgres::types::ToSql;

use super::connection::{InTransaction, db_error, execute, prepare, query_opt};
use super::flush::GroupFlush;
use super::rows::{CHANGES_CHANNEL, CHUNK_ROW, COLUMNS, NOTIFY, stored};
use crate::error::{Error, Result};
use crate::store::backend::{Staged, Staging};
use crate::store::{CommitOutcome, Decision, StoredProbe, overwrite_rule, report_taken};
use probe_api::names::ProbePath;

/// A file being written: chunk rows inserted in its own transaction.
pub(super) struct PgStaging {
    writing: InTransaction,
    flush: Arc<GroupFlush>,
    path: ProbePath,
    blob: i64,
    seq: i32,
    /// Bytes not yet inserted: less than one row.
    pending: BytesMut,
}

impl PgStaging {
    pub(super) fn new(writing: InTransaction, flush: Arc<GroupFlush>, path: ProbePath, blob: i64) -> Self {
        PgStaging { writing, flush, path, blob, seq: 0, pending: BytesMut::new() }
    }

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
        repair: bool,
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
        let decision = overwrite_rule(old.as_ref().map(StoredProbe::content), probe.content(), overwrite, repair);
        let (outcome, client) = match decision {
            Decision::Keep(outcome) => (outcome, writing.end_keeping("ROLLBACK").await?),
            Decision::Write(outcome) => {
                let size = i64::try_from(probe.size).map_err(|_| Error::invalid_argument("a probe over 2^63 bytes"))?;
                let crc32 = probe.crc32.map(i64::from);
                let sha256 = probe.sha256.0.as_slice();
                let signature = probe.signature.as_deref();
                let params: [&(dyn ToSql + Sync); 7] =
                    [&path_text, &path.module_version().as_str(), &size, &sha256, &crc32, &blob, &signature];
                let insert = prepare(
                    client,
                    "INSERT INTO probes (path, module_version, size, sha256, crc32, blob, signature)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (path) DO UPDATE SET
                         size = $3, sha256 = $4, crc32 = $5, blob = $6, signature = $7, stored_at = now()",
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
