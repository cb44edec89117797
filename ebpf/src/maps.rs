//! The maps, pinned by name under the agent's `--bpffs-dir`. Layouts live in `sockmesh-common`.
//!
//! Declared as BTF maps (`#[btf_map]`, the `.maps` section) so the kernel knows each one's key
//! and value types and any tool can print their fields (`bpftool map dump pinned ...`).
//! aya-ebpf 0.2's BTF maps cannot ask to be pinned: the agent pins each one by name
//! (`datapath::pin_paths`). The ring buffer has no key or value and stays a classic map.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuHashMap},
    macros::{btf_map, map},
    maps::RingBuf,
};
use sockmesh_common::fast::{EndpointKey, EndpointResults, EndpointSet, Verdict, VerdictKey};
use sockmesh_common::peer::{
    self, AgentStats, PeerKernelStats, PeerKey, PeerNames, PeerState, PodMeta, PodRefused,
};
use sockmesh_common::{
    map_sizes, quota::PodQuota, AgentSocket, BindKey, BindValue, DnsKey, GlobalConfig, PodConfig,
    PodStats, SockAddr, SocketEntry, TupleKey,
};

/// `BPF_F_NO_PREALLOC`: a hash map that allocates entries as they are inserted.
const BPF_F_NO_PREALLOC: usize = 1;

#[btf_map(name = "SM_CONFIG")]
pub static CONFIG: Array<GlobalConfig, 1> = Array::new();

/// Enrolled pods by network-namespace cookie.
#[btf_map(name = "SM_PODS")]
pub static PODS: HashMap<u64, PodConfig, { map_sizes::PODS as usize }> = HashMap::new();

/// The agent's own sockets by socket cookie, registered by the agent before it uses them
/// and deleted by `sock_release`: the one thing that exempts a socket from capture. A plain
/// hash (not LRU), so nothing a pod does can evict an entry; written only by the agent.
#[btf_map(name = "SM_AGENT_SOCKS")]
pub static AGENT_SOCKETS: HashMap<
    u64,
    AgentSocket,
    { map_sizes::AGENT_SOCKETS as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "SM_POD_STATS")]
pub static POD_STATS: PerCpuHashMap<u64, PodStats, { map_sizes::PODS as usize }> =
    PerCpuHashMap::new();

// What the programs remember per socket lives in the socket's own storage: `store.rs`.

/// Binds the agent recorded for sockets already listening when their pod was enrolled, by
/// socket cookie (the agent cannot write another process's socket storage); sock_release
/// forgets them. Written only by the agent, deleted by sock_release.
#[btf_map(name = "SM_FOUND_BINDS")]
pub static FOUND_BINDS: HashMap<
    u64,
    SocketEntry,
    { map_sizes::FOUND_BINDS as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

/// Sockets the kernel tier let go direct (`fast.rs`), by socket cookie: their peer and when
/// they started, until their end is counted. A plain hash: full, a connection to a kernel-tier
/// peer takes the proxy instead, and no pod's entry is evicted for another's. The agent sets
/// its size at load (`--fast-path-sockets`); this one is the default.
#[btf_map(name = "SM_FAST_SOCKS")]
pub static FAST_SOCKETS: HashMap<
    u64,
    SocketEntry,
    { map_sizes::FAST_SOCKETS as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

/// Each pod's live entries in the two tuple-keyed maps below, against its quotas
/// (`sockmesh_common::quota`); created by the agent at enrolment.
#[btf_map(name = "SM_POD_QUOTA")]
pub static POD_QUOTA: HashMap<u64, PodQuota, { map_sizes::PODS as usize }, BPF_F_NO_PREALLOC> =
    HashMap::new();

/// Original destination by (netns, app addr, listener addr): what SO_ORIGINAL_DST answers.
/// A plain hash, not LRU: no pod's entries can be evicted for another's; each pod holds at
/// most its quota.
#[btf_map(name = "SM_ORIG_TUPLE")]
pub static ORIGIN_BY_TUPLE: HashMap<
    TupleKey,
    SockAddr,
    { map_sizes::ORIG_TUPLES as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

/// Real client of an inbound connection by (netns, agent addr, app addr); written by the agent.
#[btf_map(name = "SM_IN_PEERS")]
pub static INBOUND_PEERS: LruHashMap<TupleKey, SockAddr, { map_sizes::ORIGINS as usize }> =
    LruHashMap::new();

/// Original DNS server by (netns, UDP source port). A plain hash with per-pod quotas, like
/// `SM_ORIG_TUPLE`.
#[btf_map(name = "SM_DNS_ORIG")]
pub static DNS_ORIGINS: HashMap<
    DnsKey,
    SockAddr,
    { map_sizes::DNS_ORIGINS as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

/// Wildcard binds of enrolled pods (by pod, port, family): the ports `sk_lookup` steers. A
/// plain hash, each pod within its quota (`store::Quota::Binds`): an LRU map would let one pod
/// binding thousands of ports evict another's, whose inbound connections would then go to
/// the app unpoliced.
#[btf_map(name = "SM_IN_BINDS")]
pub static INBOUND_BINDS: HashMap<
    BindKey,
    BindValue,
    { map_sizes::INBOUND_BINDS as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

/// Bind/unbind events for the agent.
#[map(name = "SM_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(map_sizes::EVENTS_BYTES, 0);

/// Fast-reject verdicts by (pod, peer), written by the agent when a peer's breaker is open or
/// its connection-rate bucket is empty: connect() to the peer fails in the kernel with
/// ECONNREFUSED until the verdict expires.
#[btf_map(name = "SM_VERDICTS")]
pub static VERDICTS: LruHashMap<VerdictKey, Verdict, { map_sizes::VERDICTS as usize }> =
    LruHashMap::new();

/// The endpoints a kernel-tier connect to a Service VIP is sent to, by (pod, VIP), when an
/// Istio DestinationRule has the agent pick them; written by the agent. A plain hash: entries
/// exist only for kernel-tier peers, which `SM_VERDICTS` bounds.
#[btf_map(name = "SM_ENDPOINTS")]
pub static ENDPOINTS: HashMap<
    VerdictKey,
    EndpointSet,
    { map_sizes::ENDPOINTS as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

/// Direct connect results per (pod, VIP, picked endpoint), for the agent's outlier ejection.
#[btf_map(name = "SM_EP_RESULTS")]
pub static ENDPOINT_RESULTS: LruHashMap<
    EndpointKey,
    EndpointResults,
    { map_sizes::ENDPOINT_RESULTS as usize },
> = LruHashMap::new();

/// Kernel counters per (pod, direction, peer); LRU so a pod talking to many peers evicts the
/// stalest instead of failing the hook.
#[btf_map(name = "SM_PEER_STATS")]
pub static PEER_STATS: LruPerCpuHashMap<
    PeerKey,
    PeerKernelStats,
    { peer::map_sizes::PEERS as usize },
> = LruPerCpuHashMap::new();

/// The agent's per-peer state, written back for readers (the programs never touch it; it is
/// declared here so it is created and pinned with the others, in one schema).
#[btf_map(name = "SM_PEER_STATE")]
pub static PEER_STATE: LruHashMap<PeerKey, PeerState, { peer::map_sizes::PEERS as usize }> =
    LruHashMap::new();

/// Pod names and enrolment times, written by the agent.
#[btf_map(name = "SM_POD_META")]
pub static POD_META: LruHashMap<u64, PodMeta, { peer::map_sizes::POD_META as usize }> =
    LruHashMap::new();

/// Who each peer is (Service, workload, namespace), written by the agent.
#[btf_map(name = "SM_PEER_NAMES")]
pub static PEER_NAMES: LruHashMap<PeerKey, PeerNames, { peer::map_sizes::PEERS as usize }> =
    LruHashMap::new();

/// Agent-wide counters, written by the agent.
#[btf_map(name = "SM_AGENT_STATS")]
pub static AGENT_STATS: Array<AgentStats, 1> = Array::new();

/// Per-pod refusals of the agent's caps and shares, written by the agent.
#[btf_map(name = "SM_POD_REFUSED")]
pub static POD_REFUSED: LruHashMap<u64, PodRefused, { peer::map_sizes::POD_META as usize }> =
    LruHashMap::new();
