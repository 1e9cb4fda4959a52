//! Talking to the database: the connection settings and pool, the
//! classification of errors (retry or not), transactions that never go back
//! to the pool open, and statements prepared once per connection.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use probe_api::errors::chain;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, SimpleQueryMessage};
use tonic::Code;

use super::tls;
use crate::error::{Error, Result};

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

/// Plain TCP or verified TLS.
#[derive(Clone)]
pub(super) enum Connector {
    Plain,
    Tls(tls::RustlsConnect),
}

/// The error of a database call: UNAVAILABLE when retrying may help (the
/// connection broke, the database is starting or shutting down, a
/// statement ran out of time), INTERNAL otherwise.
pub(super) fn db_error(what: &str, error: tokio_postgres::Error) -> Error {
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
pub(super) fn settings(config: &PostgresConfig) -> Result<(tokio_postgres::Config, Connector)> {
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
pub(super) fn make_pool(config: &PostgresConfig, (pg, connector): (tokio_postgres::Config, Connector)) -> Result<Pool> {
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

/// A pooled connection, or UNAVAILABLE.
pub(super) async fn get(pool: &Pool) -> Result<Object> {
    pool.get().await.map_err(|e| Error::new(Code::Unavailable, format!("connecting to the database: {}", chain(&e))))
}

/// A connection inside a transaction. Dropped before `commit` or
/// `rollback`, it is taken out of the pool and closed, which makes
/// PostgreSQL roll the transaction back: an open transaction never goes
/// back to the pool.
pub(super) struct InTransaction {
    client: Option<Object>,
}

impl InTransaction {
    pub(super) async fn begin(pool: &Pool, begin: &str) -> Result<Self> {
        Ok(Self::begin_returning(pool, begin).await?.0)
    }

    /// Starts a transaction with `statements`, whose last may be a query:
    /// the first value of its first row, as text. One round trip.
    pub(super) async fn begin_returning(pool: &Pool, statements: &str) -> Result<(Self, Option<String>)> {
        let transaction = InTransaction { client: Some(get(pool).await?) };
        let messages =
            transaction.client().simple_query(statements).await.map_err(|e| db_error("starting a transaction", e))?;
        let value = messages.into_iter().find_map(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        });
        Ok((transaction, value))
    }

    pub(super) fn client(&self) -> &Object {
        self.client.as_ref().expect("in a transaction")
    }

    pub(super) async fn end(self, statement: &str) -> Result<()> {
        self.end_keeping(statement).await.map(drop)
    }

    /// Ends the transaction and hands its connection on for more work.
    pub(super) async fn end_keeping(self, statement: &str) -> Result<Object> {
        let ended = self.client().batch_execute(statement).await;
        self.ended(ended)
    }

    /// The connection of a transaction ended by `statement_result`, or the
    /// error of ending it (the connection is closed then: the transaction
    /// may still be open).
    pub(super) fn ended(mut self, statement_result: Result<(), tokio_postgres::Error>) -> Result<Object> {
        let client = self.client.take().expect("in a transaction");
        if let Err(error) = statement_result {
            drop(Object::take(client));
            return Err(db_error("ending a transaction", error));
        }
        Ok(client)
    }
}

pub(super) type Params<'a> = [&'a (dyn ToSql + Sync)];

/// `sql` prepared on `client`, once per connection.
pub(super) async fn prepare(client: &Object, sql: &str) -> Result<tokio_postgres::Statement> {
    client.prepare_cached(sql).await.map_err(|e| db_error("preparing a statement", e))
}

/// Runs `sql`, prepared once per connection: one round trip, not two.
pub(super) async fn execute(client: &Object, sql: &str, params: &Params<'_>) -> Result<u64, tokio_postgres::Error> {
    let statement = client.prepare_cached(sql).await?;
    client.execute(&statement, params).await
}

pub(super) async fn query(client: &Object, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, tokio_postgres::Error> {
    let statement = client.prepare_cached(sql).await?;
    client.query(&statement, params).await
}

pub(super) async fn query_opt(
    client: &Object,
    sql: &str,
    params: &Params<'_>,
) -> Result<Option<Row>, tokio_postgres::Error> {
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
