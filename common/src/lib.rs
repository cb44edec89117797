//! The one schema shared by sockmesh's kernel programs, the agent and the CLI.
//!
//! Every map key and value is `#[repr(C)]`, has no implicit padding (explicit `_pad` fields),
//! and is defined only here, so the kernel, the agent and outside tools (`bpftool map dump
//! pinned ...`) read the same bytes. Changing a layout means bumping [`SCHEMA_VERSION`]; readers
//! refuse a version they do not understand.
//!
//! Byte order: addresses and ports are stored in **network order** exactly as the kernel hands
//! them to the programs (`user_ip4`, `user_port`, ...), so the datapath never converts; the
//! userspace helpers below convert for display.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

/// Bumped whenever a layout or map name below (or in [`peer`]) changes.
/// 2: per-peer maps (`SM_PEER_STATS`, `SM_PEER_STATE`), pod metadata, agent counters.
/// 3: the agent's own sockets by cookie (`SM_AGENT_SOCKS`) instead of by SO_MARK,
/// `GlobalConfig::flags` (was padding), the `raw_denied` counter.
/// 4: inbound steering by `sk_lookup` (`steer::*` maps, `GlobalConfig::inbound_port`, the
/// `inbound_steered` counter), and per-pod refusals of the agent's caps and shares
/// (`SM_POD_REFUSED`).
/// 5: peers' names as the agent resolved them (`SM_PEER_NAMES`: Service, workload, namespace).
/// 6: per-socket state in socket-local storage (`SM_SOCK_STORE` replaces `SM_SOCKETS`; binds
/// found at enrolment in `SM_FOUND_BINDS`), per-pod quotas on the tuple-keyed origin maps
/// (`SM_POD_QUOTA`, `GlobalConfig::pod_*_quota`, the `origin_quota` and `dns_quota`
/// counters); `SM_ORIG_TUPLE` and `SM_DNS_ORIG` are plain hashes, no longer LRU.
pub mod layout;
/// 7: the kernel fast path: `SM_VERDICTS` values carry a peer's tier and its kernel policy
/// ([`fast::Verdict`]), `SocketEntry::started_ns`, more per-peer kernel counters, the tier
/// in `PeerState`; direct sockets in `SM_FAST_SOCKS`.
/// 8: per-pod quotas of `SM_IN_BINDS` (now a plain hash, no longer LRU, of 32,768) and
/// `SM_FAST_SOCKS` (`PodQuota::binds`/`fast`, `GlobalConfig::pod_bind_quota`/
/// `pod_fast_quota`, the `bind_quota` and `fast_quota` counters).
/// 9: `Verdict::refusal` (verdict refusals counted as throttled by reason, and the
/// `throttled_breaker` peer counter) and the kernel tier's connect-latency ring
/// (`Verdict::latency_seq`, `latency_us`).
/// 10: `PeerState::direct_bytes_{out,in}_floor` (a direct connection's bytes while open).
/// 11: endpoint picking on the kernel tier (`SM_ENDPOINTS`, `SM_EP_RESULTS`, see [`fast`]).
pub const SCHEMA_VERSION: u32 = 11;

pub mod fast;
pub mod peer;
pub mod quota;

/// Names of the maps, as they appear in the object file and under the pin directory.
pub mod map_names {
    pub const CONFIG: &str = "SM_CONFIG";
    pub const PODS: &str = "SM_PODS";
    pub const POD_STATS: &str = "SM_POD_STATS";
    /// Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`) of [`crate::SocketEntry`]: freed
    /// with its socket, so no pod can evict another's (see [`crate::quota`]).
    pub const SOCK_STORE: &str = "SM_SOCK_STORE";
    /// Binds the agent recorded for sockets already listening at enrolment (socket cookie ->
    /// [`crate::SocketEntry`]): the agent cannot reach such a socket's storage.
    pub const FOUND_BINDS: &str = "SM_FOUND_BINDS";
    /// Sockets the kernel tier let go direct, by socket cookie (see [`crate::fast`]).
    pub const FAST_SOCKETS: &str = "SM_FAST_SOCKS";
    /// Per-pod live entries of the tuple-keyed maps, see [`crate::quota::PodQuota`].
    pub const POD_QUOTA: &str = "SM_POD_QUOTA";
    pub const ORIGIN_BY_TUPLE: &str = "SM_ORIG_TUPLE";
    pub const INBOUND_PEERS: &str = "SM_IN_PEERS";
    pub const DNS_ORIGINS: &str = "SM_DNS_ORIG";
    pub const INBOUND_BINDS: &str = "SM_IN_BINDS";
    pub const EVENTS: &str = "SM_EVENTS";
    /// Fast-reject verdicts (breaker open or rate bucket empty) and the kernel tier's
    /// entries, see [`crate::fast::VerdictKey`].
    pub const VERDICTS: &str = "SM_VERDICTS";
    /// The agent's own sockets, by socket cookie: never captured, see [`crate::AgentSocket`].
    pub const AGENT_SOCKETS: &str = "SM_AGENT_SOCKS";
    /// Endpoints connect4/6 picks for a Service, see [`crate::fast::EndpointSet`].
    pub const ENDPOINTS: &str = "SM_ENDPOINTS";
    /// Connect results per picked endpoint, see [`crate::fast::EndpointResults`].
    pub const ENDPOINT_RESULTS: &str = "SM_EP_RESULTS";
    pub const ALL: [&str; 16] = [
        FAST_SOCKETS,
        CONFIG,
        PODS,
        POD_STATS,
        SOCK_STORE,
        FOUND_BINDS,
        POD_QUOTA,
        ORIGIN_BY_TUPLE,
        INBOUND_PEERS,
        DNS_ORIGINS,
        INBOUND_BINDS,
        EVENTS,
        VERDICTS,
        AGENT_SOCKETS,
        ENDPOINTS,
        ENDPOINT_RESULTS,
    ];
}

/// The in-kernel relay's maps (`--kernel-relay on` or `auto`). Private to one agent process: never
/// pinned (their entries are the agent's own sockets, which die with it), so outside readers
/// and the pinned schema ([`SCHEMA_VERSION`]) do not see them.
pub mod relay {
    /// Sockets whose received bytes the verdict program forwards (sockhash, key: socket
    /// cookie). Inserting a socket here is what turns the program on for it.
    pub const SOCKS: &str = "SM_RELAY_SOCKS";
    /// Sockets bytes may be forwarded *to* (sockhash, key: socket cookie, no program attached):
    /// both ends of a connection are here before either is in [`SOCKS`], so the verdict on one
    /// side never runs while its peer is missing.
    pub const TX: &str = "SM_RELAY_TX";
    /// Socket cookie -> [`RelayPeer`]: where its bytes go, and how many went.
    pub const PEERS: &str = "SM_RELAY_PEERS";
    /// The `sk_skb/stream_verdict` program, attached to [`SOCKS`].
    pub const VERDICT: &str = "sm_relay_verdict";
    /// Sockets (two per relayed connection) each map holds; past it a connection falls back to
    /// the splice relay.
    pub const MAX_SOCKETS: u32 = 262_144;

    /// One relayed socket's entry in [`PEERS`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RelayPeer {
        /// Cookie of the socket this one's received bytes are sent out of.
        pub peer: u64,
        /// Bytes the verdict has forwarded from this socket to `peer` so far: what
        /// `sockmesh peers` and /metrics show while the connection is open (the agent takes
        /// the exact figure from TCP_INFO when it ends). Only this socket's own verdict adds
        /// to it, and the kernel runs one socket's verdicts one at a time (under the socket
        /// lock), so a plain add loses nothing; the agent only reads it.
        pub forwarded: u64,
    }
}

/// Inbound steering: the `sk_lookup` program is loaded once per enrolled pod, from its own
/// small object, because an `sk_lookup` program cannot ask for its network namespace's cookie
/// (the helper is not offered to that program type): each instance has its pod's cookie as a
/// load-time constant and its own map of that pod's inbound listeners. Like [`relay`]'s maps,
/// that map is private to one agent process (never pinned: its entries are the agent's own
/// sockets, and the kernel drops an entry when its socket closes, so an agent that dies leaves
/// nothing to steer to).
pub mod steer {
    /// The pod's inbound listeners (sockmap, 2 slots: [`V4`], [`V6`]).
    pub const LISTENERS: &str = "SM_IN_LISTENERS";
    /// The slot of the listener taking IPv4 connections (127.0.0.1) and IPv6 ones (::1).
    pub const V4: u32 = 0;
    pub const V6: u32 = 1;
    pub const SLOTS: u32 = 2;
    /// The read-only global holding the instance's pod (netns cookie, u64).
    pub const POD_NETNS_COOKIE: &str = "POD_NETNS_COOKIE";
}

/// Names of the kernel programs (function names in `ebpf/`), also their link pin names.
pub mod program_names {
    pub const CONNECT4: &str = "sm_connect4";
    pub const CONNECT6: &str = "sm_connect6";
    pub const SENDMSG4: &str = "sm_sendmsg4";
    pub const SENDMSG6: &str = "sm_sendmsg6";
    pub const RECVMSG4: &str = "sm_recvmsg4";
    pub const RECVMSG6: &str = "sm_recvmsg6";
    pub const GETPEERNAME4: &str = "sm_getpeername4";
    pub const GETPEERNAME6: &str = "sm_getpeername6";
    pub const BIND4: &str = "sm_bind4";
    pub const BIND6: &str = "sm_bind6";
    pub const SOCK_OPS: &str = "sm_sock_ops";
    pub const GETSOCKOPT: &str = "sm_getsockopt";
    pub const SOCK_RELEASE: &str = "sm_sock_release";
    /// Attached only with `--deny-raw-sockets`.
    pub const SOCK_CREATE: &str = "sm_sock_create";
    /// Inbound steering, attached to each enrolled pod's network namespace (not the cgroup);
    /// in its own object (see [`crate::steer`]).
    pub const SK_LOOKUP: &str = "sm_sk_lookup";
}

/// Map sizes. LRU maps evict the oldest entry when full instead of failing the hook.
pub mod map_sizes {
    pub const PODS: u32 = 4096;
    /// `SM_IN_PEERS`: one entry per live inbound connection (written by the agent, which
    /// caps them per pod).
    pub const ORIGINS: u32 = 65536;
    /// `SM_ORIG_TUPLE`: one entry per live redirected connection; a plain hash, filled only
    /// as far as the pods' quotas let it (see [`crate::quota`]).
    pub const ORIG_TUPLES: u32 = 262_144;
    /// `SM_DNS_ORIG`: one entry per live UDP socket that sent DNS; quotas as above.
    pub const DNS_ORIGINS: u32 = 65536;
    /// `SM_FOUND_BINDS`: as many as `SM_IN_BINDS` holds.
    pub const FOUND_BINDS: u32 = INBOUND_BINDS;
    /// `SM_FAST_SOCKS`: direct sockets live at once, node-wide. A plain hash: when full, a
    /// new connection to a kernel-tier peer takes the proxy instead (no entry is evicted).
    /// The object's size and the default of `--fast-path-sockets`, which the agent sets at
    /// load: as many as `SM_ORIG_TUPLE` (the proxy tier's redirected connections).
    pub const FAST_SOCKETS: u32 = ORIG_TUPLES;
    /// `SM_IN_BINDS`: captured ports of all pods; a plain hash within the pods' quotas.
    pub const INBOUND_BINDS: u32 = 32_768;
    pub const VERDICTS: u32 = 16384;
    /// `SM_ENDPOINTS`: at most one entry per kernel-tier peer (`SM_VERDICTS`).
    pub const ENDPOINTS: u32 = VERDICTS;
    /// `SM_EP_RESULTS`: per (pod, Service, endpoint); LRU, eviction only restarts counts.
    pub const ENDPOINT_RESULTS: u32 = 65536;
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    /// The agent's live sockets (`SM_AGENT_SOCKS`): listeners, spare and connected upstream
    /// sockets, DNS upstream sockets. Above the agent's open-file limit in practice; the map
    /// is not preallocated, so this costs memory only for what is registered.
    pub const AGENT_SOCKETS: u32 = 262_144;
}

/// Address family as stored in [`SockAddr::family`] (values of `AF_INET` / `AF_INET6`).
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// An IPv4 or IPv6 socket address as the kernel gives it to the programs.
///
/// `addr` holds the address in network order: for IPv4 only `addr[0]` is used (the same u32 as
/// `user_ip4`); for IPv6 all four words (as `user_ip6`). `port` is the port in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
}

impl SockAddr {
    pub const fn v4(addr_be: u32, port_be: u16) -> Self {
        SockAddr {
            addr: [addr_be, 0, 0, 0],
            port: port_be,
            family: AF_INET,
        }
    }
    pub const fn v6(addr_be: [u32; 4], port_be: u16) -> Self {
        SockAddr {
            addr: addr_be,
            port: port_be,
            family: AF_INET6,
        }
    }
}

/// Global settings written by the agent into `SM_CONFIG[0]` before any pod is enrolled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Layout version of every map; programs do nothing unless it equals [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// SO_MARK the agent puts on its sockets (`--mark`), for the operator's routing and
    /// firewall rules. The programs do **not** read it: any pod process with CAP_NET_RAW can
    /// set any mark, so it says nothing about who owns a socket. They know the agent's
    /// sockets by cookie (`SM_AGENT_SOCKS`).
    pub agent_mark: u32,
    /// Ports of the in-pod listeners, host order.
    pub outbound_port: u16,
    pub dns_port: u16,
    /// The in-pod inbound listener's port (the programs do not read it: they find the
    /// listener in [`steer::LISTENERS`]); for `sockmesh` readers of the pins.
    pub inbound_port: u16,
    pub _pad: u16,
    /// [`config_flags`].
    pub flags: u32,
    pub _pad2: u32,
    /// Fail open: the agent's last heartbeat, CLOCK_MONOTONIC ns (`bpf_ktime_get_ns`), rewritten
    /// every few hundred ms by a task in the agent's runtime, so a dead or hung agent stops it.
    pub heartbeat_ns: u64,
    /// Programs stop capturing (new connections go direct, counted `bypass_stale`) once the
    /// heartbeat is older than this; 0 never fails open.
    pub fail_open_after_ns: u64,
    /// Each pod's quota of `SM_ORIG_TUPLE` entries (`--pod-conn-origins`); 0: none.
    pub pod_origin_quota: u32,
    /// Each pod's quota of `SM_DNS_ORIG` entries (`--pod-dns-origins`); 0: none.
    pub pod_dns_quota: u32,
    /// Each pod's quota of `SM_IN_BINDS` entries the bind hook makes (`--pod-inbound-binds`);
    /// 0: none.
    pub pod_bind_quota: u32,
    /// Each pod's quota of `SM_FAST_SOCKS` entries (`--pod-direct-conns`); 0: none.
    pub pod_fast_quota: u32,
}

impl GlobalConfig {
    /// Whether the agent's heartbeat is older than its fail-open bound at `now_ns`. A heartbeat
    /// from the future (clock read before the write landed) is fresh, never stale.
    #[inline(always)]
    pub fn is_stale(&self, now_ns: u64) -> bool {
        self.fail_open_after_ns != 0
            && now_ns > self.heartbeat_ns
            && now_ns - self.heartbeat_ns > self.fail_open_after_ns
    }
}

/// `GlobalConfig::flags`: agent-wide options the programs read.
pub mod config_flags {
    /// `--deny-raw-sockets`: `socket(AF_INET/AF_INET6, SOCK_RAW, ...)` in an enrolled pod
    /// fails with EPERM (counted `raw_denied`).
    pub const DENY_RAW_SOCKETS: u32 = 1 << 0;
}

/// Value of `SM_AGENT_SOCKS[socket cookie]`: a socket the agent made (and registered before
/// using it), which no program captures. Socket cookies are assigned by the kernel, 64-bit,
/// and never reused before a reboot; only the agent (CAP_BPF, access to the pin directory)
/// writes this map, and `sock_release` deletes the entry when the socket goes. So a pod can
/// neither forge nor inherit the identity, unlike a SO_MARK, which any process with
/// CAP_NET_RAW may set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentSocket {
    /// Process id of the agent that registered the socket (two run at once during a
    /// `--takeover`), for readers such as `bpftool map dump`; the programs only test presence.
    pub pid: u32,
    pub _pad: u32,
}

/// One inclusive port range, host order. `lo == 0 && hi == 0` is an unused slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        port >= self.lo && port <= self.hi
    }
}

/// An IPv4 or IPv6 CIDR, network order, with the mask pre-expanded so matching is four ANDs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    pub addr: [u32; 4],
    pub mask: [u32; 4],
    pub family: u16,
    pub _pad: [u16; 3],
}

impl Cidr {
    #[inline(always)]
    pub fn contains(&self, family: u16, addr: &[u32; 4]) -> bool {
        self.family == family
            && addr[0] & self.mask[0] == self.addr[0]
            && addr[1] & self.mask[1] == self.addr[1]
            && addr[2] & self.mask[2] == self.addr[2]
            && addr[3] & self.mask[3] == self.addr[3]
    }
}

pub const MAX_EXCLUDED_PORTS: usize = 8;
pub const MAX_EXCLUDED_CIDRS: usize = 8;

/// `PodConfig::flags`: which captures are on for the pod.
pub mod pod_flags {
    pub const OUTBOUND: u32 = 1 << 0;
    pub const INBOUND: u32 = 1 << 1;
    pub const DNS: u32 = 1 << 2;
}

/// `SM_PODS[netns cookie]`: an enrolled pod and what to leave alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodConfig {
    pub flags: u32,
    /// Unused slots are `{0, 0}` (port 0 is never a connect destination).
    pub exclude_outbound_ports: [PortRange; MAX_EXCLUDED_PORTS],
    pub exclude_inbound_ports: [PortRange; MAX_EXCLUDED_PORTS],
    /// Unused slots have `family == 0`.
    pub exclude_outbound_cidrs: [Cidr; MAX_EXCLUDED_CIDRS],
}

impl PodConfig {
    #[inline(always)]
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

pub mod counter;

/// `SM_POD_STATS[netns cookie]` (per-CPU): the agent creates the entry at enrolment, the
/// programs only add to it, readers sum the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    pub counters: [u64; counter::COUNT],
}

/// `SocketEntry::kind`: why the programs track a socket.
pub mod socket_kind {
    /// A TCP connect() redirected to the outbound listener.
    pub const TCP_REDIRECT: u16 = 1;
    /// A UDP socket whose DNS traffic goes to the DNS listener.
    pub const DNS: u16 = 2;
    /// A socket holding an explicit wildcard TCP bind of its pod (an inbound capture).
    pub const BIND: u16 = 3;
    /// A TCP connect() the kernel policed and let go direct (the peer is on the kernel
    /// tier, see [`crate::fast`]); `origin` is the peer.
    pub const FAST: u16 = 4;
}

/// `SM_SOCK_STORE` (the socket's own storage): what the programs remember about one of a
/// pod's sockets, so later hooks (getpeername, sock_ops, recvmsg) can use it and sock_release
/// can undo it. sock_release cannot read a socket's port, so the port its other entries are
/// keyed by is kept here. Also the value of `SM_FOUND_BINDS[socket cookie]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketEntry {
    /// Original destination (TCP_REDIRECT, DNS); unused for BIND.
    pub origin: SockAddr,
    /// DNS: the source port, network order (its `SM_DNS_ORIG` key); BIND: the port, host order.
    pub key_port: u16,
    pub kind: u16,
    /// BIND: the family of the listening socket.
    pub family: u16,
    pub _pad: u16,
    /// FAST: 1 once the handshake completed (its end is then the sock_ops close, after the
    /// app's close(), with the bytes it moved).
    pub established: u32,
    /// FAST: when connect() let it go direct (CLOCK_MONOTONIC ns), so a failed handshake can
    /// be told a timeout (it lasted the connect timeout) from a refusal.
    pub started_ns: u64,
    /// FAST: the `Verdict::epoch_ns` of the entry that counted this socket in `active`, so
    /// its end is only subtracted from that entry (not from one written after a reload).
    pub epoch_ns: u64,
}

/// Key of the maps that link the two ends of a connection over the pod's loopback:
/// `(netns cookie, connecting side's address, accepting side's address)`. The netns cookie is
/// part of the key because every pod uses the same loopback addresses and ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub netns_cookie: u64,
    pub src: SockAddr,
    pub dst: SockAddr,
}

/// Key of `SM_DNS_ORIG`: a pod's UDP socket, by the local port it sends from (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Key of `SM_IN_BINDS`: a port an app of the pod bound on its wildcard address, so inbound
/// connections to it are steered to the agent (`sk_lookup`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BindKey {
    pub netns_cookie: u64,
    /// Host order.
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Value of `SM_IN_BINDS`: which socket holds the bind, so its release can be told apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindValue {
    pub socket_cookie: u64,
}

/// Event kinds sent to the agent over `SM_EVENTS`.
pub mod event_kind {
    /// An app bound a wildcard address: its port is captured (steered to the agent).
    pub const BIND: u32 = 1;
    /// The socket that held a captured bind was released.
    pub const UNBIND: u32 = 2;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    pub family: u16,
    /// Host order.
    pub port: u16,
    pub netns_cookie: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    impl SockAddr {
        /// The kernel's form of a socket address (network-order words and port).
        pub fn from_std(a: SocketAddr) -> Self {
            match a.ip() {
                IpAddr::V4(ip) => SockAddr::v4(u32::from_ne_bytes(ip.octets()), a.port().to_be()),
                IpAddr::V6(ip) => {
                    let o = ip.octets();
                    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    SockAddr::v6([w(0), w(4), w(8), w(12)], a.port().to_be())
                }
            }
        }

        /// Back to std; `None` for an unused (zero-family) value.
        pub fn to_std(&self) -> Option<SocketAddr> {
            let port = u16::from_be(self.port);
            match self.family {
                AF_INET => Some(SocketAddr::new(
                    Ipv4Addr::from(self.addr[0].to_ne_bytes()).into(),
                    port,
                )),
                AF_INET6 => {
                    let mut o = [0u8; 16];
                    for (i, w) in self.addr.iter().enumerate() {
                        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
                    }
                    Some(SocketAddr::new(Ipv6Addr::from(o).into(), port))
                }
                _ => None,
            }
        }
    }

    // SAFETY: all of these are #[repr(C)], Copy, have no padding holes (explicit `_pad`), and
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for SockAddr {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for PortRange {}
    unsafe impl aya::Pod for Cidr {}
    unsafe impl aya::Pod for PodConfig {}
    unsafe impl aya::Pod for PodStats {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for DnsKey {}
    unsafe impl aya::Pod for BindKey {}
    unsafe impl aya::Pod for BindValue {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for SocketEntry {}
    unsafe impl aya::Pod for AgentSocket {}
    unsafe impl aya::Pod for super::relay::RelayPeer {}
}

#[cfg(test)]
mod tests;
