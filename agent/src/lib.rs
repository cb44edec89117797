//! sockmesh: a sidecar-less eBPF service-mesh agent. The binary is a thin shell over this
//! library; nothing else is exported, so the compiler reports what no path reaches.
//!
//! Modules in layer order, top to bottom (README.md, "Architecture", says what lives where;
//! `cargo xtask layers` checks that a module only imports from its own layer and below).
mod admission;
mod app;
mod cli;
mod datapath;
mod events;
mod handover;
mod identity;
mod inpod;
mod kube;
mod observe;
mod policy;
mod proxy;
mod rules;
mod spec;
mod sys;
mod telemetry;
#[cfg(test)]
mod testkit;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};
use observe::{cli::Which, logging};

/// The kernel programs, built by build.rs for bpfel-unknown-none.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockmesh"));
/// The inbound steering program (`sk_lookup`), loaded once per pod (see `datapath::steer`).
static STEER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockmesh-steer"));

/// `sockmesh`'s entry point: one subcommand, and on failure one line an operator can act on.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log_level, cli.log_format);
    let result = match &cli.command {
        Command::Run(args) => app::run((**args).clone()),
        Command::Stats(args) => observe::cli::run(Which::Stats, args),
        Command::Peers(args) => observe::cli::run(Which::Peers, args),
        Command::Pods(args) => observe::cli::run(Which::Pods, args),
        Command::Maps(args) => observe::maps::run(args),
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
