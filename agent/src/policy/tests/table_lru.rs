//! Table bookkeeping: leases, LRU eviction order, idle expiry, and a randomised
//! run checking the indexes against the entries after every operation.

use super::table::{
    admitted, bare, breaker, concurrency, connections, key, limit, table, use_once, Key,
};
use super::{ms, secs, Rng};
use crate::policy::breaker::ConnectFailure;
use crate::policy::clock::Nanos;
use crate::policy::concurrency::Ticket;
use crate::policy::decision::{Decision, Lease, RejectReason};
use crate::policy::peer_policy::PeerPolicy;
use crate::policy::table::{PeerTable, TableConfig};
use std::collections::HashMap;
use std::time::Duration;

#[test]
fn a_stale_lease_cannot_touch_the_next_entry() {
    let mut t = table(1, bare());
    let (a, b) = (key(1), key(2));
    let old = admitted(t.admit(ms(0), &a, 0.5));
    admitted(t.admit(ms(1), &b, 0.5)); // evicts busy `a`
    let new = admitted(t.admit(ms(2), &a, 0.5)); // evicts busy `b`
    assert_ne!(old, new);
    assert_eq!((t.counters().evicted, t.counters().evicted_busy), (2, 2));
    assert_eq!(t.on_close(ms(3), &a, old), None);
    assert_eq!(connections(&t, ms(3), a), Some(1));
    assert!(
        t.queue_timeout(ms(3), &a, old, Ticket(0)),
        "gone: not waiting"
    );
    assert_eq!(t.on_close(ms(3), &a, new), None);
    assert_eq!(connections(&t, ms(3), a), Some(0));
}

#[test]
fn full_table_evicts_the_least_recently_used_resting_peer() {
    let mut t = table(3, bare());
    use_once(&mut t, ms(0), key(1));
    use_once(&mut t, ms(1), key(2));
    use_once(&mut t, ms(2), key(3));
    use_once(&mut t, ms(3), key(1));
    use_once(&mut t, ms(4), key(4));
    assert_eq!(t.len(), 3);
    assert!(t.policy(&key(2)).is_none(), "2 was least recently used");
    for k in [1, 3, 4] {
        assert!(t.policy(&key(k)).is_some(), "{k}");
    }
    assert_eq!((t.counters().evicted, t.counters().evicted_busy), (1, 0));
}

#[test]
fn eviction_prefers_resting_then_settling_then_busy() {
    let mut t = table(
        3,
        PeerPolicy {
            breaker: breaker(1),
            ..bare()
        },
    );
    admitted(t.admit(ms(0), &key(1), 0.5)); // busy: stays open
    let lease = admitted(t.admit(ms(1), &key(2), 0.5));
    t.on_connect_result(ms(1), &key(2), Err(ConnectFailure::Reset));
    t.on_close(ms(1), &key(2), lease); // settling: breaker open for 15 s
    use_once(&mut t, ms(2), key(3)); // resting, and the most recently used

    admitted(t.admit(ms(3), &key(4), 0.5));
    assert!(t.policy(&key(3)).is_none(), "resting goes first");
    admitted(t.admit(ms(4), &key(5), 0.5));
    assert!(t.policy(&key(2)).is_none(), "then settling");
    admitted(t.admit(ms(5), &key(6), 0.5));
    assert!(
        t.policy(&key(1)).is_none(),
        "busy only as a last resort, LRU"
    );
    assert_eq!((t.counters().evicted, t.counters().evicted_busy), (3, 1));
}

#[test]
fn idle_expiry_spares_busy_and_settling_peers() {
    // Peer 1 has a 1/h rate limit; the rest have no knobs.
    let source = Box::new(|k: &Key| PeerPolicy {
        conn_rate: if k.2 == 1 {
            limit(1, Duration::from_secs(3600), 1)
        } else {
            None
        },
        ..bare()
    });
    let mut t = PeerTable::new(TableConfig::default(), source);
    use_once(&mut t, secs(0), key(1)); // token spent: settling until 1 h
    use_once(&mut t, secs(0), key(2)); // resting since 0
    use_once(&mut t, secs(60), key(3)); // resting since 1 min
    admitted(t.admit(secs(0), &key(4), 0.5)); // busy

    assert_eq!(t.expire_idle(Nanos(300_000_000_000 - 1)), 0);
    assert_eq!(t.expire_idle(secs(300)), 1);
    assert!(t.policy(&key(2)).is_none());
    assert_eq!(t.expire_idle(secs(360)), 1);
    assert!(t.policy(&key(3)).is_none());
    // Forgetting peer 1 before its bucket refills would hand it a free token.
    assert_eq!(t.expire_idle(Nanos(3_600_000_000_000 - 1)), 0);
    assert_eq!(t.expire_idle(secs(3600)), 1);
    assert!(t.policy(&key(1)).is_none());
    assert_eq!(t.expire_idle(secs(1_000_000)), 0, "busy peers never expire");
    assert_eq!(t.len(), 1);
    assert_eq!(t.counters().expired_idle, 3);
}

#[test]
fn zero_max_peers_acts_as_one() {
    let mut t = table(0, bare());
    use_once(&mut t, ms(0), key(1));
    use_once(&mut t, ms(1), key(2));
    assert_eq!(t.len(), 1);
    assert!(!t.is_empty());
}

#[test]
fn random_operations_keep_the_table_consistent() {
    // Peers 0, 3, …: breaker, tight rate limit, adaptive. Peers 1, 4, …: one slot,
    // one waiter, bandwidth. The rest: no knobs.
    let source = Box::new(|k: &Key| match k.2 % 3 {
        0 => PeerPolicy {
            breaker: breaker(2),
            conn_rate: limit(1, Duration::from_secs(1), 1),
            ..PeerPolicy::default()
        },
        1 => PeerPolicy {
            concurrency: concurrency(1, 1),
            bandwidth: limit(1000, Duration::from_secs(1), 100),
            ..bare()
        },
        _ => bare(),
    });
    let config = TableConfig {
        max_peers: 16,
        idle_expiry: Duration::from_secs(1),
    };
    let mut t = PeerTable::new(config, source);
    let mut rng = Rng::new(5);
    let mut now = 0u64;
    // Open connections close by themselves after a random lifetime (< 500 ms).
    let mut open: Vec<(Key, Lease, Nanos)> = Vec::new();
    let mut waiting: HashMap<(Key, Ticket), (Lease, Nanos)> = HashMap::new();
    for _ in 0..40_000 {
        now += rng.below(50_000_000);
        let at = Nanos(now);
        let mut i = 0;
        while i < open.len() {
            if open[i].2 > at {
                i += 1;
                continue;
            }
            let (k, lease, _) = open.swap_remove(i);
            if let Some(ticket) = t.on_close(at, &k, lease) {
                let (lease, deadline) = waiting.remove(&(k, ticket)).expect("known waiter");
                assert!(deadline > at, "granted past its deadline");
                open.push((k, lease, Nanos(now + rng.below(500_000_000))));
            }
        }
        // Half the operations go to 4 hot peers, so their limits are reached.
        let range = if rng.below(2) == 0 { 4 } else { 40 };
        let k = key(rng.below(range) as u32);
        match rng.below(5) {
            0 | 1 => match t.admit(at, &k, (rng.below(1000) as f64) / 1000.0) {
                Decision::Admit { lease, .. } => {
                    open.push((k, lease, Nanos(now + rng.below(500_000_000))))
                }
                Decision::Queue {
                    lease,
                    ticket,
                    deadline,
                } => {
                    assert!(deadline > at);
                    waiting.insert((k, ticket), (lease, deadline));
                }
                Decision::Reject { .. } => {}
            },
            2 => {
                let failed = rng.below(4) == 0;
                let result = if failed {
                    Err(ConnectFailure::Refused)
                } else {
                    Ok(())
                };
                t.on_connect_result(at, &k, result);
            }
            3 => {
                let due: Vec<_> = waiting
                    .iter()
                    .filter(|(_, (_, d))| *d <= at)
                    .map(|(w, (lease, _))| (*w, *lease))
                    .collect();
                for ((k, ticket), lease) in due {
                    assert!(
                        t.queue_timeout(at, &k, lease, ticket),
                        "due and not granted"
                    );
                    waiting.remove(&(k, ticket));
                }
            }
            _ => {
                t.expire_idle(at);
                t.shape(at, &k, rng.below(500));
            }
        }
        t.assert_consistent();
        assert!(t.len() <= 16);
    }
    let c = t.counters();
    assert!(c.admitted > 0 && c.granted > 0, "{c:?}");
    assert!(c.evicted > 0 && c.expired_idle > 0, "{c:?}");
    assert!(
        RejectReason::ALL.iter().all(|r| c.rejected(*r) > 0),
        "{c:?}"
    );
}

#[test]
fn remove_where_drops_matching_peers_even_busy_and_they_start_fresh() {
    let mut t = table(
        8,
        PeerPolicy {
            breaker: breaker(1),
            ..bare()
        },
    );
    // Pod 1: a tripped breaker to peer 1, a busy connection to peer 2. Pod 2: peer 1 too.
    let (tripped, busy, other) = (key(1), key(2), (2, false, 1));
    let lease = admitted(t.admit(ms(0), &tripped, 0.5));
    t.on_connect_result(ms(1), &tripped, Err(ConnectFailure::Refused));
    t.on_close(ms(1), &tripped, lease);
    assert!(t.breaker_open_until(ms(2), &tripped).is_some(), "open");
    let held = admitted(t.admit(ms(2), &busy, 0.5));
    admitted(t.admit(ms(2), &other, 0.5));
    assert_eq!(t.len(), 3);

    assert_eq!(t.remove_where(|k| k.0 == 1), 2);
    t.assert_consistent();
    assert_eq!(t.len(), 1);
    assert!(t.policy(&other).is_some(), "another pod's peer stays");
    assert_eq!(connections(&t, ms(3), other), Some(1));
    // Fresh: the breaker is closed again, the busy peer's old lease releases nothing.
    assert_eq!(t.breaker_open_until(ms(3), &tripped), None);
    admitted(t.admit(ms(3), &tripped, 0.5));
    let fresh = admitted(t.admit(ms(3), &busy, 0.5));
    assert_eq!(t.on_close(ms(4), &busy, held), None);
    assert_eq!(connections(&t, ms(4), busy), Some(1), "stale lease ignored");
    assert_eq!(t.on_close(ms(4), &busy, fresh), None);
    assert_eq!(connections(&t, ms(4), busy), Some(0));
    assert_eq!(t.counters().evicted, 0, "not an eviction");
    t.assert_consistent();
}
