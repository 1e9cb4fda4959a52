//! `make-package`: writes a synthetic kernel support package (real layout
//! and names, pseudo-random probe bytes) for the demo and the benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;

use central_probes::admin::signatures;
use central_probes::synthetic::PackageSpec;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Write a synthetic kernel support package")]
struct Args {
    /// Where to write the zip.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "2.5.0")]
    module_version: String,
    /// A file of kernel releases, one per line.
    #[arg(long)]
    kernels: PathBuf,
    /// Skip the first N kernels of the file.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Use only N kernels.
    #[arg(long)]
    limit: Option<usize>,
    /// Also add a kernel module (.ko.gz) per kernel.
    #[arg(long)]
    kernel_modules: bool,
    /// Another variant has other bytes under the same names.
    #[arg(long, default_value_t = 0)]
    variant: u64,
    /// Divide the realistic probe sizes by this.
    #[arg(long, default_value_t = 1)]
    size_divisor: usize,
    /// Deflate the entries instead of storing them.
    #[arg(long)]
    deflate: bool,
    /// Sign every probe with this unencrypted minisign secret key (as
    /// `central-probes package sign` does).
    #[arg(long, value_name = "KEY")]
    sign: Option<PathBuf>,
    /// The serial of those signatures.
    #[arg(long, default_value_t = 1, requires = "sign")]
    serial: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let text = match std::fs::read_to_string(&args.kernels) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: reading {}: {e}", args.kernels.display());
            return ExitCode::FAILURE;
        }
    };
    let kernels: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .skip(args.skip)
        .take(args.limit.unwrap_or(usize::MAX))
        .collect();
    let spec = PackageSpec {
        kernel_modules: args.kernel_modules,
        variant: args.variant,
        size_divisor: args.size_divisor,
        deflate: args.deflate,
        ..PackageSpec::new(&args.module_version, &kernels)
    };
    let written = spec.write(&args.out).map_err(|e| e.to_string()).and_then(|bytes| {
        let Some(key) = &args.sign else { return Ok(bytes) };
        let key = signatures::load_secret_key(key, None)?;
        signatures::sign_package(&args.out, &args.out, &key, args.serial).map_err(|e| e.to_string())?;
        Ok(bytes)
    });
    match written {
        Ok(bytes) => {
            println!(
                "wrote {} with {} probes ({:.1} MiB of probe bytes)",
                args.out.display(),
                spec.probe_paths().len(),
                bytes as f64 / (1 << 20) as f64
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: writing {}: {e}", args.out.display());
            ExitCode::FAILURE
        }
    }
}
