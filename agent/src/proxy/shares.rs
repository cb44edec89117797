//! Fair shares of what every pod on the node shares, as the proxy enforces them: proxied
//! connections (each costs the agent two file descriptors), connections waiting in a peer's
//! queue, and DNS queries in flight (each costs an upstream socket). Per-pod caps, node-wide
//! caps kept below the open-file limit, and the node's last slots kept for pods under their
//! fair share: the rules are `crate::policy::shares`, pure; this is the flags, the locks and
//! the slot guards that give a slot back however a connection ends.
use std::sync::{Arc, Mutex};

use clap::Args;
use sockmesh_common::{map_sizes, peer::pod_refusal, quota};
use tokio::sync::Notify;

use crate::{
    policy::{
        shares::{ShareCaps, ShareRefusal, ShareTable},
        token_bucket::Rate,
    },
    rules::{
        knobs::{parse_count, parse_rate_knob},
        OrOff,
    },
    sys::lock::lock,
};

/// File descriptors kept out of the connection budget for everything else the agent holds:
/// its own files, every pod's listeners and spare upstream sockets (up to 20 per pod), the
/// pinned maps and programs.
pub const FD_RESERVE: u64 = 2048;

/// Per-pod and node-wide caps (`sockmesh run`), each with its `SOCKMESH_*` fallback.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Fair shares between pods (per-pod caps and node-wide caps)")]
pub struct ShareArgs {
    /// Proxied connections the node holds at once, all pods together, or `auto`: sized from
    /// the open-file limit (raised to its hard limit at start), (soft limit - 2048 -
    /// --max-dns-inflight) / 3: two sockets per connection and room for the splice pipes of
    /// those moving bytes. Past it a new connection is reset at once.
    #[arg(long, env = "SOCKMESH_MAX_CONNS", value_name = "COUNT|auto",
          default_value = "auto", value_parser = count_or_auto)]
    pub max_conns: CountOrAuto,
    /// Proxied connections (waiting or relaying) one pod holds at once, outbound and inbound
    /// each; past it a new connection of that pod is reset at once. Near --max-conns a pod
    /// holding its fair share is refused too, so the last eighth of the node's connections
    /// stays for pods under their share.
    #[arg(long, env = "SOCKMESH_POD_MAX_CONNS", value_name = "COUNT",
          default_value = "1024", value_parser = count)]
    pub pod_max_conns: u32,
    /// Of a pod's connections, how many may wait in peers' queues (--peer-max-conns) at once;
    /// past it a connection that would wait is reset.
    #[arg(long, env = "SOCKMESH_POD_MAX_QUEUED", value_name = "COUNT",
          default_value = "128", value_parser = count)]
    pub pod_max_queued: u32,
    /// DNS queries in flight upstream, all pods together (each holds a socket).
    #[arg(long, env = "SOCKMESH_MAX_DNS_INFLIGHT", value_name = "COUNT",
          default_value = "1024", value_parser = count)]
    pub max_dns_inflight: u32,
    /// DNS queries one pod has in flight upstream; past it (or past its share of
    /// --max-dns-inflight) the pod's DNS listener reads no more until one is answered, and
    /// the kernel drops what overflows its socket buffer.
    #[arg(long, env = "SOCKMESH_POD_DNS_INFLIGHT", value_name = "COUNT",
          default_value = "64", value_parser = count)]
    pub pod_dns_inflight: u32,
    /// DNS queries one pod may send per period (`500/s`, burst: one period's worth), or
    /// `off`; past it the pod's DNS listener reads no more until the next query is due.
    #[arg(long, env = "SOCKMESH_POD_DNS_RATE", value_name = "RATE|off",
          default_value = "500/s", value_parser = rate)]
    pub pod_dns_rate: OrOff<Rate>,
    /// Bind/unbind events (inbound capture) of one pod the agent applies per period (burst:
    /// one period's worth), or `off`; more wait, coalesced by port (only the latest state of
    /// a port is applied), and a pod with more than 1024 ports waiting loses the newest.
    #[arg(long, env = "SOCKMESH_POD_BIND_EVENTS", value_name = "RATE|off",
          default_value = "20/s", value_parser = rate)]
    pub pod_bind_events: OrOff<Rate>,
    /// Redirected connections of one pod whose original destination the kernel keeps at
    /// once (its entries in `SM_ORIG_TUPLE`, from the handshake to the close); past it a new
    /// connection of the pod keeps none and the agent resets it (counted `origin_quota`).
    /// The default times 110 pods fits in the map, so no pod can take another's entries.
    #[arg(long, env = "SOCKMESH_POD_CONN_ORIGINS", value_name = "COUNT",
          default_value_t = quota::defaults::ORIGINS, value_parser = origin_quota)]
    pub pod_conn_origins: u32,
    /// UDP sockets of one pod with a DNS server the kernel remembers at once (its entries in
    /// `SM_DNS_ORIG`, from the first query to the socket's close); past it the pod's
    /// connect()/sendto() to port 53 on a new socket fails with EPERM (counted `dns_quota`).
    #[arg(long, env = "SOCKMESH_POD_DNS_ORIGINS", value_name = "COUNT",
          default_value_t = quota::defaults::DNS, value_parser = dns_quota)]
    pub pod_dns_origins: u32,
    /// Ports of one pod whose wildcard TCP listeners inbound capture records at once (its
    /// entries in `SM_IN_BINDS`, from the bind to the socket's close); past it the pod's
    /// bind() of another port fails with EPERM (counted `bind_quota`). Servers the agent
    /// finds listening when it enrols the pod are captured up to as many again.
    #[arg(long, env = "SOCKMESH_POD_INBOUND_BINDS", value_name = "COUNT",
          default_value_t = quota::defaults::BINDS, value_parser = bind_quota)]
    pub pod_inbound_binds: u32,
    /// Connections of one pod the kernel fast path lets go direct at once (its entries in
    /// `SM_FAST_SOCKS`, from connect() to the close); past it the pod's new connections to
    /// kernel-tier peers take the proxy (policed the same, one hop slower; counted
    /// `fast_quota`). At most `--fast-path-sockets`; by default 2048 (110 pods at it fit in
    /// the default map), or `--fast-path-sockets` if that is smaller.
    #[arg(long, env = "SOCKMESH_POD_DIRECT_CONNS", value_name = "COUNT",
          value_parser = fast_quota)]
    pub pod_direct_conns: Option<u32>,
    /// Direct connections of the kernel fast path the node tracks at once, all pods together
    /// (the size of `SM_FAST_SOCKS`); past it a new connection to a kernel-tier peer takes
    /// the proxy. The default holds as many as the proxy tier can redirect (`SM_ORIG_TUPLE`),
    /// so handing peers to the kernel never lowers what a node holds; it costs 16 bytes a
    /// slot up front (the hash buckets, 4 MiB) and its entries only while used. Fixed when the
    /// map is created: a takeover keeps the running agent's size.
    #[arg(long, env = "SOCKMESH_FAST_PATH_SOCKETS", value_name = "COUNT",
          default_value_t = map_sizes::FAST_SOCKETS, value_parser = fast_sockets)]
    pub fast_path_sockets: u32,
}

/// A quota of at most what the map holds (more would promise entries it cannot give).
fn quota_within(s: &str, map: u32) -> Result<u32, String> {
    let n = parse_count(s, 1).map_err(|e| e.to_string())?;
    if n > map {
        return Err(format!("{n} is more than the map holds ({map})"));
    }
    Ok(n)
}

fn origin_quota(s: &str) -> Result<u32, String> {
    quota_within(s, map_sizes::ORIG_TUPLES)
}

/// At most 2^24 slots: the hash buckets (16 bytes a slot, allocated up front) stay <= 256 MiB.
fn fast_sockets(s: &str) -> Result<u32, String> {
    let n = parse_count(s, 1).map_err(|e| e.to_string())?;
    if n > FAST_SOCKETS_MAX {
        return Err(format!(
            "{n} is more than {FAST_SOCKETS_MAX} (its hash buckets alone would take {} MiB)",
            (u64::from(n).next_power_of_two() * 16) >> 20
        ));
    }
    Ok(n)
}

/// The largest `--fast-path-sockets`.
const FAST_SOCKETS_MAX: u32 = 1 << 24;

fn dns_quota(s: &str) -> Result<u32, String> {
    quota_within(s, map_sizes::DNS_ORIGINS)
}

fn bind_quota(s: &str) -> Result<u32, String> {
    quota_within(s, map_sizes::INBOUND_BINDS)
}

/// Checked against `--fast-path-sockets` once both are known ([`ShareArgs::check`]).
fn fast_quota(s: &str) -> Result<u32, String> {
    quota_within(s, FAST_SOCKETS_MAX)
}

fn count(s: &str) -> Result<u32, String> {
    parse_count(s, 1).map_err(|e| e.to_string())
}

/// A count, or `auto` (`None`): sized by the agent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CountOrAuto(pub Option<u32>);

fn count_or_auto(s: &str) -> Result<CountOrAuto, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(CountOrAuto(None));
    }
    parse_count(s, 1)
        .map(|n| CountOrAuto(Some(n)))
        .map_err(|e| format!("{e}; or auto"))
}

fn rate(s: &str) -> Result<OrOff<Rate>, String> {
    parse_rate_knob(s).map(OrOff).map_err(|e| e.to_string())
}

/// The caps as they apply, `auto` resolved.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    pub conns: ShareCaps,
    pub pod_max_queued: usize,
    pub dns: ShareCaps,
    pub pod_dns_rate: Option<Rate>,
    pub pod_bind_events: Option<Rate>,
}

impl ShareArgs {
    /// What no single flag's parser can see: a per-pod quota larger than the map it counts
    /// in would promise entries the map cannot give.
    pub fn check(&self) -> anyhow::Result<()> {
        match self.pod_direct_conns {
            Some(n) if n > self.fast_path_sockets => anyhow::bail!(
                "--pod-direct-conns {n} is more than --fast-path-sockets {} holds: lower the \
                 first or raise the second",
                self.fast_path_sockets
            ),
            _ => Ok(()),
        }
    }

    /// Each pod's quota of direct sockets (`--pod-direct-conns` or its default).
    pub fn direct_conns(&self) -> u32 {
        self.pod_direct_conns
            .unwrap_or(quota::defaults::FAST.min(self.fast_path_sockets))
    }

    /// The caps for an agent whose soft open-file limit is `nofile`.
    pub fn config(&self, nofile: u64) -> ShareConfig {
        let dns = u64::from(self.max_dns_inflight);
        let auto = nofile.saturating_sub(FD_RESERVE + dns) / 3;
        let global = self.max_conns.0.map_or(auto, u64::from).max(1);
        ShareConfig {
            conns: ShareCaps {
                per_pod: self.pod_max_conns as usize,
                global: usize::try_from(global).unwrap_or(usize::MAX),
            },
            pod_max_queued: self.pod_max_queued as usize,
            dns: ShareCaps {
                per_pod: self.pod_dns_inflight as usize,
                global: self.max_dns_inflight as usize,
            },
            pod_dns_rate: self.pod_dns_rate.0,
            pod_bind_events: self.pod_bind_events.0,
        }
    }
}

/// The [`pod_refusal`] counter of a connection refusal.
pub fn conn_refusal(r: ShareRefusal) -> usize {
    match r {
        ShareRefusal::PodCap => pod_refusal::CONN_POD_CAP,
        ShareRefusal::GlobalCap => pod_refusal::CONN_NODE_CAP,
        ShareRefusal::GlobalShare => pod_refusal::CONN_NODE_SHARE,
    }
}

/// The node's share tables, shared by every proxy task.
pub struct Shares {
    pub config: ShareConfig,
    conns: Mutex<ShareTable>,
    queued: Mutex<ShareTable>,
    dns: Mutex<ShareTable>,
    /// A connection slot or DNS slot was given back: wakes accept loops backing off for
    /// lack of fds, and DNS listeners waiting for a slot.
    freed: Notify,
}

/// Which table a slot came from.
#[derive(Copy, Clone, Debug)]
enum Kind {
    Conn,
    Queued,
    Dns,
}

/// One slot of one pod; given back on drop.
pub struct Slot {
    shares: Arc<Shares>,
    kind: Kind,
    pod: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(self.shares.table(self.kind)).give(self.pod);
        if !matches!(self.kind, Kind::Queued) {
            self.shares.freed.notify_waiters();
        }
    }
}

impl Shares {
    pub fn new(config: ShareConfig) -> Arc<Self> {
        let queued = ShareCaps {
            per_pod: config.pod_max_queued,
            global: usize::MAX,
        };
        Arc::new(Shares {
            config,
            conns: Mutex::new(ShareTable::new(config.conns)),
            queued: Mutex::new(ShareTable::new(queued)),
            dns: Mutex::new(ShareTable::new(config.dns)),
            freed: Notify::new(),
        })
    }

    fn table(&self, kind: Kind) -> &Mutex<ShareTable> {
        match kind {
            Kind::Conn => &self.conns,
            Kind::Queued => &self.queued,
            Kind::Dns => &self.dns,
        }
    }

    fn take(self: &Arc<Self>, kind: Kind, pod: u64) -> Result<Slot, ShareRefusal> {
        lock(self.table(kind)).try_take(pod)?;
        Ok(Slot {
            shares: self.clone(),
            kind,
            pod,
        })
    }

    /// A proxied connection's slot for the pod with netns cookie `pod`, in its share of
    /// `inbound` or outbound connections: the two are capped apart, so clients flooding a
    /// pod's service cannot take the connections the pod itself makes.
    pub fn conn(self: &Arc<Self>, pod: u64, inbound: bool) -> Result<Slot, ShareRefusal> {
        self.take(Kind::Conn, pod << 1 | u64::from(inbound))
    }

    /// A slot in a peer's queue; held while the connection waits.
    pub fn queued(self: &Arc<Self>, pod: u64) -> Option<Slot> {
        self.take(Kind::Queued, pod).ok()
    }

    /// A DNS query's slot.
    pub fn dns(self: &Arc<Self>, pod: u64) -> Result<Slot, ShareRefusal> {
        self.take(Kind::Dns, pod)
    }

    /// Enrolled pods: each one's fair share of the node's caps is 1/pods of them (of the
    /// connections, per direction).
    pub fn set_pods(&self, pods: usize) {
        lock(&self.conns).set_pods(2 * pods);
        lock(&self.dns).set_pods(pods);
    }

    /// Resolves once a connection or DNS slot is given back (register before checking, so
    /// none is missed: `let f = shares.freed(); ...; f.await`).
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// Connections held now, node-wide (for the status event).
    pub fn conns_held(&self) -> usize {
        lock(&self.conns).total()
    }

    /// DNS queries in flight now, node-wide.
    pub fn dns_held(&self) -> usize {
        lock(&self.dns).total()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        shares: ShareArgs,
    }

    fn parse(args: &[&str]) -> Result<ShareArgs, String> {
        let argv = std::iter::once("x").chain(args.iter().copied());
        Cli::try_parse_from(argv)
            .map(|c| c.shares)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_fit_a_node_of_110_pods_under_this_machines_fd_limit() {
        let c = parse(&[]).expect("defaults").config(20_000);
        // (20000 - 2048 - 1024) / 3
        assert_eq!(c.conns.global, 5642);
        assert_eq!(c.conns.per_pod, 1024);
        // Every one of 110 pods keeps a fair share of connections and DNS slots.
        assert!(c.conns.fair_share(110) >= 50, "{}", c.conns.fair_share(110));
        assert!(c.dns.fair_share(110) >= 9);
        // Two sockets per connection plus the DNS sockets stay under the limit.
        assert!(2 * c.conns.global as u64 + c.dns.global as u64 + FD_RESERVE < 20_000);
        assert_eq!(c.pod_dns_rate.map(|r| r.tokens()), Some(500));
        let big = parse(&[]).expect("defaults").config(1 << 20);
        assert_eq!(big.conns.global, ((1u64 << 20) - 2048 - 1024) as usize / 3);
    }

    #[test]
    fn caps_take_numbers_auto_and_off() {
        let c = parse(&[
            "--max-conns",
            "300",
            "--pod-max-conns",
            "10",
            "--pod-dns-rate",
            "off",
            "--pod-bind-events",
            "5/s",
        ])
        .expect("parses")
        .config(20_000);
        assert_eq!((c.conns.global, c.conns.per_pod), (300, 10));
        assert_eq!(c.pod_dns_rate, None);
        assert_eq!(c.pod_bind_events.map(|r| r.tokens()), Some(5));
        for bad in [
            &["--max-conns", "0"][..],
            &["--pod-max-conns", "many"],
            &["--pod-dns-rate", "fast"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        // A tiny limit still leaves one connection rather than none.
        assert_eq!(parse(&[]).expect("defaults").config(10).conns.global, 1);
    }

    #[tokio::test]
    async fn slots_are_given_back_on_drop_and_wake_waiters() {
        let s = Shares::new(parse(&["--pod-max-conns", "1"]).expect("p").config(20_000));
        let a = s.conn(1, false).expect("first");
        assert_eq!(s.conn(1, false).err(), Some(ShareRefusal::PodCap));
        let inbound = s.conn(1, true).expect("inbound has a cap of its own");
        let freed = s.freed();
        drop(a);
        freed.await;
        let _b = s.conn(1, false).expect("given back");
        assert_eq!(s.conns_held(), 2);
        drop(inbound);
    }
}
