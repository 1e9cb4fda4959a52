//! `central-probes token`: API tokens, made and revoked where Central keeps
//! them: the data directory's tokens file (read on every call), or the
//! shared database (`--database-url`; every replica reloads it each second).

use std::path::PathBuf;
use std::time::Duration;

use super::CliError;
use central_probes::server::{PostgresConfig, Role, TokenFile};
use central_probes::store::postgres::DatabaseTokens;
use clap::{Args, Subcommand};

/// Where the tokens are: a data directory or a database.
#[derive(Args)]
pub struct TokenPlace {
    /// The data directory of a Central with a filesystem store.
    #[arg(long, env = "CENTRAL_DATA_DIR", required_unless_present = "database_url", conflicts_with = "database_url")]
    data_dir: Option<PathBuf>,
    /// The database of Centrals that share one (as `serve --database-url`).
    #[arg(long, env = "CENTRAL_DATABASE_URL")]
    database_url: Option<String>,
    /// The database's CA, to connect over TLS (as `serve --database-ca`).
    #[arg(long, env = "CENTRAL_DATABASE_CA", requires = "database_url")]
    database_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a new API token and print it (the only time it is shown).
    Create {
        #[command(flatten)]
        place: TokenPlace,
        #[arg(long, value_enum)]
        role: Role,
        /// A name to revoke it by; defaults to the role and a number.
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke the token with this name; Central refuses it at once (within
    /// a second on every replica of a shared database).
    Revoke {
        #[command(flatten)]
        place: TokenPlace,
        #[arg(long)]
        name: String,
    },
    /// List token names and roles.
    List {
        #[command(flatten)]
        place: TokenPlace,
    },
}

enum Tokens {
    File(TokenFile),
    Database(DatabaseTokens),
}

impl TokenPlace {
    async fn open(&self) -> Result<Tokens, CliError> {
        match (&self.data_dir, &self.database_url) {
            (Some(dir), _) => Ok(Tokens::File(TokenFile::in_data_dir(dir))),
            (None, Some(url)) => {
                let ca_pem = self.database_ca.as_deref().map(|ca| super::read(ca, "the database CA")).transpose()?;
                let config = PostgresConfig {
                    url: url.clone(),
                    max_connections: 1,
                    statement_timeout: Duration::from_secs(30),
                    ca_pem,
                };
                let tokens = DatabaseTokens::connect(&config).await.map_err(|e| e.context("opening the database"))?;
                Ok(Tokens::Database(tokens))
            }
            (None, None) => unreachable!("clap requires one of them"),
        }
    }
}

impl Tokens {
    async fn names(&self) -> Result<Vec<(String, Role)>, CliError> {
        let records = match self {
            Tokens::File(file) => file.load().map_err(|e| e.to_string())?,
            Tokens::Database(database) => database.load().await?,
        };
        Ok(records.into_iter().map(|r| (r.name, r.role)).collect())
    }
}

pub async fn token(command: TokenCommand) -> Result<(), CliError> {
    match command {
        TokenCommand::Create { place, role, name } => {
            let tokens = place.open().await?;
            let name = match name {
                Some(name) => name,
                None => format!("{role}-{}", tokens.names().await?.len() + 1),
            };
            let token = match &tokens {
                Tokens::File(file) => file.create(role, &name).map_err(|e| format!("creating a token: {e}"))?,
                Tokens::Database(database) => database.create(role, &name).await?,
            };
            eprintln!("created token {name:?} with role {role}; it is shown only now:");
            println!("{token}");
            Ok(())
        }
        TokenCommand::Revoke { place, name } => {
            let revoked = match place.open().await? {
                Tokens::File(file) => file.revoke(&name).map_err(|e| e.to_string())?,
                Tokens::Database(database) => database.revoke(&name).await?,
            };
            if !revoked {
                return Err(format!("no token named {name:?}").into());
            }
            eprintln!("revoked token {name:?}");
            Ok(())
        }
        TokenCommand::List { place } => {
            for (name, role) in place.open().await?.names().await? {
                println!("{name}\t{role}");
            }
            Ok(())
        }
    }
}
