//! `central-probes export`: a support package of stored probes, for
//! another Central (an air-gapped one).

use std::path::PathBuf;

use clap::Args;

use super::upload::Endpoint;
use super::{CliError, OutputFormat, format_and_file};

#[derive(Args)]
#[command(after_help = super::ENDPOINT_ENV)]
pub struct ExportArgs {
    /// Only the probes of this module version (repeatable); every stored
    /// probe without it.
    #[arg(long)]
    module_version: Vec<String>,
    /// The support package to write (a zip file); replaced only once the
    /// export is complete.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// `text`, or `json`: what was exported as one object. Deprecated: any
    /// other value is taken as the file to write, as --out, with a warning
    /// (until the next release).
    #[arg(short = 'o', long = "output", value_name = "FORMAT")]
    output: Option<String>,
    #[command(flatten)]
    endpoint: Endpoint,
}

pub async fn export(args: ExportArgs) -> Result<(), CliError> {
    let (format, out) = format_and_file("export", args.output.as_deref(), args.out)?;
    let mut client = args.endpoint.connect()?;
    let started = std::time::Instant::now();
    let export = central_probes::admin::export::export(&mut client, args.module_version.clone(), &out);
    let report = args.endpoint.within("the export", export).await?;
    let elapsed = started.elapsed();
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({
                "out": out.display().to_string(),
                "probes": report.probes,
                "bytes": report.bytes,
                "module_versions": report.module_versions,
                "elapsed_ms": elapsed.as_millis() as u64,
            })
        ),
        OutputFormat::Text => {
            let seconds = elapsed.as_secs_f64().max(1e-3);
            println!(
                "Exported {} probes ({} bytes) of module versions {} to {} in {seconds:.1} s ({:.0} MB/s).",
                report.probes,
                report.bytes,
                report.module_versions.join(", "),
                out.display(),
                report.bytes as f64 / seconds / 1e6
            );
        }
    }
    Ok(())
}
