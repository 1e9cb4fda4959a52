//! `central-probes ls`: what Central holds, one line per probe.

use clap::Args;
use probe_api::v1::ListModuleVersionsRequest;

use super::upload::Endpoint;
use super::{CliError, OutputFormat, rfc3339};

#[derive(Args)]
#[command(after_help = super::ENDPOINT_ENV)]
pub struct LsArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Only probes of this module version.
    #[arg(long)]
    module_version: Option<String>,
    /// `text` (a line per probe), or `json` (one object: docs/operations.md,
    /// "Machine-readable output").
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: OutputFormat,
    /// A line per module version instead: its number of probes, their
    /// bytes, and when the last of them was uploaded; then, for a pack
    /// store, the live and dead bytes of its packs.
    #[arg(long)]
    summary: bool,
}

async fn summary(args: &LsArgs) -> Result<(), CliError> {
    let mut client = args.endpoint.connect()?;
    let listing = client.list_module_versions(ListModuleVersionsRequest {});
    let response = args.endpoint.call("listing module versions", listing).await?;
    let (mut summaries, space) = (response.module_versions, response.space);
    if let Some(version) = &args.module_version {
        summaries.retain(|summary| &summary.module_version == version);
    }
    let (probes, bytes) = summaries.iter().fold((0, 0), |(p, b), s| (p + s.probes, b + s.bytes));
    if args.output == OutputFormat::Json {
        let listed: Vec<serde_json::Value> = summaries
            .iter()
            .map(|s| {
                serde_json::json!({
                    "module_version": s.module_version,
                    "probes": s.probes,
                    "bytes": s.bytes,
                    "last_upload": (s.last_stored_unix > 0).then(|| rfc3339(s.last_stored_unix)),
                })
            })
            .collect();
        let space = space.map(|s| serde_json::json!({"live_bytes": s.live_bytes, "dead_bytes": s.dead_bytes}));
        println!(
            "{}",
            serde_json::json!({"module_versions": listed, "probes": probes, "bytes": bytes, "space": space})
        );
        return Ok(());
    }
    let width = summaries.iter().map(|s| s.module_version.len()).max().unwrap_or(0).max(14);
    println!("{:width$}  {:>8}  {:>14}  LAST UPLOAD", "MODULE VERSION", "PROBES", "BYTES");
    for s in &summaries {
        println!("{:width$}  {:>8}  {:>14}  {}", s.module_version, s.probes, s.bytes, rfc3339(s.last_stored_unix));
    }
    eprintln!("{} module versions, {probes} probes, {bytes} bytes", summaries.len());
    if let Some(space) = space {
        let packs = space.live_bytes + space.dead_bytes;
        let dead_percent = if packs == 0 { 0.0 } else { space.dead_bytes as f64 * 100.0 / packs as f64 };
        eprintln!(
            "packs on disk: {} bytes live, {} bytes dead ({dead_percent:.1}%; compaction returns them)",
            space.live_bytes, space.dead_bytes
        );
    }
    Ok(())
}

pub async fn ls(args: LsArgs) -> Result<(), CliError> {
    if args.summary {
        return summary(&args).await;
    }
    let endpoint = &args.endpoint;
    let mut client = endpoint.connect()?;
    let listing = central_probes::admin::client::list_all(&mut client, args.module_version.as_deref());
    let probes = endpoint.within("listing", listing).await?;
    use std::io::Write;
    if args.output == OutputFormat::Json {
        let listed: Vec<serde_json::Value> = probes
            .iter()
            .map(|p| {
                let signature = (!p.signature_key_id.is_empty())
                    .then(|| serde_json::json!({"key_id": p.signature_key_id, "serial": p.signature_serial}));
                serde_json::json!({
                    "path": p.path,
                    "size": p.size,
                    "sha256": p.sha256,
                    "crc32": p.crc32,
                    "signature": signature,
                    "prefetched": p.prefetched,
                })
            })
            .collect();
        let bytes: u64 = probes.iter().map(|p| p.size).sum();
        println!("{}", serde_json::json!({"probes": listed, "count": probes.len(), "bytes": bytes}));
        return Ok(());
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = probes
        .iter()
        .try_for_each(|probe| {
            write!(out, "{}  {:>10}  {}", probe.sha256, probe.size, probe.path)?;
            if !probe.signature_key_id.is_empty() {
                write!(out, "  signed-by {} serial {}", probe.signature_key_id, probe.signature_serial)?;
            }
            if probe.prefetched {
                write!(out, "  prefetched")?;
            }
            writeln!(out)
        })
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
