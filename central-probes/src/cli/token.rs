//! `central-probes token`: API tokens, made and revoked where the data
//! directory is; Central reads the file on every call.

use std::path::PathBuf;

use super::CliError;
use central_probes::server::{Role, TokenFile};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a new API token and print it (the only time it is shown).
    Create {
        #[arg(long, env = "CENTRAL_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, value_enum)]
        role: Role,
        /// A name to revoke it by; defaults to the role and a number.
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke the token with this name; Central refuses it at once.
    Revoke {
        #[arg(long, env = "CENTRAL_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// List token names and roles.
    List {
        #[arg(long, env = "CENTRAL_DATA_DIR")]
        data_dir: PathBuf,
    },
}

pub fn token(command: TokenCommand) -> Result<(), CliError> {
    match command {
        TokenCommand::Create { data_dir, role, name } => {
            let tokens = TokenFile::in_data_dir(&data_dir);
            let name = match name {
                Some(name) => name,
                None => {
                    let count = tokens.load().map_err(|e| e.to_string())?.len();
                    format!("{role}-{}", count + 1)
                }
            };
            let token = tokens.create(role, &name).map_err(|e| format!("creating a token: {e}"))?;
            eprintln!("created token {name:?} with role {role}; it is shown only now:");
            println!("{token}");
            Ok(())
        }
        TokenCommand::Revoke { data_dir, name } => {
            if TokenFile::in_data_dir(&data_dir).revoke(&name).map_err(|e| e.to_string())? {
                eprintln!("revoked token {name:?}");
                Ok(())
            } else {
                Err(format!("no token named {name:?}").into())
            }
        }
        TokenCommand::List { data_dir } => {
            for record in TokenFile::in_data_dir(&data_dir).load().map_err(|e| e.to_string())? {
                println!("{}\t{}", record.name, record.role);
            }
            Ok(())
        }
    }
}
