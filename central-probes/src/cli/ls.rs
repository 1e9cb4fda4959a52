//! `central-probes ls`: what Central holds, one line per probe.

use clap::Args;

use super::upload::Endpoint;
use super::{CliError, OutputFormat};

#[derive(Args)]
pub struct LsArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Only probes of this module version.
    #[arg(long)]
    module_version: Option<String>,
    /// `text` (a line per probe), or `json` (one object: README,
    /// "Machine-readable output").
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: OutputFormat,
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
    if args.output == OutputFormat::Json {
        let listed: Vec<serde_json::Value> = probes
            .iter()
            .map(|p| serde_json::json!({"path": p.path, "size": p.size, "sha256": p.sha256, "crc32": p.crc32}))
            .collect();
        let bytes: u64 = probes.iter().map(|p| p.size).sum();
        println!("{}", serde_json::json!({"probes": listed, "count": probes.len(), "bytes": bytes}));
        return Ok(());
    }
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
