//! The `central-probes` command line: one file per subcommand. Each
//! subcommand parses its flags here and calls into the library; nothing
//! here serves or stores anything itself.

mod export;
mod ls;
mod misses;
mod package;
mod pki;
mod rm;
mod serve;
mod token;
mod upload;
mod verify;

use std::path::Path;

use clap::{Parser, Subcommand};
use probe_api::errors::Context;

#[derive(Parser)]
#[command(version, about = "Kernel probe store and server for Collectors, and its admin tools")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run Central's probe server.
    Serve(Box<serve::ServeArgs>),
    /// Upload a kernel support package (zip) to Central.
    Upload(upload::UploadArgs),
    /// The documented spelling: `collector support-packages upload`.
    Collector {
        #[command(subcommand)]
        command: CollectorCommand,
    },
    /// List the probes Central stores.
    Ls(ls::LsArgs),
    /// Delete stored probes by path or module version (--dry-run shows what would go).
    Rm(rm::RmArgs),
    /// The probes Collectors asked for that no source had, and the support packages to upload.
    Misses(misses::MissesArgs),
    /// Write stored probes into a support package (zip) for another Central.
    Export(export::ExportArgs),
    /// Read every stored probe and name those whose bytes no longer match their upload (exit 1 if any).
    Verify(verify::VerifyArgs),
    /// Create, revoke and list API tokens (in the data directory, or in the shared database).
    Token {
        #[command(subcommand)]
        command: token::TokenCommand,
    },
    /// Sign a support package's probes, or check their signatures (minisign).
    Package {
        #[command(subcommand)]
        command: package::PackageCommand,
    },
    /// Development certificates.
    Pki {
        #[command(subcommand)]
        command: pki::PkiCommand,
    },
}

#[derive(Subcommand)]
pub enum CollectorCommand {
    #[command(name = "support-packages")]
    SupportPackages {
        #[command(subcommand)]
        command: SupportPackagesCommand,
    },
}

#[derive(Subcommand)]
pub enum SupportPackagesCommand {
    /// Upload a kernel support package (zip) to Central.
    Upload(upload::UploadArgs),
}

/// A subcommand's failure, with its causes (printed as one line by
/// `central_probes::admin::error::chain`).
/// `-o`: a report for people, or one JSON object on stdout (README,
/// "Machine-readable output").
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

pub type CliError = Box<dyn std::error::Error + Send + Sync>;

/// Runs one subcommand; the error is the one line the user sees.
pub async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Serve(args) => serve::serve(*args).await,
        Command::Upload(args)
        | Command::Collector {
            command: CollectorCommand::SupportPackages { command: SupportPackagesCommand::Upload(args) },
        } => upload::upload(args).await,
        Command::Ls(args) => ls::ls(args).await,
        Command::Rm(args) => rm::rm(args).await,
        Command::Export(args) => export::export(args).await,
        Command::Verify(args) => verify::verify(args).await,
        Command::Misses(args) => misses::misses(args).await,
        Command::Token { command } => token::token(command).await,
        Command::Package { command } => package::run(command).await,
        Command::Pki { command } => pki::pki(command),
    }
}

pub(crate) fn read(path: &Path, what: &str) -> Result<Vec<u8>, Context> {
    std::fs::read(path).map_err(Context::of(format!("reading {what} {}", path.display())))
}

/// Seconds since the Unix epoch as RFC 3339 UTC; empty for 0 (unknown).
pub(crate) fn rfc3339(unix: i64) -> String {
    match u64::try_from(unix) {
        Ok(seconds) if seconds > 0 => humantime::format_rfc3339_seconds(
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds),
        )
        .to_string(),
        _ => String::new(),
    }
}

/// Parses `1073741824`, `1G` (10^9), `1GiB` (2^30) and the like.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a size such as 1GiB"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("{text} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("5G"), Ok(5_000_000_000));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
