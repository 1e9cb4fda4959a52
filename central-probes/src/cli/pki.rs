//! `central-probes pki init`: development certificates.

use std::path::PathBuf;

use super::CliError;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Write a development CA, a server certificate for central.stackrox,
    /// central.stackrox.svc, sensor.stackrox.svc (the names the product's
    /// roxctl and Collectors check), localhost and 127.0.0.1, and a
    /// Collector client certificate.
    ///
    /// Files already in --out are kept, and the command fails: a new CA
    /// invalidates every certificate the old one issued.
    Init {
        /// The directory to write them to (made if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace the files of an earlier run (a new CA: certificates it
        /// issued are no longer trusted).
        #[arg(long)]
        force: bool,
        /// Another DNS name or IP address for the server certificate
        /// (repeatable): the name a site reaches Central by.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
}

pub fn pki(command: PkiCommand) -> Result<(), CliError> {
    let PkiCommand::Init { out, force, sans } = command;
    central_probes::pki::init(&out, &sans, force)
        .map_err(|e| format!("writing certificates to {}: {e}", out.display()))?;
    println!("wrote {} to {}", central_probes::pki::FILES.join(", "), out.display());
    Ok(())
}
