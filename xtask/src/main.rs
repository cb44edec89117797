//! Developer tasks for sockmesh: `cargo xtask <command>` (alias in .cargo/config.toml).

mod bench;
mod build;
mod demo;
mod layers;
mod manifests;
mod prereqs;
mod soak;
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
    /// Check the architecture rules: the agent's layer order (README.md `## Architecture`),
    /// no two files importing each other, no .rs file over 600 lines.
    Layers,
    /// Two pods on a private bridge, real curl and dig traffic through the agent (needs root).
    Demo,
    /// Benchmarks between two pods: direct, sockmesh, iptables REDIRECT + agent, HAProxy;
    /// then many idle proxied connections. Results in bench-results/ (needs root).
    Bench {
        /// A short run (one repetition, 2 s per run, 10k idle connections): about 2 minutes.
        #[arg(long)]
        quick: bool,
        /// Repetitions of every workload and variant (default 3, or 1 with --quick).
        #[arg(long)]
        reps: Option<usize>,
        /// Idle connections held in the scale step (default 100000, or 10000 with --quick;
        /// 0 skips the step).
        #[arg(long)]
        scale_conns: Option<usize>,
        /// Seconds per run (default 4, or 2 with --quick); longer runs help a profiler.
        #[arg(long)]
        seconds: Option<u64>,
        /// Only these workloads, comma-separated: bulk1, bulk8, rr, new-conns, connect,
        /// inbound-conns (default: all).
        #[arg(long, value_name = "NAMES")]
        workload: Option<String>,
        /// Only these variants, comma-separated: direct, sockmesh, iptables, haproxy,
        /// sockmesh-splice, sockmesh-baseline (default: all; direct is always run, every ratio
        /// needs it; the baseline only with --baseline-bin).
        #[arg(long, value_name = "NAMES")]
        variant: Option<String>,
        /// Another build of the agent (e.g. main's) to measure beside this one in the same
        /// run, as the variant sockmesh-baseline.
        #[arg(long, value_name = "PATH")]
        baseline_bin: Option<std::path::PathBuf>,
    },
    /// One process of the bench's scale step (started by `cargo xtask bench` in a pod's
    /// namespace; speaks lines on stdin/stdout).
    #[command(hide = true)]
    BenchHold {
        /// Listen on these ports (comma-separated) and accept.
        #[arg(long)]
        serve: Option<String>,
        /// Connect to these ip:port targets (comma-separated) when told.
        #[arg(long)]
        connect: Option<String>,
        /// This process's open-file limit.
        #[arg(long)]
        nofile: u64,
    },
    /// Soak: many connections with random sizes, half-closes and resets through the mesh
    /// between two pods; bytes checked per connection, agent fds/tasks/RSS flat (needs root).
    Soak {
        /// Connections to push (the CI form of the same test runs 1500).
        #[arg(long, default_value_t = soak::MIN_CONNS)]
        conns: u64,
        /// Fail if pushing them takes longer than this many seconds.
        #[arg(long, default_value_t = 600)]
        secs: u64,
        /// Replay a run: the seed its [soak] line printed.
        #[arg(long, value_parser = parse_seed)]
        seed: Option<u64>,
    },
}

/// A seed as the soak prints it (`0x5eed50a4`) or in decimal.
fn parse_seed(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("'{s}' is not a seed: give the number the [soak] line printed"))
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
        Cmd::Layers => layers::layers(),
        Cmd::Demo => demo::demo(),
        Cmd::Bench {
            quick,
            reps,
            scale_conns,
            seconds,
            workload,
            variant,
            baseline_bin,
        } => bench::Selection::parse(workload.as_deref(), variant.as_deref())
            .and_then(|only| bench::bench(quick, reps, scale_conns, seconds, only, baseline_bin)),
        Cmd::BenchHold {
            serve,
            connect,
            nofile,
        } => bench::hold::parse_role(serve.as_deref(), connect.as_deref())
            .and_then(|role| bench::hold::run(role, nofile)),
        Cmd::Soak { conns, secs, seed } => soak::soak(conns, secs, seed),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
