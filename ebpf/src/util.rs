//! Small helpers shared by the programs: who is enrolled, counters, address tests.
use aya_ebpf::{bindings::bpf_sock, helpers::bpf_get_netns_cookie, EbpfContext};
use sockmesh_common::{
    counter,
    peer::{peer_counter, PeerKernelStats, PeerKey},
    GlobalConfig, PodConfig, SockAddr, AF_INET, SCHEMA_VERSION,
};

/// `BPF_NOEXIST` map-update flag: create only.
const BPF_NOEXIST: u64 = 1;

use crate::maps::{CONFIG, PEER_STATS, PODS, POD_STATS};

pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const DNS_PORT_BE: u16 = 53u16.to_be();
/// 127.0.0.1 in network order as a u32 read on little endian.
pub const LOOPBACK4_BE: u32 = u32::from_be_bytes([127, 0, 0, 1]).to_be();
/// ::1 in network order.
pub const LOOPBACK6_BE: [u32; 4] = [0, 0, 0, 1u32.to_be()];
/// The ::ffff:0:0/96 prefix word (bytes 00 00 ff ff) as a u32 read on little endian.
pub const V4_MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();

/// The enrolled pod a socket belongs to, if the agent is configured for this schema and the
/// socket is not the agent's own.
#[inline(always)]
pub fn pod_for<C: EbpfContext>(
    ctx: &C,
    sk: *const bpf_sock,
) -> Option<(u64, &'static GlobalConfig, &'static PodConfig)> {
    let cfg = CONFIG.get(0)?;
    if cfg.schema_version != SCHEMA_VERSION {
        return None;
    }
    if !sk.is_null() && unsafe { (*sk).mark } == cfg.agent_mark {
        return None;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let pod = unsafe { PODS.get(&netns) }?;
    Some((netns, cfg, pod))
}

#[inline(always)]
pub fn count(netns: u64, idx: usize) {
    if idx >= counter::COUNT {
        return;
    }
    if let Some(stats) = POD_STATS.get_ptr_mut(&netns) {
        // Per-CPU value: no other writer on this CPU while the program runs.
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
        unsafe { (*stats).counters[idx] += 1 };
        return;
    }
    let mut fresh = PeerKernelStats::default();
    fresh.counters[idx] = 1;
    // NOEXIST: another CPU may have created the entry meanwhile; then add to ours in it. A new
    // per-CPU entry starts at zero on every other CPU.
    if PEER_STATS.insert(&key, &fresh, BPF_NOEXIST).is_err() {
        match PEER_STATS.get_ptr_mut(&key) {
            Some(stats) => unsafe { (*stats).counters[idx] += 1 },
            None => count(netns, counter::MAP_FULL),
        }
    }
}

#[inline(always)]
pub fn is_loopback4(addr_be: u32) -> bool {
    // First octet is the lowest byte of the network-order word on little endian.
    addr_be & 0xff == 127
}

#[inline(always)]
pub fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD
}

#[inline(always)]
pub fn is_loopback6(a: &[u32; 4]) -> bool {
    (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == LOOPBACK6_BE[3])
        || (is_v4_mapped(a) && is_loopback4(a[3]))
}

/// An IPv6 socket's address as a key address: v4-mapped addresses become IPv4, so both ends
/// of a connection (a dual-stack socket and an IPv4 listener) agree on the key.
#[inline(always)]
pub fn sockaddr6(a: [u32; 4], port_be: u16) -> SockAddr {
    if is_v4_mapped(&a) {
        SockAddr::v4(a[3], port_be)
    } else {
        SockAddr::v6(a, port_be)
    }
}

#[inline(always)]
pub fn is_loopback(dst: &SockAddr) -> bool {
    if dst.family == AF_INET {
        is_loopback4(dst.addr[0])
    } else {
        is_loopback6(&dst.addr)
    }
}
