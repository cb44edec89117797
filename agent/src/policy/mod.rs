//! The per-peer policy engine: pure state machines, no I/O.
//!
//! Nothing here touches a socket, the kernel, tokio or the wall clock. Every call
//! takes `now` ([`Nanos`], from a [`Clock`] the owner holds) and, where a decision
//! is random, a number in [0, 1) the owner draws. Given the same inputs, the same
//! answers, which is what makes every knob unit-testable to the nanosecond.
//!
//! # Pieces
//!
//! | module | knob |
//! |---|---|
//! | [`token_bucket`] | connection rate (rejects) and bandwidth (delays) |
//! | [`breaker`] | circuit breaker on connect failures, counter-based half-open ramp |
//! | [`adaptive`] | Google SRE client-side adaptive throttling |
//! | [`concurrency`] | max concurrent connections, CoDel-timed adaptive-LIFO queue |
//! | [`timeouts`] | connect / idle / lifetime / DNS timeouts and deadline math |
//! | [`outlier`] | endpoint picking and outlier ejection for a Service port (Istio DestinationRules at L4) |
//! | [`fast`] | the kernel tier: which policies the kernel enforces exactly, and its entry |
//! | [`idle_sweep`] | when the kernel tier's direct connections of a pod next need a look for the idle timeout |
//! | [`peer_policy`] | [`PeerPolicy`]: every knob of one peer, as configuration resolved it |
//! | [`key`] | [`PeerKey`]: (pod, direction, peer), what per-peer state is keyed by |
//! | [`decision`] | [`Decision`], [`RejectReason`], [`Counters`], [`PeerView`] |
//! | [`table`] | [`PeerTable`]: per-peer state, bounded LRU, composition, counters |
//! | [`bind_queue`] | per-pod queues of bind/unbind events, coalesced by port and applied at each pod's rate, round robin |
//! | [`shares`] | per-pod and node-wide caps on what pods share (connections, DNS queries in flight), with a fair share kept for every pod |
//!
//! Where a peer's [`PeerPolicy`] comes from (flags, the policy file, reload) is the
//! configuration's business: `crate::rules`, one layer up.
//!
//! # Admission order
//!
//! [`PeerTable::admit`] consults the enabled knobs in this order and stops at the
//! first rejection:
//!
//! 1. **breaker** — a peer known to be down is refused before anything else is
//!    spent on it; an open breaker is also what the kernel fast-rejects, so the
//!    agent's answer agrees with the kernel's.
//! 2. **adaptive throttle** — a local rejection here counts as a request (as in
//!    the SRE design) and, while the breaker is closed, as a breaker failure;
//!    half-open probes skip it (see `peer.rs` for why).
//! 3. **connection rate** — takes one token.
//! 4. **concurrency** — takes a slot, queues, or rejects (and then refunds the
//!    rate token: the attempt went nowhere).
//!
//! A stage that passed an attempt keeps that decision if a later stage rejects it:
//! notably a half-open breaker's probe turn is used up. Cheap to accept: it
//! delays the next probe by one admission interval.
//!
//! Afterwards the owner reports the upstream connect's outcome
//! ([`PeerTable::on_connect_result`]: feeds breaker and adaptive throttle) and
//! the end of every admitted connection ([`PeerTable::on_close`]: frees the slot,
//! possibly granting a waiter). Bandwidth is applied per write with
//! [`PeerTable::shape`].
//!
//! # What the client sees (decided by the proxy)
//!
//! | decision | TCP client |
//! |---|---|
//! | `Admit` | the proxied connection |
//! | `Queue` | nothing yet: the accepted socket waits, no upstream connect |
//! | `Reject{..}` with [`Decision::fast_reject_until`] (open breaker, empty rate bucket) | RST; until then the kernel verdict makes `connect()` fail at once instead |
//! | any other `Reject` (throttled, rate without a verdict, full queue, queue timeout) | RST (abortive close, SO_LINGER 0): a fast, unambiguous failure, never a hang |
//! | bandwidth (`shape`) | data delayed by the returned wait; never dropped |
//! | connect timeout | RST; reported as `ConnectFailure::Timeout` |
//! | idle timeout | both sides closed |
//! | max lifetime | both sides closed gracefully (FIN) |
//!
//! DNS queries do not pass admission: the knobs above are defined over connections (a
//! connect outcome feeds the breaker, a slot is held until close), a query is neither, and
//! a pod's resolver is one peer every lookup shares, so a rate or breaker written for a TCP
//! peer would take name resolution down with it. Only the DNS timeout applies to a query
//! (SERVFAIL when the upstream does not answer in time); per-pod DNS caps are the proxy's.

pub mod adaptive;
pub mod bind_queue;
pub mod breaker;
pub mod clock;
pub mod concurrency;
pub mod decision;
pub mod fast;
pub mod idle_sweep;
pub mod key;
pub mod outlier;
mod peer;
pub mod peer_policy;
pub mod shares;
pub mod table;
mod table_index;
pub mod timeouts;
pub mod token_bucket;

#[cfg(test)]
pub(crate) mod tests;

pub use breaker::{BreakerState, BreakerTransition, ConnectFailure};
pub use clock::{Clock, Nanos};
pub use concurrency::Ticket;
pub use decision::{Decision, Lease, PeerView, RejectReason};
pub use key::{Direction, PeerKey, Tenant};
pub use peer_policy::PeerPolicy;
pub use table::{PeerTable, PolicySource};
pub use timeouts::Timeouts;
