//! `central-probes rm`: delete stored probes by path or module version.

use clap::Args;
use probe_api::v1::DeleteProbesRequest;

use super::CliError;
use super::upload::Endpoint;

#[derive(Args)]
#[command(after_help = super::ENDPOINT_ENV)]
pub struct RmArgs {
    /// Probe paths to delete (<module version>/<file name>).
    paths: Vec<String>,
    /// Delete every probe of this module version (repeatable).
    #[arg(long)]
    module_version: Vec<String>,
    /// Show what would be deleted; delete nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    endpoint: Endpoint,
}

pub async fn rm(args: RmArgs) -> Result<(), CliError> {
    if args.paths.is_empty() && args.module_version.is_empty() {
        return Err("name probe paths or --module-version to delete".into());
    }
    let mut client = args.endpoint.connect()?;
    let request = DeleteProbesRequest {
        paths: args.paths.clone(),
        module_versions: args.module_version.clone(),
        dry_run: args.dry_run,
    };
    let response = args.endpoint.call("deleting probes", client.delete_probes(request)).await?;
    for probe in &response.deleted {
        println!("{}  {:>10}  {}", probe.sha256, probe.size, probe.path);
    }
    let verb = if args.dry_run { "Would delete" } else { "Deleted" };
    println!("{verb} {} probes ({} bytes).", response.deleted.len(), response.deleted_bytes);
    Ok(())
}
