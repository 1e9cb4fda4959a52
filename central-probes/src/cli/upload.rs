//! `central-probes upload` (also spelled `collector support-packages
//! upload`): streams a support package into Central and reports per file.

use std::path::PathBuf;
use std::time::Duration;

use central_probes::admin::client as admin_client;
use central_probes::admin::error::AdminError;
use central_probes::admin::progress::Progress;
use central_probes::admin::upload::{self as admin_upload, UploadReport, UploadRequest};
use clap::Args;
use probe_api::transport;
use probe_api::v1::FileOutcome;

use super::{CliError, OutputFormat};

#[derive(Args)]
pub struct Endpoint {
    /// Central's address, HOST:PORT.
    #[arg(short = 'e', long = "endpoint", env = "ROX_CENTRAL_ADDRESS")]
    endpoint: String,
    /// The CA certificate (PEM) that signed Central's server certificate.
    #[arg(long, env = "ROX_CA_CERT_FILE")]
    ca: PathBuf,
    /// Give up on the whole command after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Args)]
#[command(after_help = super::ENDPOINT_ENV)]
pub struct UploadArgs {
    /// The support package, a zip file.
    package: PathBuf,
    #[command(flatten)]
    endpoint: Endpoint,
    /// Replace files Central has with different content.
    #[arg(long)]
    overwrite: bool,
    /// The package's published SHA-256: 64 hex characters, or a file in
    /// sha256sum format (such as the .sha256 published beside the package).
    /// The whole package is checked first; a mismatch sends nothing.
    #[arg(long, value_name = "SHA256HEX|FILE")]
    checksum: Option<String>,
    /// Read every file Central already has from the package and compare
    /// SHA-256s. Without it, such a file is compared by the size and CRC-32
    /// the package's directory records, and not read: that catches any
    /// changed file, not one forged to keep its CRC-32. Central also reads
    /// its stored copies of the package's module versions first (as
    /// `verify -e` does), and a copy found damaged is sent again, repaired.
    #[arg(long)]
    verify: bool,
    /// `text`, or `json`: per-file outcomes and totals as one object.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: OutputFormat,
    /// Exit with status 0, not 3, when entries under kernel-modules/ that
    /// are not probes (invalid paths) were skipped; the valid ones are
    /// uploaded either way.
    #[arg(long)]
    allow_skipped: bool,
}

/// What the docs of both spellings of `upload` say of its exit status.
pub const EXIT_STATUS: &str = "Exit status: 0 when the upload is complete (files that differ from Central's \
    and were kept, without --overwrite, are named in a warning); 1 on an error (files stored before it are whole); \
    3 when the valid probes were uploaded but entries under kernel-modules/ that are not probes were skipped \
    (the summary names them; --allow-skipped makes this 0).";

impl Endpoint {
    /// An endpoint named by other flags than these (`verify -e`).
    pub(crate) fn new(endpoint: String, ca: PathBuf, timeout: Duration) -> Self {
        Endpoint { endpoint, ca, timeout }
    }

    /// A client of Central's admin API with the token of `ROX_API_TOKEN`.
    pub(crate) fn connect(&self) -> Result<admin_client::AdminClient, CliError> {
        let ca = probe_api::client_tls::read_ca_file(&self.ca)?;
        Ok(admin_client::connect(&self.endpoint, ca, &api_token()?, Duration::from_secs(10))?)
    }

    /// `work` given at most `--timeout`; `what` names it in the error
    /// ("the export"), and a call that never reached Central names its
    /// address and the reason.
    pub(crate) async fn within<T, E: Into<CliError>>(
        &self,
        what: &str,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, CliError> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result.map_err(|error| self.unreached(error.into())),
            Err(_) => {
                Err(format!("{what} did not finish within --timeout {}", humantime::format_duration(self.timeout))
                    .into())
            }
        }
    }

    /// One call to Central given at most `--timeout`, its failure shown
    /// with the hints of `transport::describe_at`; `what` names it
    /// ("listing misses").
    pub(crate) async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CliError> {
        let described = async {
            call.await
                .map(tonic::Response::into_inner)
                .map_err(|status| format!("{what}: {}", transport::describe_at(&self.endpoint, &status)))
        };
        self.within(what, described).await
    }

    /// `error`, or, for a call of the admin API that never reached Central,
    /// a line naming Central's address and the system's or TLS's reason:
    /// the call's status alone knows neither the address nor, in its
    /// message, the reason.
    fn unreached(&self, error: CliError) -> CliError {
        match error.downcast_ref::<AdminError>() {
            Some(AdminError::Rpc { what, status }) if transport::unreached(&self.endpoint, &status.0).is_some() => {
                format!("{what}: {}", transport::describe_at(&self.endpoint, &status.0)).into()
            }
            _ => error,
        }
    }
}

fn api_token() -> Result<String, String> {
    std::env::var("ROX_API_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| "set ROX_API_TOKEN to an API token (central-probes token create)".to_owned())
}

pub async fn upload(args: UploadArgs) -> Result<(), CliError> {
    let endpoint = &args.endpoint;
    let mut client = endpoint.connect()?;
    let checksum = match &args.checksum {
        Some(checksum) => Some(central_probes::admin::checksum::expected_checksum(checksum, &args.package)?),
        None => None,
    };
    let request =
        UploadRequest { package: args.package.clone(), overwrite: args.overwrite, checksum, verify: args.verify };
    let upload = admin_upload::upload(&mut client, &request, |plan| {
        eprintln!(
            "{}: {} probe files; {} new ({:.1} MiB) to upload; {} already in Central compared by size and CRC-32, \
             {} to read and compare by SHA-256",
            request.package.display(),
            plan.probes_in_package,
            plan.new_files,
            plan.new_bytes as f64 / (1 << 20) as f64,
            plan.decided_from_directory,
            plan.to_compare,
        );
        if !plan.too_large_for_collectors.is_empty() {
            eprintln!(
                "warning: {} probe files are larger than a Collector receives ({} MiB gzip'd), so no node can \
                 load them: {}",
                plan.too_large_for_collectors.len(),
                probe_api::limits::COLLECTOR_MAX_PROBE_FILE >> 20,
                plan.too_large_for_collectors.join(", ")
            );
        }
        if plan.damaged_in_central > 0 {
            eprintln!(
                "Central found {} of its stored copies damaged (--verify): those files are sent again to repair \
                 them",
                plan.damaged_in_central
            );
        }
        Progress::for_stderr()
    });
    let report = endpoint.within("the upload", upload).await?;
    match args.output {
        OutputFormat::Text => print_report(&report),
        OutputFormat::Json => println!("{}", json_report(&request.package, &report)),
    }
    eprintln!("Read {} bytes of the package.", report.package_bytes_read);
    match report.unrecognised.len() {
        0 => Ok(()),
        _ if args.allow_skipped => Ok(()),
        skipped => Err(super::Incomplete {
            status: 3,
            message: format!(
                "{skipped} entries of {} were skipped, not uploaded (exit status 3; --allow-skipped accepts them)",
                request.package.display()
            ),
        }
        .into()),
    }
}

/// The upload as one JSON object: what Central did with each file sent,
/// and the totals (files found identical or different from the package's
/// directory were not sent).
fn json_report(package: &std::path::Path, report: &UploadReport) -> serde_json::Value {
    let response = report.response.clone().unwrap_or_default();
    let files: Vec<serde_json::Value> = response
        .results
        .iter()
        .map(|file| {
            let outcome = match file.outcome() {
                FileOutcome::Stored => "stored",
                FileOutcome::Identical => "identical",
                FileOutcome::Conflict => "conflict",
                FileOutcome::Overwritten => "overwritten",
                FileOutcome::Unspecified => "unspecified",
            };
            serde_json::json!({
                "path": file.path,
                "outcome": outcome,
                "sha256": file.sha256,
                "existing_sha256": file.existing_sha256,
            })
        })
        .collect();
    serde_json::json!({
        "package": package.display().to_string(),
        "probes_in_package": report.probes_in_package,
        "files_sent": report.files_sent,
        "bytes_sent": report.bytes_sent,
        "package_bytes_read": report.package_bytes_read,
        "stored": response.stored_count,
        "overwritten": response.overwritten_count,
        "identical": report.identical + response.identical_count as usize,
        "conflicts": response.conflict_count as usize + report.conflicts.len(),
        "kept_as_they_were": report.conflicts,
        "skipped": report.unrecognised.len(),
        "unrecognised": report.unrecognised,
        "files": files,
        "elapsed_ms": report.elapsed.as_millis() as u64,
    })
}

fn print_report(report: &UploadReport) {
    match &report.response {
        None if report.conflicts.is_empty() => {
            println!("Nothing to do: all {} probe files are already in Central.", report.probes_in_package)
        }
        None => println!(
            "Nothing uploaded: {} probe files are already in Central, {} differ from Central's.",
            report.identical,
            report.conflicts.len()
        ),

        Some(response) => {
            let seconds = report.elapsed.as_secs_f64().max(1e-3);
            println!(
                "Uploaded {} files ({:.1} MiB) in {:.1} s ({:.0} MB/s): {} stored, {} overwritten, {} identical, {} kept as they were.",
                report.files_sent,
                report.bytes_sent as f64 / (1 << 20) as f64,
                seconds,
                report.bytes_sent as f64 / seconds / 1e6,
                response.stored_count,
                response.overwritten_count,
                report.identical,
                response.conflict_count,
            );
        }
    }
    if !report.conflicts.is_empty() {
        eprintln!(
            "warning: {} files differ from the ones in Central and were not overwritten: {}. \
             Re-run with --overwrite to replace them.",
            report.conflicts.len(),
            first_few(&report.conflicts)
        );
    }
    // Last, where it is seen: the valid probes were stored, but not all of
    // the package.
    if !report.unrecognised.is_empty() {
        println!(
            "Skipped {} entries under kernel-modules/ that are not probes at valid paths (is the package corrupt?): {}",
            report.unrecognised.len(),
            first_few_of(&report.unrecognised, 3)
        );
    }
}

fn first_few(items: &[String]) -> String {
    first_few_of(items, 10)
}

fn first_few_of(items: &[String], count: usize) -> String {
    let shown: Vec<&str> = items.iter().take(count).map(String::as_str).collect();
    match items.len() - shown.len() {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}
