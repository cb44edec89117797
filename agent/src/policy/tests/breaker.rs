use super::{ms, secs};
use crate::policy::breaker::{
    Breaker, BreakerConfig, BreakerDecision, BreakerState, BreakerTransition,
};
use crate::policy::clock::Nanos;
use std::time::Duration;

const ADMIT: BreakerDecision = BreakerDecision::Admit;
const HALF_OPEN_REJECT: BreakerDecision = BreakerDecision::Reject { retry_after: None };

fn config(failures: u32, open_secs: u64, start_pct: u8) -> BreakerConfig {
    BreakerConfig {
        failure_threshold: failures,
        open_for: Duration::from_secs(open_secs),
        half_open_start_pct: start_pct,
    }
}

/// A breaker that opened at t = 0 and is half-open from 10 s.
fn opened_at_zero() -> Breaker {
    let mut b = Breaker::new(config(1, 10, 10));
    assert_eq!(
        b.on_failure(ms(0)),
        Some(BreakerTransition::Opened { until: secs(10) })
    );
    b
}

#[test]
fn defaults_are_the_briefs() {
    assert_eq!(BreakerConfig::default(), config(5, 15, 10));
}

#[test]
fn opens_on_exactly_the_fth_consecutive_failure() {
    let mut b = Breaker::new(config(3, 10, 10));
    assert_eq!(b.on_failure(ms(0)), None);
    assert_eq!(b.on_failure(ms(1)), None);
    assert_eq!(
        b.state(ms(1)),
        BreakerState::Closed {
            consecutive_failures: 2
        }
    );
    assert_eq!(b.admit(ms(1)), ADMIT);
    let until = ms(2).saturating_add(Duration::from_secs(10));
    assert_eq!(
        b.on_failure(ms(2)),
        Some(BreakerTransition::Opened { until })
    );
    assert_eq!(b.state(ms(2)), BreakerState::Open { until });
    assert_eq!(b.open_until(ms(2)), Some(until));
}

#[test]
fn a_success_resets_the_failure_count() {
    let mut b = Breaker::new(config(3, 10, 10));
    for t in 0..2 {
        assert_eq!(b.on_failure(ms(t)), None);
    }
    assert_eq!(b.on_success(ms(2)), None);
    for t in 3..5 {
        assert_eq!(b.on_failure(ms(t)), None);
    }
    assert_eq!(
        b.state(ms(5)),
        BreakerState::Closed {
            consecutive_failures: 2
        }
    );
    assert!(b.on_failure(ms(5)).is_some());
}

#[test]
fn open_rejects_until_the_exact_instant() {
    let mut b = opened_at_zero();
    assert_eq!(
        b.admit(ms(0)),
        BreakerDecision::Reject {
            retry_after: Some(Duration::from_secs(10))
        }
    );
    assert_eq!(
        b.admit(Nanos(10_000_000_000 - 1)),
        BreakerDecision::Reject {
            retry_after: Some(Duration::from_nanos(1))
        }
    );
    assert_eq!(b.open_until(Nanos(10_000_000_000 - 1)), Some(secs(10)));
    // At `until` the state reads as half-open without any call mutating it…
    assert_eq!(b.state(secs(10)), BreakerState::HalfOpen { share_pct: 10 });
    assert_eq!(b.open_until(secs(10)), None);
    // …and the first attempt is the probe.
    assert_eq!(b.admit(secs(10)), ADMIT);
}

#[test]
fn half_open_admits_exactly_one_in_ten_starting_with_the_first() {
    let mut b = opened_at_zero();
    let admitted: Vec<usize> = (1..=31).filter(|_| b.admit(secs(10)) == ADMIT).collect();
    assert_eq!(admitted, vec![1, 11, 21, 31]);
}

#[test]
fn ramp_doubles_on_each_success_then_closes() {
    let mut b = opened_at_zero();
    let mut admitted = Vec::new();
    let mut closed_after = None;
    for attempt in 1..=20 {
        if b.admit(secs(10)) == ADMIT {
            admitted.push(attempt);
            if b.on_success(secs(10)) == Some(BreakerTransition::Closed) {
                closed_after = Some(attempt);
                break;
            }
        }
    }
    // share 10 % (acc 90→100 admits #1), 20 % (#2..#6: 20,40,60,80,100),
    // 40 % (#7 40, #8 80, #9 120), 80 % (#10 20+80=100) → 100 %: closed.
    assert_eq!(admitted, vec![1, 6, 9, 10]);
    assert_eq!(closed_after, Some(10));
    assert_eq!(
        b.state(secs(10)),
        BreakerState::Closed {
            consecutive_failures: 0
        }
    );
}

#[test]
fn shares_reported_while_ramping() {
    let mut b = opened_at_zero();
    assert_eq!(b.admit(secs(10)), ADMIT);
    let mut shares = Vec::new();
    for _ in 0..3 {
        assert_eq!(b.on_success(secs(10)), None);
        shares.push(b.state(secs(10)));
    }
    let pct = |share_pct| BreakerState::HalfOpen { share_pct };
    assert_eq!(shares, vec![pct(20), pct(40), pct(80)]);
}

#[test]
fn a_half_open_failure_reopens_for_d_from_that_failure() {
    let mut b = opened_at_zero();
    assert_eq!(b.admit(secs(10)), ADMIT);
    assert_eq!(b.on_success(secs(11)), None); // 20 %
    assert_eq!(
        b.on_failure(secs(12)),
        Some(BreakerTransition::Opened { until: secs(22) })
    );
    assert_eq!(
        b.admit(secs(21)),
        BreakerDecision::Reject {
            retry_after: Some(Duration::from_secs(1))
        }
    );
    // Re-entering half-open starts over at 10 %, first attempt admitted.
    assert_eq!(b.admit(secs(22)), ADMIT);
    assert_eq!(b.state(secs(22)), BreakerState::HalfOpen { share_pct: 10 });
    assert_eq!(b.admit(secs(22)), HALF_OPEN_REJECT);
}

#[test]
fn outcomes_while_open_are_ignored() {
    let mut b = opened_at_zero();
    assert_eq!(b.on_failure(secs(5)), None);
    assert_eq!(b.on_success(secs(6)), None);
    assert_eq!(b.open_until(secs(6)), Some(secs(10)));
}

#[test]
fn outcome_after_a_lapsed_open_applies_to_half_open() {
    // No admit call after the open period: a late failure still re-opens.
    let mut b = opened_at_zero();
    assert_eq!(
        b.on_failure(secs(11)),
        Some(BreakerTransition::Opened { until: secs(21) })
    );
}

#[test]
fn threshold_zero_acts_as_one() {
    let mut b = Breaker::new(config(0, 1, 10));
    assert_eq!(
        b.on_failure(ms(0)),
        Some(BreakerTransition::Opened { until: secs(1) })
    );
}

#[test]
fn start_share_is_clamped() {
    // 0 % → 1 %: the first attempt, then one in a hundred.
    let mut b = Breaker::new(config(1, 1, 0));
    b.on_failure(ms(0));
    let admitted: Vec<u32> = (1..=201).filter(|_| b.admit(secs(1)) == ADMIT).collect();
    assert_eq!(admitted, vec![1, 101, 201]);

    // ≥ 100 %: everything passes, and the first success closes.
    for pct in [100, 200] {
        let mut b = Breaker::new(config(1, 1, pct));
        b.on_failure(ms(0));
        assert!((0..5).all(|_| b.admit(secs(1)) == ADMIT));
        assert_eq!(b.on_success(secs(1)), Some(BreakerTransition::Closed));
    }
}

#[test]
fn clock_going_backwards_while_open_stays_open() {
    let mut b = Breaker::new(config(1, 10, 10));
    b.on_failure(secs(100));
    assert_eq!(
        b.admit(secs(50)),
        BreakerDecision::Reject {
            retry_after: Some(Duration::from_secs(60))
        }
    );
    assert_eq!(b.open_until(Nanos::ZERO), Some(secs(110)));
}

#[test]
fn huge_open_period_saturates() {
    let mut b = Breaker::new(BreakerConfig {
        open_for: Duration::MAX,
        ..config(1, 0, 10)
    });
    assert_eq!(
        b.on_failure(secs(1)),
        Some(BreakerTransition::Opened { until: Nanos::MAX })
    );
    assert!(matches!(
        b.admit(Nanos(u64::MAX - 1)),
        BreakerDecision::Reject { retry_after: Some(d) } if d == Duration::from_nanos(1)
    ));
    assert_eq!(b.admit(Nanos::MAX), ADMIT);
}

#[test]
fn zero_open_period_goes_straight_to_half_open() {
    let mut b = Breaker::new(config(1, 0, 10));
    b.on_failure(secs(1));
    assert_eq!(b.open_until(secs(1)), None);
    assert_eq!(b.admit(secs(1)), ADMIT);
    assert_eq!(b.admit(secs(1)), HALF_OPEN_REJECT);
}

#[test]
fn set_config_keeps_state_and_applies_later() {
    let mut b = Breaker::new(config(3, 10, 10));
    b.on_failure(ms(0));
    b.on_failure(ms(1));
    b.set_config(config(2, 30, 50));
    assert_eq!(
        b.state(ms(1)),
        BreakerState::Closed {
            consecutive_failures: 2
        }
    );
    // Already at the new threshold: the next failure opens, for the new D.
    assert_eq!(
        b.on_failure(ms(2)),
        Some(BreakerTransition::Opened {
            until: ms(2).saturating_add(Duration::from_secs(30))
        })
    );
}
