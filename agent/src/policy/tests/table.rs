use super::{dms, ms, secs};
use crate::policy::breaker::{BreakerConfig, BreakerState, BreakerTransition, ConnectFailure};
use crate::policy::clock::Nanos;
use crate::policy::concurrency::{ConcurrencyConfig, Ticket};
use crate::policy::decision::{Decision, Lease};
use crate::policy::peer_policy::{PeerPolicy, RateLimit};
use crate::policy::table::{PeerTable, TableConfig};
use crate::policy::timeouts::Timeouts;
use crate::policy::token_bucket::Rate;
use crate::policy::RejectReason::{self, *};
use std::time::Duration;

/// (pod, inbound, peer): the shape of the agent's real key.
pub(super) type Key = (u32, bool, u32);

pub(super) fn key(peer: u32) -> Key {
    (1, false, peer)
}

/// Every knob off.
pub(super) fn bare() -> PeerPolicy {
    PeerPolicy {
        timeouts: Timeouts::default(),
        conn_rate: None,
        bandwidth: None,
        concurrency: None,
        breaker: None,
        adaptive: None,
        endpoint_selection: false,
    }
}

pub(super) fn limit(tokens: u64, per: Duration, burst: u64) -> Option<RateLimit> {
    let rate = Rate::new(tokens, per).expect("valid test rate");
    Some(RateLimit { rate, burst })
}

pub(super) fn breaker(failures: u32) -> Option<BreakerConfig> {
    Some(BreakerConfig {
        failure_threshold: failures,
        ..BreakerConfig::default()
    })
}

pub(super) fn concurrency(max: u32, queue: u32) -> Option<ConcurrencyConfig> {
    Some(ConcurrencyConfig {
        max_concurrent: max,
        max_queue: queue,
        standing_wait: dms(5),
        interval: dms(100),
    })
}

pub(super) fn table(max_peers: usize, policy: PeerPolicy) -> PeerTable<Key> {
    let config = TableConfig {
        max_peers,
        idle_expiry: Duration::from_secs(300),
    };
    PeerTable::with_policy(config, policy)
}

/// A rejection the next attempts could pass (no kernel verdict).
fn reject(reason: RejectReason, retry_after: Option<Duration>) -> Decision {
    Decision::Reject {
        reason,
        retry_after,
        fast_reject_until: None,
    }
}

/// A rejection certain to repeat for `wait` from `now`: the kernel may refuse until then.
pub(super) fn refused(reason: RejectReason, now: Nanos, wait: Duration) -> Decision {
    Decision::Reject {
        reason,
        retry_after: Some(wait),
        fast_reject_until: Some(now.saturating_add(wait)),
    }
}

#[track_caller]
pub(super) fn admitted(d: Decision) -> Lease {
    match d {
        Decision::Admit { lease, .. } => lease,
        other => panic!("expected Admit, got {other:?}"),
    }
}

/// Admits and immediately closes: the peer has been used and holds nothing.
pub(super) fn use_once(t: &mut PeerTable<Key>, now: Nanos, k: Key) {
    let lease = admitted(t.admit(now, &k, 0.5));
    assert_eq!(t.on_close(now, &k, lease), None);
}

pub(super) fn connections(t: &PeerTable<Key>, now: Nanos, k: Key) -> Option<u32> {
    t.peers(now)
        .find(|(key, _)| **key == k)
        .map(|(_, v)| v.connections)
}

#[test]
fn default_table_config() {
    let c = TableConfig::default();
    assert_eq!(
        (c.max_peers, c.idle_expiry),
        (16_384, Duration::from_secs(300))
    );
}

#[test]
fn knobs_are_consulted_breaker_rate_concurrency() {
    let mut t = table(
        8,
        PeerPolicy {
            breaker: breaker(1),
            conn_rate: limit(1, Duration::from_secs(1), 1),
            concurrency: concurrency(1, 0),
            ..bare()
        },
    );
    let k = key(1);
    let lease = admitted(t.admit(secs(0), &k, 0.5));
    // Both rate and concurrency would refuse; rate is asked first.
    assert_eq!(
        t.admit(secs(0), &k, 0.5),
        refused(RateLimited, secs(0), Duration::from_secs(1))
    );
    // A token again, but the only slot is taken and there is no queue.
    assert_eq!(t.admit(secs(1), &k, 0.5), reject(ConcurrencyFull, None));
    assert_eq!(t.on_close(secs(1), &k, lease), None);
    // The concurrency rejection refunded its token: admitted at the same instant.
    let lease = admitted(t.admit(secs(1), &k, 0.5));
    assert_eq!(
        t.on_connect_result(secs(1), &k, Err(ConnectFailure::Refused)),
        Some(BreakerTransition::Opened { until: secs(16) })
    );
    assert_eq!(t.on_close(secs(1), &k, lease), None);
    // The rate limit would refuse too; the breaker answers first.
    assert_eq!(
        t.admit(ms(1500), &k, 0.5),
        refused(BreakerOpen, ms(1500), dms(14_500))
    );
    assert_eq!(t.breaker_open_until(ms(1500), &k), Some(secs(16)));

    let c = t.counters();
    assert_eq!((c.admitted, c.breaker_opened), (2, 1));
    let by_reason: Vec<u64> = RejectReason::ALL.iter().map(|r| c.rejected(*r)).collect();
    assert_eq!(by_reason, vec![1, 0, 1, 1, 0]);
}

#[test]
fn adaptive_comes_before_rate_and_counts_only_its_own_rejections() {
    let mut t = table(
        8,
        PeerPolicy {
            adaptive: PeerPolicy::default().adaptive,
            conn_rate: limit(1, Duration::from_secs(1), 1),
            ..bare()
        },
    );
    let k = key(1);
    admitted(t.admit(secs(0), &k, 0.5));
    for _ in 0..10 {
        assert_eq!(
            t.on_connect_result(secs(0), &k, Err(ConnectFailure::Timeout)),
            None
        );
    }
    // p = 10/11: 0.5 is throttled before the (empty) rate bucket is asked…
    assert_eq!(t.admit(secs(0), &k, 0.5), reject(AdaptiveThrottle, None));
    // …0.95 passes the throttle and meets the rate limit.
    assert_eq!(
        t.admit(secs(0), &k, 0.95),
        refused(RateLimited, secs(0), Duration::from_secs(1))
    );
    // 10 failures + 1 local throttle = 11 requests; the rate rejection is not one.
    let view = t.peers(secs(0)).next().map(|(_, v)| v);
    assert_eq!(view.and_then(|v| v.reject_probability), Some(11.0 / 12.0));
}

#[test]
fn queue_grant_and_timeout() {
    let mut t = table(
        8,
        PeerPolicy {
            concurrency: concurrency(1, 2),
            ..bare()
        },
    );
    let k = key(1);
    let lease = admitted(t.admit(ms(0), &k, 0.5));
    let q = |ticket, deadline| Decision::Queue {
        lease,
        ticket: Ticket(ticket),
        deadline,
    };
    assert_eq!(t.admit(ms(10), &k, 0.5), q(0, ms(110)));
    assert_eq!(t.admit(ms(20), &k, 0.5), q(1, ms(110)));
    assert_eq!(t.admit(ms(30), &k, 0.5), reject(ConcurrencyFull, None));
    assert_eq!(t.on_close(ms(30), &k, lease), Some(Ticket(0)));
    assert!(t.queue_timeout(ms(110), &k, lease, Ticket(1)));
    assert!(
        !t.queue_timeout(ms(110), &k, lease, Ticket(0)),
        "granted: honour it"
    );
    assert!(!t.cancel_wait(ms(110), &k, lease, Ticket(9)));
    assert_eq!(connections(&t, ms(110), k), Some(1));
    assert_eq!(t.on_close(ms(120), &k, lease), None);
    assert_eq!(connections(&t, ms(120), k), Some(0));

    let c = t.counters();
    assert_eq!((c.admitted, c.queued, c.granted), (1, 2, 1));
    assert_eq!(
        (c.rejected(QueueTimeout), c.rejected(ConcurrencyFull)),
        (1, 1)
    );
}

#[test]
fn cancelled_waiters_are_not_counted_as_timeouts() {
    let mut t = table(
        8,
        PeerPolicy {
            concurrency: concurrency(1, 2),
            ..bare()
        },
    );
    let k = key(1);
    let lease = admitted(t.admit(ms(0), &k, 0.5));
    assert!(matches!(t.admit(ms(1), &k, 0.5), Decision::Queue { .. }));
    assert!(t.cancel_wait(ms(2), &k, lease, Ticket(0)));
    assert_eq!(t.on_close(ms(3), &k, lease), None);
    assert_eq!(t.counters().rejected(QueueTimeout), 0);
}

#[test]
fn breaker_opens_on_any_failure_kind_and_sets_the_kernel_expiry() {
    let mut t = table(8, PeerPolicy::default());
    let k = key(1);
    admitted(t.admit(secs(1), &k, 0.5));
    let kinds = [
        ConnectFailure::Refused,
        ConnectFailure::Reset,
        ConnectFailure::Timeout,
        ConnectFailure::Unreachable,
    ];
    for kind in kinds {
        assert_eq!(t.on_connect_result(secs(1), &k, Err(kind)), None);
    }
    assert_eq!(
        t.on_connect_result(secs(2), &k, Err(ConnectFailure::Refused)),
        Some(BreakerTransition::Opened { until: secs(17) })
    );
    assert_eq!(
        t.breaker_open_until(Nanos(17_000_000_000 - 1), &k),
        Some(secs(17))
    );
    assert_eq!(t.breaker_open_until(secs(17), &k), None);
    assert_eq!(t.breaker_open_until(secs(17), &key(2)), None);
    // rand 0.99: the adaptive throttle (p = 5/6) lets the half-open probe through.
    admitted(t.admit(secs(17), &k, 0.99));
    let view = t.peers(secs(17)).next().map(|(_, v)| v);
    assert_eq!(
        view.and_then(|v| v.breaker),
        Some(BreakerState::HalfOpen { share_pct: 10 })
    );
}

#[test]
fn reload_keeps_the_state_of_each_knob() {
    let k = key(1);
    let first = PeerPolicy {
        breaker: breaker(1),
        conn_rate: limit(1, Duration::from_secs(1), 1),
        ..bare()
    };
    let mut t = table(8, first.clone());
    use_once(&mut t, secs(0), k);
    t.on_connect_result(secs(0), &k, Err(ConnectFailure::Refused));

    // Faster rate, same breaker: the breaker stays open.
    let faster = PeerPolicy {
        conn_rate: limit(10, Duration::from_secs(1), 10),
        ..first
    };
    t.set_source(Box::new(move |_| faster.clone()));
    assert_eq!(
        t.admit(secs(0), &k, 0.5),
        refused(BreakerOpen, secs(0), Duration::from_secs(15))
    );

    // Breaker off: the bucket kept its (empty) level and refills at the new rate.
    let no_breaker = PeerPolicy {
        conn_rate: limit(10, Duration::from_secs(1), 10),
        ..bare()
    };
    t.set_source(Box::new(move |_| no_breaker.clone()));
    assert_eq!(
        t.admit(secs(0), &k, 0.5),
        refused(RateLimited, secs(0), dms(100))
    );
    assert_eq!(t.policy(&k).map(|p| p.breaker), Some(None));

    // A connection is open when a concurrency limit of 1 arrives: it counts.
    let lease = admitted(t.admit(secs(1), &k, 0.5));
    t.set_source(Box::new(|_| PeerPolicy {
        concurrency: concurrency(1, 0),
        ..bare()
    }));
    assert_eq!(t.admit(secs(1), &k, 0.5), reject(ConcurrencyFull, None));
    assert_eq!(t.on_close(secs(1), &k, lease), None);
    admitted(t.admit(secs(1), &k, 0.5));
}

#[test]
fn shaping_delays_by_the_peers_bandwidth() {
    let source = Box::new(|k: &Key| PeerPolicy {
        bandwidth: if k.2 == 1 {
            limit(1000, Duration::from_secs(1), 1000)
        } else {
            None
        },
        ..bare()
    });
    let mut t = PeerTable::new(TableConfig::default(), source);
    admitted(t.admit(ms(0), &key(1), 0.5));
    admitted(t.admit(ms(0), &key(2), 0.5));
    assert_eq!(t.shape(ms(0), &key(1), 500), Duration::ZERO);
    assert_eq!(t.shape(ms(0), &key(1), 1000), dms(500));
    assert_eq!(t.shape(ms(250), &key(1), 0), dms(250));
    assert_eq!(
        t.shape(ms(0), &key(2), u64::MAX),
        Duration::ZERO,
        "knob off"
    );
    assert_eq!(t.shape(ms(0), &key(3), 1), Duration::ZERO, "unknown peer");
}

#[test]
fn clock_going_backwards_is_read_as_the_latest_time() {
    let mut t = table(
        8,
        PeerPolicy {
            conn_rate: limit(10, Duration::from_secs(1), 1),
            ..bare()
        },
    );
    let k = key(1);
    admitted(t.admit(secs(1), &k, 0.5));
    assert_eq!(
        t.admit(secs(0), &k, 0.5),
        // The kernel expiry is from the latest time seen too.
        refused(RateLimited, secs(1), dms(100))
    );
    admitted(t.admit(ms(1100), &k, 0.5));
}

#[test]
fn admit_carries_the_peers_timeouts_and_unknown_keys_are_ignored() {
    let fast = Timeouts {
        connect: Some(dms(500)),
        ..Timeouts::default()
    };
    let mut t = PeerTable::new(
        TableConfig::default(),
        Box::new(move |k: &Key| PeerPolicy {
            timeouts: if k.2 == 7 { fast } else { Timeouts::default() },
            ..bare()
        }),
    );
    assert!(
        matches!(t.admit(ms(0), &key(7), 0.5), Decision::Admit { timeouts, .. } if timeouts == fast)
    );
    assert!(matches!(
        t.admit(ms(0), &key(8), 0.5),
        Decision::Admit { timeouts, .. } if timeouts == Timeouts::default()
    ));
    assert_eq!(t.on_connect_result(ms(0), &key(9), Ok(())), None);
    assert!(
        t.policy(&key(9)).is_none(),
        "reporting does not create entries"
    );
}

#[test]
fn peer_view_reports_each_knob() {
    let mut t = table(
        8,
        PeerPolicy {
            conn_rate: limit(5, Duration::from_secs(1), 5),
            ..PeerPolicy::default()
        },
    );
    let k = key(1);
    admitted(t.admit(secs(1), &k, 0.5));
    admitted(t.admit(secs(1), &k, 0.5));
    let views: Vec<_> = t.peers(secs(3)).collect();
    assert_eq!(views.len(), 1);
    let (peer, v) = views[0];
    assert_eq!(*peer, k);
    assert_eq!((v.connections, v.queued), (2, 0));
    assert_eq!(v.conn_tokens, Some(5));
    assert_eq!(
        v.breaker,
        Some(BreakerState::Closed {
            consecutive_failures: 0
        })
    );
    assert_eq!(v.reject_probability, Some(0.0));
    assert_eq!(v.idle_for, Duration::from_secs(2));
}

#[test]
fn reject_reasons_have_stable_names_and_indexes() {
    let names: Vec<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        names,
        [
            "breaker_open",
            "adaptive_throttle",
            "rate_limited",
            "concurrency_full",
            "queue_timeout"
        ]
    );
    for (i, reason) in RejectReason::ALL.iter().enumerate() {
        assert_eq!(reason.index(), i);
    }
}
