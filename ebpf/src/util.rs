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

use crate::maps::{AGENT_SOCKETS, CONFIG, PEER_STATS, PODS, POD_STATS};

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

/// The socket cookie of the running program's socket: the key of `SM_AGENT_SOCKS` and
/// `SM_FOUND_BINDS`.
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
/// socket is not the agent's own ([`is_agent_socket`]). For sock_addr programs (connect,
/// sendmsg, bind, getpeername, recvmsg), which run in the calling process's context.
#[inline(always)]
pub fn pod_for<C: EbpfContext>(
    ctx: &C,
) -> Option<(u64, &'static GlobalConfig, &'static PodConfig)> {
    let cfg = CONFIG.get(0)?;
    if cfg.schema_version != SCHEMA_VERSION {
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
    // Only sockets of enrolled pods pay for this second lookup; host sockets stop above.
    if is_agent_socket(socket_cookie(ctx)) {
        return None;
    }
    Some((netns, cfg, pod))
}

/// Whether the agent registered this socket as its own (`SM_AGENT_SOCKS`): its upstream
/// connections, DNS queries and listeners, which must never be captured (no loops).
///
/// Why a registered socket cookie and not the SO_MARK the programs used to trust: since Linux
/// 5.17 CAP_NET_RAW is enough to set any SO_MARK, container runtimes grant NET_RAW by
/// default, and `--mark` is public, so a pod could mark its own sockets and bypass the mesh.
/// A cookie is assigned by the kernel and never reused before a reboot, and only the agent
/// can write the map. Compared with the alternatives, checked against this kernel's verifier
/// (6.18): `bpf_get_socket_cookie` is allowed in every program that decides or undoes a
/// capture (connect4/6, sendmsg4/6, bind4/6, getpeername4/6, recvmsg4/6, sock_ops,
/// sock_release; getsockopt may not call it, and needs no identity: it answers from a tuple
/// map keyed by netns). `bpf_get_current_pid_tgid` is allowed everywhere too, but a tgid
/// names a process, not a socket: in sock_ops callbacks run from softirq it is whatever task
/// was interrupted, a dead agent's pid can be reused by a pod process (pid_max is 32768 on
/// this machine) while its entry stays pinned, and it needs the agent in the root pid
/// namespace. `bpf_get_current_cgroup_id` is allowed in the same places, but outside
/// Kubernetes (pods as plain network namespaces, the tests) pod processes share the agent's
/// cgroup.
#[inline(always)]
pub fn is_agent_socket(cookie: u64) -> bool {
    AGENT_SOCKETS.get_ptr(&cookie).is_some()
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
    add_peer(netns, direction, peer, idx, 1);
}

/// Adds `n` to a per-peer counter, creating the peer's entry on first use.
#[inline(always)]
pub fn add_peer(netns: u64, direction: u16, peer: &SockAddr, idx: usize, n: u64) {
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
        unsafe { (*stats).counters[idx] = (*stats).counters[idx].wrapping_add(n) };
        return;
    }
    let mut fresh = PeerKernelStats::default();
    fresh.counters[idx] = n;
    // NOEXIST: another CPU may have created the entry meanwhile; then add to ours in it. A new
    // per-CPU entry starts at zero on every other CPU.
    if PEER_STATS.insert(&key, &fresh, BPF_NOEXIST).is_err() {
        match PEER_STATS.get_ptr_mut(&key) {
            // SAFETY: as above: this CPU's copy of a live entry, `idx` checked above.
            Some(stats) => unsafe {
                (*stats).counters[idx] = (*stats).counters[idx].wrapping_add(n)
            },
            None => count(netns, counter::MAP_FULL),
        }
    }
}
