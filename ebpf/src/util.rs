//! Small helpers shared by the programs: who is enrolled, counters, and the context-only BPF
//! helpers wrapped once (their one `unsafe` each is argued here).
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    EbpfContext,
};
use sockmesh_common::{
    counter,
    peer::{peer_counter, PeerKernelStats, PeerKey},
    GlobalConfig, PodConfig, SockAddr, SCHEMA_VERSION,
};

/// `BPF_NOEXIST` map-update flag: create only.
pub const BPF_NOEXIST: u64 = 1;

use crate::{
    addr::Sock,
    maps::{CONFIG, PEER_STATS, PODS, POD_STATS},
};

pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const DNS_PORT_BE: u16 = 53u16.to_be();

/// The network-namespace cookie of the running program's socket: the pod key of `SM_PODS`.
#[inline(always)]
pub fn netns_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: `ctx.as_ptr()` is the context pointer the kernel passed to the running program,
    // the helper's only argument; every program type calling this (sock_addr, sockopt,
    // sock_ops, sock) may call the helper, and the verifier refuses to load one that may not.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// The socket cookie of the running program's socket: the key of `SM_SOCKETS`.
#[inline(always)]
pub fn socket_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: as in `netns_cookie`: the kernel's own context pointer, for program types
    // (sock_addr, sock_ops, sock) the verifier lets call this helper.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// CLOCK_MONOTONIC in ns, the clock of the agent's heartbeat and verdict deadlines.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no arguments, no preconditions; allowed in every program type.
    unsafe { bpf_ktime_get_ns() }
}

/// The enrolled pod a socket belongs to, if the agent is configured for this schema and the
/// socket is not the agent's own.
#[inline(always)]
pub fn pod_for<C: EbpfContext>(
    ctx: &C,
    sk: Sock,
) -> Option<(u64, &'static GlobalConfig, &'static PodConfig)> {
    let cfg = CONFIG.get(0)?;
    if cfg.schema_version != SCHEMA_VERSION {
        return None;
    }
    if !sk.is_null() && sk.mark() == cfg.agent_mark {
        return None;
    }
    let netns = netns_cookie(ctx);
    // SAFETY: the value stays mapped while the program runs (map memory lives as long as the
    // map, and a program using a map holds it), and `PodConfig` is plain integers, valid for
    // any bytes. Only the agent writes or deletes entries (enrol, unenrol). A preallocated
    // map reuses a replaced or deleted element at once (the hazard `HashMap::get` warns of),
    // so a hook racing the agent may act once on old, half-updated or another pod's settings;
    // it never reads outside the map's memory.
    let pod = unsafe { PODS.get(&netns) }?;
    Some((netns, cfg, pod))
}

#[inline(always)]
pub fn count(netns: u64, idx: usize) {
    if idx >= counter::COUNT {
        return;
    }
    if let Some(stats) = POD_STATS.get_ptr_mut(&netns) {
        // SAFETY: `stats` points at this CPU's copy of a live entry (map memory stays mapped
        // while the program runs) and `idx` is in bounds (checked above). Per-CPU: other CPUs
        // write their own copies; on this CPU the add can only lose a count if a run preempted
        // or interrupted mid-add is resumed after another one, which a counter tolerates.
        unsafe { (*stats).counters[idx] += 1 };
    }
}

/// Adds one to a per-peer counter, creating the peer's entry on first use.
#[inline(always)]
pub fn count_peer(netns: u64, direction: u16, peer: &SockAddr, idx: usize) {
    if idx >= peer_counter::COUNT {
        return;
    }
    let key = PeerKey {
        netns_cookie: netns,
        peer: *peer,
        direction,
        _pad: 0,
    };
    if let Some(stats) = PEER_STATS.get_ptr_mut(&key) {
        // SAFETY: as in `count`: this CPU's copy of a live per-CPU entry, `idx` checked above.
        // An LRU entry evicted and reused meanwhile makes this count land on another peer.
        unsafe { (*stats).counters[idx] += 1 };
        return;
    }
    let mut fresh = PeerKernelStats::default();
    fresh.counters[idx] = 1;
    // NOEXIST: another CPU may have created the entry meanwhile; then add to ours in it. A new
    // per-CPU entry starts at zero on every other CPU.
    if PEER_STATS.insert(&key, &fresh, BPF_NOEXIST).is_err() {
        match PEER_STATS.get_ptr_mut(&key) {
            // SAFETY: as above: this CPU's copy of a live entry, `idx` checked above.
            Some(stats) => unsafe { (*stats).counters[idx] += 1 },
            None => count(netns, counter::MAP_FULL),
        }
    }
}
