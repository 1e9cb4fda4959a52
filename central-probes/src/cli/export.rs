//! `central-probes export`: a support package of stored probes, for
//! another Central (an air-gapped one).

use std::path::PathBuf;

use clap::Args;

use super::CliError;
use super::upload::Endpoint;

#[derive(Args)]
pub struct ExportArgs {
    /// Only the probes of this module version (repeatable); every stored
    /// probe without it.
    #[arg(long)]
    module_version: Vec<String>,
    /// The support package to write (a zip file); replaced only once the
    /// export is complete.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: PathBuf,
    #[command(flatten)]
    endpoint: Endpoint,
}

pub async fn export(args: ExportArgs) -> Result<(), CliError> {
    let mut client = args.endpoint.connect()?;
    let started = std::time::Instant::now();
    let export = central_probes::admin::export::export(&mut client, args.module_version.clone(), &args.output);
    let report = args.endpoint.within("the export", export).await?;
    let seconds = started.elapsed().as_secs_f64().max(1e-3);
    println!(
        "Exported {} probes ({} bytes) of module versions {} to {} in {seconds:.1} s ({:.0} MB/s).",
        report.probes,
        report.bytes,
        report.module_versions.join(", "),
        args.output.display(),
        report.bytes as f64 / seconds / 1e6
    );
    Ok(())
}
