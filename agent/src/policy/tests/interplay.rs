//! How the knobs act together: breaker vs adaptive throttling (rules in `peer.rs`), the
//! kernel fast-reject expiry of each rejection, and the counters by reason, per peer and
//! for the whole table.
use super::table::{admitted, bare, breaker, concurrency, key, limit, refused, table, Key};
use super::{ms, secs};
use crate::policy::breaker::{BreakerState, BreakerTransition, ConnectFailure};
use crate::policy::clock::Nanos;
use crate::policy::decision::{Counters, Decision};
use crate::policy::peer_policy::PeerPolicy;
use crate::policy::table::PeerTable;
use crate::policy::RejectReason::*;
use std::time::Duration;

/// rand01 = 0: adaptive throttling rejects whenever its probability is above zero.
const ALWAYS: f64 = 0.0;
/// rand01 just under 1: it never rejects below p = 0.999.
const NEVER: f64 = 0.999;

fn view_of(t: &PeerTable<Key>, now: Nanos, k: Key) -> crate::policy::PeerView {
    t.peers(now)
        .find(|(key, _)| **key == k)
        .map(|(_, v)| v)
        .expect("peer tracked")
}

fn fail(t: &mut PeerTable<Key>, now: Nanos, k: Key) -> Option<BreakerTransition> {
    t.on_connect_result(now, &k, Err(ConnectFailure::Refused))
}

/// Rule 1: a dead peer opens the breaker after exactly F attempts whether adaptive
/// throttling refuses some of them locally or not, and the attempt that opens it carries
/// the kernel expiry.
#[test]
fn a_dead_peer_opens_the_breaker_after_f_attempts_with_throttling_on() {
    let mut t = table(8, PeerPolicy::default());
    let k = key(1);
    // Attempt 1: nothing recorded yet, p = 0: it reaches the peer and fails.
    admitted(t.admit(secs(1), &k, ALWAYS));
    assert_eq!(fail(&mut t, secs(1), k), None);
    // Attempts 2-4: p > 0, throttled locally; each extends the breaker's streak.
    for streak in 2..=4 {
        assert_eq!(
            t.admit(secs(1), &k, ALWAYS),
            Decision::Reject {
                reason: AdaptiveThrottle,
                retry_after: None,
                fast_reject_until: None
            }
        );
        assert_eq!(
            view_of(&t, secs(1), k).breaker,
            Some(BreakerState::Closed {
                consecutive_failures: streak
            })
        );
    }
    // Attempt 5 (F = 5): throttled, and that opens the breaker for D = 15 s.
    assert_eq!(
        t.admit(secs(1), &k, ALWAYS),
        refused(AdaptiveThrottle, secs(1), Duration::from_secs(15))
    );
    assert_eq!(t.breaker_open_until(secs(1), &k), Some(secs(16)));
    assert_eq!(
        t.admit(ms(1001), &k, ALWAYS),
        refused(BreakerOpen, ms(1001), Duration::from_millis(14_999))
    );
    let c = t.counters();
    assert_eq!((c.breaker_opened, c.breaker_opened_by_throttle), (1, 1));
    assert_eq!(c.rejected(AdaptiveThrottle), 4);
    assert_eq!(c.fast_reject_verdicts, 2);
    assert_eq!(c.connect_failed(ConnectFailure::Refused), 1);
}

/// The same dead peer when the coin never throttles: five real failures open it, as
/// before (and it is the connect result, not admission, that reports the opening).
#[test]
fn without_throttled_attempts_five_failures_open_it() {
    let mut t = table(8, PeerPolicy::default());
    let k = key(1);
    for _ in 1..=4 {
        admitted(t.admit(secs(1), &k, NEVER));
        assert_eq!(fail(&mut t, secs(1), k), None);
    }
    admitted(t.admit(secs(1), &k, NEVER));
    assert_eq!(
        fail(&mut t, secs(1), k),
        Some(BreakerTransition::Opened { until: secs(16) })
    );
    assert_eq!(t.counters().breaker_opened_by_throttle, 0);
}

/// A success resets the streak, throttled attempts included: a peer that still accepts
/// some connections is throttled, not cut off.
#[test]
fn a_success_resets_the_streak_so_a_partly_failing_peer_is_only_throttled() {
    let mut t = table(8, PeerPolicy::default());
    let k = key(1);
    admitted(t.admit(secs(1), &k, ALWAYS));
    assert_eq!(t.on_connect_result(secs(1), &k, Ok(())), None);
    for _ in 0..2 {
        admitted(t.admit(secs(1), &k, ALWAYS));
        fail(&mut t, secs(1), k);
    }
    // requests 3, accepts 1: p = 1/4. Two throttled: streak 4, p = 3/6.
    for _ in 0..2 {
        assert!(matches!(
            t.admit(secs(1), &k, ALWAYS),
            Decision::Reject {
                reason: AdaptiveThrottle,
                ..
            }
        ));
    }
    // The coin lets one through and it succeeds: the streak is gone.
    admitted(t.admit(secs(1), &k, NEVER));
    assert_eq!(t.on_connect_result(secs(1), &k, Ok(())), None);
    for _ in 0..4 {
        assert!(t.admit(secs(1), &k, ALWAYS).fast_reject_until().is_none());
    }
    assert_eq!(
        view_of(&t, secs(1), k).breaker,
        Some(BreakerState::Closed {
            consecutive_failures: 4
        })
    );
}

/// Rules 2 and 3: half-open probes are never throttled, even with the window full of
/// failures; the ramp runs exactly as with throttling off, and once it closes the
/// breaker the throttle starts from a clean window.
#[test]
fn half_open_probes_bypass_the_throttle_and_closing_clears_it() {
    let mut t = table(8, PeerPolicy::default());
    let k = key(1);
    for _ in 0..5 {
        admitted(t.admit(secs(0), &k, NEVER));
        fail(&mut t, secs(0), k);
    }
    assert_eq!(t.breaker_open_until(secs(0), &k), Some(secs(15)));
    assert!(view_of(&t, secs(15), k).reject_probability > Some(0.8));
    // The counter-based ramp: A R R R R A R R A A (10 % → 20 → 40 → 80 → closed).
    let mut pattern = String::new();
    let mut closed = false;
    for i in 0..10 {
        let now = secs(15).saturating_add(Duration::from_millis(i));
        match t.admit(now, &k, ALWAYS) {
            Decision::Admit { .. } => {
                pattern.push('A');
                closed = t.on_connect_result(now, &k, Ok(())) == Some(BreakerTransition::Closed);
            }
            Decision::Reject {
                reason,
                fast_reject_until,
                ..
            } => {
                assert_eq!((reason, fast_reject_until), (BreakerOpen, None));
                pattern.push('R');
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pattern, "ARRRRARRAA");
    assert!(closed, "the fourth good probe closes the breaker");
    assert_eq!(view_of(&t, secs(16), k).reject_probability, Some(0.0));
    admitted(t.admit(secs(16), &k, ALWAYS));
    assert_eq!(t.counters().breaker_closed, 1);
}

/// Rate limit: the rejection says when the next token is due, which is exactly when
/// the next attempt is admitted (and the kernel verdict's expiry).
#[test]
fn a_rate_rejection_carries_the_next_token_time() {
    let mut t = table(
        8,
        PeerPolicy {
            conn_rate: limit(2, Duration::from_secs(1), 3),
            ..bare()
        },
    );
    let k = key(1);
    for _ in 0..3 {
        let lease = admitted(t.admit(secs(0), &k, 0.5));
        t.on_close(secs(0), &k, lease);
    }
    let d = t.admit(secs(0), &k, 0.5);
    assert_eq!(d, refused(RateLimited, secs(0), Duration::from_millis(500)));
    assert_eq!(d.fast_reject_until(), Some(ms(500)));
    // Anything earlier is refused with the same expiry; at it, admitted.
    assert_eq!(t.admit(ms(499), &k, 0.5).fast_reject_until(), Some(ms(500)));
    admitted(t.admit(ms(500), &k, 0.5));
    assert_eq!(t.counters().fast_reject_verdicts, 2);
}

/// Every decision is counted by reason, for the table and for the peer it concerns.
#[test]
fn every_decision_is_counted_per_peer_and_in_total() {
    let source = Box::new(|k: &Key| PeerPolicy {
        concurrency: concurrency(1, 4),
        bandwidth: limit(1000, Duration::from_secs(1), 1000),
        breaker: if k.2 == 1 { breaker(5) } else { None },
        ..bare()
    });
    let mut t = PeerTable::new(Default::default(), source);
    let (a, b) = (key(1), key(2));
    let la = admitted(t.admit(secs(0), &a, 0.5));
    t.on_connect_result(secs(0), &a, Ok(()));
    // Queued twice behind it: one gives up, one is granted.
    let Decision::Queue {
        lease, ticket: t1, ..
    } = t.admit(secs(0), &a, 0.5)
    else {
        panic!("queued")
    };
    let Decision::Queue { ticket: t2, .. } = t.admit(secs(0), &a, 0.5) else {
        panic!("queued")
    };
    assert!(t.cancel_wait(ms(1), &a, lease, t1));
    assert_eq!(t.on_close(ms(2), &a, la), Some(t2));
    // Shaping: 1500 bytes against a 1000-byte bucket, the second write waits.
    assert_eq!(t.shape(ms(2), &a, 1000), Duration::ZERO);
    assert_eq!(t.shape(ms(2), &a, 500), Duration::from_millis(500));
    // Peer b: one timeout.
    admitted(t.admit(secs(0), &b, 0.5));
    t.on_connect_result(secs(0), &b, Err(ConnectFailure::Timeout));

    let ca = view_of(&t, ms(2), a).counters;
    let mut want = Counters::default();
    want.admitted = 1;
    want.queued = 2;
    want.granted = 1;
    want.queue_cancelled = 1;
    want.connect_ok = 1;
    want.shaped_writes = 1;
    want.shaped_delay_ns = 500_000_000;
    want.shaped_bytes = 1500;
    assert_eq!(ca, want);
    let cb = view_of(&t, ms(2), b).counters;
    assert_eq!((cb.admitted, cb.connect_ok), (1, 0));
    assert_eq!(cb.connect_failed(ConnectFailure::Timeout), 1);
    assert_eq!(cb.queued, 0);
    // The table's counters are the sum (nothing evicted here).
    want.admitted += 1;
    let total = t.counters();
    assert_eq!(total.connect_failed(ConnectFailure::Timeout), 1);
    assert_eq!(
        (
            total.admitted,
            total.queued,
            total.granted,
            total.queue_cancelled
        ),
        (
            want.admitted,
            want.queued,
            want.granted,
            want.queue_cancelled
        )
    );
    assert_eq!(
        (total.shaped_writes, total.shaped_bytes),
        (want.shaped_writes, want.shaped_bytes)
    );
}
