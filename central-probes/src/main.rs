//! `central-probes`: Central's probe server and its admin CLI. This file
//! parses the command line and dispatches; each subcommand lives in `cli/`.

mod cli;

use std::process::ExitCode;

use clap::FromArgMatches;

fn main() -> ExitCode {
    let cli = cli::Cli::from_arg_matches(&cli::command().get_matches()).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    // Blocking threads read probe chunks, write uploads and commit them;
    // the bound keeps a flood of requests from growing threads without end
    // (probe streams are bounded by their slots anyway).
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(32).build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("starting the runtime: {e}")),
    };
    match runtime.block_on(cli::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => match error.downcast_ref::<cli::Incomplete>() {
            Some(incomplete) => {
                eprintln!("error: {incomplete}");
                ExitCode::from(incomplete.status)
            }
            None => fail(&central_probes::admin::error::chain(error.as_ref())),
        },
    }
}

/// One line on stderr: the error and every cause.
fn fail(line: &str) -> ExitCode {
    eprintln!("error: {line}");
    ExitCode::FAILURE
}
