//! Command-line interface. Every flag has an env fallback and says its default.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{CidrSpec, PodSpec, PortRangeSpec};

#[derive(Parser, Debug)]
#[command(
    name = "sockmesh",
    version,
    about = "Sidecar-less eBPF service mesh agent"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (error, warn, info, debug, trace, or a tracing EnvFilter directive).
    #[arg(
        long,
        global = true,
        env = "SOCKMESH_LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load and attach the kernel programs, enrol pods and proxy their traffic.
    Run(Box<RunArgs>),
    /// Show the kernel's per-pod counters from the pinned maps (works while the agent is down).
    Stats(StatsArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Enrol a pod by its network namespace: `PATH[,exclude-ports=22;8000-8100]
    /// [,exclude-cidrs=10.1.0.0/16;fd00::/8][,exclude-inbound-ports=9000]`. PATH is e.g.
    /// /var/run/netns/NAME or /proc/PID/ns/net. Repeatable.
    #[arg(long = "pod", value_name = "SPEC", value_parser = PodSpec::parse)]
    pub pods: Vec<PodSpec>,
    /// Where maps (and, with --keep-pins, links) are pinned.
    #[arg(
        long,
        env = "SOCKMESH_BPFFS_DIR",
        default_value = "/sys/fs/bpf/sockmesh"
    )]
    pub bpffs_dir: PathBuf,
    /// cgroup2 directory the programs attach to (default: the cgroup2 mount point).
    #[arg(long, env = "SOCKMESH_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Port of the outbound listener inside each pod (127.0.0.1 and ::1).
    #[arg(long, env = "SOCKMESH_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port of the DNS listener inside each pod (127.0.0.1 and ::1, UDP).
    #[arg(long, env = "SOCKMESH_DNS_PORT", default_value_t = 15053)]
    pub dns_port: u16,
    /// SO_MARK carried by the agent's own sockets, which the programs never redirect.
    #[arg(long, env = "SOCKMESH_MARK", default_value = "0x534d", value_parser = parse_mark)]
    pub mark: u32,
    /// Outbound ports never captured, for every pod (e.g. `22,8000-8100`).
    #[arg(long, env = "SOCKMESH_EXCLUDE_OUTBOUND_PORTS", value_parser = PortRangeSpec::parse, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<PortRangeSpec>,
    /// Outbound destinations never captured, for every pod (e.g. `10.1.0.0/16,fd00::/8`).
    #[arg(long, env = "SOCKMESH_EXCLUDE_OUTBOUND_CIDRS", value_parser = CidrSpec::parse, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<CidrSpec>,
    /// Listening ports never captured, for every pod.
    #[arg(long, env = "SOCKMESH_EXCLUDE_INBOUND_PORTS", value_parser = PortRangeSpec::parse, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<PortRangeSpec>,
    /// Keep maps and links pinned at exit (programs stay attached): for restarts and upgrades.
    #[arg(long, env = "SOCKMESH_KEEP_PINS")]
    pub keep_pins: bool,
    /// Forward the kernel programs' debug logs (aya-log) into the agent's log.
    #[arg(long, env = "SOCKMESH_KERNEL_LOG")]
    pub kernel_log: bool,
    /// At shutdown, how long live connections may take to finish before they are closed.
    #[arg(long, env = "SOCKMESH_DRAIN_TIMEOUT", default_value = "5s", value_parser = crate::policy::parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Per-peer policy: defaults for every knob, and the policy file.
    #[command(flatten)]
    pub policy: crate::policy::PolicyArgs,
    /// Kubernetes mode: enrol this node's opted-in pods from the API.
    #[command(flatten)]
    pub kube: crate::kube::KubeArgs,
}

#[derive(Args, Debug, Clone)]
pub struct StatsArgs {
    /// Where the agent pinned its maps.
    #[arg(
        long,
        env = "SOCKMESH_BPFFS_DIR",
        default_value = "/sys/fs/bpf/sockmesh"
    )]
    pub bpffs_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match r {
        Ok(0) => Err("the mark must not be 0 (every unmarked socket has mark 0)".into()),
        Ok(m) => Ok(m),
        Err(_) => Err(format!("'{s}' is not a mark: use a number such as 0x534d")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks() {
        assert_eq!(parse_mark("0x534d"), Ok(0x534d));
        assert_eq!(parse_mark("42"), Ok(42));
        assert!(parse_mark("0").is_err());
        assert!(parse_mark("zz").is_err());
    }

    #[test]
    fn cli_parses_a_full_run_line() {
        let cli = Cli::try_parse_from([
            "sockmesh",
            "run",
            "--pod",
            "/var/run/netns/a,exclude-ports=22",
            "--pod",
            "/proc/1/ns/net",
            "--outbound-port",
            "16001",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8,fd00::/8",
        ])
        .expect("parses");
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.pods.len(), 2);
        assert_eq!(run.outbound_port, 16001);
        assert_eq!(run.dns_port, 15053);
        assert_eq!(run.exclude_outbound_cidrs.len(), 2);
    }
}
