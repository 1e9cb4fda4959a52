//! The misses of replicas sharing a database, in its `probe_misses` table:
//! each replica merges its batches into the same rows, so any replica lists
//! what all of them missed, and an upload through any replica resolves it.

use std::collections::BTreeSet;

use deadpool_postgres::Pool;
use probe_api::limits::{MAX_MISS_CLIENTS, MAX_MISSES};
use probe_api::names::ProbePath;
use tokio_postgres::Row;

use super::connection::{db_error, get};
use crate::error::{Error, Result};
use crate::store::client_id::ClientId;
use crate::store::misses::{Miss, MissLog, Resolved, Resolver};

/// The `probe_misses` table.
pub struct DatabaseMisses {
    pool: Pool,
}

impl DatabaseMisses {
    pub(super) fn new(pool: Pool) -> Self {
        DatabaseMisses { pool }
    }
}

/// Client ids are stored as `bigint`: the same 64 bits.
fn to_sql(client: ClientId) -> i64 {
    client.0 as i64
}

#[tonic::async_trait]
impl MissLog for DatabaseMisses {
    async fn record(&self, seen: Vec<Miss>) -> Result<()> {
        let mut client = get(&self.pool).await?;
        let transaction = client.transaction().await.map_err(|e| db_error("recording misses", e))?;
        let upsert = transaction
            .prepare(&format!(
                "INSERT INTO probe_misses AS m (path, requests, clients, first_seen, last_seen)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (path) DO UPDATE SET
                     requests = m.requests + excluded.requests,
                     clients = (SELECT coalesce(array_agg(c), '{{}}') FROM
                                (SELECT DISTINCT c FROM unnest(m.clients || excluded.clients) AS c
                                 LIMIT {MAX_MISS_CLIENTS}) AS distinct_clients),
                     first_seen = least(m.first_seen, excluded.first_seen),
                     last_seen = greatest(m.last_seen, excluded.last_seen),
                     resolved_at = NULL,
                     resolved_by = NULL"
            ))
            .await
            .map_err(|e| db_error("recording misses", e))?;
        for miss in &seen {
            let clients: Vec<i64> = miss.clients.iter().copied().map(to_sql).collect();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
                &miss.path.to_string(),
                &(miss.requests as i64),
                &clients,
                &(miss.first_seen as i64),
                &(miss.last_seen as i64),
            ];
            transaction.execute(&upsert, &params).await.map_err(|e| db_error("recording misses", e))?;
        }
        // Bounded like any miss log: the misses seen longest ago go.
        transaction
            .execute(
                &format!(
                    "DELETE FROM probe_misses WHERE path IN
                     (SELECT path FROM probe_misses ORDER BY last_seen DESC, path OFFSET {MAX_MISSES})"
                ),
                &[],
            )
            .await
            .map_err(|e| db_error("recording misses", e))?;
        transaction.commit().await.map_err(|e| db_error("recording misses", e))
    }

    async fn resolve(&self, paths: &[ProbePath], resolved: Resolved) -> Result<()> {
        let paths: Vec<String> = paths.iter().map(ToString::to_string).collect();
        let client = get(&self.pool).await?;
        client
            .execute(
                "UPDATE probe_misses SET resolved_at = $2, resolved_by = $3
                 WHERE path = ANY($1) AND resolved_at IS NULL",
                &[&paths, &(resolved.at as i64), &resolved.by.as_str()],
            )
            .await
            .map_err(|e| db_error("resolving misses", e))?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Miss>> {
        let client = get(&self.pool).await?;
        let rows = client
            .query(
                "SELECT path, requests, clients, first_seen, last_seen, resolved_at, resolved_by
                 FROM probe_misses ORDER BY last_seen DESC, path",
                &[],
            )
            .await
            .map_err(|e| db_error("listing misses", e))?;
        rows.iter().map(miss).collect()
    }
}

fn miss(row: &Row) -> Result<Miss> {
    let bad = || Error::internal("the database holds a bad miss");
    let unsigned = |column: &str| u64::try_from(row.get::<_, i64>(column)).map_err(|_| bad());
    let clients: Vec<i64> = row.get("clients");
    let resolved = match (row.get::<_, Option<i64>>("resolved_at"), row.get::<_, Option<String>>("resolved_by")) {
        (Some(at), Some(by)) => {
            Some(Resolved { at: u64::try_from(at).map_err(|_| bad())?, by: Resolver::parse(&by).ok_or_else(bad)? })
        }
        _ => None,
    };
    Ok(Miss {
        path: ProbePath::parse(row.get("path")).map_err(|_| bad())?,
        requests: unsigned("requests")?,
        clients: clients.into_iter().map(|c| ClientId(c as u64)).collect::<BTreeSet<_>>(),
        first_seen: unsigned("first_seen")?,
        last_seen: unsigned("last_seen")?,
        resolved,
    })
}
