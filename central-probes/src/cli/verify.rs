//! `central-probes verify`: reads every stored probe and names each one
//! whose bytes no longer match what was recorded when it was uploaded.
//! Offline, from a stopped Central's `--data-dir` or from the database
//! replicas share (`--database-url`); or over the API from a running
//! Central (`-e`, VerifyProbes). Exits 1 when any probe is damaged, 2
//! when the check could not be made.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use central_probes::admin::error::AdminError;
use central_probes::server::{PostgresConfig, open_to_verify};
use central_probes::store::ProbeStore;
use central_probes::store::check::{VerifySummary, verify_all};
use central_probes::store::postgres::PostgresStore;
use clap::Args;
use probe_api::names::ModuleVersion;
use probe_api::v1::verify_probes_response::Message;
use probe_api::v1::{ListModuleVersionsRequest, ProbeInfo, VerifyProbesRequest};

use super::upload::Endpoint;
use super::{CliError, Incomplete, OutputFormat, read};

#[derive(Args)]
pub struct VerifyArgs {
    /// The data directory of a stopped Central (pack or per-file store),
    /// read directly.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["database_url", "endpoint"])]
    data_dir: Option<PathBuf>,
    /// The database of Centrals that share one (as `serve --database-url`),
    /// read directly; the replicas may keep running.
    #[arg(long, value_name = "URL", conflicts_with = "endpoint")]
    database_url: Option<String>,
    /// The database's CA, to connect over TLS (as `serve --database-ca`).
    #[arg(long, requires = "database_url")]
    database_ca: Option<PathBuf>,
    /// A running Central's address, HOST:PORT: it reads its store itself
    /// (needs ROX_API_TOKEN, role view, and --ca).
    #[arg(short = 'e', long, requires = "ca")]
    endpoint: Option<String>,
    /// With -e: the CA certificate (PEM) that signed Central's certificate.
    #[arg(long, env = "ROX_CA_CERT_FILE")]
    ca: Option<PathBuf>,
    /// With -e: give up after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Only the probes of this module version (repeatable); every stored
    /// probe without it.
    #[arg(long)]
    module_version: Vec<String>,
    /// `text` (a line per damaged probe, then a summary on stderr), or
    /// `json` (one object: README, "Machine-readable output").
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: OutputFormat,
}

/// A damaged probe as reported: what was recorded, and what is wrong.
struct Damaged {
    probe: ProbeInfo,
    reason: String,
}

pub async fn verify(args: VerifyArgs) -> Result<(), CliError> {
    let versions = args.module_version.iter().map(|v| ModuleVersion::parse(v)).collect::<Result<Vec<_>, _>>()?;
    let text = args.output == OutputFormat::Text;
    let mut damaged = Vec::new();
    let mut found = |probe: Damaged| {
        if text {
            println!("damaged  {}  {}", probe.probe.path, probe.reason);
        }
        damaged.push(probe);
    };
    let summary = match (&args.data_dir, &args.database_url, &args.endpoint) {
        (Some(dir), _, _) => offline(open_to_verify(dir).await?, &versions, &mut found).await?,
        (None, Some(url), _) => {
            let ca_pem = args.database_ca.as_deref().map(|ca| read(ca, "the database CA")).transpose()?;
            let config = PostgresConfig {
                url: url.clone(),
                max_connections: 2,
                statement_timeout: Duration::from_secs(60),
                ca_pem,
            };
            let store = PostgresStore::connect(&config).await.map_err(|e| e.context("opening the database"))?;
            offline(Arc::new(store), &versions, &mut found).await?
        }
        (None, None, Some(address)) => {
            let ca = args.ca.clone().ok_or("-e needs --ca")?;
            let endpoint = Endpoint::new(address.clone(), ca, args.timeout);
            endpoint.within("the verification", online(&endpoint, &args.module_version, &mut found)).await?
        }
        (None, None, None) => {
            return Err("say which store to verify: --data-dir DIR (a stopped Central), --database-url URL, or \
                        -e HOST:PORT --ca FILE (a running Central)"
                .into());
        }
    };
    report(&args, &damaged, summary)
}

fn report(args: &VerifyArgs, damaged: &[Damaged], summary: VerifySummary) -> Result<(), CliError> {
    if args.output == OutputFormat::Json {
        let listed: Vec<serde_json::Value> = damaged
            .iter()
            .map(|d| {
                serde_json::json!({
                    "path": d.probe.path,
                    "size": d.probe.size,
                    "sha256": d.probe.sha256,
                    "crc32": d.probe.crc32,
                    "reason": d.reason,
                })
            })
            .collect();
        let object = serde_json::json!({
            "damaged": listed, "checked": summary.checked, "bytes": summary.bytes, "damaged_count": summary.damaged,
        });
        println!("{object}");
    } else {
        eprintln!("{} probes checked ({} bytes), {} damaged", summary.checked, summary.bytes, summary.damaged);
    }
    if summary.damaged == 0 {
        return Ok(());
    }
    let mut versions: Vec<&str> = damaged.iter().filter_map(|d| d.probe.path.split_once('/')).map(|(v, _)| v).collect();
    versions.dedup();
    let message = format!(
        "{} damaged probes: Central does not serve them; upload the support packages of module version(s) {} \
         again to repair them",
        summary.damaged,
        versions.join(", ")
    );
    Err(Box::new(Incomplete { status: 1, message }))
}

async fn offline(
    store: Arc<dyn ProbeStore>,
    versions: &[ModuleVersion],
    found: &mut impl FnMut(Damaged),
) -> Result<VerifySummary, CliError> {
    // "0 damaged" would read as an all-clear for a mistyped version.
    if !versions.is_empty() {
        let asked: Vec<String> = versions.iter().map(ToString::to_string).collect();
        let held = store.summaries().await?.into_iter().map(|s| s.module_version.to_string());
        AdminError::unless_held(&asked, held)?;
    }
    let summary = verify_all(store.as_ref(), versions, |damaged| {
        found(Damaged { probe: damaged.probe.into(), reason: damaged.why });
        Ok(())
    })
    .await?;
    Ok(summary)
}

async fn online(
    endpoint: &Endpoint,
    versions: &[String],
    found: &mut impl FnMut(Damaged),
) -> Result<VerifySummary, CliError> {
    let mut client = endpoint.connect()?;
    if !versions.is_empty() {
        let listing = client.list_module_versions(ListModuleVersionsRequest {});
        let held = endpoint.call("listing module versions", listing).await?.module_versions;
        AdminError::unless_held(versions, held.into_iter().map(|s| s.module_version))?;
    }
    let request = VerifyProbesRequest { module_versions: versions.to_vec() };
    let mut stream = endpoint.call("starting the verification", client.verify_probes(request)).await?;
    let failed = |status: tonic::Status| format!("verifying: {}", probe_api::transport::describe(&status));
    while let Some(message) = stream.message().await.map_err(failed)? {
        match message.message {
            Some(Message::Damaged(damaged)) => {
                let mut probe =
                    damaged.probe.ok_or("Central's reply breaks the API: a damaged probe without its path")?;
                probe.path = probe_api::errors::remote_text(&probe.path);
                found(Damaged { probe, reason: probe_api::errors::remote_text(&damaged.reason) });
            }
            Some(Message::Summary(summary)) => {
                return Ok(VerifySummary {
                    checked: summary.checked_count,
                    bytes: summary.checked_bytes,
                    damaged: summary.damaged_count,
                });
            }
            None => {}
        }
    }
    Err("the verification ended before it was complete; run it again".into())
}
