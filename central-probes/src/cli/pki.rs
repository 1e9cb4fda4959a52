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
    Init {
        #[arg(long)]
        out: PathBuf,
        /// Another DNS name or IP address for the server certificate
        /// (repeatable): the name a site reaches Central by.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
}

pub fn pki(command: PkiCommand) -> Result<(), CliError> {
    let PkiCommand::Init { out, sans } = command;
    central_probes::pki::init(&out, &sans).map_err(|e| format!("writing certificates to {}: {e}", out.display()))?;
    println!(
        "wrote ca.pem, ca-key.pem, server.pem, server-key.pem, collector.pem, collector-key.pem to {}",
        out.display()
    );
    Ok(())
}
