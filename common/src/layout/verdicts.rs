//! The layouts of `SM_VERDICTS` (the kernel fast path's per-peer entry) and the tier names
//! the per-peer state shares with it; the map table is in `maps.rs`.
use core::mem::{offset_of, size_of};

use super::{f, map, Field, Kind, MapKind, MapLayout};
use crate::fast::{
    refusal, tier, EndpointKey, EndpointResults, EndpointSet, Verdict, VerdictKey, WindowBucket,
    ADAPTIVE_BUCKETS, LATENCY_RING, MAX_KERNEL_ENDPOINTS,
};
use crate::{map_names, SockAddr};

// Every slot of `EndpointSet::addrs` has its field below.
const _: () = assert!(MAX_KERNEL_ENDPOINTS == 16);

pub(super) fn socket_kind_name(v: u64) -> &'static str {
    match v as u16 {
        crate::socket_kind::TCP_REDIRECT => "tcp_redirect",
        crate::socket_kind::DNS => "dns",
        crate::socket_kind::BIND => "bind",
        crate::socket_kind::FAST => "fast",
        _ => "none",
    }
}
pub(super) fn tier_name(v: u64) -> &'static str {
    match v as u32 {
        tier::PROXY => "proxy",
        tier::KERNEL => "kernel",
        _ => "unknown",
    }
}
fn refusal_name(v: u64) -> &'static str {
    match v as u32 {
        refusal::UNSAID => "unsaid",
        refusal::BREAKER => "breaker",
        refusal::RATE => "rate",
        _ => "unknown",
    }
}
pub(super) fn tier_reason_name(v: u64) -> &'static str {
    crate::peer::tier_reason::name(v as u8)
}

pub(super) const VERDICT_KEY: (usize, &[Field]) = (
    size_of::<VerdictKey>(),
    &[
        f(
            "netns_cookie",
            offset_of!(VerdictKey, netns_cookie),
            Kind::U64,
        ),
        f("peer", offset_of!(VerdictKey, peer), Kind::SockAddr),
        f("_pad", offset_of!(VerdictKey, _pad), Kind::Pad { len: 4 }),
    ],
);

pub(super) const VERDICT_VALUE: (usize, &[Field]) = (
    size_of::<Verdict>(),
    &[
        f("until_ns", offset_of!(Verdict, until_ns), Kind::U64),
        f(
            "tier",
            offset_of!(Verdict, tier),
            Kind::Named {
                size: 4,
                name: tier_name,
            },
        ),
        f(
            "connect_timeout_ms",
            offset_of!(Verdict, connect_timeout_ms),
            Kind::U32,
        ),
        f(
            "breaker_failures",
            offset_of!(Verdict, breaker_failures),
            Kind::U32,
        ),
        f(
            "breaker_opened",
            offset_of!(Verdict, breaker_opened),
            Kind::U32,
        ),
        f(
            "breaker_open_ns",
            offset_of!(Verdict, breaker_open_ns),
            Kind::U64,
        ),
        f("max_conns", offset_of!(Verdict, max_conns), Kind::U64),
        f("active", offset_of!(Verdict, active), Kind::U64),
        f("failures", offset_of!(Verdict, failures), Kind::U64),
        f("rate_tokens", offset_of!(Verdict, rate_tokens), Kind::U64),
        f("rate_per_ns", offset_of!(Verdict, rate_per_ns), Kind::U64),
        f("rate_burst", offset_of!(Verdict, rate_burst), Kind::U64),
        f("epoch_ns", offset_of!(Verdict, epoch_ns), Kind::U64),
        f("rate_tat", offset_of!(Verdict, rate_tat), Kind::U64),
        f(
            "adaptive_k_milli",
            offset_of!(Verdict, adaptive_k_milli),
            Kind::U64,
        ),
        f(
            "adaptive_bucket_ns",
            offset_of!(Verdict, adaptive_bucket_ns),
            Kind::U64,
        ),
        f(
            "idle_timeout_ms",
            offset_of!(Verdict, idle_timeout_ms),
            Kind::U64,
        ),
        // The adaptive window's buckets (epoch, requests, accepts each): kernel state, shown
        // raw by bpftool; not decoded here.
        f(
            "window",
            offset_of!(Verdict, window),
            Kind::Pad {
                len: ADAPTIVE_BUCKETS * size_of::<WindowBucket>(),
            },
        ),
        f(
            "refusal",
            offset_of!(Verdict, refusal),
            Kind::Named {
                size: 4,
                name: refusal_name,
            },
        ),
        f("_pad", offset_of!(Verdict, _pad), Kind::Pad { len: 4 }),
        f("latency_seq", offset_of!(Verdict, latency_seq), Kind::U64),
        // The latency ring (µs each): kernel state, shown raw by bpftool; `peers` shows its
        // quantiles.
        f(
            "latency_us",
            offset_of!(Verdict, latency_us),
            Kind::Pad {
                len: LATENCY_RING * size_of::<u32>(),
            },
        ),
    ],
);

/// `SM_ENDPOINTS` and `SM_EP_RESULTS`: endpoint picking on the kernel tier.
pub(super) const ENDPOINTS_MAP: MapLayout = map(
    map_names::ENDPOINTS,
    MapKind::Hash,
    "endpoints connect4/6 picks from, per pod and Service (DestinationRule)",
    VERDICT_KEY,
    (
        size_of::<EndpointSet>(),
        &[
            f("cursor", offset_of!(EndpointSet, cursor), Kind::U64),
            f("count", offset_of!(EndpointSet, count), Kind::U32),
            f("_pad", offset_of!(EndpointSet, _pad), Kind::Pad { len: 4 }),
            ep(0, "endpoint0"),
            ep(1, "endpoint1"),
            ep(2, "endpoint2"),
            ep(3, "endpoint3"),
            ep(4, "endpoint4"),
            ep(5, "endpoint5"),
            ep(6, "endpoint6"),
            ep(7, "endpoint7"),
            ep(8, "endpoint8"),
            ep(9, "endpoint9"),
            ep(10, "endpoint10"),
            ep(11, "endpoint11"),
            ep(12, "endpoint12"),
            ep(13, "endpoint13"),
            ep(14, "endpoint14"),
            ep(15, "endpoint15"),
        ],
    ),
);

const fn ep(i: usize, name: &'static str) -> Field {
    f(
        name,
        offset_of!(EndpointSet, addrs) + i * size_of::<SockAddr>(),
        Kind::SockAddr,
    )
}

pub(super) const ENDPOINT_RESULTS_MAP: MapLayout = map(
    map_names::ENDPOINT_RESULTS,
    MapKind::LruHash,
    "direct connect results per pod, Service and picked endpoint",
    (
        size_of::<EndpointKey>(),
        &[
            f(
                "netns_cookie",
                offset_of!(EndpointKey, netns_cookie),
                Kind::U64,
            ),
            f("vip", offset_of!(EndpointKey, vip), Kind::SockAddr),
            f(
                "endpoint",
                offset_of!(EndpointKey, endpoint),
                Kind::SockAddr,
            ),
        ],
    ),
    (
        size_of::<EndpointResults>(),
        &[
            f(
                "successes",
                offset_of!(EndpointResults, successes),
                Kind::U64,
            ),
            f("failures", offset_of!(EndpointResults, failures), Kind::U64),
            f(
                "consecutive",
                offset_of!(EndpointResults, consecutive),
                Kind::U64,
            ),
        ],
    ),
);
