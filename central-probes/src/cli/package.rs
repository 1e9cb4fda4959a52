//! `central-probes package sign` and `package verify`: signatures of a
//! support package's probes, made and checked on the clean side of an air
//! gap (docs/security.md, "Signed probes"); `package push` and `pull`
//! (`registry`): the package through an OCI registry.

use std::path::PathBuf;

use central_probes::admin::signatures::{self, Checked};
use clap::{Args, Subcommand};
use probe_api::signing::TrustedKeys;

use super::{CliError, Incomplete, OutputFormat, format_and_file};

#[derive(Subcommand)]
pub enum PackageCommand {
    /// Write a copy of a support package with a minisign signature beside every probe.
    Sign(SignArgs),
    /// Check the signature of every probe of a support package; names each failure (exit 1 if any, 2 if the check failed).
    Verify(VerifyArgs),
    /// Make a minisign key pair without a password, as `minisign -G -W` does
    /// (for tests and demos; a site signs with keys it keeps offline).
    Keygen(KeygenArgs),
    /// Push a support package to an OCI registry (or an OCI layout directory), sending only the blobs it lacks.
    Push(super::registry::PushArgs),
    /// Pull a support package from an OCI registry into a zip that upload and roxctl take.
    Pull(super::registry::PullArgs),
}

#[derive(Args)]
pub struct KeygenArgs {
    /// Where to write the public key (what Central and Collectors trust).
    #[arg(long, value_name = "FILE")]
    public_key: PathBuf,
    /// Where to write the secret key (readable by its owner only).
    #[arg(long, value_name = "FILE")]
    secret_key: PathBuf,
}

#[derive(Args)]
pub struct SignArgs {
    /// The support package (zip) to sign.
    package: PathBuf,
    /// A minisign secret key (`minisign -G`), unencrypted (`-W`) or with
    /// its password in --password-file.
    #[arg(long, value_name = "KEY")]
    secret_key: PathBuf,
    /// A file whose first line is the secret key's password.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// The release number in every trusted comment: raise it with each
    /// release, so that a node refuses an older one.
    #[arg(long, default_value_t = 1)]
    serial: u64,
    /// The signed package to write (replaced only once it is complete).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// `text`, or `json`: what was signed as one object. Deprecated: any
    /// other value is taken as the file to write, as --out, with a warning
    /// (until the next release).
    #[arg(short = 'o', long = "output", value_name = "FORMAT")]
    output: Option<String>,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The support package (zip) to check.
    package: PathBuf,
    /// A file of one or more minisign public keys.
    #[arg(long, value_name = "KEYS")]
    trusted_keys: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: OutputFormat,
}

pub async fn run(command: PackageCommand) -> Result<(), CliError> {
    match command {
        PackageCommand::Sign(args) => sign(args).await,
        PackageCommand::Verify(args) => super::check_result(verify(args).await),
        PackageCommand::Keygen(args) => keygen(&args),
        PackageCommand::Push(args) => super::registry::push(args).await,
        PackageCommand::Pull(args) => super::registry::pull(args).await,
    }
}

fn keygen(args: &KeygenArgs) -> Result<(), CliError> {
    let keys = minisign::KeyPair::generate_unencrypted_keypair().map_err(|e| format!("making a key: {e}"))?;
    let secret = keys.sk.to_box(None).map_err(|e| format!("encoding the secret key: {e}"))?.into_string();
    let public = keys.pk.to_box().map_err(|e| format!("encoding the public key: {e}"))?.into_string();
    central_probes::private_file::replace(&args.secret_key, secret.as_bytes())
        .map_err(|e| format!("writing {}: {e}", args.secret_key.display()))?;
    std::fs::write(&args.public_key, public).map_err(|e| format!("writing {}: {e}", args.public_key.display()))?;
    println!("Wrote {} and {}.", args.public_key.display(), args.secret_key.display());
    Ok(())
}

async fn sign(args: SignArgs) -> Result<(), CliError> {
    let (format, out) = format_and_file("package sign", args.output.as_deref(), args.out)?;
    let key = signatures::load_secret_key(&args.secret_key, args.password_file.as_deref())?;
    let (package, output, serial) = (args.package.clone(), out.clone(), args.serial);
    let report = tokio::task::spawn_blocking(move || signatures::sign_package(&package, &output, &key, serial))
        .await
        .map_err(|e| format!("signing: {e}"))??;
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({
                "out": out.display().to_string(),
                "signed": report.signed,
                "serial": serial,
                "replaced": report.replaced,
                "other_entries": report.other_entries,
            })
        ),
        OutputFormat::Text => println!(
            "Signed {} probes at serial {serial} into {} ({} earlier signatures replaced, {} other entries copied).",
            report.signed,
            out.display(),
            report.replaced,
            report.other_entries
        ),
    }
    Ok(())
}

async fn verify(args: VerifyArgs) -> Result<(), CliError> {
    let keys = TrustedKeys::load(&args.trusted_keys)?;
    let package = args.package.clone();
    let checked = tokio::task::spawn_blocking(move || signatures::verify_package(&package, &keys))
        .await
        .map_err(|e| format!("verifying: {e}"))??;
    let failed: Vec<&Checked> = checked.iter().filter(|c| c.outcome.is_err()).collect();
    match args.output {
        OutputFormat::Json => {
            let failures: Vec<serde_json::Value> = failed
                .iter()
                .map(|c| {
                    let why = c.outcome.as_ref().expect_err("a failure");
                    serde_json::json!({"path": c.path.to_string(), "reason": why.reason(), "message": why.to_string()})
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({"probes": checked.len(), "verified": checked.len() - failed.len(), "failures": failures})
            );
        }
        OutputFormat::Text => {
            for c in &failed {
                println!("FAILED {}: {}", c.path, c.outcome.as_ref().expect_err("a failure"));
            }
            println!("{} of {} probes verified.", checked.len() - failed.len(), checked.len());
        }
    }
    if !failed.is_empty() {
        let message = format!("{} probes of {} failed verification", failed.len(), args.package.display());
        return Err(Box::new(Incomplete { status: 1, message }));
    }
    Ok(())
}
