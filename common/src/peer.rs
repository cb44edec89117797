//! Observability schema: per-peer counters (kernel, per-CPU), the agent's per-peer state written
//! back for readers, and per-pod metadata. Readers (`sockmesh stats|peers|pods`, `/metrics`,
//! `bpftool map dump pinned ...`) use exactly these layouts.
//!
//! Every map here is an LRU hash: a full map evicts its least recently used entry instead of
//! failing the writer. The agent counts what it had to drop (see [`agent_counter`]).

use crate::SockAddr;

/// Names of the observability maps, pinned beside the ones in [`crate::map_names`].
pub mod map_names {
    /// Kernel counters per (pod, direction, peer): [`PeerKernelStats`], per-CPU.
    pub const PEER_STATS: &str = "SM_PEER_STATS";
    /// The agent's per-peer state: [`PeerState`].
    pub const PEER_STATE: &str = "SM_PEER_STATE";
    /// Per-pod metadata written by the agent at enrolment: [`PodMeta`].
    pub const POD_META: &str = "SM_POD_META";
    /// Agent-wide counters (one entry): [`AgentStats`].
    pub const AGENT_STATS: &str = "SM_AGENT_STATS";
    /// What the agent refused or held back per pod (its caps and shares): [`PodRefused`].
    pub const POD_REFUSED: &str = "SM_POD_REFUSED";
    /// Who each peer (and its pod) is, as the agent resolved it: [`PeerNames`].
    pub const PEER_NAMES: &str = "SM_PEER_NAMES";
    pub const ALL: [&str; 6] = [
        PEER_STATS,
        PEER_STATE,
        POD_META,
        AGENT_STATS,
        POD_REFUSED,
        PEER_NAMES,
    ];
}

pub mod map_sizes {
    /// Peers tracked per map; the same as the agent's default `--max-peers`.
    pub const PEERS: u32 = 16384;
    /// Pods whose metadata is kept (enrolled now or earlier): as many as `SM_PODS` holds.
    pub const POD_META: u32 = 4096;
}

/// `PeerKey::direction`.
pub mod direction {
    /// The pod connects out; the peer is the original destination (ip, port).
    pub const OUTBOUND: u16 = 1;
    /// A client connects to the pod; the peer is the client's ip with the pod's port.
    pub const INBOUND: u16 = 2;

    pub fn name(d: u16) -> &'static str {
        match d {
            OUTBOUND => "outbound",
            INBOUND => "inbound",
            _ => "unknown",
        }
    }
}

/// Key of `SM_PEER_STATS` and `SM_PEER_STATE`: one peer of one pod in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub netns_cookie: u64,
    pub peer: SockAddr,
    pub direction: u16,
    pub _pad: u16,
}

/// Indexes into [`PeerKernelStats::counters`].
pub mod peer_counter {
    /// TCP connect() to this peer redirected to the outbound listener.
    pub const REDIRECT: usize = 0;
    /// connect() to this peer refused in the kernel by a current verdict (breaker open or
    /// rate bucket empty).
    pub const FAST_REJECT: usize = 1;
    /// A DNS datagram to this peer (the pod's DNS server) redirected to the DNS listener:
    /// a UDP connect() (counted once per socket) or a sendto() (once per datagram).
    pub const REDIRECT_DNS: usize = 2;
    /// Kernel tier: connect() policed in the kernel and let go direct.
    pub const DIRECT: usize = 3;
    /// Kernel tier: direct connections established (a connection, as the proxy's
    /// `conns_total` counts them).
    pub const CONNS: usize = 4;
    /// Kernel tier: direct connections that ended after they were established; live ones
    /// are `CONNS - CLOSED`.
    pub const CLOSED: usize = 5;
    /// Kernel tier: bytes the pod sent to the peer (acked) and received from it, added when
    /// each direct connection ends.
    pub const BYTES_OUT: usize = 6;
    pub const BYTES_IN: usize = 7;
    /// Kernel tier: connect() refused (ECONNREFUSED) because the peer's rate bucket was
    /// empty, or it had `max_conns` live connections.
    pub const THROTTLED_RATE: usize = 8;
    pub const THROTTLED_CONCURRENCY: usize = 9;
    /// Kernel tier: handshakes that failed, and those of them that ran out of the connect
    /// timeout (ETIMEDOUT).
    pub const CONNECT_FAILURES: usize = 10;
    pub const CONNECT_TIMEOUTS: usize = 11;
    /// Kernel tier: times the kernel opened the peer's breaker (and handed it back to the
    /// proxy).
    pub const BREAKER_OPENED: usize = 12;
    /// Kernel tier: connect() refused by adaptive throttling.
    pub const THROTTLED_ADAPTIVE: usize = 13;
    /// Either tier: connect() refused by a verdict because the peer's breaker is open.
    pub const THROTTLED_BREAKER: usize = 14;
    /// Slots in the value (spares): new counters fit without a layout change.
    pub const COUNT: usize = 16;
    pub const NAMES: [&str; 15] = [
        "redirect",
        "fast_reject",
        "redirect_dns",
        "direct",
        "conns",
        "closed",
        "bytes_out",
        "bytes_in",
        "throttled_rate",
        "throttled_concurrency",
        "connect_failures",
        "connect_timeouts",
        "breaker_opened",
        "throttled_adaptive",
        "throttled_breaker",
    ];
}

/// `SM_PEER_STATS[PeerKey]` (per-CPU): written only by the kernel programs, readers sum CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerKernelStats {
    pub counters: [u64; peer_counter::COUNT],
}

/// Indexes into [`PeerState::timeouts`].
pub mod timeout_kind {
    pub const CONNECT: usize = 0;
    pub const IDLE: usize = 1;
    pub const LIFETIME: usize = 2;
    pub const DNS: usize = 3;
    pub const COUNT: usize = 4;
    pub const NAMES: [&str; COUNT] = ["connect", "idle", "lifetime", "dns"];
}

/// Indexes into [`PeerState::throttled`]: why the agent refused a connection locally.
pub mod throttle_reason {
    pub const BREAKER: usize = 0;
    pub const ADAPTIVE: usize = 1;
    pub const RATE: usize = 2;
    /// Over the concurrency limit with a full queue.
    pub const CONCURRENCY: usize = 3;
    /// Waited in the concurrency queue past its CoDel deadline.
    pub const QUEUE_TIMEOUT: usize = 4;
    pub const COUNT: usize = 6;
    pub const NAMES: [&str; 5] = [
        "breaker",
        "adaptive",
        "rate",
        "concurrency",
        "queue_timeout",
    ];
}

/// `PeerState::breaker`.
pub mod breaker_state {
    /// No breaker configured for this peer.
    pub const NONE: u8 = 0;
    pub const CLOSED: u8 = 1;
    /// Open until `PeerState::breaker_open_until_ns`; past it, readers show it half-open.
    pub const OPEN: u8 = 2;
    pub const HALF_OPEN: u8 = 3;

    pub fn name(s: u8) -> &'static str {
        match s {
            CLOSED => "closed",
            OPEN => "open",
            HALF_OPEN => "half_open",
            _ => "none",
        }
    }
}

/// `PeerState::last_error`.
pub mod peer_error {
    pub const NONE: u8 = 0;
    pub const CONNECT_REFUSED: u8 = 1;
    pub const CONNECT_TIMEOUT: u8 = 2;
    pub const CONNECT_RESET: u8 = 3;
    pub const UNREACHABLE: u8 = 4;
    /// Refused locally by policy (see `throttled`).
    pub const THROTTLED: u8 = 5;
    pub const IDLE_TIMEOUT: u8 = 6;
    pub const LIFETIME: u8 = 7;
    /// A relayed connection was reset by one side.
    pub const RESET: u8 = 8;
    pub const DNS_TIMEOUT: u8 = 9;
    pub const DNS_FAILED: u8 = 10;

    pub fn name(e: u8) -> &'static str {
        match e {
            CONNECT_REFUSED => "connect_refused",
            CONNECT_TIMEOUT => "connect_timeout",
            CONNECT_RESET => "connect_reset",
            UNREACHABLE => "unreachable",
            THROTTLED => "throttled",
            IDLE_TIMEOUT => "idle_timeout",
            LIFETIME => "lifetime",
            RESET => "reset",
            DNS_TIMEOUT => "dns_timeout",
            DNS_FAILED => "dns_failed",
            _ => "none",
        }
    }
}

/// `SM_PEER_STATE[PeerKey]`: written by the agent (about once a second, and at exit), read by
/// the CLI and `/metrics`. Counters are totals since the entry was created: a restarted agent
/// continues from the values it finds, so they stay monotonic while the pinned map lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerState {
    /// Relayed connections open now.
    pub conns_active: u64,
    /// Connections relayed (upstream connect succeeded), ever.
    pub conns_total: u64,
    /// Bytes from the pod to the peer, counted when each connection ends.
    pub bytes_out: u64,
    /// Bytes from the peer to the pod.
    pub bytes_in: u64,
    /// By [`timeout_kind`].
    pub timeouts: [u64; timeout_kind::COUNT],
    /// By [`throttle_reason`].
    pub throttled: [u64; throttle_reason::COUNT],
    /// Upstream connects that failed (refused, reset, unreachable, timed out).
    pub connect_failures: u64,
    /// Relayed connections that ended with a reset.
    pub resets: u64,
    /// DNS queries forwarded to this peer.
    pub dns_queries: u64,
    /// When `last_error` happened, Unix time in milliseconds (0: never).
    pub last_error_unix_ms: u64,
    /// While the breaker is open: until when, CLOCK_MONOTONIC ns (as `bpf_ktime_get_ns`).
    pub breaker_open_until_ns: u64,
    /// When the agent wrote this entry, Unix time in milliseconds.
    pub updated_unix_ms: u64,
    /// The kernel tier's bytes each way as of the agent's last look at the open direct
    /// connections: the kernel's totals of the ended ones (`peer_counter::BYTES_*`, read
    /// first) plus what the open ones had moved (sock_diag, read after). Never above the
    /// truth, only raised; readers show the larger of it and the kernel's totals, so a direct
    /// connection's bytes show while it is open and the figure never goes down.
    pub direct_bytes_out_floor: u64,
    pub direct_bytes_in_floor: u64,
    /// Upstream connect latency quantiles over the agent's recent samples, microseconds
    /// (0: no sample).
    pub connect_p50_us: u32,
    pub connect_p99_us: u32,
    /// Adaptive throttling's current local reject probability, in parts per million.
    pub adaptive_reject_ppm: u32,
    /// [`breaker_state`].
    pub breaker: u8,
    /// [`peer_error`].
    pub last_error: u8,
    /// [`crate::fast::tier`] the agent last put the peer on (outbound peers only).
    pub tier: u8,
    /// [`tier_reason`]: why the peer is on that tier.
    pub tier_reason: u8,
}

/// `PeerState::tier_reason`: why a peer is on its tier, for `sockmesh peers`.
pub mod tier_reason {
    /// Nothing decided yet (no connection since the agent started, or an old entry).
    pub const UNKNOWN: u8 = 0;
    /// On the kernel tier: every knob of its policy is enforced there.
    pub const KERNEL: u8 = 1;
    /// `--fast-path off`.
    pub const FAST_PATH_OFF: u8 = 2;
    /// Inbound peers always take the proxy (the kernel tier polices connect()).
    pub const INBOUND: u8 = 3;
    /// Knobs the kernel cannot enforce exactly.
    pub const BANDWIDTH: u8 = 4;
    pub const QUEUE: u8 = 5;
    pub const LIFETIME: u8 = 6;
    pub const IDLE_TIMEOUT: u8 = 7;
    pub const ADAPTIVE: u8 = 8;
    /// A connection rate whose lowest terms have too large a numerator (see
    /// `fast::MAX_KERNEL_RATE_TOKENS`).
    pub const RATE_INEXACT: u8 = 9;
    /// The kernel opened the breaker and handed the peer back (half-open ramp on the proxy).
    pub const BREAKER_OPENED: u8 = 10;
    /// Eligible, waiting for its proxied connections to end before the handover (the kernel
    /// counts the concurrency cap from zero).
    pub const HANDOVER_PENDING: u8 = 11;
    /// The kernel could not take the entry (map update failed).
    pub const MAP_FULL: u8 = 12;
    /// The breaker is open or half-open on the proxy.
    pub const BREAKER: u8 = 13;
    /// The agent picks the peer's endpoint (an Istio DestinationRule's outlier detection or
    /// load balancer); the kernel would connect to the address as given.
    pub const ENDPOINT_SELECTION: u8 = 14;
    /// Set by readers, never written: the agent handed the peer to the kernel, but its
    /// `SM_VERDICTS` entry is gone (evicted from the LRU, or deleted and not yet rewritten),
    /// so its connections are proxied again until the next proxied one decides anew.
    pub const ENTRY_GONE: u8 = 15;

    pub fn name(r: u8) -> &'static str {
        match r {
            KERNEL => "kernel",
            FAST_PATH_OFF => "fast_path_off",
            INBOUND => "inbound",
            BANDWIDTH => "bandwidth",
            QUEUE => "queue",
            LIFETIME => "lifetime",
            IDLE_TIMEOUT => "idle_timeout",
            ADAPTIVE => "adaptive",
            RATE_INEXACT => "rate_inexact",
            BREAKER_OPENED => "breaker_opened",
            HANDOVER_PENDING => "handover_pending",
            MAP_FULL => "map_full",
            BREAKER => "breaker",
            ENDPOINT_SELECTION => "endpoint_selection",
            ENTRY_GONE => "entry_gone",
            _ => "unknown",
        }
    }
}

/// Pod names are cut to this many bytes (NUL-padded).
pub const POD_NAME_LEN: usize = 128;

/// `SM_POD_META[netns cookie]`: who a pod is, so readers can show names instead of cookies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodMeta {
    /// The pod's name as the agent knows it (the `--pod` netns path, or `namespace/name`),
    /// UTF-8, NUL-padded.
    pub name: [u8; POD_NAME_LEN],
    /// When the pod was (last) enrolled, Unix time in milliseconds.
    pub enrolled_unix_ms: u64,
    /// When it was unenrolled (0: still enrolled, or the agent died).
    pub removed_unix_ms: u64,
}

impl Default for PodMeta {
    fn default() -> Self {
        PodMeta {
            name: [0; POD_NAME_LEN],
            enrolled_unix_ms: 0,
            removed_unix_ms: 0,
        }
    }
}

/// Names are cut to this many bytes (NUL-padded): a Kubernetes name or namespace is at most
/// 63 bytes (a DNS label).
pub const IDENT_LEN: usize = 64;
/// `NAME.NAMESPACE`: two DNS labels and a dot.
pub const SERVICE_LEN: usize = 128;

/// `SM_PEER_NAMES[PeerKey]`: who the peer and the pod are, as the agent's identity index said
/// when it last wrote the entry (empty: not known). Keyed like `SM_PEER_STATE`, so the maps
/// stay keyed by address and readers join the two. UTF-8, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerNames {
    /// The Service the connection is addressed to, `NAME.NAMESPACE`: outbound, the peer's
    /// (its ClusterIP, or an endpoint of it); inbound, the pod's Service on its port.
    pub service: [u8; SERVICE_LEN],
    /// The peer's workload and namespace.
    pub workload: [u8; IDENT_LEN],
    pub namespace: [u8; IDENT_LEN],
    /// The pod's own workload and namespace.
    pub pod_workload: [u8; IDENT_LEN],
    pub pod_namespace: [u8; IDENT_LEN],
}

impl Default for PeerNames {
    fn default() -> Self {
        PeerNames {
            service: [0; SERVICE_LEN],
            workload: [0; IDENT_LEN],
            namespace: [0; IDENT_LEN],
            pod_workload: [0; IDENT_LEN],
            pod_namespace: [0; IDENT_LEN],
        }
    }
}

/// Indexes into [`AgentStats::counters`]: agent-wide events that belong to no single peer.
pub mod agent_counter {
    /// Per-peer entries the agent dropped from memory while they still had unflushed figures
    /// (its in-memory table was full). Zero in practice; non-zero means raise the map size.
    pub const PEER_STATE_DROPPED: usize = 0;
    /// Writes to `SM_PEER_STATE` that failed.
    pub const PEER_STATE_WRITE_FAILED: usize = 1;
    /// Flushes of per-peer state done.
    pub const FLUSHES: usize = 2;
    /// Per-peer policy entries evicted from the policy table to make room (`--max-peers`).
    pub const POLICY_PEERS_EVICTED: usize = 3;
    /// Connections to the metrics or health listener closed at once: every slot was taken.
    pub const HTTP_REFUSED: usize = 4;
    /// Connections to the metrics or health listener closed at their maximum lifetime.
    pub const HTTP_EXPIRED: usize = 5;
    pub const COUNT: usize = 8;
    pub const NAMES: [&str; 6] = [
        "peer_state_dropped",
        "peer_state_write_failed",
        "flushes",
        "policy_peers_evicted",
        "http_refused",
        "http_expired",
    ];
}

/// Indexes into [`PodRefused::counters`]: each time a pod hit one of the agent's per-pod caps
/// or node-wide shares (README, "Operations"). Counted against the pod that hit it, never
/// against the pods it would otherwise have crowded out.
pub mod pod_refusal {
    /// A proxied connection reset at once: the pod already had `--pod-max-conns`.
    pub const CONN_POD_CAP: usize = 0;
    /// A proxied connection reset at once: the node had `--max-conns`.
    pub const CONN_NODE_CAP: usize = 1;
    /// A proxied connection reset at once: the node was near `--max-conns` and the pod held
    /// at least its fair share of it.
    pub const CONN_NODE_SHARE: usize = 2;
    /// A connection that would have waited in a peer's queue was reset: the pod already had
    /// `--pod-max-queued` connections waiting.
    pub const QUEUE_POD_CAP: usize = 3;
    /// accept() on one of the pod's listeners failed for lack of file descriptors or socket
    /// memory (EMFILE, ENFILE, ENOBUFS, ENOMEM); the loop backed off instead of retrying.
    pub const ACCEPT_BACKOFF: usize = 4;
    /// The pod's DNS listener waited for a query slot (`--pod-dns-inflight`, or the node's
    /// share of `--max-dns-inflight`) before reading the next query.
    pub const DNS_INFLIGHT: usize = 5;
    /// The pod's DNS listener waited for its rate (`--pod-dns-rate`) before reading the next
    /// query.
    pub const DNS_RATE: usize = 6;
    /// DNS datagrams the kernel dropped at the pod's DNS listener (its socket buffer was full
    /// while the agent held back), as the kernel counts them (SO_RXQ_OVFL).
    pub const DNS_DROPPED: usize = 7;
    /// Bind/unbind events of the pod applied late: over its `--pod-bind-events` budget.
    pub const BIND_DEFERRED: usize = 8;
    /// Bind/unbind events of the pod dropped: too many of its ports had changes waiting.
    pub const BIND_DROPPED: usize = 9;
    /// The pod's per-peer policy entries evicted to make room for its own new peers (it held
    /// its share of `--max-peers`); another pod's peers never evict them.
    pub const PEERS_EVICTED: usize = 10;
    /// Slots in the value (spares): new counters fit without a layout change.
    pub const COUNT: usize = 16;
    pub const NAMES: [&str; 11] = [
        "conn_pod_cap",
        "conn_node_cap",
        "conn_node_share",
        "queue_pod_cap",
        "accept_backoff",
        "dns_inflight",
        "dns_rate",
        "dns_dropped",
        "bind_deferred",
        "bind_dropped",
        "peers_evicted",
    ];
}

/// `SM_POD_REFUSED[netns cookie]`: [`pod_refusal`] counters, written (added to) by the agent
/// about once a second; monotonic across restarts while pinned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodRefused {
    pub counters: [u64; pod_refusal::COUNT],
}

/// `SM_AGENT_STATS[0]`: agent-wide counters, monotonic across restarts while pinned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentStats {
    pub counters: [u64; agent_counter::COUNT],
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    impl PodMeta {
        pub fn new(name: &str, enrolled_unix_ms: u64) -> Self {
            let mut m = PodMeta {
                enrolled_unix_ms,
                ..Default::default()
            };
            // Cut at a char boundary so the stored name stays valid UTF-8.
            let mut end = name.len().min(POD_NAME_LEN);
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            m.name[..end].copy_from_slice(&name.as_bytes()[..end]);
            m
        }

        pub fn name(&self) -> std::string::String {
            read_name(&self.name)
        }
    }

    /// Copies `s` into `to`, cut at a char boundary so it stays valid UTF-8.
    pub fn write_name(to: &mut [u8], s: &str) {
        let mut end = s.len().min(to.len());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        to.fill(0);
        to[..end].copy_from_slice(&s.as_bytes()[..end]);
    }

    /// The text up to the first NUL.
    pub fn read_name(from: &[u8]) -> std::string::String {
        let end = from.iter().position(|&b| b == 0).unwrap_or(from.len());
        std::string::String::from_utf8_lossy(&from[..end]).into_owned()
    }

    impl PeerNames {
        pub fn new(
            service: &str,
            workload: &str,
            namespace: &str,
            pod_workload: &str,
            pod_namespace: &str,
        ) -> Self {
            let mut n = PeerNames::default();
            write_name(&mut n.service, service);
            write_name(&mut n.workload, workload);
            write_name(&mut n.namespace, namespace);
            write_name(&mut n.pod_workload, pod_workload);
            write_name(&mut n.pod_namespace, pod_namespace);
            n
        }
    }

    // SAFETY: #[repr(C)], Copy, no padding holes (explicit `_pad`, sizes checked below), every
    // bit pattern valid.
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for PeerKernelStats {}
    unsafe impl aya::Pod for PeerState {}
    unsafe impl aya::Pod for PodMeta {}
    unsafe impl aya::Pod for AgentStats {}
    unsafe impl aya::Pod for PodRefused {}
    unsafe impl aya::Pod for PeerNames {}
}

#[cfg(feature = "user")]
pub use user::read_name;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<PeerKey>(), 8 + 20 + 2 + 2);
        assert_eq!(size_of::<PeerKernelStats>(), 8 * peer_counter::COUNT);
        assert_eq!(
            size_of::<PeerState>(),
            8 * (4 + timeout_kind::COUNT + throttle_reason::COUNT + 8) + 4 * 3 + 1 + 1 + 2
        );
        assert_eq!(size_of::<PodMeta>(), POD_NAME_LEN + 16);
        assert_eq!(size_of::<AgentStats>(), 8 * agent_counter::COUNT);
        assert_eq!(size_of::<PodRefused>(), 8 * pod_refusal::COUNT);
        assert_eq!(size_of::<PeerNames>(), SERVICE_LEN + 4 * IDENT_LEN);
    }

    #[test]
    fn names_fit_their_arrays() {
        assert!(peer_counter::NAMES.len() <= peer_counter::COUNT);
        assert!(throttle_reason::NAMES.len() <= throttle_reason::COUNT);
        assert!(agent_counter::NAMES.len() <= agent_counter::COUNT);
        assert!(pod_refusal::NAMES.len() <= pod_refusal::COUNT);
    }

    #[cfg(feature = "user")]
    #[test]
    fn pod_names_round_trip_and_are_cut_at_a_char_boundary() {
        assert_eq!(
            PodMeta::new("/var/run/netns/web", 1).name(),
            "/var/run/netns/web"
        );
        let long = "é".repeat(100); // 200 bytes
        let cut = PodMeta::new(&long, 1).name();
        assert_eq!(cut.len(), 128);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
