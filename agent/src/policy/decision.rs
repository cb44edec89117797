//! What admission answers, and what the table counts: the types the agent's
//! proxy, CLI and metrics consume.

use super::breaker::BreakerState;
use super::clock::Nanos;
use super::concurrency::Ticket;
use super::timeouts::Timeouts;
use std::time::Duration;

/// Why an attempt was refused locally.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    BreakerOpen,
    AdaptiveThrottle,
    RateLimited,
    ConcurrencyFull,
    QueueTimeout,
}

impl RejectReason {
    pub const ALL: [RejectReason; 5] = [
        RejectReason::BreakerOpen,
        RejectReason::AdaptiveThrottle,
        RejectReason::RateLimited,
        RejectReason::ConcurrencyFull,
        RejectReason::QueueTimeout,
    ];

    /// Stable snake_case name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BreakerOpen => "breaker_open",
            RejectReason::AdaptiveThrottle => "adaptive_throttle",
            RejectReason::RateLimited => "rate_limited",
            RejectReason::ConcurrencyFull => "concurrency_full",
            RejectReason::QueueTimeout => "queue_timeout",
        }
    }

    /// Position in [`RejectReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Identifies one incarnation of a peer entry. Hand it back to
/// [`PeerTable::on_close`](super::PeerTable::on_close) (and the queue calls), so
/// that after an eviction a stale close cannot release a slot of the peer's next
/// entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lease(pub(super) u64);

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead; call `on_close` with `lease` when the connection ends, whatever
    /// happens to it. `timeouts` are the peer's.
    Admit { lease: Lease, timeouts: Timeouts },
    /// Wait for `on_close` of another connection to hand out `ticket`, or give up
    /// at `deadline` with `queue_timeout`. Once granted, it is an `Admit`.
    Queue {
        lease: Lease,
        ticket: Ticket,
        deadline: Nanos,
    },
    /// Refused locally. `retry_after` is when the same attempt could pass, if
    /// known.
    Reject {
        reason: RejectReason,
        retry_after: Option<Duration>,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub admitted: u64,
    pub queued: u64,
    /// Queued attempts later granted a slot.
    pub granted: u64,
    pub breaker_opened: u64,
    /// Entries dropped to make room (including `evicted_busy`).
    pub evicted: u64,
    /// Evictions that had to drop an entry with connections or waiters.
    pub evicted_busy: u64,
    pub expired_idle: u64,
    rejected: [u64; RejectReason::ALL.len()],
}

impl Counters {
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()]
    }

    pub(super) fn reject(&mut self, reason: RejectReason) {
        self.rejected[reason.index()] += 1;
    }
}

/// A read-only snapshot of one peer, for `sockmesh peers` and metrics.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct PeerView {
    pub connections: u32,
    pub queued: usize,
    pub breaker: Option<BreakerState>,
    pub reject_probability: Option<f64>,
    pub conn_tokens: Option<u64>,
    pub idle_for: Duration,
}
