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
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = probes
        .iter()
        .try_for_each(|probe| writeln!(out, "{}  {:>10}  {}", probe.sha256, probe.size, probe.path))
        .and_then(|()| out.flush());
    match written {
        // A reader that has seen enough (`| head`) is no failure.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        Err(error) => return Err(format!("writing the listing: {error}").into()),
        Ok(()) => {}
    }
    eprintln!("{} probes", probes.len());
    Ok(())
}
