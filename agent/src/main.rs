use std::process::ExitCode;

use clap::Parser;
use sockmesh::{
    cli::{Cli, Command},
    observe::{cli::Which, logging},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log_level, cli.log_format);
    let result = match &cli.command {
        Command::Run(args) => sockmesh::app::run((**args).clone()),
        Command::Stats(args) => sockmesh::observe::cli::run(Which::Stats, args),
        Command::Peers(args) => sockmesh::observe::cli::run(Which::Peers, args),
        Command::Pods(args) => sockmesh::observe::cli::run(Which::Pods, args),
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
