//! The maps, pinned by name under the agent's `--bpffs-dir`. Layouts live in `sockmesh-common`.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuHashMap, RingBuf},
};
use sockmesh_common::fast::{Verdict, VerdictKey};
use sockmesh_common::peer::{
    self, AgentStats, PeerKernelStats, PeerKey, PeerState, PodMeta, PodRefused,
};
use sockmesh_common::{
    map_sizes, AgentSocket, BindKey, BindValue, DnsKey, GlobalConfig, PodConfig, PodStats,
    SockAddr, SocketEntry, TupleKey,
};

/// `BPF_F_NO_PREALLOC`: a hash map that allocates entries as they are inserted.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "SM_CONFIG")]
pub static CONFIG: Array<GlobalConfig> = Array::pinned(1, 0);

/// Enrolled pods by network-namespace cookie.
#[map(name = "SM_PODS")]
pub static PODS: HashMap<u64, PodConfig> = HashMap::pinned(map_sizes::PODS, 0);

/// The agent's own sockets by socket cookie, registered by the agent before it uses them
/// and deleted by `sock_release`: the one thing that exempts a socket from capture. A plain
/// hash (not LRU), so nothing a pod does can evict an entry; written only by the agent.
#[map(name = "SM_AGENT_SOCKS")]
pub static AGENT_SOCKETS: HashMap<u64, AgentSocket> =
    HashMap::pinned(map_sizes::AGENT_SOCKETS, BPF_F_NO_PREALLOC);

#[map(name = "SM_POD_STATS")]
pub static POD_STATS: PerCpuHashMap<u64, PodStats> = PerCpuHashMap::pinned(map_sizes::PODS, 0);

/// What the programs remember per socket (the app's side), by socket cookie.
#[map(name = "SM_SOCKETS")]
pub static SOCKETS: LruHashMap<u64, SocketEntry> = LruHashMap::pinned(map_sizes::ORIGINS, 0);

/// Original destination by (netns, app addr, listener addr): what SO_ORIGINAL_DST answers.
#[map(name = "SM_ORIG_TUPLE")]
pub static ORIGIN_BY_TUPLE: LruHashMap<TupleKey, SockAddr> =
    LruHashMap::pinned(map_sizes::ORIGINS, 0);

/// Real client of an inbound connection by (netns, agent addr, app addr); written by the agent.
#[map(name = "SM_IN_PEERS")]
pub static INBOUND_PEERS: LruHashMap<TupleKey, SockAddr> =
    LruHashMap::pinned(map_sizes::ORIGINS, 0);

/// Original DNS server by (netns, UDP source port).
#[map(name = "SM_DNS_ORIG")]
pub static DNS_ORIGINS: LruHashMap<DnsKey, SockAddr> = LruHashMap::pinned(map_sizes::ORIGINS, 0);

/// Wildcard binds of enrolled pods (by pod, port, family): the ports `sk_lookup` steers.
#[map(name = "SM_IN_BINDS")]
pub static INBOUND_BINDS: LruHashMap<BindKey, BindValue> =
    LruHashMap::pinned(map_sizes::INBOUND_BINDS, 0);

/// Bind/unbind events for the agent.
#[map(name = "SM_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(map_sizes::EVENTS_BYTES, 0);

/// Fast-reject verdicts by (pod, peer), written by the agent when a peer's breaker is open or
/// its connection-rate bucket is empty: connect() to the peer fails in the kernel with
/// ECONNREFUSED until the verdict expires.
#[map(name = "SM_VERDICTS")]
pub static VERDICTS: LruHashMap<VerdictKey, Verdict> = LruHashMap::pinned(map_sizes::VERDICTS, 0);

/// Kernel counters per (pod, direction, peer); LRU so a pod talking to many peers evicts the
/// stalest instead of failing the hook.
#[map(name = "SM_PEER_STATS")]
pub static PEER_STATS: LruPerCpuHashMap<PeerKey, PeerKernelStats> =
    LruPerCpuHashMap::pinned(peer::map_sizes::PEERS, 0);

/// The agent's per-peer state, written back for readers (the programs never touch it; it is
/// declared here so it is created and pinned with the others, in one schema).
#[map(name = "SM_PEER_STATE")]
pub static PEER_STATE: LruHashMap<PeerKey, PeerState> =
    LruHashMap::pinned(peer::map_sizes::PEERS, 0);

/// Pod names and enrolment times, written by the agent.
#[map(name = "SM_POD_META")]
pub static POD_META: LruHashMap<u64, PodMeta> = LruHashMap::pinned(peer::map_sizes::POD_META, 0);

/// Agent-wide counters, written by the agent.
#[map(name = "SM_AGENT_STATS")]
pub static AGENT_STATS: Array<AgentStats> = Array::pinned(1, 0);

/// Per-pod refusals of the agent's caps and shares, written by the agent.
#[map(name = "SM_POD_REFUSED")]
pub static POD_REFUSED: LruHashMap<u64, PodRefused> =
    LruHashMap::pinned(peer::map_sizes::POD_META, 0);
