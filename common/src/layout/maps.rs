//! The layouts of the pinned maps, one per map, built from the `#[repr(C)]` types with
//! `offset_of!`; see the parent module for why.
use core::mem::{offset_of, size_of};

use super::peer_state::PEER_STATE_VALUE;
use super::verdicts::{
    socket_kind_name, ENDPOINTS_MAP, ENDPOINT_RESULTS_MAP, VERDICT_KEY, VERDICT_VALUE,
};
use super::{f, map, Field, Kind, MapKind, MapLayout};
use crate::peer::{
    self, agent_counter, direction, peer_counter, pod_refusal, AgentStats, PeerKernelStats,
    PeerKey, PeerNames, PodMeta, PodRefused, IDENT_LEN, POD_NAME_LEN, SERVICE_LEN,
};
use crate::{
    counter, map_names, quota::PodQuota, AgentSocket, BindKey, BindValue, DnsKey, GlobalConfig,
    PodConfig, PodStats, SockAddr, SocketEntry, TupleKey, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS,
};

fn family_name(v: u64) -> &'static str {
    match v as u16 {
        crate::AF_INET => "inet",
        crate::AF_INET6 => "inet6",
        _ => "none",
    }
}
fn direction_name(v: u64) -> &'static str {
    direction::name(v as u16)
}

const FAMILY: Kind = Kind::Named {
    size: 2,
    name: family_name,
};

/// A key that is a netns cookie (the pods' maps) or a socket cookie.
const NETNS_KEY: (usize, &[Field]) = (8, &[f("netns_cookie", 0, Kind::U64)]);
const SOCKET_KEY: (usize, &[Field]) = (8, &[f("socket_cookie", 0, Kind::U64)]);
const INDEX_KEY: (usize, &[Field]) = (4, &[f("index", 0, Kind::U32)]);
/// Socket-local storage is keyed by a socket's fd (4 bytes) from userspace.
const SOCK_STORE_KEY: (usize, &[Field]) = (4, &[f("socket_fd", 0, Kind::U32)]);
const POD_QUOTA_VALUE: (usize, &[Field]) = (
    size_of::<PodQuota>(),
    &[
        f("origins", offset_of!(PodQuota, origins), Kind::U64),
        f("dns", offset_of!(PodQuota, dns), Kind::U64),
        f("binds", offset_of!(PodQuota, binds), Kind::U64),
        f("fast", offset_of!(PodQuota, fast), Kind::U64),
    ],
);

const PEER_KEY: (usize, &[Field]) = (
    size_of::<PeerKey>(),
    &[
        f("netns_cookie", offset_of!(PeerKey, netns_cookie), Kind::U64),
        f("peer", offset_of!(PeerKey, peer), Kind::SockAddr),
        f(
            "direction",
            offset_of!(PeerKey, direction),
            Kind::Named {
                size: 2,
                name: direction_name,
            },
        ),
        f("_pad", offset_of!(PeerKey, _pad), Kind::Pad { len: 2 }),
    ],
);

const TUPLE_KEY: (usize, &[Field]) = (
    size_of::<TupleKey>(),
    &[
        f(
            "netns_cookie",
            offset_of!(TupleKey, netns_cookie),
            Kind::U64,
        ),
        f("src", offset_of!(TupleKey, src), Kind::SockAddr),
        f("dst", offset_of!(TupleKey, dst), Kind::SockAddr),
    ],
);

/// A value that is one socket address, named by what it is in that map.
const ORIGIN_VALUE: (usize, &[Field]) = (size_of::<SockAddr>(), &[f("origin", 0, Kind::SockAddr)]);
const CLIENT_VALUE: (usize, &[Field]) = (size_of::<SockAddr>(), &[f("client", 0, Kind::SockAddr)]);
const SERVER_VALUE: (usize, &[Field]) = (size_of::<SockAddr>(), &[f("server", 0, Kind::SockAddr)]);

const CONFIG_VALUE: (usize, &[Field]) = (
    size_of::<GlobalConfig>(),
    &[
        f(
            "schema_version",
            offset_of!(GlobalConfig, schema_version),
            Kind::U32,
        ),
        f(
            "agent_mark",
            offset_of!(GlobalConfig, agent_mark),
            Kind::U32,
        ),
        f(
            "outbound_port",
            offset_of!(GlobalConfig, outbound_port),
            Kind::U16,
        ),
        f("dns_port", offset_of!(GlobalConfig, dns_port), Kind::U16),
        f(
            "inbound_port",
            offset_of!(GlobalConfig, inbound_port),
            Kind::U16,
        ),
        f("_pad", offset_of!(GlobalConfig, _pad), Kind::Pad { len: 2 }),
        f("flags", offset_of!(GlobalConfig, flags), Kind::U32),
        f(
            "_pad2",
            offset_of!(GlobalConfig, _pad2),
            Kind::Pad { len: 4 },
        ),
        f(
            "heartbeat_ns",
            offset_of!(GlobalConfig, heartbeat_ns),
            Kind::U64,
        ),
        f(
            "fail_open_after_ns",
            offset_of!(GlobalConfig, fail_open_after_ns),
            Kind::U64,
        ),
        f(
            "pod_origin_quota",
            offset_of!(GlobalConfig, pod_origin_quota),
            Kind::U32,
        ),
        f(
            "pod_dns_quota",
            offset_of!(GlobalConfig, pod_dns_quota),
            Kind::U32,
        ),
        f(
            "pod_bind_quota",
            offset_of!(GlobalConfig, pod_bind_quota),
            Kind::U32,
        ),
        f(
            "pod_fast_quota",
            offset_of!(GlobalConfig, pod_fast_quota),
            Kind::U32,
        ),
    ],
);

const POD_CONFIG_VALUE: (usize, &[Field]) = (
    size_of::<PodConfig>(),
    &[
        f("flags", offset_of!(PodConfig, flags), Kind::U32),
        f(
            "exclude_outbound_ports",
            offset_of!(PodConfig, exclude_outbound_ports),
            Kind::PortRanges {
                n: MAX_EXCLUDED_PORTS,
            },
        ),
        f(
            "exclude_inbound_ports",
            offset_of!(PodConfig, exclude_inbound_ports),
            Kind::PortRanges {
                n: MAX_EXCLUDED_PORTS,
            },
        ),
        f(
            "exclude_outbound_cidrs",
            offset_of!(PodConfig, exclude_outbound_cidrs),
            Kind::Cidrs {
                n: MAX_EXCLUDED_CIDRS,
            },
        ),
    ],
);

const AGENT_SOCKET_VALUE: (usize, &[Field]) = (
    size_of::<AgentSocket>(),
    &[
        f("pid", offset_of!(AgentSocket, pid), Kind::U32),
        f("_pad", offset_of!(AgentSocket, _pad), Kind::Pad { len: 4 }),
    ],
);

const POD_STATS_VALUE: (usize, &[Field]) = (
    size_of::<PodStats>(),
    &[f(
        "counters",
        offset_of!(PodStats, counters),
        Kind::Counters {
            names: &counter::NAMES,
            slots: counter::COUNT,
        },
    )],
);

const SOCKET_ENTRY_VALUE: (usize, &[Field]) = (
    size_of::<SocketEntry>(),
    &[
        f("origin", offset_of!(SocketEntry, origin), Kind::SockAddr),
        f("key_port", offset_of!(SocketEntry, key_port), Kind::U16),
        f(
            "kind",
            offset_of!(SocketEntry, kind),
            Kind::Named {
                size: 2,
                name: socket_kind_name,
            },
        ),
        f("family", offset_of!(SocketEntry, family), FAMILY),
        f("_pad", offset_of!(SocketEntry, _pad), Kind::Pad { len: 2 }),
        f(
            "established",
            offset_of!(SocketEntry, established),
            Kind::U32,
        ),
        f("started_ns", offset_of!(SocketEntry, started_ns), Kind::U64),
        f("epoch_ns", offset_of!(SocketEntry, epoch_ns), Kind::U64),
    ],
);

const DNS_KEY: (usize, &[Field]) = (
    size_of::<DnsKey>(),
    &[
        f("netns_cookie", offset_of!(DnsKey, netns_cookie), Kind::U64),
        f("port", offset_of!(DnsKey, port), Kind::PortBe),
        f("family", offset_of!(DnsKey, family), FAMILY),
        f("_pad", offset_of!(DnsKey, _pad), Kind::Pad { len: 4 }),
    ],
);

const BIND_KEY: (usize, &[Field]) = (
    size_of::<BindKey>(),
    &[
        f("netns_cookie", offset_of!(BindKey, netns_cookie), Kind::U64),
        f("port", offset_of!(BindKey, port), Kind::U16),
        f("family", offset_of!(BindKey, family), FAMILY),
        f("_pad", offset_of!(BindKey, _pad), Kind::Pad { len: 4 }),
    ],
);

const BIND_VALUE: (usize, &[Field]) = (
    size_of::<BindValue>(),
    &[f(
        "socket_cookie",
        offset_of!(BindValue, socket_cookie),
        Kind::U64,
    )],
);

const PEER_KERNEL_VALUE: (usize, &[Field]) = (
    size_of::<PeerKernelStats>(),
    &[f(
        "counters",
        offset_of!(PeerKernelStats, counters),
        Kind::Counters {
            names: &peer_counter::NAMES,
            slots: peer_counter::COUNT,
        },
    )],
);

const POD_META_VALUE: (usize, &[Field]) = (
    size_of::<PodMeta>(),
    &[
        f(
            "name",
            offset_of!(PodMeta, name),
            Kind::Text { len: POD_NAME_LEN },
        ),
        f(
            "enrolled_unix_ms",
            offset_of!(PodMeta, enrolled_unix_ms),
            Kind::U64,
        ),
        f(
            "removed_unix_ms",
            offset_of!(PodMeta, removed_unix_ms),
            Kind::U64,
        ),
    ],
);

const PEER_NAMES_VALUE: (usize, &[Field]) = (
    size_of::<PeerNames>(),
    &[
        f(
            "service",
            offset_of!(PeerNames, service),
            Kind::Text { len: SERVICE_LEN },
        ),
        f(
            "workload",
            offset_of!(PeerNames, workload),
            Kind::Text { len: IDENT_LEN },
        ),
        f(
            "namespace",
            offset_of!(PeerNames, namespace),
            Kind::Text { len: IDENT_LEN },
        ),
        f(
            "pod_workload",
            offset_of!(PeerNames, pod_workload),
            Kind::Text { len: IDENT_LEN },
        ),
        f(
            "pod_namespace",
            offset_of!(PeerNames, pod_namespace),
            Kind::Text { len: IDENT_LEN },
        ),
    ],
);

const AGENT_STATS_VALUE: (usize, &[Field]) = (
    size_of::<AgentStats>(),
    &[f(
        "counters",
        offset_of!(AgentStats, counters),
        Kind::Counters {
            names: &agent_counter::NAMES,
            slots: agent_counter::COUNT,
        },
    )],
);

const POD_REFUSED_VALUE: (usize, &[Field]) = (
    size_of::<PodRefused>(),
    &[f(
        "counters",
        offset_of!(PodRefused, counters),
        Kind::Counters {
            names: &pod_refusal::NAMES,
            slots: pod_refusal::COUNT,
        },
    )],
);

/// Every map the agent pins, in `sockmesh maps list` order. A pinned map must be here (a test
/// checks the names against [`map_names::ALL`] and [`peer::map_names::ALL`]).
pub const MAPS: &[MapLayout] = &[
    map(
        map_names::CONFIG,
        MapKind::Array,
        "agent settings and heartbeat",
        INDEX_KEY,
        CONFIG_VALUE,
    ),
    map(
        map_names::PODS,
        MapKind::Hash,
        "enrolled pods and their exclusions",
        NETNS_KEY,
        POD_CONFIG_VALUE,
    ),
    map(
        map_names::POD_STATS,
        MapKind::PerCpuHash,
        "kernel counters per pod",
        NETNS_KEY,
        POD_STATS_VALUE,
    ),
    map(
        map_names::SOCK_STORE,
        MapKind::SkStorage,
        "what the programs remember per socket, in the socket",
        SOCK_STORE_KEY,
        SOCKET_ENTRY_VALUE,
    ),
    map(
        map_names::FAST_SOCKETS,
        MapKind::Hash,
        "sockets the kernel tier let go direct, by socket cookie",
        SOCKET_KEY,
        SOCKET_ENTRY_VALUE,
    ),
    map(
        map_names::FOUND_BINDS,
        MapKind::Hash,
        "binds found listening at enrolment, by socket cookie",
        SOCKET_KEY,
        SOCKET_ENTRY_VALUE,
    ),
    map(
        map_names::POD_QUOTA,
        MapKind::Hash,
        "each pod's live entries of the shared maps, against its quotas",
        NETNS_KEY,
        POD_QUOTA_VALUE,
    ),
    map(
        map_names::ORIGIN_BY_TUPLE,
        MapKind::Hash,
        "original destination per proxied connection",
        TUPLE_KEY,
        ORIGIN_VALUE,
    ),
    map(
        map_names::INBOUND_PEERS,
        MapKind::LruHash,
        "real client per inbound connection",
        TUPLE_KEY,
        CLIENT_VALUE,
    ),
    map(
        map_names::DNS_ORIGINS,
        MapKind::Hash,
        "original DNS server per pod UDP socket",
        DNS_KEY,
        SERVER_VALUE,
    ),
    map(
        map_names::INBOUND_BINDS,
        MapKind::Hash,
        "captured wildcard binds",
        BIND_KEY,
        BIND_VALUE,
    ),
    map(
        map_names::EVENTS,
        MapKind::RingBuf,
        "bind events for the agent (a stream, no entries)",
        (0, &[]),
        (0, &[]),
    ),
    map(
        map_names::VERDICTS,
        MapKind::LruHash,
        "fast-reject verdicts per pod and peer",
        VERDICT_KEY,
        VERDICT_VALUE,
    ),
    ENDPOINTS_MAP,
    ENDPOINT_RESULTS_MAP,
    map(
        map_names::AGENT_SOCKETS,
        MapKind::Hash,
        "the agent's own sockets",
        SOCKET_KEY,
        AGENT_SOCKET_VALUE,
    ),
    map(
        peer::map_names::PEER_STATS,
        MapKind::LruPerCpuHash,
        "kernel counters per pod, direction and peer",
        PEER_KEY,
        PEER_KERNEL_VALUE,
    ),
    map(
        peer::map_names::PEER_STATE,
        MapKind::LruHash,
        "the agent's state per pod, direction and peer",
        PEER_KEY,
        PEER_STATE_VALUE,
    ),
    map(
        peer::map_names::POD_META,
        MapKind::LruHash,
        "pod names and enrolment times",
        NETNS_KEY,
        POD_META_VALUE,
    ),
    map(
        peer::map_names::PEER_NAMES,
        MapKind::LruHash,
        "who each peer is (Service, workload, namespace), as the agent resolved it",
        PEER_KEY,
        PEER_NAMES_VALUE,
    ),
    map(
        peer::map_names::AGENT_STATS,
        MapKind::Array,
        "agent-wide counters",
        INDEX_KEY,
        AGENT_STATS_VALUE,
    ),
    map(
        peer::map_names::POD_REFUSED,
        MapKind::LruHash,
        "what the agent's caps and shares refused per pod",
        NETNS_KEY,
        POD_REFUSED_VALUE,
    ),
];

/// The layout of the pinned map `name`, if the schema knows it.
pub fn find(name: &str) -> Option<&'static MapLayout> {
    MAPS.iter().find(|m| m.name == name)
}
