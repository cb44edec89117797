//! Developer tasks for sockmesh: `cargo xtask <command>` (alias in .cargo/config.toml).

mod build;
mod demo;
mod manifests;
mod prereqs;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "sockmesh developer tasks: each command first checks, and installs where it can, what it needs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check and install the prerequisites (toolchain, bpf-linker, Debian packages, bpffs,
    /// cgroup2, kernel); needs root.
    Prereqs,
    /// Build the workspace, including the eBPF programs (no root needed).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run lints and every test, kernel tests included (needs root).
    /// Arguments after `--` go to the test runner, e.g. `cargo xtask test -- outbound`.
    Test {
        /// Test filters or runner flags, passed through.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Two pods on a private bridge, real curl and dig traffic through the agent (needs root).
    Demo,
    /// Throughput and latency benchmarks (not implemented yet, issue #6).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        _args: Vec<String>,
    },
    /// Long-running soak test (not implemented yet, issue #7).
    Soak {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        _args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    util::extend_path();
    let result = match cli.command {
        Cmd::Prereqs => prereqs::ensure(prereqs::Level::Run).map(|_| {
            println!("prereqs: all present");
        }),
        Cmd::Build { release } => build::build(release),
        Cmd::Test { args } => test::test(&args),
        Cmd::Demo => demo::demo(),
        Cmd::Bench { .. } => Err(anyhow::anyhow!(
            "`cargo xtask bench` is not implemented yet (issue #6)"
        )),
        Cmd::Soak { .. } => Err(anyhow::anyhow!(
            "`cargo xtask soak` is not implemented yet (issue #7)"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
