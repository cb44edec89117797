//! Per-pod counters kept by the kernel programs, indexes into [`crate::PodStats::counters`].

/// TCP connect() redirected to the outbound listener.
pub const REDIRECT_TCP: usize = 0;
/// Bypassed: loopback destination.
pub const BYPASS_LOOPBACK: usize = 1;
/// Bypassed: excluded port or CIDR.
pub const BYPASS_EXCLUDED: usize = 2;
/// UDP/53 connect() or sendmsg() redirected to the DNS listener.
pub const REDIRECT_DNS: usize = 3;
/// An explicit wildcard TCP bind recorded in `SM_IN_BINDS` (inbound capture of its port).
pub const BIND_CAPTURE: usize = 4;
/// SO_ORIGINAL_DST answered from the origin map.
pub const ORIGIN_HIT: usize = 5;
/// SO_ORIGINAL_DST asked for a socket with no origin.
pub const ORIGIN_MISS: usize = 6;
/// getpeername()/accept()/recvmsg() address restored.
pub const PEER_RESTORED: usize = 7;
/// An origin could not be stored (map update failed).
pub const MAP_FULL: usize = 8;
/// An event could not be sent to the agent (ring buffer full).
pub const EVENT_LOST: usize = 9;
/// connect() refused in the kernel: a verdict in `SM_VERDICTS` (breaker open, or the
/// peer's rate bucket empty with no queueing) is still current.
pub const FAST_REJECT: usize = 10;
/// Not captured (connect, DNS sendmsg or an inbound connection went direct): the agent's
/// heartbeat is stale.
pub const BYPASS_STALE: usize = 11;
/// A raw socket refused at `socket()` (`--deny-raw-sockets`).
pub const RAW_DENIED: usize = 12;
/// An inbound connection (its SYN) to a captured port handed to the agent's inbound
/// listener by `sk_lookup`.
pub const INBOUND_STEERED: usize = 13;
/// A connection's origin not stored: its pod had its quota of `SM_ORIG_TUPLE` entries
/// (`--pod-conn-origins`); the agent finds no origin and resets the connection.
pub const ORIGIN_QUOTA: usize = 14;
/// A DNS connect()/sendto() refused (EPERM): its pod had its quota of `SM_DNS_ORIG`
/// entries (`--pod-dns-origins`).
pub const DNS_QUOTA: usize = 15;
/// A wildcard TCP bind refused (EPERM): its pod had its quota of `SM_IN_BINDS` entries
/// (`--pod-inbound-binds`).
pub const BIND_QUOTA: usize = 16;
/// A connection to a kernel-tier peer sent to the proxy instead of direct: its pod had
/// its quota of `SM_FAST_SOCKS` entries (`--pod-direct-conns`). Not a refusal: the
/// connection is served, one hop slower.
pub const FAST_QUOTA: usize = 17;
pub const COUNT: usize = 18;
pub const NAMES: [&str; 18] = [
    "redirect_tcp",
    "bypass_loopback",
    "bypass_excluded",
    "redirect_dns",
    "bind_capture",
    "origin_hit",
    "origin_miss",
    "peer_restored",
    "map_full",
    "event_lost",
    "fast_reject",
    "bypass_stale",
    "raw_denied",
    "inbound_steered",
    "origin_quota",
    "dns_quota",
    "bind_quota",
    "fast_quota",
];
/// The kernel's refusals of a pod's quotas: shown with the agent's (`sockmesh pods`
/// REFUSED, `sockmesh_pod_refused_total`).
pub const REFUSALS: [usize; 3] = [ORIGIN_QUOTA, DNS_QUOTA, BIND_QUOTA];
