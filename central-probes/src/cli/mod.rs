//! The `central-probes` command line: one file per subcommand. Each
//! subcommand parses its flags here and calls into the library; nothing
//! here serves or stores anything itself.

mod coverage;
mod export;
mod ls;
mod misses;
mod package;
mod pki;
mod registry;
mod rm;
mod serve;
mod token;
mod upload;
mod verify;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
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
    #[command(long_about = long_about_of_upload())]
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
    /// Before a kernel rollout: the probe each node would be served and its source (exit 1 if a node would crash-loop, 2 if the check failed).
    Coverage(coverage::CoverageArgs),
    /// Write stored probes into a support package (zip) for another Central.
    Export(export::ExportArgs),
    /// Read every stored probe and name those whose bytes no longer match their upload (exit 1 if any, 2 if the check failed).
    Verify(verify::VerifyArgs),
    /// Create, revoke and list API tokens (in the data directory, or in the shared database).
    Token {
        #[command(subcommand)]
        command: token::TokenCommand,
    },
    /// Sign a support package's probes, check their signatures (minisign), push or pull it through a registry.
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
    #[command(long_about = long_about_of_upload())]
    Upload(upload::UploadArgs),
}

/// `-o`: a report for people, or one JSON object on stdout
/// (docs/operations.md, "Machine-readable output").
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// The "Environment:" section of every command's --help: the variables
/// read without a flag of their own (those with one show as `[env: NAME=]`
/// beside it). Every command logs, so every section names `RUST_LOG`.
const LOG_ENV: &str = "Environment:\n  RUST_LOG       what is logged on stderr (default: info)";

/// The token of the commands that call Central's admin API (`Endpoint`),
/// their `after_help`: `command` puts it in their "Environment:" section.
pub(crate) const ENDPOINT_ENV: &str =
    "  ROX_API_TOKEN  the API token sent to Central (required; `central-probes token create` makes one)";

/// The command line, with an "Environment:" section at the end of every
/// command's --help: the lines of the command's own `after_help` (the
/// variables only it reads), then `LOG_ENV`'s.
pub fn command() -> clap::Command {
    fn with_environment(command: clap::Command) -> clap::Command {
        let names: Vec<String> = command.get_subcommands().map(|c| c.get_name().to_owned()).collect();
        let own = command.get_after_help().map(|text| format!("{}\n", text.to_string().trim_end()));
        let command = names.into_iter().fold(command, |command, name| command.mut_subcommand(name, with_environment));
        let section = LOG_ENV.replacen('\n', &format!("\n{}", own.unwrap_or_default()), 1);
        command.after_help(section)
    }
    with_environment(<Cli as clap::CommandFactory>::command())
}

fn long_about_of_upload() -> String {
    format!("Upload a kernel support package (zip) to Central.\n\n{}", upload::EXIT_STATUS)
}

/// A command that did its work but not all of it (an upload that skipped
/// entries), or a check's finding or failure: `main` prints `message` as
/// the error and exits with `status`.
#[derive(Debug)]
pub struct Incomplete {
    pub status: u8,
    pub message: String,
}

impl std::fmt::Display for Incomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Incomplete {}

/// A subcommand's failure, with its causes (printed as one line by
/// `central_probes::admin::error::chain`).
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

/// The output format and the file to write of a command that writes one
/// (`export`, `package sign`). `-o` named that file before it meant the
/// output format everywhere: a value of `-o` that is not a format is still
/// taken as the file, with a warning, until the next release.
pub(crate) fn format_and_file(
    command: &str,
    output: Option<&str>,
    out: Option<PathBuf>,
) -> Result<(OutputFormat, PathBuf), CliError> {
    let format = output.and_then(|value| OutputFormat::from_str(value, false).ok());
    let old_file = match (output, format) {
        (Some(value), None) => Some(PathBuf::from(value)),
        _ => None,
    };
    let file = match (out, old_file) {
        (Some(_), Some(old)) => {
            return Err(format!(
                "-o {} is not an output format (text, json), and --out names the file already",
                old.display()
            )
            .into());
        }
        (Some(file), None) => file,
        (None, Some(old)) => {
            eprintln!(
                "warning: `{command} -o FILE` is deprecated and goes in the next release: -o names the output \
                 format (text or json); name the file with --out {}",
                old.display()
            );
            old
        }
        (None, None) => return Err(format!("{command} needs --out FILE, the zip to write").into()),
    };
    Ok((format.unwrap_or(OutputFormat::Text), file))
}

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
        Command::Verify(args) => check_result(verify::verify(args).await),
        Command::Misses(args) => misses::misses(args).await,
        Command::Coverage(args) => check_result(coverage::coverage(args).await),
        Command::Token { command } => token::token(command).await,
        Command::Package { command } => package::run(command).await,
        Command::Pki { command } => pki::pki(command),
    }
}

/// The exit status of a check (`verify`, `coverage`, `package verify`)
/// that could not be made: 2, as grep's and diff's, so that 1 always means
/// the check found something (a damaged probe, a node that would
/// crash-loop, a signature that fails).
const CHECK_FAILED: u8 = 2;

pub(crate) fn check_result(result: Result<(), CliError>) -> Result<(), CliError> {
    result.map_err(|error| {
        if error.is::<Incomplete>() {
            return error;
        }
        let message = central_probes::admin::error::chain(error.as_ref());
        Box::new(Incomplete { status: CHECK_FAILED, message }) as CliError
    })
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
    fn o_is_the_output_format_and_an_old_o_file_still_names_the_file() {
        let file = |path: &str| Some(PathBuf::from(path));
        let ok = |output: Option<&str>, out| format_and_file("export", output, out).unwrap();
        assert_eq!(ok(Some("json"), file("a.zip")), (OutputFormat::Json, PathBuf::from("a.zip")));
        assert_eq!(ok(None, file("a.zip")), (OutputFormat::Text, PathBuf::from("a.zip")));
        assert_eq!(ok(Some("old.zip"), None), (OutputFormat::Text, PathBuf::from("old.zip")));
        // `export -o json` once wrote a zip named `json`; now it asks for --out.
        let error = format_and_file("export", Some("json"), None).unwrap_err().to_string();
        assert!(error.contains("--out FILE"), "{error}");
        let error = format_and_file("export", Some("old.zip"), file("new.zip")).unwrap_err().to_string();
        assert!(error.contains("old.zip") && error.contains("--out"), "{error}");
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        command().debug_assert();
    }
}
