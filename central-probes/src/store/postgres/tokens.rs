//! API tokens in the shared database: every replica checks the same ones.
//! Only each token's SHA-256 is stored, as in a tokens file.

use std::sync::{Arc, Weak};

use deadpool_postgres::Pool;
use probe_api::digest::Sha256Digest;
use tracing::warn;

use super::connection::{PostgresConfig, db_error, get, make_pool, settings};
use super::schema;
use crate::error::{Error, Result};
use crate::store::tokens::{Role, SHARED_REFRESH, SharedTokens, TokenRecord, name_taken, new_token};

/// The `api_tokens` table.
#[derive(Clone)]
pub struct DatabaseTokens {
    pool: Pool,
}

impl DatabaseTokens {
    /// For the token commands: connects and brings the schema up to date.
    pub async fn connect(config: &PostgresConfig) -> Result<Self> {
        let pool = make_pool(config, settings(config)?)?;
        let mut client = get(&pool).await?;
        schema::migrate(&mut client).await?;
        drop(client);
        Ok(DatabaseTokens { pool })
    }

    pub(super) fn new(pool: Pool) -> Self {
        DatabaseTokens { pool }
    }

    pub async fn load(&self) -> Result<Vec<TokenRecord>> {
        let client = get(&self.pool).await?;
        let rows = client
            .query("SELECT name, role, sha256 FROM api_tokens ORDER BY created_at, name", &[])
            .await
            .map_err(|e| db_error("reading the API tokens", e))?;
        rows.iter()
            .map(|row| {
                let (name, role, sha256): (String, String, Vec<u8>) = (row.get(0), row.get(1), row.get(2));
                let bad = || Error::internal(format!("the database holds a bad API token record {name:?}"));
                let role = Role::parse(&role).ok_or_else(bad)?;
                let hash = Sha256Digest(sha256.try_into().map_err(|_| bad())?);
                Ok(TokenRecord { hash, role, name })
            })
            .collect()
    }

    /// Makes a token and returns it: the only time it is ever seen.
    pub async fn create(&self, role: Role, name: &str) -> Result<String> {
        let (token, record) = new_token(role, name).map_err(|e| Error::invalid_argument(e.to_string()))?;
        let client = get(&self.pool).await?;
        let inserted = client
            .execute(
                "INSERT INTO api_tokens (name, role, sha256) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                &[&record.name, &role.to_string(), &record.hash.0.as_slice()],
            )
            .await
            .map_err(|e| db_error("storing an API token", e))?;
        if inserted == 0 {
            return Err(Error::new(tonic::Code::AlreadyExists, name_taken(name).to_string()));
        }
        Ok(token)
    }

    /// Removes the token named `name`; false if there was none.
    pub async fn revoke(&self, name: &str) -> Result<bool> {
        let client = get(&self.pool).await?;
        let removed = client
            .execute("DELETE FROM api_tokens WHERE name = $1", &[&name])
            .await
            .map_err(|e| db_error("revoking an API token", e))?;
        Ok(removed > 0)
    }

    /// The tokens now, kept up to date every `SHARED_REFRESH` by a task
    /// that ends when the last holder of the list drops it. A failed reload
    /// keeps the last list (and is logged): the database being briefly away
    /// does not lock admins out.
    pub async fn watch(self) -> Result<SharedTokens> {
        let shared: SharedTokens = Arc::new(std::sync::RwLock::new(Arc::new(self.load().await?)));
        let weak: Weak<_> = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SHARED_REFRESH).await;
                let loaded = self.load().await;
                let Some(shared) = weak.upgrade() else { return };
                match loaded {
                    Ok(tokens) => *shared.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tokens),
                    Err(error) => warn!(%error, "could not reload the API tokens; keeping the last ones"),
                }
            }
        });
        Ok(shared)
    }
}
