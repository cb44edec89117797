//! `sockmesh stats|peers|pods`: read the pinned maps (the agent need not run), filter, sort,
//! print a table or JSON, optionally refreshing (`--watch`).
use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::Result;
use clap::Args;
use sockmesh_common::{
    counter,
    peer::{agent_counter, throttle_reason, timeout_kind},
};

use super::{
    group::{group, parse_by, By},
    table::{render, Cols},
    view::{peer_rows, pod_rows, refusal_names, PeerRow, PodRow, Snapshot},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Stats,
    Peers,
    Pods,
}

/// Keys `--sort` accepts; numbers sort largest first, names alphabetically.
pub const SORT_KEYS: [&str; 8] = [
    "bytes",
    "conns",
    "active",
    "throttled",
    "timeouts",
    "failures",
    "peer",
    "pod",
];

pub fn parse_sort(s: &str) -> Result<String, String> {
    if SORT_KEYS.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "unknown sort key '{s}': use one of {}",
            SORT_KEYS.join(", ")
        ))
    }
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
    /// Refresh every INTERVAL (default 2s) until interrupted.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s", value_parser = crate::rules::parse_duration)]
    pub watch: Option<std::time::Duration>,
    /// Only this pod: a part of its name, or its netns cookie.
    #[arg(long)]
    pub pod: Option<String>,
    /// Only peers whose `ip:port` contains this.
    #[arg(long)]
    pub peer: Option<String>,
    /// Order of peers: bytes (default), conns, active, throttled, timeouts, failures, peer, pod.
    #[arg(long, value_parser = parse_sort)]
    pub sort: Option<String>,
    /// `peers`: one row per Service, per workload, or per peer address (default). Peers with
    /// no such name stay one row per address.
    #[arg(long, value_name = "service|workload|peer", value_parser = parse_by)]
    pub by: Option<By>,
}

pub fn run(which: Which, args: &StatsArgs) -> Result<()> {
    let Some(every) = args.watch else {
        print!("{}", once(which, args)?);
        return Ok(());
    };
    let every = every.max(Duration::from_millis(100));
    loop {
        let out = once(which, args)?;
        let mut stdout = std::io::stdout().lock();
        if !args.json {
            // Clear the screen and home the cursor: a refreshing view like top(1).
            let _ = write!(stdout, "\x1b[2J\x1b[H");
        }
        let _ = write!(stdout, "{out}");
        let _ = stdout.flush();
        drop(stdout);
        // A display refresh, not a wait for an event: there is none to wait on in a map.
        std::thread::sleep(every);
    }
}

fn once(which: Which, args: &StatsArgs) -> Result<String> {
    let snap = Snapshot::read(&args.bpffs_dir)?;
    let peers = select_peers(peer_rows(&snap), args);
    let pods: Vec<PodRow> = pod_rows(&snap, &peers)
        .into_iter()
        .filter(|p| pod_matches(&p.pod, p.netns_cookie, args.pod.as_deref()))
        .collect();
    let peers = match args.by {
        Some(by) if by != By::Peer && which == Which::Peers => {
            let mut grouped = group(&peers, |r| by.key(r));
            sort_peers(&mut grouped, args.sort.as_deref().unwrap_or("bytes"));
            grouped
        }
        _ => peers,
    };
    Ok(match (which, args.json) {
        (Which::Peers, true) => json_line(serde_json::json!({ "peers": peers })),
        (Which::Pods, true) => json_line(serde_json::json!({ "pods": pods })),
        (Which::Stats, true) => json_line(stats_json(&pods, &peers, &snap.agent)),
        (Which::Peers, false) => peers_table(&peers),
        (Which::Pods, false) => pods_table(&pods),
        (Which::Stats, false) => stats_table(&pods, &peers, &snap.agent),
    })
}

fn json_line(v: serde_json::Value) -> String {
    format!("{v}\n")
}

fn pod_matches(name: &str, cookie: u64, filter: Option<&str>) -> bool {
    filter.is_none_or(|f| name.contains(f) || cookie.to_string() == f)
}

/// `--pod` (substring of the name, or the exact cookie), `--peer` (substring of `ip:port`),
/// then `--sort`.
pub fn select_peers(rows: Vec<PeerRow>, args: &StatsArgs) -> Vec<PeerRow> {
    let mut rows: Vec<PeerRow> = rows
        .into_iter()
        .filter(|r| pod_matches(&r.pod, r.netns_cookie, args.pod.as_deref()))
        .filter(|r| args.peer.as_deref().is_none_or(|p| r.peer.contains(p)))
        .collect();
    sort_peers(&mut rows, args.sort.as_deref().unwrap_or("bytes"));
    rows
}

pub fn sort_peers(rows: &mut [PeerRow], key: &str) {
    let num = |r: &PeerRow| -> u64 {
        match key {
            "conns" => r.conns_total,
            "active" => r.conns_active,
            "throttled" => r.throttled_total(),
            "timeouts" => r.timeouts_total(),
            "failures" => r.connect_failures,
            _ => r.bytes(),
        }
    };
    match key {
        "peer" => rows.sort_by(|a, b| a.peer.cmp(&b.peer).then(a.pod.cmp(&b.pod))),
        "pod" => rows.sort_by(|a, b| a.pod.cmp(&b.pod).then(a.peer.cmp(&b.peer))),
        _ => rows.sort_by(|a, b| num(b).cmp(&num(a)).then(a.peer.cmp(&b.peer))),
    }
}

/// "rate=3 breaker=1" for the non-zero entries, "-" if none.
fn nonzero(v: &[(&str, u64)]) -> String {
    let parts: Vec<String> = v
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

pub fn peers_table(rows: &[PeerRow]) -> String {
    let mut t = Cols::new(&[
        "POD",
        "DIR",
        "PEER",
        "SERVICE",
        "WORKLOAD",
        "ACTIVE",
        "CONNS",
        "BYTES_OUT",
        "BYTES_IN",
        "TIMEOUTS",
        "THROTTLED",
        "FAILED",
        "FAST_REJ",
        "DNS_REDIR",
        "BREAKER",
        "ADAPTIVE",
        "P50_MS",
        "P99_MS",
        "LAST_ERROR",
        "TIER",
    ]);
    for r in rows {
        t.row(vec![
            r.pod.clone(),
            r.direction.into(),
            r.peer.clone(),
            r.service.clone().unwrap_or_else(|| "-".into()),
            workload_cell(r),
            r.conns_active.to_string(),
            r.conns_total.to_string(),
            r.bytes_out.to_string(),
            r.bytes_in.to_string(),
            nonzero(&r.timeouts),
            nonzero(&r.throttled),
            r.connect_failures.to_string(),
            r.fast_rejects.to_string(),
            r.dns_redirects.to_string(),
            r.breaker.into(),
            format!("{:.3}", r.adaptive_reject_ratio),
            format!("{:.3}", r.connect_p50_us as f64 / 1000.0),
            format!("{:.3}", r.connect_p99_us as f64 / 1000.0),
            r.last_error.into(),
            // Why, next to the tier: `proxy (idle_timeout)`, `kernel`.
            if r.tier == "kernel" {
                format!("kernel ({} direct)", r.direct)
            } else {
                format!("proxy ({})", r.tier_reason)
            },
        ]);
    }
    render(t, "(no peers recorded)")
}

/// The peer's workload as `NAMESPACE/WORKLOAD` (or the workload alone when it has no
/// namespace, or the namespace alone for a ClusterIP), `-` if unknown.
fn workload_cell(r: &PeerRow) -> String {
    match (&r.namespace, &r.workload) {
        (Some(ns), Some(w)) => format!("{ns}/{w}"),
        (None, Some(w)) => w.clone(),
        (Some(ns), None) => format!("{ns}/-"),
        (None, None) => "-".into(),
    }
}

pub fn pods_table(rows: &[PodRow]) -> String {
    let mut t = Cols::new(&[
        "POD",
        "NETNS_COOKIE",
        "ENROLLED",
        "PEERS",
        "ACTIVE",
        "CONNS",
        "BYTES_OUT",
        "BYTES_IN",
        "TIMEOUTS",
        "THROTTLED",
        "FAILED",
        "BREAKERS_OPEN",
        "REDIRECTS",
        "FAST_REJ",
        "REFUSED",
    ]);
    for p in rows {
        let c = |i: usize| p.counters.get(i).map_or(0, |(_, n)| *n).to_string();
        t.row(vec![
            p.pod.clone(),
            p.netns_cookie.to_string(),
            if p.enrolled { "yes" } else { "no" }.into(),
            p.peers.to_string(),
            p.conns_active.to_string(),
            p.conns_total.to_string(),
            p.bytes_out.to_string(),
            p.bytes_in.to_string(),
            p.timeouts.to_string(),
            p.throttled.to_string(),
            p.connect_failures.to_string(),
            p.breakers_open.to_string(),
            c(counter::REDIRECT_TCP),
            c(counter::FAST_REJECT),
            refused_cell(p),
        ]);
    }
    render(t, "(no pods have been enrolled)")
}

/// The pod's refusals: the total and its non-zero kinds, e.g. `19 (conn_pod_cap=19)`.
fn refused_cell(p: &PodRow) -> String {
    match p.refused_total() {
        0 => "0".into(),
        n => format!("{n} ({})", nonzero(&p.refused)),
    }
}

/// Sums over the shown pods and peers.
struct Totals {
    kernel: Vec<(&'static str, u64)>,
    timeouts: Vec<(&'static str, u64)>,
    throttled: Vec<(&'static str, u64)>,
    conns_total: u64,
    conns_active: u64,
    bytes_out: u64,
    bytes_in: u64,
    connect_failures: u64,
    refused: Vec<(&'static str, u64)>,
}

fn totals(pods: &[PodRow], peers: &[PeerRow]) -> Totals {
    let sum = |names: &[&'static str], get: &dyn Fn(usize) -> u64| -> Vec<(&'static str, u64)> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, get(i)))
            .collect()
    };
    Totals {
        kernel: sum(&counter::NAMES, &|i| {
            pods.iter()
                .map(|p| p.counters.get(i).map_or(0, |c| c.1))
                .sum()
        }),
        timeouts: sum(&timeout_kind::NAMES, &|i| {
            peers.iter().map(|r| r.timeouts[i].1).sum()
        }),
        throttled: sum(&throttle_reason::NAMES, &|i| {
            peers.iter().map(|r| r.throttled[i].1).sum()
        }),
        conns_total: peers.iter().map(|r| r.conns_total).sum(),
        conns_active: peers.iter().map(|r| r.conns_active).sum(),
        bytes_out: peers.iter().map(|r| r.bytes_out).sum(),
        bytes_in: peers.iter().map(|r| r.bytes_in).sum(),
        connect_failures: peers.iter().map(|r| r.connect_failures).sum(),
        refused: sum(&refusal_names(), &|i| {
            pods.iter()
                .map(|p| p.refused.get(i).map_or(0, |c| c.1))
                .sum()
        }),
    }
}

fn obj(v: &[(&str, u64)]) -> serde_json::Value {
    v.iter()
        .map(|(k, n)| ((*k).to_string(), (*n).into()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn agent_named(agent: &[u64]) -> Vec<(&'static str, u64)> {
    agent_counter::NAMES
        .iter()
        .copied()
        .zip(agent.iter().copied())
        .collect()
}

/// `{"pods":[{netns_cookie, pod, enrolled, counters}], "totals":{...}, "agent":{...}}`.
fn stats_json(pods: &[PodRow], peers: &[PeerRow], agent: &[u64]) -> serde_json::Value {
    let t = totals(pods, peers);
    let pod_list: Vec<_> = pods
        .iter()
        .map(|p| {
            serde_json::json!({
                "netns_cookie": p.netns_cookie, "pod": p.pod, "enrolled": p.enrolled,
                "counters": obj(&p.counters), "refused": obj(&p.refused),
            })
        })
        .collect();
    serde_json::json!({
        "pods": pod_list,
        "totals": {
            "pods": pods.len(), "pods_enrolled": pods.iter().filter(|p| p.enrolled).count(),
            "peers": peers.len(), "conns_active": t.conns_active, "conns_total": t.conns_total,
            "bytes_out": t.bytes_out, "bytes_in": t.bytes_in,
            "connect_failures": t.connect_failures,
            "timeouts": obj(&t.timeouts), "throttled": obj(&t.throttled),
            "kernel": obj(&t.kernel), "refused": obj(&t.refused),
        },
        "agent": obj(&agent_named(agent)),
    })
}

fn stats_table(pods: &[PodRow], peers: &[PeerRow], agent: &[u64]) -> String {
    let t = totals(pods, peers);
    let mut c = Cols::new(&["WHAT", "VALUE"]);
    let mut add = |k: String, v: u64| c.row(vec![k, v.to_string()]);
    add("pods".into(), pods.len() as u64);
    add(
        "pods enrolled".into(),
        pods.iter().filter(|p| p.enrolled).count() as u64,
    );
    add("peers".into(), peers.len() as u64);
    add("connections active".into(), t.conns_active);
    add("connections total".into(), t.conns_total);
    add("bytes out".into(), t.bytes_out);
    add("bytes in".into(), t.bytes_in);
    add("connect failures".into(), t.connect_failures);
    for (k, v) in &t.timeouts {
        add(format!("timeouts {k}"), *v);
    }
    for (k, v) in &t.throttled {
        add(format!("throttled {k}"), *v);
    }
    for (k, v) in &t.kernel {
        add(format!("kernel {k}"), *v);
    }
    for (k, v) in &t.refused {
        add(format!("refused {k}"), *v);
    }
    for (k, v) in agent_named(agent) {
        add(format!("agent {k}"), v);
    }
    render(c, "")
}
