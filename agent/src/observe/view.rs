//! One snapshot of the pinned maps, and the rows every reader shows: `sockmesh stats|peers|pods`
//! (tables and JSON) and `/metrics` are all rendered from these, so they cannot disagree.
use std::{collections::HashMap, path::Path};

use anyhow::Result;
use serde::Serialize;
use sockmesh_common::{
    counter,
    fast::tier,
    peer::{
        agent_counter, breaker_state, direction, peer_counter, peer_error, pod_refusal, read_name,
        throttle_reason, tier_reason, timeout_kind, PeerNames,
    },
};

use crate::{
    datapath::stats::{self, PeerRecord, PodCounters},
    sys::clock::monotonic_ns,
};

/// Everything the readers show, read in one go.
pub struct Snapshot {
    pub pods: Vec<PodCounters>,
    pub peers: Vec<PeerRecord>,
    pub agent: [u64; agent_counter::COUNT],
    /// CLOCK_MONOTONIC when read: decides whether an "open" breaker has reached half-open.
    pub monotonic_ns: u64,
}

impl Snapshot {
    /// Reads the maps pinned in `dir`; refuses a schema version this binary does not know.
    pub fn read(dir: &Path) -> Result<Snapshot> {
        stats::check_schema(dir)?;
        Ok(Snapshot {
            pods: stats::read_pod_counters(dir)?,
            peers: stats::read_peers(dir)?,
            agent: stats::read_agent_counters(dir)?,
            monotonic_ns: monotonic_ns(),
        })
    }

    /// Pod display names by netns cookie: the name the agent wrote, else the cookie.
    pub fn pod_names(&self) -> HashMap<u64, String> {
        self.pods
            .iter()
            .map(|p| (p.netns_cookie, pod_name(p)))
            .collect()
    }
}

pub fn pod_name(p: &PodCounters) -> String {
    p.meta
        .map(|m| m.name())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| p.netns_cookie.to_string())
}

/// Named counters, in a fixed order (JSON objects and metric labels).
pub type Named = Vec<(&'static str, u64)>;

fn named(names: &[&'static str], values: &[u64]) -> Named {
    names.iter().copied().zip(values.iter().copied()).collect()
}

/// One peer of one pod, as `sockmesh peers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerRow {
    pub pod: String,
    pub netns_cookie: u64,
    pub direction: &'static str,
    /// `ip:port`, or `(N peers)` for a row summing several (`--by`).
    pub peer: String,
    /// How many (pod, direction, peer) entries the row sums: 1 unless grouped.
    pub peers: u64,
    /// The Service the connection is addressed to (`NAME.NAMESPACE`), and the peer's
    /// workload and namespace, as the agent resolved them (null: not known).
    pub service: Option<String>,
    pub workload: Option<String>,
    pub namespace: Option<String>,
    /// The pod's own workload and namespace.
    pub pod_workload: Option<String>,
    pub pod_namespace: Option<String>,
    pub conns_active: u64,
    pub conns_total: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    #[serde(serialize_with = "as_object")]
    pub timeouts: Named,
    #[serde(serialize_with = "as_object")]
    pub throttled: Named,
    pub connect_failures: u64,
    pub resets: u64,
    pub dns_queries: u64,
    /// Kernel: connect()s redirected to the proxy, and refused at once while the breaker was open.
    pub redirects: u64,
    pub fast_rejects: u64,
    /// Kernel: DNS connect()s and sendto()s to this server redirected to the DNS listener.
    pub dns_redirects: u64,
    pub breaker: &'static str,
    pub adaptive_reject_ratio: f64,
    pub connect_p50_us: u32,
    pub connect_p99_us: u32,
    pub last_error: &'static str,
    pub last_error_unix_ms: u64,
    /// `proxy` or `kernel` (outbound peers the agent handed to the kernel fast path), and why.
    pub tier: &'static str,
    pub tier_reason: &'static str,
    /// Kernel tier: connect()s policed in the kernel and let go direct.
    pub direct: u64,
}

fn as_object<S: serde::Serializer>(v: &Named, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(v.len()))?;
    for (k, n) in v {
        m.serialize_entry(k, n)?;
    }
    m.end()
}

impl PeerRow {
    pub fn timeouts_total(&self) -> u64 {
        self.timeouts.iter().map(|(_, n)| n).sum()
    }
    pub fn throttled_total(&self) -> u64 {
        self.throttled.iter().map(|(_, n)| n).sum()
    }
    pub fn bytes(&self) -> u64 {
        self.bytes_in.saturating_add(self.bytes_out)
    }
}

/// The breaker as a reader sees it now: an open breaker whose time is up is half-open.
pub fn breaker_now(state: u8, open_until_ns: u64, now_ns: u64) -> &'static str {
    if state == breaker_state::OPEN && now_ns >= open_until_ns {
        breaker_state::name(breaker_state::HALF_OPEN)
    } else {
        breaker_state::name(state)
    }
}

pub fn peer_rows(snap: &Snapshot) -> Vec<PeerRow> {
    let names = snap.pod_names();
    snap.peers
        .iter()
        .map(|r| {
            // The proxy's figures and the kernel tier's, in the same fields: a peer's
            // connections are counted wherever they went.
            let s = with_kernel_tier(&r.state, &r.kernel);
            let (on_kernel, why) = live_tier(&s, r.key.direction, r.live);
            let peer = r
                .key
                .peer
                .to_std()
                .map_or_else(|| "?".to_string(), |a| a.to_string());
            let name = |f: fn(&PeerNames) -> &[u8]| {
                r.names
                    .as_ref()
                    .map(|n| read_name(f(n)))
                    .filter(|s| !s.is_empty())
            };
            PeerRow {
                pod: names
                    .get(&r.key.netns_cookie)
                    .cloned()
                    .unwrap_or_else(|| r.key.netns_cookie.to_string()),
                netns_cookie: r.key.netns_cookie,
                direction: direction::name(r.key.direction),
                peer,
                peers: 1,
                service: name(|n| &n.service),
                workload: name(|n| &n.workload),
                namespace: name(|n| &n.namespace),
                pod_workload: name(|n| &n.pod_workload),
                pod_namespace: name(|n| &n.pod_namespace),
                conns_active: s.conns_active,
                conns_total: s.conns_total,
                bytes_out: s.bytes_out,
                bytes_in: s.bytes_in,
                timeouts: named(&timeout_kind::NAMES, &s.timeouts),
                throttled: named(&throttle_reason::NAMES, &s.throttled),
                connect_failures: s.connect_failures,
                resets: s.resets,
                dns_queries: s.dns_queries,
                redirects: r.kernel[peer_counter::REDIRECT],
                fast_rejects: r.kernel[peer_counter::FAST_REJECT],
                dns_redirects: r.kernel[peer_counter::REDIRECT_DNS],
                breaker: breaker_now(s.breaker, s.breaker_open_until_ns, snap.monotonic_ns),
                adaptive_reject_ratio: s.adaptive_reject_ppm as f64 / 1e6,
                connect_p50_us: s.connect_p50_us,
                connect_p99_us: s.connect_p99_us,
                last_error: peer_error::name(s.last_error),
                last_error_unix_ms: s.last_error_unix_ms,
                tier: if on_kernel { "kernel" } else { "proxy" },
                tier_reason: tier_reason::name(why),
                direct: r.kernel[peer_counter::DIRECT],
            }
        })
        .collect()
}

/// The tier a peer is on now, (on the kernel tier, why): for an outbound peer its
/// `SM_VERDICTS` entry decides (`live`: its tier, and whether the kernel opened the breaker),
/// since the agent's last decision can be stale: the entry evicted from the LRU, or the peer
/// handed back by the kernel's breaker before the agent took note.
pub fn live_tier(
    state: &sockmesh_common::peer::PeerState,
    dir: u16,
    live: Option<(u32, bool)>,
) -> (bool, u8) {
    let agent_kernel = u32::from(state.tier) == tier::KERNEL;
    if dir != direction::OUTBOUND {
        return (agent_kernel, state.tier_reason);
    }
    match live {
        Some((t, _)) if t == tier::KERNEL => (true, tier_reason::KERNEL),
        Some((_, true)) => (false, tier_reason::BREAKER_OPENED),
        _ if agent_kernel => (false, tier_reason::ENTRY_GONE),
        _ => (false, state.tier_reason),
    }
}

/// The agent's figures of a peer plus what the kernel tier counted for its direct
/// connections (`peer_counter`), field by field.
pub fn with_kernel_tier(
    state: &sockmesh_common::peer::PeerState,
    k: &[u64; peer_counter::COUNT],
) -> sockmesh_common::peer::PeerState {
    let mut s = *state;
    let live = k[peer_counter::CONNS].saturating_sub(k[peer_counter::CLOSED]);
    s.conns_active = s.conns_active.wrapping_add(live);
    s.conns_total = s.conns_total.wrapping_add(k[peer_counter::CONNS]);
    // The direct connections' bytes: the kernel's totals of the ended ones, or the agent's
    // last look at them with the open ones, whichever is larger (both only grow).
    s.bytes_out = s
        .bytes_out
        .wrapping_add(k[peer_counter::BYTES_OUT].max(state.direct_bytes_out_floor));
    s.bytes_in = s
        .bytes_in
        .wrapping_add(k[peer_counter::BYTES_IN].max(state.direct_bytes_in_floor));
    s.timeouts[timeout_kind::CONNECT] =
        s.timeouts[timeout_kind::CONNECT].wrapping_add(k[peer_counter::CONNECT_TIMEOUTS]);
    s.throttled[throttle_reason::RATE] =
        s.throttled[throttle_reason::RATE].wrapping_add(k[peer_counter::THROTTLED_RATE]);
    s.throttled[throttle_reason::CONCURRENCY] = s.throttled[throttle_reason::CONCURRENCY]
        .wrapping_add(k[peer_counter::THROTTLED_CONCURRENCY]);
    s.throttled[throttle_reason::ADAPTIVE] =
        s.throttled[throttle_reason::ADAPTIVE].wrapping_add(k[peer_counter::THROTTLED_ADAPTIVE]);
    s.throttled[throttle_reason::BREAKER] =
        s.throttled[throttle_reason::BREAKER].wrapping_add(k[peer_counter::THROTTLED_BREAKER]);
    s.connect_failures = s
        .connect_failures
        .wrapping_add(k[peer_counter::CONNECT_FAILURES]);
    s
}

/// One pod, as `sockmesh pods` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodRow {
    pub pod: String,
    pub netns_cookie: u64,
    pub enrolled: bool,
    pub enrolled_unix_ms: u64,
    pub removed_unix_ms: u64,
    pub peers: u64,
    pub conns_active: u64,
    pub conns_total: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub timeouts: u64,
    pub throttled: u64,
    pub connect_failures: u64,
    pub breakers_open: u64,
    #[serde(serialize_with = "as_object")]
    pub counters: Named,
    /// What the agent's per-pod caps and shares, and the kernel's quotas, refused or held
    /// back, by kind.
    #[serde(serialize_with = "as_object")]
    pub refused: Named,
}

impl PodRow {
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().map(|(_, n)| n).sum()
    }
}

/// Every kind of refusal a pod row shows: the agent's (`SM_POD_REFUSED`), then the kernel's
/// quotas (counted in `SM_POD_STATS`).
pub fn refusal_names() -> Vec<&'static str> {
    let kernel = counter::REFUSALS.iter().map(|&i| counter::NAMES[i]);
    pod_refusal::NAMES.iter().copied().chain(kernel).collect()
}

/// A pod's refusals, in the order of [`refusal_names`].
fn refused(agent: &[u64], kernel: &[u64]) -> Named {
    let mut out = named(&pod_refusal::NAMES, agent);
    for &i in &counter::REFUSALS {
        out.push((counter::NAMES[i], kernel.get(i).copied().unwrap_or(0)));
    }
    out
}

pub fn pod_rows(snap: &Snapshot, peers: &[PeerRow]) -> Vec<PodRow> {
    snap.pods
        .iter()
        .map(|p| {
            let mine = peers.iter().filter(|r| r.netns_cookie == p.netns_cookie);
            let mut row = PodRow {
                pod: pod_name(p),
                netns_cookie: p.netns_cookie,
                enrolled: p.enrolled,
                enrolled_unix_ms: p.meta.map_or(0, |m| m.enrolled_unix_ms),
                removed_unix_ms: p.meta.map_or(0, |m| m.removed_unix_ms),
                peers: 0,
                conns_active: 0,
                conns_total: 0,
                bytes_out: 0,
                bytes_in: 0,
                timeouts: 0,
                throttled: 0,
                connect_failures: 0,
                breakers_open: 0,
                counters: named(&counter::NAMES, &p.counters),
                refused: refused(&p.refused, &p.counters),
            };
            for r in mine {
                row.peers += 1;
                row.conns_active += r.conns_active;
                row.conns_total += r.conns_total;
                row.bytes_out += r.bytes_out;
                row.bytes_in += r.bytes_in;
                row.timeouts += r.timeouts_total();
                row.throttled += r.throttled_total();
                row.connect_failures += r.connect_failures;
                row.breakers_open += u64::from(r.breaker == "open");
            }
            row
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_breaker_past_its_deadline_reads_half_open() {
        assert_eq!(breaker_now(breaker_state::OPEN, 100, 99), "open");
        assert_eq!(breaker_now(breaker_state::OPEN, 100, 100), "half_open");
        assert_eq!(breaker_now(breaker_state::CLOSED, 0, 5), "closed");
        assert_eq!(breaker_now(breaker_state::NONE, 0, 5), "none");
    }

    /// An outbound peer's tier is its live entry's; the agent's word counts only without one
    /// (then an entry it handed over and the kernel no longer has is `entry_gone`).
    #[test]
    fn the_live_entry_decides_an_outbound_peers_tier() {
        use sockmesh_common::peer::PeerState;
        let on = |tier: u32, reason: u8| PeerState {
            tier: tier as u8,
            tier_reason: reason,
            ..Default::default()
        };
        let kernel = on(tier::KERNEL, tier_reason::KERNEL);
        let proxy = on(tier::PROXY, tier_reason::QUEUE);
        let out = direction::OUTBOUND;
        assert_eq!(
            live_tier(&kernel, out, Some((tier::KERNEL, false))),
            (true, tier_reason::KERNEL)
        );
        assert_eq!(
            live_tier(&kernel, out, None),
            (false, tier_reason::ENTRY_GONE)
        );
        assert_eq!(
            live_tier(&kernel, out, Some((tier::PROXY, true))),
            (false, tier_reason::BREAKER_OPENED)
        );
        // A fast-reject verdict of the proxy tier: still the agent's reason.
        assert_eq!(
            live_tier(&proxy, out, Some((tier::PROXY, false))),
            (false, tier_reason::QUEUE)
        );
        assert_eq!(live_tier(&proxy, out, None), (false, tier_reason::QUEUE));
        // Inbound peers have no entry: the agent's word.
        let inbound = on(tier::PROXY, tier_reason::INBOUND);
        assert_eq!(
            live_tier(&inbound, direction::INBOUND, None),
            (false, tier_reason::INBOUND)
        );
    }
}
