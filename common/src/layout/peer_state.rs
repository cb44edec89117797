//! The layout of `SM_PEER_STATE` (the agent's per-peer figures); the map table is in
//! `maps.rs`.
use core::mem::{offset_of, size_of};

use super::verdicts::{tier_name, tier_reason_name};
use super::{f, Field, Kind};
use crate::peer::{breaker_state, peer_error, throttle_reason, timeout_kind, PeerState};

fn breaker_name(v: u64) -> &'static str {
    breaker_state::name(v as u8)
}
fn error_name(v: u64) -> &'static str {
    peer_error::name(v as u8)
}

pub(super) const PEER_STATE_VALUE: (usize, &[Field]) = (
    size_of::<PeerState>(),
    &[
        f(
            "conns_active",
            offset_of!(PeerState, conns_active),
            Kind::U64,
        ),
        f("conns_total", offset_of!(PeerState, conns_total), Kind::U64),
        f("bytes_out", offset_of!(PeerState, bytes_out), Kind::U64),
        f("bytes_in", offset_of!(PeerState, bytes_in), Kind::U64),
        f(
            "timeouts",
            offset_of!(PeerState, timeouts),
            Kind::Counters {
                names: &timeout_kind::NAMES,
                slots: timeout_kind::COUNT,
            },
        ),
        f(
            "throttled",
            offset_of!(PeerState, throttled),
            Kind::Counters {
                names: &throttle_reason::NAMES,
                slots: throttle_reason::COUNT,
            },
        ),
        f(
            "connect_failures",
            offset_of!(PeerState, connect_failures),
            Kind::U64,
        ),
        f("resets", offset_of!(PeerState, resets), Kind::U64),
        f("dns_queries", offset_of!(PeerState, dns_queries), Kind::U64),
        f(
            "last_error_unix_ms",
            offset_of!(PeerState, last_error_unix_ms),
            Kind::U64,
        ),
        f(
            "breaker_open_until_ns",
            offset_of!(PeerState, breaker_open_until_ns),
            Kind::U64,
        ),
        f(
            "updated_unix_ms",
            offset_of!(PeerState, updated_unix_ms),
            Kind::U64,
        ),
        f(
            "direct_bytes_out_floor",
            offset_of!(PeerState, direct_bytes_out_floor),
            Kind::U64,
        ),
        f(
            "direct_bytes_in_floor",
            offset_of!(PeerState, direct_bytes_in_floor),
            Kind::U64,
        ),
        f(
            "connect_p50_us",
            offset_of!(PeerState, connect_p50_us),
            Kind::U32,
        ),
        f(
            "connect_p99_us",
            offset_of!(PeerState, connect_p99_us),
            Kind::U32,
        ),
        f(
            "adaptive_reject_ppm",
            offset_of!(PeerState, adaptive_reject_ppm),
            Kind::U32,
        ),
        f(
            "breaker",
            offset_of!(PeerState, breaker),
            Kind::Named {
                size: 1,
                name: breaker_name,
            },
        ),
        f(
            "last_error",
            offset_of!(PeerState, last_error),
            Kind::Named {
                size: 1,
                name: error_name,
            },
        ),
        f(
            "tier",
            offset_of!(PeerState, tier),
            Kind::Named {
                size: 1,
                name: tier_name,
            },
        ),
        f(
            "tier_reason",
            offset_of!(PeerState, tier_reason),
            Kind::Named {
                size: 1,
                name: tier_reason_name,
            },
        ),
    ],
);
