//! Fast-reject verdicts: `SM_VERDICTS`, the one place the agent tells `connect4/6` to refuse
//! a pod's connections to a peer at once, without a proxy round trip. The agent writes one
//! when a peer's breaker opens or its connection-rate bucket runs dry; the verdict carries
//! its own expiry (CLOCK_MONOTONIC ns), so the kernel lifts it by itself even if the agent
//! is gone, and the agent lifts it early on a reload or when the pod leaves.
//!
//! The same map holds the kernel tier's entries (`sockmesh_common::fast`): a peer handed over
//! to the kernel, which polices its connect()s and lets them go direct. The agent writes such
//! an entry once and afterwards only deletes it: the kernel changes its counters in place, and
//! a rewrite from here would lose them.
use std::{net::SocketAddr, sync::Mutex, time::Duration};

use aya::maps::{HashMap, MapData};
use sockmesh_common::{
    fast::{tier, Verdict, VerdictKey, LATENCY_RING},
    socket_kind, SockAddr, SocketEntry,
};
use tracing::warn;

use crate::sys::lock::lock;

/// What [`Verdicts::scan`] found.
#[derive(Default)]
pub struct Scan {
    pub idle_timeouts: std::collections::HashMap<(u64, SocketAddr), Duration>,
    pub latencies: Vec<(u64, SocketAddr, Vec<u32>)>,
    /// Every (pod, peer) on the kernel tier now.
    pub kernel_peers: Vec<(u64, SocketAddr)>,
}

pub struct Verdicts {
    map: Mutex<HashMap<MapData, VerdictKey, Verdict>>,
    /// Per kernel-tier entry, (its epoch, its `latency_seq`) when last read.
    latency_seen: Mutex<std::collections::HashMap<VerdictKey, (u64, u64)>>,
    /// `SM_FAST_SOCKS`, read only: which sockets connect() let go direct.
    sockets: HashMap<MapData, u64, SocketEntry>,
}

impl Verdicts {
    pub fn new(
        map: HashMap<MapData, VerdictKey, Verdict>,
        sockets: HashMap<MapData, u64, SocketEntry>,
    ) -> Verdicts {
        Verdicts {
            map: Mutex::new(map),
            latency_seen: Mutex::default(),
            sockets,
        }
    }

    /// Whether the socket with this cookie is a pod's connection the kernel tier let go
    /// direct (never one of the agent's own, which the programs do not capture).
    pub fn is_direct(&self, cookie: u64) -> bool {
        self.sockets
            .get(&cookie, 0)
            .is_ok_and(|e| e.kind == socket_kind::FAST)
    }

    /// The peer a direct socket was connect()ed to (a Service's address when the kernel
    /// picked one of its endpoints, which is then the socket's remote address).
    pub fn direct_peer(&self, cookie: u64) -> Option<SocketAddr> {
        self.sockets
            .get(&cookie, 0)
            .ok()
            .filter(|e| e.kind == socket_kind::FAST)
            .and_then(|e| e.origin.to_std())
    }

    /// Refuse the pod's connect() to `peer` in the kernel until `until_ns` (CLOCK_MONOTONIC),
    /// counting each refusal as throttled for `why` (`fast::refusal`).
    pub fn refuse(&self, netns_cookie: u64, peer: SocketAddr, until_ns: u64, why: u32) {
        let v = Verdict {
            until_ns,
            refusal: why,
            ..Default::default()
        };
        if let Err(e) = lock(&self.map).insert(key(netns_cookie, peer), v, 0) {
            warn!(netns_cookie, %peer, error = %e, "could not write the fast-reject verdict");
        }
    }

    /// Hands `peer` of the pod over to the kernel tier with `entry`; false if the kernel
    /// would not take it.
    pub fn promote(&self, netns_cookie: u64, peer: SocketAddr, entry: &Verdict) -> bool {
        match lock(&self.map).insert(key(netns_cookie, peer), entry, 0) {
            Ok(()) => true,
            Err(e) => {
                warn!(netns_cookie, %peer, error = %e, "could not hand the peer to the kernel tier");
                false
            }
        }
    }

    /// Takes every peer off the kernel tier (a reload, a restart, fail-open): their next
    /// connect()s go to the proxy again, which decides anew. Returns how many.
    pub fn demote_all(&self) -> usize {
        let mut m = lock(&self.map);
        let keys: Vec<VerdictKey> = m
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, v)| v.tier == tier::KERNEL || v.breaker_opened != 0)
            .map(|(k, _)| k)
            .collect();
        for k in &keys {
            let _ = m.remove(k);
        }
        keys.len()
    }

    /// Breakers the kernel opened (its direct connects to a peer failed `breaker_failures`
    /// times in a row), each with its pod, peer and deadline; the entries are deleted, the
    /// caller's policy table takes over the open breaker (and writes its own verdict).
    pub fn take_kernel_opened(&self) -> Vec<(u64, SocketAddr, u64)> {
        let mut m = lock(&self.map);
        let opened: Vec<(VerdictKey, u64)> = m
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, v)| v.breaker_opened != 0)
            .map(|(k, v)| (k, v.until_ns))
            .collect();
        let mut out = Vec::with_capacity(opened.len());
        for (k, until) in opened {
            let _ = m.remove(&k);
            if let Some(peer) = k.peer.to_std() {
                out.push((k.netns_cookie, peer, until));
            }
        }
        out
    }

    /// One pass over the kernel tier's entries (the agent's once-a-second look):
    /// - `idle_timeouts`: peers with an idle timeout, (pod, peer) -> the timeout;
    /// - `latencies`: connect latencies (µs) of direct connections recorded since the last
    ///   scan, by (pod, peer): the new slots of each entry's ring (at most `LATENCY_RING`; a
    ///   peer with more handshakes between two scans is sampled, the latest kept). An entry
    ///   written anew (another epoch) starts its ring again.
    pub fn scan(&self) -> Scan {
        let mut scan = Scan::default();
        let mut seen = lock(&self.latency_seen);
        let mut kept = std::collections::HashMap::with_capacity(seen.len());
        for (k, v) in lock(&self.map).iter().filter_map(|r| r.ok()) {
            let Some(peer) = k.peer.to_std().filter(|_| v.tier == tier::KERNEL) else {
                continue;
            };
            scan.kernel_peers.push((k.netns_cookie, peer));
            if v.idle_timeout_ms != 0 {
                scan.idle_timeouts.insert(
                    (k.netns_cookie, peer),
                    Duration::from_millis(v.idle_timeout_ms),
                );
            }
            let (epoch, seq) = (v.epoch_ns, v.latency_seq);
            let from = match seen.get(&k) {
                Some(&(e, s)) if e == epoch && s <= seq => s,
                _ => 0,
            };
            kept.insert(k, (epoch, seq));
            let new = new_slots(from, seq);
            if !new.is_empty() {
                let samples = new
                    .map(|i| v.latency_us[(i % LATENCY_RING as u64) as usize])
                    .collect();
                scan.latencies.push((k.netns_cookie, peer, samples));
            }
        }
        // Entries gone (demoted, evicted, their pod left) are forgotten.
        *seen = kept;
        scan
    }

    /// Lift a verdict written by `refuse` before it expires (a policy reload).
    pub fn lift(&self, netns_cookie: u64, peer: SocketAddr) {
        // Already gone (expired and removed by the kernel, or evicted) is fine.
        let _ = lock(&self.map).remove(&key(netns_cookie, peer));
    }

    /// Whether the pod's `peer` is on the kernel tier now.
    pub fn is_kernel(&self, netns_cookie: u64, peer: SocketAddr) -> bool {
        lock(&self.map)
            .get(&key(netns_cookie, peer), 0)
            .is_ok_and(|v| v.tier == tier::KERNEL)
    }

    /// A pod left: lift every verdict of its namespace.
    pub fn forget_pod(&self, netns_cookie: u64) {
        let mut m = lock(&self.map);
        let keys: Vec<VerdictKey> = m
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.netns_cookie == netns_cookie)
            .collect();
        for k in keys {
            let _ = m.remove(&k);
        }
    }
}

/// The ring slots (by sequence number) written after `from` up to `seq`: the latest
/// `LATENCY_RING` at most, since older ones are overwritten.
fn new_slots(from: u64, seq: u64) -> std::ops::Range<u64> {
    seq.saturating_sub(LATENCY_RING as u64).max(from)..seq
}

fn key(netns_cookie: u64, peer: SocketAddr) -> VerdictKey {
    VerdictKey {
        netns_cookie,
        peer: SockAddr::from_std(peer),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::new_slots;

    /// The ring's new slots: all since the last read, but never more than the ring holds.
    #[test]
    fn new_slots_are_the_latest_the_ring_still_holds() {
        assert_eq!(new_slots(0, 3), 0..3);
        assert_eq!(new_slots(3, 3), 3..3, "nothing new");
        assert_eq!(new_slots(3, 10), 3..10);
        // 40 handshakes since the last read: only the last 16 are still in the ring.
        assert_eq!(new_slots(10, 50), 34..50);
        assert_eq!(new_slots(0, 16), 0..16);
    }
}
