//! One peer's state: the knobs of its [`PeerPolicy`] composed in admission order.
//! The table adds identity (lease), LRU bookkeeping and counters on top.
//!
//! # Breaker and adaptive throttling together
//!
//! The two answer different questions: the breaker "is this peer down?" (and,
//! when it says so, the kernel refuses at once), adaptive throttling "how much
//! should a struggling peer get?". Left independent they fight on a dead peer:
//! after the first failure the throttle starts refusing locally, those refusals
//! never reach the peer, so the breaker's F consecutive failures take e^F
//! attempts instead of F, and the kernel fast path starts late. And after an
//! outage the throttle's window is full of failures, so it would starve the
//! breaker's half-open probes and keep refusing a recovered peer for minutes.
//! So, with both knobs on:
//!
//! 1. **A throttled attempt counts as a breaker failure while the breaker is
//!    closed.** It did not get a connection, and the throttle only refuses once
//!    more than 1 - 1/K of the window's attempts failed. A dead peer opens the
//!    breaker after exactly F attempts, as with throttling off. A success still
//!    resets the streak, so a peer that mostly works keeps its breaker closed
//!    and is only throttled.
//! 2. **Half-open probes bypass the throttle.** The ramp (10 % → 100 %) is
//!    already the more careful throttle, and a probe refused by the coin would
//!    delay recovery for nothing.
//! 3. **When the ramp closes the breaker, the throttle's window is cleared.**
//!    Its samples describe the outage the breaker has just handled; the
//!    recovered peer starts with a clean history.
//!
//! Without a breaker (`breaker_failures = off`) the throttle is plain SRE
//! throttling.

use super::adaptive::AdaptiveThrottle;
use super::breaker::{Breaker, BreakerDecision, BreakerTransition, ConnectFailure};
use super::clock::Nanos;
use super::concurrency::{Acquire, ConcurrencyConfig, ConcurrencyLimiter};
use super::decision::{Decision, Lease, RejectReason};
use super::peer_policy::{PeerPolicy, RateLimit};
use super::token_bucket::{TokenBucket, Wait};
use std::time::Duration;

/// Concurrency config when the knob is off: the limiter still counts connections
/// (the table needs the count to protect busy peers) but never queues or rejects.
/// Keeping a limiter in every state also means a reload that turns the knob on or
/// off never loses track of slots or restarts ticket numbers.
const UNLIMITED: ConcurrencyConfig = ConcurrencyConfig {
    max_concurrent: u32::MAX,
    max_queue: 0,
    standing_wait: Duration::from_millis(5),
    interval: Duration::from_millis(100),
};

#[derive(Clone, Debug)]
pub(super) struct PeerState {
    pub(super) policy: PeerPolicy,
    pub(super) breaker: Option<Breaker>,
    pub(super) adaptive: Option<AdaptiveThrottle>,
    pub(super) rate: Option<TokenBucket>,
    pub(super) bandwidth: Option<TokenBucket>,
    pub(super) concurrency: ConcurrencyLimiter,
}

impl PeerState {
    pub(super) fn new(policy: PeerPolicy, now: Nanos) -> PeerState {
        let mut state = PeerState {
            policy: PeerPolicy {
                timeouts: policy.timeouts,
                conn_rate: None,
                bandwidth: None,
                concurrency: None,
                breaker: None,
                adaptive: None,
                endpoint_selection: false,
            },
            breaker: None,
            adaptive: None,
            rate: None,
            bandwidth: None,
            concurrency: ConcurrencyLimiter::new(UNLIMITED),
        };
        state.apply_policy(policy, now);
        state
    }

    /// Switches to `policy`, keeping the state of every knob whose config did not
    /// change, and reconfiguring in place the ones that did (see each knob's
    /// `set_config`/`reconfigure`). A knob turned off drops its state; one turned
    /// on starts fresh.
    pub(super) fn apply_policy(&mut self, policy: PeerPolicy, now: Nanos) {
        if policy == self.policy {
            return;
        }
        sync_bucket(&mut self.rate, policy.conn_rate, now);
        sync_bucket(&mut self.bandwidth, policy.bandwidth, now);
        match (&mut self.breaker, policy.breaker) {
            (Some(b), Some(config)) => b.set_config(config),
            (slot, config) => *slot = config.map(Breaker::new),
        }
        match (&mut self.adaptive, policy.adaptive) {
            (Some(a), Some(config)) => a.set_config(config),
            (slot, config) => *slot = config.map(AdaptiveThrottle::new),
        }
        self.concurrency
            .set_config(policy.concurrency.unwrap_or(UNLIMITED));
        self.policy = policy;
    }

    /// Admission order: breaker → adaptive → rate → concurrency (see `mod.rs`). `lease` is
    /// the entry's, handed back in an admission. The flag says this rejection opened the
    /// breaker (a throttled attempt, rule 1), for the table's counters.
    pub(super) fn admit(&mut self, now: Nanos, rand01: f64, lease: Lease) -> (Decision, bool) {
        let mut probe = false;
        if let Some(breaker) = &mut self.breaker {
            if let BreakerDecision::Reject { retry_after } = breaker.admit(now) {
                let until = retry_after.map(|d| now.saturating_add(d));
                return reject(RejectReason::BreakerOpen, retry_after, until);
            }
            probe = breaker.is_probing(now);
        }
        if let (Some(adaptive), false) = (&mut self.adaptive, probe) {
            if adaptive.admit(now, rand01).is_err() {
                let opened = self.breaker.as_mut().and_then(|b| b.on_local_reject(now));
                if let Some(BreakerTransition::Opened { until }) = opened {
                    let d = Decision::Reject {
                        reason: RejectReason::AdaptiveThrottle,
                        retry_after: Some(until.saturating_since(now)),
                        fast_reject_until: Some(until),
                    };
                    return (d, true);
                }
                return reject(RejectReason::AdaptiveThrottle, None, None);
            }
        }
        if let Some(rate) = &mut self.rate {
            match rate.try_take(now, 1) {
                Ok(()) => {}
                Err(Wait::After(wait)) => {
                    // Only time refills the bucket, and nothing queues on it: every
                    // attempt until the next token is due would be refused too.
                    let due = now.saturating_add(wait);
                    return reject(RejectReason::RateLimited, Some(wait), Some(due));
                }
                Err(Wait::Never) => return reject(RejectReason::RateLimited, None, None),
            }
        }
        match self.concurrency.try_acquire(now) {
            Acquire::Acquired => {
                let timeouts = self.policy.timeouts;
                (Decision::Admit { lease, timeouts }, false)
            }
            Acquire::Queued { ticket, deadline } => {
                let d = Decision::Queue {
                    lease,
                    ticket,
                    deadline,
                };
                (d, false)
            }
            Acquire::Rejected => {
                // The attempt goes nowhere: give its rate token back, so a full
                // queue does not also drain the peer's connection budget.
                if let Some(rate) = &mut self.rate {
                    rate.refund(1);
                }
                reject(RejectReason::ConcurrencyFull, None, None)
            }
        }
    }

    pub(super) fn on_connect_result(
        &mut self,
        now: Nanos,
        result: Result<(), ConnectFailure>,
    ) -> Option<BreakerTransition> {
        if let Some(adaptive) = &mut self.adaptive {
            adaptive.on_result(now, result.is_ok());
        }
        let breaker = self.breaker.as_mut()?;
        let transition = match result {
            Ok(()) => breaker.on_success(now),
            Err(_) => breaker.on_failure(now),
        };
        if let (Some(BreakerTransition::Closed), Some(adaptive)) = (transition, &mut self.adaptive)
        {
            // Rule 3 (module doc): the outage is over, so is its history.
            adaptive.clear();
        }
        transition
    }

    /// Connections or waiters present: dropping this state would lose track of them.
    pub(super) fn is_busy(&self) -> bool {
        self.concurrency.active() > 0 || self.concurrency.queued() > 0
    }

    /// The instant dropping this state stops losing information: the breaker is no
    /// longer open, both buckets are full, the adaptive window is empty.
    pub(super) fn rests_at(&self, now: Nanos) -> Nanos {
        let breaker = self.breaker.as_ref().and_then(|b| b.open_until(now));
        let buckets = [&self.rate, &self.bandwidth]
            .into_iter()
            .flatten()
            .map(TokenBucket::full_at);
        let adaptive = self.adaptive.as_ref().map(AdaptiveThrottle::clear_at);
        breaker
            .into_iter()
            .chain(buckets)
            .chain(adaptive)
            .max()
            .unwrap_or(Nanos::ZERO)
    }
}

fn reject(
    reason: RejectReason,
    retry_after: Option<Duration>,
    fast_reject_until: Option<Nanos>,
) -> (Decision, bool) {
    let d = Decision::Reject {
        reason,
        retry_after,
        fast_reject_until,
    };
    (d, false)
}

fn sync_bucket(slot: &mut Option<TokenBucket>, limit: Option<RateLimit>, now: Nanos) {
    match (slot.as_mut(), limit) {
        (Some(bucket), Some(l))
            if bucket.rate() == l.rate && bucket.capacity() == l.burst.max(1) => {}
        (Some(bucket), Some(l)) => bucket.reconfigure(now, l.rate, l.burst),
        (_, l) => *slot = l.map(|l| TokenBucket::new(l.rate, l.burst, now)),
    }
}
