use super::{ms, secs};
use crate::policy::adaptive::{AdaptiveConfig, AdaptiveThrottle, Throttled};
use crate::policy::clock::Nanos;
use std::time::Duration;

fn with_k(k: f64) -> AdaptiveThrottle {
    AdaptiveThrottle::new(AdaptiveConfig {
        k,
        ..AdaptiveConfig::default()
    })
}

/// Records `requests` finished attempts of which `accepts` succeeded, at `now`.
fn record(t: &mut AdaptiveThrottle, now: Nanos, requests: u64, accepts: u64) {
    for i in 0..requests {
        t.on_result(now, i < accepts);
    }
}

#[test]
fn defaults_are_two_minutes_and_k_two() {
    let c = AdaptiveConfig::default();
    assert_eq!(c.window, Duration::from_secs(120));
    assert_eq!(c.k, 2.0);
}

#[test]
fn probability_follows_the_formula() {
    let mut t = with_k(2.0);
    assert_eq!(t.reject_probability(ms(0)), 0.0);
    record(&mut t, ms(0), 10, 2);
    assert_eq!(t.totals(ms(0)), (10, 2));
    assert_eq!(t.reject_probability(ms(0)), 6.0 / 11.0);

    let mut all_ok = with_k(2.0);
    record(&mut all_ok, ms(0), 1000, 1000);
    assert_eq!(all_ok.reject_probability(ms(0)), 0.0);

    // The throttle starts exactly when requests exceed K * accepts.
    let mut edge = with_k(2.0);
    record(&mut edge, ms(0), 10, 5);
    assert_eq!(edge.reject_probability(ms(0)), 0.0);
    edge.on_result(ms(0), false);
    assert_eq!(edge.reject_probability(ms(0)), 1.0 / 12.0);

    let mut one = with_k(2.0);
    one.on_result(ms(0), false);
    assert_eq!(one.reject_probability(ms(0)), 0.5);
}

#[test]
fn admit_compares_rand_with_p_and_counts_its_rejections() {
    let mut t = with_k(2.0);
    record(&mut t, ms(0), 10, 2); // p = 6/11 = 0.5454…
    assert_eq!(t.admit(ms(0), 0.55), Ok(()));
    assert_eq!(t.totals(ms(0)), (10, 2), "an admission records nothing");
    assert_eq!(
        t.admit(ms(0), 0.54),
        Err(Throttled {
            probability: 6.0 / 11.0
        })
    );
    assert_eq!(t.totals(ms(0)), (11, 2), "a local rejection is a request");
    assert_eq!(t.reject_probability(ms(0)), 7.0 / 12.0);
}

#[test]
fn out_of_range_random_numbers() {
    let mut t = with_k(2.0);
    // p = 0: even a negative draw admits.
    assert_eq!(t.admit(ms(0), -1.0), Ok(()));
    record(&mut t, ms(0), 10, 0); // p = 10/11
    assert_eq!(t.admit(ms(0), f64::NAN), Ok(()), "NaN fails open");
    assert_eq!(t.admit(ms(0), 1.0), Ok(()), "p < 1 always");
    assert!(t.admit(ms(0), -1.0).is_err());
}

#[test]
fn samples_leave_the_window_by_whole_buckets() {
    let mut t = with_k(2.0);
    t.on_result(Nanos(9_999_999_999), false); // bucket 0 (0–10 s)
    t.on_result(secs(10), false); // bucket 1 (10–20 s)
    assert_eq!(t.totals(Nanos(119_999_999_999)).0, 2);
    assert_eq!(t.totals(secs(120)).0, 1);
    assert_eq!(t.totals(Nanos(129_999_999_999)).0, 1);
    assert_eq!(t.totals(secs(130)).0, 0);
    assert_eq!(t.reject_probability(secs(130)), 0.0);
    // A bucket slot reused after a full turn starts from zero.
    t.on_result(secs(240), true);
    assert_eq!(t.totals(secs(240)), (1, 1));
}

#[test]
fn clear_at_is_when_the_last_sample_leaves() {
    let mut t = with_k(2.0);
    assert_eq!(t.clear_at(), Nanos::ZERO);
    t.on_result(secs(25), false); // bucket 2 → gone at (2 + 12) * 10 s
    assert_eq!(t.clear_at(), secs(140));
    assert_eq!(t.totals(Nanos(139_999_999_999)).0, 1);
    assert_eq!(t.totals(secs(140)).0, 0);
}

#[test]
fn k_edge_values() {
    let p = |k: f64, requests, accepts| {
        let mut t = with_k(k);
        record(&mut t, ms(0), requests, accepts);
        t.reject_probability(ms(0))
    };
    assert_eq!(p(1.0, 10, 5), 5.0 / 11.0);
    assert_eq!(p(f64::NAN, 10, 2), 6.0 / 11.0, "NaN reads as 2");
    assert_eq!(p(0.5, 10, 5), 5.0 / 11.0, "below 1 reads as 1");
    assert_eq!(p(-3.0, 10, 5), 5.0 / 11.0);
    assert_eq!(p(f64::NEG_INFINITY, 10, 5), 5.0 / 11.0);
    assert_eq!(p(f64::INFINITY, 10, 1), 0.0);
    assert_eq!(p(f64::INFINITY, 10, 0), 10.0 / 11.0, "no 0 * inf = NaN");
    assert_eq!(p(1e300, 10, 1), 0.0);
    assert_eq!(
        AdaptiveConfig {
            k: f64::NAN,
            ..AdaptiveConfig::default()
        }
        .effective_k(),
        2.0
    );
}

#[test]
fn probability_is_never_nan_and_below_one() {
    for k in [1.0, 2.0, 1e9, f64::INFINITY, f64::NAN] {
        for (r, a) in [(0, 0), (1, 0), (100_000, 0), (100_000, 1), (5, 5)] {
            let mut t = with_k(k);
            record(&mut t, ms(0), r, a);
            let p = t.reject_probability(ms(0));
            assert!(
                !p.is_nan() && (0.0..1.0).contains(&p),
                "k={k} r={r} a={a}: {p}"
            );
        }
    }
}

#[test]
fn clock_going_backwards_writes_to_the_latest_bucket() {
    let mut t = with_k(2.0);
    t.on_result(secs(130), false);
    t.on_result(secs(5), false); // earlier than anything seen: counts as 130 s
    assert_eq!(t.totals(secs(5)).0, 2);
    assert_eq!(t.totals(secs(130)).0, 2);
    assert_eq!(t.totals(secs(250)).0, 0);
}

#[test]
fn huge_times_do_not_overflow() {
    let mut t = with_k(2.0);
    t.on_result(Nanos::MAX, false);
    assert_eq!(t.totals(Nanos::MAX), (1, 0));
    assert_eq!(t.clear_at(), Nanos::MAX);
    assert_eq!(t.admit(Nanos::MAX, 0.99), Ok(()));
}

#[test]
fn tiny_window_uses_one_nanosecond_buckets() {
    let mut t = AdaptiveThrottle::new(AdaptiveConfig {
        window: Duration::ZERO,
        k: 2.0,
    });
    t.on_result(Nanos(100), false);
    assert_eq!(t.totals(Nanos(111)).0, 1);
    assert_eq!(t.totals(Nanos(112)).0, 0);
}

#[test]
fn set_config_keeps_counts_unless_the_bucket_width_changes() {
    let mut t = with_k(2.0);
    record(&mut t, ms(0), 10, 2);
    t.set_config(AdaptiveConfig {
        k: 1.0,
        ..AdaptiveConfig::default()
    });
    assert_eq!(t.reject_probability(ms(0)), 8.0 / 11.0);
    t.set_config(AdaptiveConfig {
        window: Duration::from_secs(60),
        k: 1.0,
    });
    assert_eq!(t.totals(ms(0)), (0, 0));
}
