//! Command-line interface. Every flag has an env fallback and says its default.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::spec::{CidrSpec, PodSpec, PortRangeSpec};

/// When `run` takes over a running agent (`--takeover`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakeoverMode {
    /// Never: start afresh (refused if an agent runs on the same pins).
    #[value(alias = "false", alias = "0")]
    Off,
    /// Take over the running agent, or fail.
    #[value(alias = "true", alias = "1")]
    Always,
    /// Take over the running agent if there is one, else start afresh.
    IfRunning,
}

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
    /// Log line format on stderr: `text` or `json` (one object per line).
    #[arg(
        long,
        global = true,
        env = "SOCKMESH_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: crate::observe::logging::LogFormat,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load and attach the kernel programs, enrol pods and proxy their traffic.
    Run(Box<RunArgs>),
    /// Totals: kernel counters per pod, agent per-peer figures summed (works while the agent is down).
    Stats(crate::observe::cli::StatsArgs),
    /// One row per (pod, direction, peer): connections, bytes, timeouts, throttling, breaker.
    Peers(crate::observe::cli::StatsArgs),
    /// One row per pod: name, enrolment, and its peers' figures summed.
    Pods(crate::observe::cli::StatsArgs),
    /// Any pinned map with field names, from the schema (the maps carry no BTF for bpftool).
    Maps(crate::observe::maps::MapsArgs),
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
    /// Port of the inbound listener inside each pod (127.0.0.1 and ::1): the kernel hands it
    /// the connections to every port an app of the pod listens on (sk_lookup).
    #[arg(long, env = "SOCKMESH_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// SO_MARK put on the agent's own sockets, for your routing and firewall rules (e.g. to
    /// exempt the agent's traffic from an iptables REDIRECT). The programs do not trust it: a
    /// pod may set any mark, this one too, and is captured all the same; they know the
    /// agent's sockets by the cookies it registers.
    #[arg(long, env = "SOCKMESH_MARK", default_value = "0x534d", value_parser = parse_mark)]
    pub mark: u32,
    /// Refuse raw IP sockets in enrolled pods: `socket(AF_INET/AF_INET6, SOCK_RAW, ...)`
    /// fails with EPERM, counted per pod as `raw_denied`. Packet sockets (AF_PACKET) cannot
    /// be refused this way (see the README).
    #[arg(long, env = "SOCKMESH_DENY_RAW_SOCKETS")]
    pub deny_raw_sockets: bool,
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
    /// Upgrade without a gap: take the listening sockets and pins of the agent running with
    /// the same --bpffs-dir (over /run/sockmesh/<dir>.sock), serve on them, then let it drain
    /// and exit. `--takeover` (`always`) fails, leaving the running agent untouched, if there
    /// is none; `if-running` starts afresh then (the DaemonSet: the same arguments start the
    /// first pod and every replacement), and an agent started so waits for a signal after
    /// handing over instead of exiting (its supervisor would restart it, and it would take
    /// the node back).
    #[arg(long, env = "SOCKMESH_TAKEOVER", value_enum, value_name = "always|if-running", num_args = 0..=1, require_equals = true, default_value = "off", default_missing_value = "always")]
    pub takeover: TakeoverMode,
    /// On SIGTERM, keep serving this long for a successor to take over (a rollout) before
    /// stopping for good (an uninstall: pods go direct, pins removed unless --keep-pins). A
    /// handover already under way is waited for. `0s`: stop at once.
    #[arg(long, env = "SOCKMESH_HANDOVER_WAIT", default_value = "0s", value_parser = crate::rules::parse_duration)]
    pub handover_wait: std::time::Duration,
    /// Forward the kernel programs' debug logs (aya-log) into the agent's log.
    #[arg(long, env = "SOCKMESH_KERNEL_LOG")]
    pub kernel_log: bool,
    /// At shutdown, how long live connections may take to finish before they are closed.
    #[arg(long, env = "SOCKMESH_DRAIN_TIMEOUT", default_value = "5s", value_parser = crate::rules::parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Threads running the proxies (default: one per CPU). Measured on 2 cores: see the
    /// README's performance section.
    #[arg(long, env = "SOCKMESH_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Fail open: when the agent's heartbeat (written every 125-500 ms) is older than this,
    /// the kernel stops redirecting and new connections go direct; `off` never fails open.
    #[arg(long, env = "SOCKMESH_FAIL_OPEN_AFTER", value_name = "DURATION|off", default_value = "2s", value_parser = fail_open_after)]
    pub fail_open_after: crate::rules::OrOff<std::time::Duration>,
    /// In-kernel relay for connections without a bandwidth limit (sockhash + sk_skb verdict:
    /// the kernel forwards bytes between the two sockets without waking the agent per
    /// message). `auto` (the default): splice first, and a connection that shows
    /// request/response traffic (a few small exchanges each way, nothing bulk) moves to the
    /// kernel relay, which has the lower latency, while bulk streams stay on splice, which has
    /// the higher throughput. `on`: every unshaped connection in the kernel from the start;
    /// `off`: splice only.
    #[arg(long, env = "SOCKMESH_KERNEL_RELAY", value_name = "auto|on|off", default_value = "auto", value_parser = kernel_relay_mode)]
    pub kernel_relay: crate::datapath::relay::Mode,
    /// The kernel fast path. `auto` (the default): an outbound peer whose policy the kernel
    /// can enforce exactly (connect and idle timeouts, connection rate, a concurrency cap
    /// without a queue, the breaker's opening, adaptive throttling) is handed to the kernel
    /// after its first proxied connection, and later connect()s to it are policed in the
    /// kernel and go direct; a peer with a bandwidth limit, a queue or a lifetime stays on the
    /// proxy. `off`: every connection is proxied.
    #[arg(long, env = "SOCKMESH_FAST_PATH", value_name = "auto|off", default_value = "auto", value_parser = fast_path_mode)]
    pub fast_path: FastPath,
    /// Per-peer policy: defaults for every knob, and the policy file.
    #[command(flatten)]
    pub policy: crate::rules::PolicyArgs,
    /// Per-pod caps and node-wide caps on what pods share.
    #[command(flatten)]
    pub shares: crate::proxy::shares::ShareArgs,
    /// Where /metrics, /healthz and /readyz are served (ip:port), or `off`.
    #[arg(long, env = "SOCKMESH_METRICS_ADDR", default_value = "127.0.0.1:15090", value_parser = crate::observe::http::parse_addr)]
    pub metrics_addr: crate::observe::http::MetricsAddr,
    /// Where only /healthz and /readyz are served (ip:port), or `off`: what a node address
    /// exposes for the kubelet's probes without publishing every pod's peers and bytes.
    #[arg(long, env = "SOCKMESH_HEALTH_ADDR", default_value = "off", value_parser = crate::observe::http::parse_addr)]
    pub health_addr: crate::observe::http::MetricsAddr,
    /// Peers per pod and direction with their own `peer` label in /metrics; the rest are
    /// summed under peer="other" (bounds the series count).
    #[arg(long, env = "SOCKMESH_METRICS_TOP_PEERS", default_value_t = 20)]
    pub metrics_top_peers: usize,
    /// Kubernetes mode: enrol this node's opted-in pods from the API.
    #[command(flatten)]
    pub kube: crate::kube::KubeArgs,
}

impl RunArgs {
    /// What every pod enrolled by this agent shares.
    pub fn pod_template(&self) -> crate::inpod::manager::PodTemplate {
        crate::inpod::manager::PodTemplate {
            mark: self.mark,
            outbound_port: self.outbound_port,
            dns_port: self.dns_port,
            inbound_port: self.inbound_port,
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            handed: None,
        }
    }
}

fn fail_open_after(
    s: &str,
) -> Result<crate::rules::OrOff<std::time::Duration>, Box<dyn std::error::Error + Send + Sync>> {
    let d = crate::rules::knobs::parse_timeout_knob(s)?;
    crate::datapath::heartbeat::validate(d)?;
    Ok(crate::rules::OrOff(d))
}

/// `--fast-path`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FastPath {
    Auto,
    Off,
}

fn fast_path_mode(s: &str) -> Result<FastPath, String> {
    match s {
        "auto" => Ok(FastPath::Auto),
        "off" => Ok(FastPath::Off),
        _ => Err(format!("'{s}' is not a fast-path mode: use auto or off")),
    }
}

fn kernel_relay_mode(s: &str) -> Result<crate::datapath::relay::Mode, String> {
    use crate::datapath::relay::Mode;
    match s {
        "auto" => Ok(Mode::Auto),
        "on" => Ok(Mode::On),
        "off" => Ok(Mode::Off),
        _ => Err(format!("'{s}' is not a relay mode: use auto, on or off")),
    }
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
    use clap::{Args, CommandFactory};

    #[test]
    fn marks() {
        assert_eq!(parse_mark("0x534d"), Ok(0x534d));
        assert_eq!(parse_mark("42"), Ok(42));
        assert!(parse_mark("0").is_err());
        assert!(parse_mark("zz").is_err());
    }

    #[test]
    fn takeover_modes_parse_and_the_bare_flag_means_always() {
        let mode = |extra: &[&str]| {
            let mut argv = vec!["sockmesh", "run"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Run(r)) => Ok((r.takeover, r.handover_wait)),
                Ok(_) => panic!("not run"),
                Err(e) => Err(e.to_string()),
            }
        };
        let zero = std::time::Duration::ZERO;
        assert_eq!(mode(&[]), Ok((TakeoverMode::Off, zero)));
        assert_eq!(mode(&["--takeover"]), Ok((TakeoverMode::Always, zero)));
        // The bare flag takes no value: what follows is the next flag, not its value.
        assert_eq!(
            mode(&["--takeover", "--handover-wait", "5s"]),
            Ok((TakeoverMode::Always, std::time::Duration::from_secs(5)))
        );
        assert_eq!(
            mode(&["--takeover=if-running"]),
            Ok((TakeoverMode::IfRunning, zero))
        );
        assert!(mode(&["--takeover=maybe"]).is_err());
        assert!(mode(&["--handover-wait", "soon"]).is_err());
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
        assert_eq!(
            run.metrics_addr.0,
            Some("127.0.0.1:15090".parse().expect("addr"))
        );
        assert_eq!(
            run.fail_open_after.0,
            Some(std::time::Duration::from_secs(2))
        );
    }

    #[test]
    fn observability_flags_parse() {
        let cli = Cli::try_parse_from([
            "sockmesh",
            "--log-format",
            "json",
            "run",
            "--metrics-addr",
            "off",
            "--metrics-top-peers",
            "5",
        ])
        .expect("parses");
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.metrics_addr.0, None);
        assert_eq!(run.metrics_top_peers, 5);
        assert!(Cli::try_parse_from(["sockmesh", "run", "--metrics-addr", "nope"]).is_err());
        let cli = Cli::try_parse_from(["sockmesh", "peers", "--watch", "--sort", "throttled"])
            .expect("parses");
        let Command::Peers(p) = cli.command else {
            panic!("not peers")
        };
        assert_eq!(p.watch, Some(std::time::Duration::from_secs(2)));
        assert!(Cli::try_parse_from(["sockmesh", "peers", "--sort", "colour"]).is_err());
        Cli::command().debug_assert();
    }

    #[test]
    fn kernel_relay_takes_auto_on_or_off() {
        let run = |args: &[&str]| match Cli::try_parse_from(args) {
            Ok(Cli {
                command: Command::Run(r),
                ..
            }) => Ok(r.kernel_relay),
            Ok(_) => panic!("not run"),
            Err(e) => Err(e.to_string()),
        };
        use crate::datapath::relay::Mode;
        assert_eq!(run(&["sockmesh", "run"]), Ok(Mode::Auto));
        assert_eq!(
            run(&["sockmesh", "run", "--kernel-relay", "off"]),
            Ok(Mode::Off)
        );
        assert_eq!(
            run(&["sockmesh", "run", "--kernel-relay", "on"]),
            Ok(Mode::On)
        );
        let e = run(&["sockmesh", "run", "--kernel-relay", "maybe"]).expect_err("refused");
        assert!(e.contains("use auto, on or off"), "{e}");
    }

    #[test]
    fn fail_open_after_takes_off_and_refuses_too_short() {
        let parse = |v: &str| Cli::try_parse_from(["sockmesh", "run", "--fail-open-after", v]);
        let Ok(Cli {
            command: Command::Run(run),
            ..
        }) = parse("off")
        else {
            panic!("off parses")
        };
        assert_eq!(run.fail_open_after.0, None);
        let e = parse("100ms").expect_err("too short").to_string();
        assert!(e.contains("at least 500ms"), "{e}");
        assert!(parse("banana").is_err());
    }

    #[test]
    fn the_flags_flatten_into_run_without_clashing() {
        // RunArgs flattens these flags: clap's own checks reject any clash of id, long or env.
        let run = RunArgs::augment_args(clap::Command::new("run"));
        let policy_flags = crate::rules::PolicyArgs::augment_args(clap::Command::new("policy"));
        run.clone().debug_assert();
        for arg in policy_flags.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" {
                continue;
            }
            let same: Vec<_> = run
                .get_arguments()
                .filter(|a| a.get_id().as_str() == id)
                .collect();
            assert_eq!(
                same.len(),
                1,
                "--{id} must appear exactly once in `sockmesh run`"
            );
            if let Some(env) = arg.get_env() {
                let envs = run
                    .get_arguments()
                    .filter(|a| a.get_env() == Some(env))
                    .count();
                assert_eq!(envs, 1, "{id}'s env variable is shared");
            }
        }
    }
}
