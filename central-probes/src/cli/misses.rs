//! `central-probes misses`: the probes Collectors asked for that Central
//! could not provide, and the support packages that would.

use clap::Args;
use probe_api::v1::{ListMissesRequest, ProbeMiss};

use super::upload::Endpoint;
use super::{CliError, OutputFormat, rfc3339 as time};

#[derive(Args)]
#[command(after_help = super::ENDPOINT_ENV)]
pub struct MissesArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Also the misses an upload or the upstream has resolved since.
    #[arg(long)]
    all: bool,
    /// `text` (a table), or `json` (one object: docs/operations.md,
    /// "Machine-readable output").
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: OutputFormat,
}

fn status(miss: &ProbeMiss) -> &str {
    if miss.resolved_by.is_empty() { "open" } else { "resolved" }
}

pub async fn misses(args: MissesArgs) -> Result<(), CliError> {
    let mut client = args.endpoint.connect()?;
    let listing = client.list_misses(ListMissesRequest { include_resolved: args.all });
    let response = args.endpoint.call("listing misses", listing).await?;
    if args.output == OutputFormat::Json {
        let misses: Vec<serde_json::Value> = response
            .misses
            .iter()
            .map(|miss| {
                serde_json::json!({
                    "path": miss.path,
                    "module_version": miss.module_version,
                    "file_name": miss.file_name,
                    "requests": miss.requests,
                    "distinct_clients": miss.distinct_clients,
                    "first_seen": time(miss.first_seen_unix),
                    "last_seen": time(miss.last_seen_unix),
                    "status": status(miss),
                    "resolved_at": (miss.resolved_unix > 0).then(|| time(miss.resolved_unix)),
                    "resolved_by": (!miss.resolved_by.is_empty()).then_some(&miss.resolved_by),
                })
            })
            .collect();
        let report = serde_json::json!({
            "misses": misses,
            "open_count": response.open_count,
            "module_versions_to_upload": response.module_versions_to_upload,
        });
        println!("{report}");
        return Ok(());
    }
    let width = response.misses.iter().map(|miss| miss.path.len()).max().unwrap_or(0).max(4);
    println!("{:width$}  {:>8}  {:>7}  {:20}  {:20}  STATUS", "PATH", "REQUESTS", "CLIENTS", "FIRST SEEN", "LAST SEEN");
    for miss in &response.misses {
        let status = match miss.resolved_by.as_str() {
            "" => "open".to_owned(),
            by => format!("resolved by {by} at {}", time(miss.resolved_unix)),
        };
        println!(
            "{:width$}  {:>8}  {:>7}  {:20}  {:20}  {status}",
            miss.path,
            miss.requests,
            miss.distinct_clients,
            time(miss.first_seen_unix),
            time(miss.last_seen_unix)
        );
    }
    match response.module_versions_to_upload.as_slice() {
        [] => println!("No open misses."),
        versions => println!(
            "{} open misses. Upload the support packages of module version {} (support-pkg-<module version>-*.zip).",
            response.open_count,
            versions.join(", ")
        ),
    }
    Ok(())
}
