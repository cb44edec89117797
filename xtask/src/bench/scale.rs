//! Many concurrent idle connections from a client pod to the server pod (half IPv4, half
//! IPv6, over several server ports), held by several processes (`holders`), each under an
//! open-file limit of its own. Three steps in one run: direct (no mesh: the kernel's own cost
//! of an idle connection), `sockmesh` (the fast path: each destination's first connection is
//! proxied, which hands it to the kernel tier, then every held connection goes direct, checked
//! by the peers' direct counts) and `sockmesh-proxy` (every connection through the agent,
//! checked by its fds). Each reports the time to establish them, the agent's RSS, fds and CPU
//! per connection, and the kernel's memory per connection (`kmem`), and checks the agent's fds
//! go back once they close.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::holders::Holders;
use super::kmem::{self, Growth};
use super::plan::Variant;
use super::topo::{Topology, SERVER_V4, SERVER_V6};
use super::workloads::cpu_ms;
use crate::util::output;

pub struct ScaleResult {
    pub variant: Variant,
    pub conns: usize,
    pub processes: usize,
    pub establish_secs: f64,
    /// The agent's figures (none for direct).
    pub agent: Option<AgentFigures>,
    /// What the kernel's memory grew by with the connections open.
    pub kernel: Growth,
    /// The map the mesh keeps an entry in per connection, whose growth `kernel.map_bytes` is.
    pub map: Option<&'static str>,
    /// Fast path: connections the kernel tier let go direct (the peers' direct counts).
    pub direct: Option<u64>,
}

pub struct AgentFigures {
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub fds_before: usize,
    pub fds_after: usize,
    pub fds_after_close: usize,
    /// CPU time the agent used while holding them, per second held (its idle sweep).
    pub cpu_ms_per_s_held: f64,
}

impl ScaleResult {
    pub fn rss_per_conn_bytes(&self) -> Option<f64> {
        let a = self.agent.as_ref()?;
        Some((a.rss_after_kib.saturating_sub(a.rss_before_kib) * 1024) as f64 / self.conns as f64)
    }

    /// Slab and TCP buffer growth per connection (both ends' sockets: the client's and the
    /// server's, and for the proxy tier the agent's two).
    pub fn kernel_per_conn_bytes(&self) -> f64 {
        (self.kernel.slab_bytes + self.kernel.tcp_buffer_bytes) as f64 / self.conns as f64
    }

    pub fn map_per_conn_bytes(&self) -> Option<f64> {
        Some(self.kernel.map_bytes? as f64 / self.conns as f64)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "variant": self.variant.name(),
            "connections": self.conns,
            "processes": self.processes,
            "establish_seconds": self.establish_secs,
            "connections_per_second": self.conns as f64 / self.establish_secs,
            "direct_connections": self.direct,
            "agent": self.agent.as_ref().map(|a| json!({
                "rss_before_kib": a.rss_before_kib,
                "rss_after_kib": a.rss_after_kib,
                "rss_per_connection_bytes": self.rss_per_conn_bytes(),
                "fds_before": a.fds_before,
                "fds_with_connections": a.fds_after,
                "fds_after_close": a.fds_after_close,
                "cpu_ms_per_second_held": a.cpu_ms_per_s_held,
            })),
            "kernel": {
                "slab_bytes": self.kernel.slab_bytes,
                "tcp_buffer_bytes": self.kernel.tcp_buffer_bytes,
                "per_connection_bytes": self.kernel_per_conn_bytes(),
                "top_slab_caches": self.kernel.top_caches.iter()
                    .map(|(n, b)| json!({"cache": n, "bytes": b})).collect::<Vec<_>>(),
                "map": self.map,
                "map_bytes": self.kernel.map_bytes,
                "map_per_connection_bytes": self.map_per_conn_bytes(),
            },
        })
    }
}

/// The scale step of `v` (direct, sockmesh or sockmesh-proxy) with `n` connections held for
/// `hold` once open.
pub fn idle_connections(
    topo: &Topology,
    v: Variant,
    n: usize,
    hold: Duration,
) -> Result<ScaleResult> {
    let (v4, v6): (IpAddr, IpAddr) = (SERVER_V4.parse()?, SERVER_V6.parse()?);
    let pid = topo.proxy_pid(v);
    let map = match v {
        Variant::Sockmesh => Some(sockmesh_common::map_names::FAST_SOCKETS),
        Variant::SockmeshProxy => Some(sockmesh_common::map_names::ORIGIN_BY_TUPLE),
        Variant::Direct => None,
        _ => bail!("no scale step for {}", v.name()),
    };
    let map_pin = map.and_then(|m| Some(topo.pins(v)?.join(m)));
    let mut holders = Holders::start(&topo.server, topo.client(v), v4, v6, n)?;
    let peers = match v {
        Variant::Sockmesh => {
            holders.warm()?;
            let peers = kernel_tier_peers(topo, &holders)?;
            holders.cool()?;
            Some(peers)
        }
        _ => None,
    };
    let fds_before = match pid {
        Some(p) => settled_fds(p)?,
        None => 0,
    };
    let rss_before_kib = pid.map(rss_kib).transpose()?.unwrap_or(0);
    let kernel_before = kmem::Snapshot::take(map_pin.as_deref())?;
    let direct_before = peers.as_ref().map(|p| direct_sum(topo, p)).transpose()?;
    let start = Instant::now();
    let base = holders.accepted();
    let opened = holders.open_all(base)?;
    let establish_secs = start.elapsed().as_secs_f64();
    let kernel_after = kmem::Snapshot::take(map_pin.as_deref())?;
    let direct = match (&peers, direct_before) {
        (Some(p), Some(b)) => Some(direct_sum(topo, p)?.saturating_sub(b)),
        _ => None,
    };
    let fds_after = pid.map(fds).transpose()?.unwrap_or(0);
    // Held a while with the agent's periodic work (the idle sweep) going on.
    let cpu0 = pid.and_then(cpu_ms);
    std::thread::sleep(hold);
    let cpu1 = pid.and_then(cpu_ms);
    let rss_after_kib = pid.map(rss_kib).transpose()?.unwrap_or(0);
    match v {
        Variant::Sockmesh if direct != Some(opened as u64) => bail!(
            "{} of the {opened} connections went direct (the peers' direct counts): the rest \
             took the proxy (is SM_FAST_SOCKS full? see sockmesh peers)",
            direct.unwrap_or(0)
        ),
        Variant::SockmeshProxy if fds_after < fds_before + 2 * opened => bail!(
            "the agent holds {fds_after} fds with {opened} connections open (from \
             {fds_before}): the connections did not all go through it"
        ),
        _ => {}
    }
    let processes = holders.processes();
    holders.close();
    let agent = match pid {
        Some(p) => Some(AgentFigures {
            rss_before_kib,
            rss_after_kib,
            fds_before,
            fds_after,
            fds_after_close: fds_back(p, fds_before)?,
            cpu_ms_per_s_held: match (cpu0, cpu1) {
                (Some(a), Some(b)) => (b - a) / hold.as_secs_f64(),
                _ => f64::NAN,
            },
        }),
        None => None,
    };
    Ok(ScaleResult {
        variant: v,
        conns: opened,
        processes,
        establish_secs,
        agent,
        kernel: kmem::growth(&kernel_before, &kernel_after, 6),
        map,
        direct,
    })
}

/// `sockmesh peers --json` of the fast path's agent: outbound peers by `ip:port`, each with
/// its tier and direct count.
fn peer_table(topo: &Topology) -> Result<HashMap<String, (String, u64)>> {
    let pins = topo
        .pins(Variant::Sockmesh)
        .context("the fast path's pins")?;
    let out = output(
        std::process::Command::new(&topo.agent_bin)
            .args(["peers", "--json", "--bpffs-dir"])
            .arg(&pins),
    )?;
    let doc: Value = serde_json::from_str(&out).context("sockmesh peers --json")?;
    Ok(doc["peers"]
        .as_array()
        .context("no peers in sockmesh peers --json")?
        .iter()
        .filter(|p| p["direction"] == "outbound")
        .filter_map(|p| {
            Some((
                p["peer"].as_str()?.to_string(),
                (p["tier"].as_str()?.to_string(), p["direct"].as_u64()?),
            ))
        })
        .collect())
}

/// Waits (bounded) until every target's peer is on the kernel tier after its warm-up
/// connection, and returns their `ip:port`s.
fn kernel_tier_peers(topo: &Topology, holders: &Holders) -> Result<Vec<String>> {
    let want: Vec<String> = holders.targets.iter().map(|t| t.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let table = peer_table(topo)?;
        let missing: Vec<&String> = want
            .iter()
            .filter(|p| table.get(*p).is_none_or(|(tier, _)| tier != "kernel"))
            .collect();
        if missing.is_empty() {
            return Ok(want);
        }
        if Instant::now() > deadline {
            bail!(
                "after a first proxied connection each, {} of {} destinations are not on the \
                 kernel tier (e.g. {}): see sockmesh peers",
                missing.len(),
                want.len(),
                missing[0]
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn direct_sum(topo: &Topology, peers: &[String]) -> Result<u64> {
    let table = peer_table(topo)?;
    Ok(peers
        .iter()
        .filter_map(|p| table.get(p))
        .map(|(_, d)| d)
        .sum())
}

/// The agent's fd count once it stops changing: connections of the workloads before may still
/// be closing (a half-closed one waits for its server).
fn settled_fds(pid: u32) -> Result<usize> {
    let settle = Instant::now() + Duration::from_secs(15);
    let mut last = fds(pid)?;
    while Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(300));
        let now = fds(pid)?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

/// The agent's fds once its proxied connections closed (it closes its sides when it sees both
/// ends go: no event to wait on from here).
fn fds_back(pid: u32, before: usize) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = fds(pid)?;
        if n <= before + 8 || Instant::now() > deadline {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("read the agent's /proc status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in the agent's /proc status")
}

fn fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .context("list the agent's fds")?
        .count())
}

/// Raises this process's open-file limit as far as it may (the agents started from here
/// inherit it) and returns it. Past the hard limit needs CAP_SYS_RESOURCE; without it the soft
/// limit still goes up to the hard one.
pub fn raise_nofile() -> Result<u64> {
    let max: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: max,
        rlim_max: max,
    };
    // SAFETY: plain syscalls with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        return Ok(max);
    }
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("read RLIMIT_NOFILE");
    }
    lim.rlim_cur = lim.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("raise RLIMIT_NOFILE");
    }
    Ok(lim.rlim_max)
}

/// How many proxied connections the agent's `nofile` allows: it holds two sockets per
/// connection (idle connections stay on splice under the default `--kernel-relay auto`, so no
/// pipes), plus a margin for the rest. (The holders have limits of their own.)
pub fn max_conns(nofile: u64) -> usize {
    (nofile.saturating_sub(512) / 2) as usize
}
