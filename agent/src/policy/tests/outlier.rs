use super::{ms, secs};
use crate::policy::clock::Nanos;
use crate::policy::outlier::{LbMode, Outcome, OutlierConfig, Pool};
use std::net::SocketAddr;
use std::time::Duration;

fn ep(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], 8080))
}

fn cfg(threshold: u32, max_pct: u32) -> OutlierConfig {
    OutlierConfig {
        threshold,
        interval: Duration::from_secs(1),
        base_ejection: Duration::from_secs(10),
        max_ejection_percent: max_pct,
        min_health_percent: 0,
    }
}

fn pool(c: OutlierConfig, lb: LbMode) -> Pool {
    let mut p = Pool::new(c, lb, Nanos::ZERO);
    p.set_endpoints(vec![ep(1), ep(2), ep(3)]);
    p
}

/// Picks `n` times at `now`, releasing each at once.
fn picks(p: &mut Pool, n: usize, now: Nanos) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let a = p.pick(now).expect("an endpoint");
            p.release(a);
            match a.ip() {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            }
        })
        .collect()
}

#[test]
fn round_robin_walks_every_endpoint_in_turn() {
    let mut p = pool(cfg(3, 100), LbMode::RoundRobin);
    assert_eq!(picks(&mut p, 6, ms(1)), [1, 2, 3, 1, 2, 3]);
}

#[test]
fn a_failing_endpoint_is_ejected_at_the_threshold_and_skipped() {
    let mut p = pool(cfg(3, 100), LbMode::RoundRobin);
    assert_eq!(p.connect_result(ep(2), false, ms(1)), Outcome::Counted);
    assert_eq!(p.connect_result(ep(2), false, ms(2)), Outcome::Counted);
    // A success in between resets the count: consecutive failures only.
    assert_eq!(p.connect_result(ep(2), true, ms(3)), Outcome::Counted);
    assert_eq!(p.connect_result(ep(2), false, ms(4)), Outcome::Counted);
    assert_eq!(p.connect_result(ep(2), false, ms(5)), Outcome::Counted);
    assert_eq!(
        p.connect_result(ep(2), false, ms(6)),
        Outcome::Ejected(ms(6).saturating_add(Duration::from_secs(10)))
    );
    assert_eq!(p.ejected(ms(7)), vec![ep(2)]);
    assert_eq!(picks(&mut p, 4, ms(7)), [1, 3, 1, 3]);
    // Back after the base ejection time, without anyone sweeping in between.
    assert_eq!(picks(&mut p, 3, secs(11)), [1, 2, 3]);
}

/// Endpoint 1 fails once at each of `at` (seconds); the ejections' ends, in seconds.
fn ejections(c: OutlierConfig, at: &[u64]) -> Vec<u64> {
    let mut p = pool(c, LbMode::RoundRobin);
    at.iter()
        .map(|&t| match p.connect_result(ep(1), false, secs(t)) {
            Outcome::Ejected(until) => until.0 / 1_000_000_000,
            other => panic!("at {t} s: {other:?}"),
        })
        .collect()
}

#[test]
fn a_repeat_ejection_lasts_base_times_the_number_of_ejections() {
    // Failing again as soon as it is back: 10 s, then 20 s, then 30 s.
    assert_eq!(ejections(cfg(1, 100), &[0, 10, 30]), [10, 30, 60]);
}

#[test]
fn time_in_service_forgives_one_ejection_per_interval() {
    // Back at 30 s, in service for 5 intervals: the multiplier (2) is forgiven entirely.
    assert_eq!(ejections(cfg(1, 100), &[0, 10, 35]), [10, 30, 45]);
}

#[test]
fn an_ejection_never_exceeds_the_maximum_time() {
    let c = OutlierConfig {
        base_ejection: Duration::from_secs(200),
        ..cfg(1, 100)
    };
    assert_eq!(ejections(c, &[0, 200]), [200, 500], "400 s capped at 300 s");
}

#[test]
fn the_percentage_cap_ejects_the_first_then_stops_like_envoy() {
    // Istio's default 10 % of three endpoints: 0 % < 10 % ejects one, 33 % does not.
    let mut p = pool(cfg(1, 10), LbMode::RoundRobin);
    assert!(matches!(
        p.connect_result(ep(1), false, ms(1)),
        Outcome::Ejected(_)
    ));
    assert_eq!(p.connect_result(ep(2), false, ms(2)), Outcome::CapReached);
    assert_eq!(p.ejected(ms(3)), vec![ep(1)]);
    // 0 % turns ejection off.
    let mut off = pool(cfg(1, 0), LbMode::RoundRobin);
    assert_eq!(off.connect_result(ep(1), false, ms(1)), Outcome::CapReached);
    // 50 %: one of three (0 < 50), then 33 % < 50 % a second, then 66 % stops.
    let mut half = pool(cfg(1, 50), LbMode::RoundRobin);
    assert!(matches!(
        half.connect_result(ep(1), false, ms(1)),
        Outcome::Ejected(_)
    ));
    assert!(matches!(
        half.connect_result(ep(2), false, ms(1)),
        Outcome::Ejected(_)
    ));
    assert_eq!(
        half.connect_result(ep(3), false, ms(1)),
        Outcome::CapReached
    );
}

#[test]
fn with_everything_ejected_picks_use_every_endpoint() {
    let mut p = pool(cfg(1, 100), LbMode::RoundRobin);
    for i in 1..=3 {
        assert!(matches!(
            p.connect_result(ep(i), false, ms(1)),
            Outcome::Ejected(_)
        ));
    }
    assert_eq!(picks(&mut p, 3, ms(2)), [1, 2, 3]);
}

#[test]
fn below_min_health_ejections_are_ignored_and_none_are_added() {
    let c = OutlierConfig {
        min_health_percent: 70,
        ..cfg(1, 100)
    };
    let mut p = pool(c, LbMode::RoundRobin);
    // Ejecting one would leave 66 % < 70 %: refused.
    assert_eq!(p.connect_result(ep(1), false, ms(1)), Outcome::CapReached);
    let c = OutlierConfig {
        min_health_percent: 60,
        ..cfg(1, 100)
    };
    p.configure(c, LbMode::RoundRobin);
    assert!(matches!(
        p.connect_result(ep(1), false, ms(2)),
        Outcome::Ejected(_)
    ));
    assert_eq!(picks(&mut p, 2, ms(3)), [2, 3]);
}

#[test]
fn least_connections_prefers_the_idlest_endpoint_in_service() {
    let mut p = pool(cfg(1, 100), LbMode::LeastConnections);
    let a = p.pick(ms(1)).expect("first");
    let b = p.pick(ms(1)).expect("second");
    assert_ne!(a, b);
    let c = p.pick(ms(1)).expect("third");
    assert_eq!(
        [a, b, c]
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3,
        "one connection each"
    );
    p.release(b);
    assert_eq!(p.pick(ms(1)), Some(b), "the one with no connection left");
    assert!(matches!(
        p.connect_result(a, false, ms(2)),
        Outcome::Ejected(_)
    ));
    p.release(a);
    // a has the fewest connections but is ejected.
    assert_ne!(p.pick(ms(3)), Some(a));
}

#[test]
fn an_endpoint_update_keeps_the_state_of_those_that_stay() {
    let mut p = pool(cfg(1, 100), LbMode::RoundRobin);
    assert!(matches!(
        p.connect_result(ep(2), false, ms(1)),
        Outcome::Ejected(_)
    ));
    p.set_endpoints(vec![ep(3), ep(2), ep(4)]);
    assert_eq!(p.ejected(ms(2)), vec![ep(2)]);
    assert_eq!(p.len(), 3);
    let got = picks(&mut p, 4, ms(2));
    assert!(!got.contains(&2) && !got.contains(&1), "{got:?}");
    // A result for an endpoint gone meanwhile changes nothing.
    assert_eq!(p.connect_result(ep(1), false, ms(3)), Outcome::Counted);
    p.set_endpoints(Vec::new());
    assert_eq!(p.pick(ms(4)), None);
}

/// What the kernel tier picks from is what `pick` chooses among: the endpoints in service,
/// all of them again at the return, and all of them when ejections are ignored.
#[test]
fn the_usable_set_follows_ejections_and_returns() {
    let mut p = pool(cfg(1, 100), LbMode::RoundRobin);
    assert_eq!(p.usable(ms(1)), [ep(1), ep(2), ep(3)]);
    assert!(matches!(
        p.connect_result(ep(3), false, ms(2)),
        Outcome::Ejected(_)
    ));
    assert_eq!(p.usable(ms(3)), [ep(1), ep(2)]);
    assert_eq!(picks(&mut p, 4, ms(3)), [1, 2, 1, 2]);
    // minHealthPercent raised while one is out: below it, ejections are ignored.
    p.configure(
        OutlierConfig {
            min_health_percent: 100,
            ..cfg(1, 100)
        },
        LbMode::RoundRobin,
    );
    assert_eq!(
        p.usable(ms(4)),
        [ep(1), ep(2), ep(3)],
        "below minHealthPercent"
    );
    p.configure(cfg(1, 100), LbMode::RoundRobin);
    assert_eq!(p.usable(ms(5)), [ep(1), ep(2)]);
    assert_eq!(p.usable(secs(11)), [ep(1), ep(2), ep(3)], "back after 10 s");
}

/// The kernel tier's counts for one second: only the failures after the last success count
/// toward the threshold, as they would one by one.
#[test]
fn batched_results_count_the_failures_that_ended_the_run() {
    let mut p = pool(cfg(3, 100), LbMode::RoundRobin);
    // 5 failures, but a success came after all but 2 of them: not ejected.
    assert_eq!(p.connect_results(ep(1), 1, 5, 2, ms(1)), Outcome::Counted);
    assert!(p.ejected(ms(2)).is_empty());
    // One more failure next second: 3 in a row.
    assert_eq!(
        p.connect_results(ep(1), 0, 1, 3, ms(3)),
        Outcome::Ejected(ms(3).saturating_add(Duration::from_secs(10)))
    );
    assert_eq!(p.ejected(ms(4)), vec![ep(1)]);
    // A run past the threshold ejects once; the cap then keeps a second endpoint in.
    let mut p = pool(cfg(2, 30), LbMode::RoundRobin);
    assert!(matches!(
        p.connect_results(ep(2), 0, 7, 7, ms(1)),
        Outcome::Ejected(_)
    ));
    assert_eq!(
        p.connect_results(ep(3), 0, 4, 4, ms(2)),
        Outcome::CapReached
    );
}
