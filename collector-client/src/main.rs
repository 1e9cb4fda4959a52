//! `collector-client`: the Collector's probe fetch as a command. This file
//! parses the command line and dispatches to `cli`; the work lives in the
//! library. Exit status 1 when no probe can be had, as the Collector does.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, CollectionMethod, Command, OutputFormat};

fn main() -> ExitCode {
    let command = Cli::parse().command;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = match command {
        Command::GetProbe(args) => *args,
        Command::Facts(args) => return exit_with(cli::facts(args)),
    };
    if CollectionMethod::parse(&args.node.collection_method) == CollectionMethod::CoreBpf {
        if args.output == OutputFormat::Json {
            println!("{}", serde_json::json!({"result": "core_bpf"}));
            return ExitCode::SUCCESS;
        }
        println!(
            "collection method CORE_BPF: the probe is built into the Collector and fits every kernel; \
             nothing to fetch"
        );
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    exit_with(runtime.block_on(cli::get_probe(args)))
}

fn exit_with(result: Result<(), cli::CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the error and every cause.
            eprintln!("error: {}", probe_api::errors::chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}
