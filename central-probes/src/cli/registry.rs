//! `central-probes package push` and `package pull`: support packages to
//! and from an OCI registry (docs/registry.md).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use central_probes::admin::progress::Progress;
use central_probes::admin::registry_pull;
use central_probes::admin::registry_push;
use central_probes::admin::registry_target::Target;
use central_probes::oci::{Reference, RegistryOptions};
use central_probes::server::UpstreamKind;
use clap::Args;
use probe_api::https::ProxySettings;

use super::{CliError, OutputFormat};

/// The variables push and pull read without a flag of their own.
const REGISTRY_ENV: &str = "  https_proxy    the HTTP CONNECT proxy to the registry, else HTTPS_PROXY
  no_proxy       registry hosts reached without the proxy, else NO_PROXY
  SSL_CERT_FILE  the CA bundle without --registry-ca";

/// `serve`'s flags of a registry upstream (flattened into `ServeArgs`).
#[derive(Args)]
pub struct OciUpstreamArgs {
    /// Instead of --upstream: a registry repository of pushed support packages (docs/registry.md).
    #[arg(long, env = "CENTRAL_UPSTREAM_OCI", value_name = "HOST[:PORT]/PATH")]
    upstream_oci: Option<String>,
    /// Credentials for --upstream-oci: containers-auth.json or Docker's config.json.
    #[arg(long, env = "REGISTRY_AUTH_FILE", value_name = "FILE")]
    registry_auth_file: Option<PathBuf>,
    /// With --upstream-oci: how long an index is used before its tag is checked again.
    #[arg(long, env = "CENTRAL_UPSTREAM_INDEX_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    upstream_index_ttl: Duration,
}

impl OciUpstreamArgs {
    /// The registry upstream, if --upstream-oci names one.
    pub fn kind(&self) -> Option<UpstreamKind> {
        Some(UpstreamKind::Registry {
            repository: self.upstream_oci.clone()?,
            auth_file: self.registry_auth_file.clone(),
            index_ttl: self.upstream_index_ttl,
        })
    }
}

/// How to reach the registry (shared by push and pull).
#[derive(Args)]
pub struct RegistryArgs {
    /// Registry credentials: containers-auth.json or Docker's config.json,
    /// {"auths": {"HOST[:PORT]": {"auth": base64("user:password")}}}.
    #[arg(long, env = "REGISTRY_AUTH_FILE", value_name = "FILE")]
    registry_auth_file: Option<PathBuf>,
    /// The CA certificates (PEM) trusted for the registry; the system's
    /// bundle when absent (SSL_CERT_FILE, else the usual paths).
    #[arg(long, value_name = "FILE")]
    registry_ca: Option<PathBuf>,
    /// How long to wait for a connection, and for each answer's head.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    registry_timeout: Duration,
}

impl RegistryArgs {
    fn options(&self) -> Result<RegistryOptions, CliError> {
        let ca_pem = match &self.registry_ca {
            Some(file) => probe_api::client_tls::read_ca_file(file)?,
            None => probe_api::https::system_ca_bundle().map_err(|e| format!("without --registry-ca: {e}"))?,
        };
        Ok(RegistryOptions {
            ca_pem,
            proxies: ProxySettings::from_env()?,
            auth_file: self.registry_auth_file.clone(),
            connect_timeout: self.registry_timeout,
            answer_timeout: self.registry_timeout,
        })
    }
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("destination").required(true).args(["repository", "oci_layout"]))]
#[command(after_help = REGISTRY_ENV)]
pub struct PushArgs {
    /// The support package (zip) to push.
    package: PathBuf,
    /// Where to push: HOST[:PORT]/PATH (a repository of an OCI registry).
    #[arg(long, value_name = "HOST[:PORT]/PATH")]
    repository: Option<String>,
    /// The tag to name the package by; the package's module version when absent.
    #[arg(long)]
    tag: Option<String>,
    /// Instead of a registry: write an OCI image layout into DIR (what
    /// `skopeo copy oci:DIR:TAG` reads).
    #[arg(long, value_name = "DIR", conflicts_with = "repository")]
    oci_layout: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: OutputFormat,
}

#[derive(Args)]
#[command(after_help = REGISTRY_ENV)]
pub struct PullArgs {
    /// What to pull: HOST[:PORT]/PATH:TAG (the tag is the module version the package was pushed under).
    #[arg(long, value_name = "HOST[:PORT]/PATH:TAG")]
    repository: String,
    /// The support package (zip) to write (replaced only once it is complete).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: OutputFormat,
}

pub async fn push(args: PushArgs) -> Result<(), CliError> {
    let target = match (&args.repository, &args.oci_layout) {
        (Some(repository), _) => {
            let reference = Reference::parse(repository, false)?;
            Target::Registry(Box::new(args.registry.options()?.open(&reference, true)?))
        }
        (None, Some(dir)) => Target::Layout(dir.clone()),
        (None, None) => return Err("push needs --repository HOST[:PORT]/PATH or --oci-layout DIR".into()),
    };
    target.prepare()?;
    let name = target.name();
    let progress = Progress::for_stderr();
    let report = registry_push::push(&args.package, Arc::new(target), args.tag.clone(), &progress).await?;
    let tag = args.tag.unwrap_or_else(|| report.module_version.clone());
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({
                "destination": name, "tag": tag, "index_digest": report.index_digest, "probes": report.probes,
                "signatures": report.signatures, "shards": report.shards, "blobs_sent": report.blobs_sent,
                "bytes_sent": report.bytes_sent,
            })
        ),
        OutputFormat::Text => println!(
            "Pushed {} probes ({} signed) to {name}:{tag} in {} shards: {} blobs sent ({} bytes), the rest already there. Index {}.",
            report.probes, report.signatures, report.shards, report.blobs_sent, report.bytes_sent, report.index_digest
        ),
    }
    Ok(())
}

pub async fn pull(args: PullArgs) -> Result<(), CliError> {
    let reference = Reference::parse(&args.repository, true)?;
    let Some(tag) = reference.tag.clone() else {
        return Err(
            format!("{}: name the tag to pull, HOST[:PORT]/PATH:TAG (the module version)", args.repository).into()
        );
    };
    let registry = Arc::new(args.registry.options()?.open(&reference, false)?);
    let progress = Progress::for_stderr();
    let report = registry_pull::pull(registry, &tag, &args.out, &progress).await?;
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({
                "out": args.out.display().to_string(), "module_version": report.module_version,
                "index_digest": report.index_digest, "probes": report.probes, "signatures": report.signatures,
                "bytes": report.bytes,
            })
        ),
        OutputFormat::Text => println!(
            "Pulled {} probes ({} signed, {} bytes) of module version {} into {}.",
            report.probes,
            report.signatures,
            report.bytes,
            report.module_version,
            args.out.display()
        ),
    }
    Ok(())
}
