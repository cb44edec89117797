use std::process::ExitCode;

use clap::Parser;
use sockmesh::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // bpf-linker 0.10 leaves BTF the kernel rejects; aya then loads without it and says so at
    // length on every start. The programs work without BTF (AYA-NOTES), so keep that quiet.
    let directives = format!("{},aya::bpf=error", cli.log_level);
    let filter =
        EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info,aya::bpf=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match &cli.command {
        Command::Run(args) => sockmesh::app::run((**args).clone()),
        Command::Stats(args) => sockmesh::stats_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line an operator can act on: the chain of causes, outermost first.
            eprintln!("sockmesh: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
