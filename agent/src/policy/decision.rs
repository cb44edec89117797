//! What admission answers, and what the table counts: the types the agent's
//! proxy, CLI and metrics consume.

use super::breaker::{BreakerState, ConnectFailure};
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
    /// known. `fast_reject_until`: until then every further attempt to this peer
    /// would be refused for certain (open breaker, empty rate bucket), so the
    /// owner may let the kernel refuse them without asking (see
    /// [`Decision::fast_reject_until`]).
    Reject {
        reason: RejectReason,
        retry_after: Option<Duration>,
        fast_reject_until: Option<Nanos>,
    },
}

impl Decision {
    /// The instant until which the kernel may refuse this peer's next attempts
    /// outright: set only when the answer is certain, whoever asks, until then.
    ///
    /// * breaker open: the end of the open period;
    /// * rate limited: when the next token is due (the rate knob never queues, so
    ///   nothing but time can admit the next attempt);
    /// * adaptive throttling whose rejection opened the breaker: the open period.
    ///
    /// Never for adaptive throttling otherwise (a coin toss: the next attempt may
    /// pass), a full queue or a queue timeout (a slot can free up at any moment).
    #[cfg(test)]
    pub fn fast_reject_until(&self) -> Option<Nanos> {
        match self {
            Decision::Reject {
                fast_reject_until, ..
            } => *fast_reject_until,
            _ => None,
        }
    }
}

/// Every decision the engine takes, by outcome and reason: kept for the whole
/// table ([`PeerTable::counters`](super::PeerTable::counters)) and per peer
/// ([`PeerView::counters`], which restarts when the entry is evicted or
/// expires). Plain numbers, so exporters copy them as they are.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub admitted: u64,
    pub queued: u64,
    /// Queued attempts later granted a slot.
    pub granted: u64,
    /// Waiters whose client went away before a grant or their deadline.
    pub queue_cancelled: u64,
    /// Upstream connects that succeeded.
    pub connect_ok: u64,
    pub breaker_opened: u64,
    /// Of `breaker_opened`: opened by adaptive-throttling rejections counted as
    /// failures (see `peer.rs`), not by upstream failures alone.
    pub breaker_opened_by_throttle: u64,
    /// Half-open ramps that reached 100 %.
    pub breaker_closed: u64,
    /// Rejections that came with a kernel fast-reject expiry
    /// ([`Decision::fast_reject_until`]).
    pub fast_reject_verdicts: u64,
    /// Writes delayed by bandwidth shaping, and their total delay.
    pub shaped_writes: u64,
    pub shaped_delay_ns: u64,
    /// Bytes passed through `shape` (delayed or not).
    pub shaped_bytes: u64,
    /// Entries dropped to make room (including `evicted_busy`).
    pub evicted: u64,
    /// Evictions that had to drop an entry with connections or waiters.
    pub evicted_busy: u64,
    pub expired_idle: u64,
    rejected: [u64; RejectReason::ALL.len()],
    connect_failed: [u64; ConnectFailure::ALL.len()],
}

impl Counters {
    #[cfg(test)]
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()]
    }

    /// Upstream connects that failed this way (each also a breaker failure).
    #[cfg(test)]
    pub fn connect_failed(&self, kind: ConnectFailure) -> u64 {
        self.connect_failed[kind.index()]
    }

    pub(super) fn reject(&mut self, reason: RejectReason) {
        self.rejected[reason.index()] += 1;
    }

    pub(super) fn connect_result(&mut self, result: Result<(), ConnectFailure>) {
        match result {
            Ok(()) => self.connect_ok += 1,
            Err(kind) => self.connect_failed[kind.index()] += 1,
        }
    }

    pub(super) fn shaped(&mut self, bytes: u64, delay: Duration) {
        self.shaped_bytes = self.shaped_bytes.saturating_add(bytes);
        if !delay.is_zero() {
            self.shaped_writes += 1;
            let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
            self.shaped_delay_ns = self.shaped_delay_ns.saturating_add(ns);
        }
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
    /// This peer's decisions since its entry was created.
    pub counters: Counters,
    /// Which tier the peer is on, and why.
    pub tier: super::fast::Tier,
}
