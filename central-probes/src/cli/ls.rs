//! `central-probes ls`: what Central holds, one line per probe.

use clap::Args;

use super::CliError;
use super::upload::Endpoint;

#[derive(Args)]
pub struct LsArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Only probes of this module version.
    #[arg(long)]
    module_version: Option<String>,
}

pub async fn ls(args: LsArgs) -> Result<(), CliError> {
    let endpoint = &args.endpoint;
    let mut client = endpoint.connect()?;
    let probes = tokio::time::timeout(
        endpoint.timeout,
        central_probes::admin::client::list_all(&mut client, args.module_version.as_deref()),
    )
    .await
    .map_err(|_| "listing did not finish within --timeout".to_owned())??;
    for probe in &probes {
        println!("{}  {:>10}  {}", probe.sha256, probe.size, probe.path);
    }
    eprintln!("{} probes", probes.len());
    Ok(())
}
