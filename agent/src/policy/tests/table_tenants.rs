//! The table shared between pods: a pod that talks to very many peers churns its own entries
//! and never another pod's open breaker or drained bucket while that pod stays under its
//! share; a newcomer under its share takes room from the pod holding the most.

use super::table::{admitted, bare, breaker, limit, use_once, Key};
use super::{ms, secs, Rng};
use crate::policy::breaker::{BreakerState, ConnectFailure};
use crate::policy::clock::Nanos;
use crate::policy::decision::Decision;
use crate::policy::peer_policy::PeerPolicy;
use crate::policy::table::{PeerTable, TableConfig};
use crate::policy::RejectReason;
use std::time::Duration;

const VICTIM: u32 = 1;
const HOSTILE: u32 = 2;

fn of(pod: u32, peer: u32) -> Key {
    (pod, false, peer)
}

/// Breaker after 1 failure (open 15 s), 1 connection per hour: a failed peer's breaker opens
/// and a used peer's bucket stays empty, both states worth keeping.
fn strict() -> PeerPolicy {
    PeerPolicy {
        breaker: breaker(1),
        conn_rate: limit(1, Duration::from_secs(3600), 1),
        ..bare()
    }
}

fn table(max_peers: usize) -> PeerTable<Key> {
    let config = TableConfig {
        max_peers,
        idle_expiry: Duration::from_secs(300),
    };
    PeerTable::with_policy(config, strict())
}

fn breaker_open(t: &PeerTable<Key>, now: Nanos, k: Key) -> bool {
    t.peers(now)
        .any(|(key, v)| *key == k && matches!(v.breaker, Some(BreakerState::Open { .. })))
}

#[test]
fn a_pod_with_100k_peers_cannot_evict_another_pods_breakers_and_buckets() {
    let mut t = table(1000);
    // The victim: 10 peers with an open breaker, 10 with a drained rate bucket.
    for p in 0..10 {
        let k = of(VICTIM, p);
        admitted(t.admit(ms(0), &k, 0.5));
        t.on_connect_result(ms(0), &k, Err(ConnectFailure::Refused));
    }
    for p in 10..20 {
        use_once(&mut t, ms(0), of(VICTIM, p));
    }
    // The hostile pod: 100,000 distinct peers, each used once, well within the breaker's
    // open time and the bucket's refill.
    for p in 0..100_000 {
        use_once(&mut t, ms(1 + u64::from(p) / 100), of(HOSTILE, p));
    }
    let now = secs(2);
    assert_eq!(t.len(), 1000);
    for p in 0..10 {
        assert!(
            breaker_open(&t, now, of(VICTIM, p)),
            "victim peer {p}: breaker kept"
        );
    }
    for p in 10..20 {
        // Still drained: the attempt is refused by the rate, not admitted by a fresh bucket.
        match t.admit(now, &of(VICTIM, p), 0.5) {
            Decision::Reject {
                reason: RejectReason::RateLimited,
                ..
            } => {}
            other => panic!("victim peer {p}: bucket forgotten, got {other:?}"),
        }
    }
    // Every eviction was the hostile pod's own.
    let ev = t.take_evictions();
    assert_eq!(ev, vec![(u64::from(HOSTILE), 100_000 - 980)]);
    assert!(t.take_evictions().is_empty(), "taken");
    t.assert_consistent();
}

#[test]
fn a_pod_under_its_share_takes_room_from_the_pod_holding_the_most() {
    let mut t = table(100);
    for p in 0..100 {
        use_once(&mut t, ms(u64::from(p)), of(HOSTILE, p));
    }
    // Two tenants now: a share of 50 each. The newcomer's 50 peers all come out of the
    // hostile pod's entries, its least recently used first.
    for p in 0..50 {
        use_once(&mut t, secs(1), of(VICTIM, p));
    }
    assert_eq!(t.len(), 100);
    let mine = |t: &PeerTable<Key>, pod| t.peers(secs(1)).filter(|(k, _)| k.0 == pod).count();
    assert_eq!((mine(&t, VICTIM), mine(&t, HOSTILE)), (50, 50));
    assert!(
        t.policy(&of(HOSTILE, 0)).is_none(),
        "least recently used went first"
    );
    assert!(t.policy(&of(HOSTILE, 99)).is_some());
    // At its share, the newcomer's next peer evicts its own least recently used.
    use_once(&mut t, secs(2), of(VICTIM, 50));
    assert!(t.policy(&of(VICTIM, 0)).is_none());
    assert_eq!((mine(&t, VICTIM), mine(&t, HOSTILE)), (50, 50));
    let mut ev = t.take_evictions();
    ev.sort_unstable();
    assert_eq!(ev, vec![(u64::from(VICTIM), 1), (u64::from(HOSTILE), 50)]);
    t.assert_consistent();
}

#[test]
fn many_pods_keep_the_indexes_consistent() {
    let mut t = table(64);
    let mut rng = Rng::new(0x7e4a);
    let mut open = Vec::new();
    for i in 0..20_000u64 {
        let now = ms(i);
        let range = if rng.below(2) == 0 { 8 } else { 500 };
        let k = of(rng.below(5) as u32, rng.below(range) as u32);
        match rng.below(4) {
            0 | 1 => {
                if let Decision::Admit { lease, .. } = t.admit(now, &k, 0.5) {
                    open.push((k, lease));
                }
            }
            2 if !open.is_empty() => {
                let (k, lease) = open.swap_remove(rng.below(open.len() as u64) as usize);
                t.on_close(now, &k, lease);
            }
            _ => {
                t.on_connect_result(now, &k, Err(ConnectFailure::Refused));
            }
        }
        assert!(t.len() <= 64);
        t.assert_consistent();
    }
}
