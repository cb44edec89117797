use super::{dms, ms, secs, Rng};
use crate::policy::clock::Nanos;
use crate::policy::token_bucket::{Rate, TokenBucket, Wait, MAX_RATE_PERIOD};
use std::time::Duration;

fn rate(tokens: u64, per: Duration) -> Rate {
    Rate::new(tokens, per).expect("valid test rate")
}

fn per_sec(tokens: u64) -> Rate {
    rate(tokens, Duration::from_secs(1))
}

#[test]
fn starts_full_then_rejects_with_exact_wait() {
    let mut b = TokenBucket::new(per_sec(10), 3, ms(0));
    assert_eq!(b.try_take(ms(0), 1), Ok(()));
    assert_eq!(b.try_take(ms(0), 1), Ok(()));
    assert_eq!(b.try_take(ms(0), 1), Ok(()));
    assert_eq!(b.try_take(ms(0), 1), Err(Wait::After(dms(100))));
    assert_eq!(b.try_take(ms(50), 1), Err(Wait::After(dms(50))));
    assert_eq!(b.try_take(ms(100), 1), Ok(()));
    assert_eq!(b.try_take(ms(100), 1), Err(Wait::After(dms(100))));
    // Refill is capped at the burst: after a long pause, exactly 3 pass again.
    let passed = (0..10).filter(|_| b.try_take(secs(60), 1).is_ok()).count();
    assert_eq!(passed, 3);
}

#[test]
fn a_rejected_take_takes_nothing() {
    let mut b = TokenBucket::new(per_sec(10), 5, ms(0));
    assert_eq!(b.try_take(ms(0), 3), Ok(()));
    // 2 left; asking for 4 fails and must not consume the 2.
    assert_eq!(b.try_take(ms(0), 4), Err(Wait::After(dms(200))));
    assert_eq!(b.available(ms(0)), 2);
    assert_eq!(b.try_take(ms(0), 2), Ok(()));
}

#[test]
fn non_integer_interval_is_exact_and_rounds_waits_up() {
    // 3/s: one token every 333_333_333.3 ns.
    let mut b = TokenBucket::new(per_sec(3), 1, Nanos(0));
    assert_eq!(b.try_take(Nanos(0), 1), Ok(()));
    assert_eq!(
        b.try_take(Nanos(0), 1),
        Err(Wait::After(Duration::from_nanos(333_333_334)))
    );
    assert_eq!(
        b.try_take(Nanos(333_333_333), 1),
        Err(Wait::After(Duration::from_nanos(1)))
    );
    assert_eq!(b.try_take(Nanos(333_333_334), 1), Ok(()));
}

#[test]
fn long_run_has_no_drift() {
    // 3/s, burst 2, an attempt every millisecond for 10 s: the 2 initial tokens,
    // then token k (k = 1..=30) at the first millisecond ≥ k × 333.33… ms. The
    // 30th lands at exactly 10 s.
    let mut b = TokenBucket::new(per_sec(3), 2, ms(0));
    let passed: Vec<u64> = (0..=10_000)
        .filter(|t| b.try_take(ms(*t), 1).is_ok())
        .collect();
    let mut expected = vec![0, 1];
    expected.extend((1..=30).map(|k: u64| (k * 1000).div_ceil(3)));
    assert_eq!(passed, expected);
}

#[test]
fn a_full_bucket_discards_the_overshoot() {
    // Burst 1 polled every millisecond: the bucket is full at 333.33 ms and the
    // refill between then and the 334 ms poll is discarded. That is the cap doing
    // its job (no credit beyond the burst), so passes come every 334 ms.
    let mut b = TokenBucket::new(per_sec(3), 1, ms(0));
    let passed: Vec<u64> = (0..=1_500)
        .filter(|t| b.try_take(ms(*t), 1).is_ok())
        .collect();
    assert_eq!(passed, vec![0, 334, 668, 1002, 1336]);
}

#[test]
fn same_rate_in_other_units_behaves_identically() {
    let mut a = TokenBucket::new(per_sec(100), 7, ms(0));
    let mut b = TokenBucket::new(rate(6000, Duration::from_secs(60)), 7, ms(0));
    let mut rng = Rng::new(7);
    let mut now = 0;
    for _ in 0..20_000 {
        now += rng.below(30_000_000); // up to 30 ms
        let n = rng.below(4);
        assert_eq!(
            a.try_take(Nanos(now), n),
            b.try_take(Nanos(now), n),
            "at {now}"
        );
    }
}

#[test]
fn clock_not_advancing_never_refills() {
    let mut b = TokenBucket::new(per_sec(1), 1, secs(5));
    assert_eq!(b.try_take(secs(5), 1), Ok(()));
    for _ in 0..1000 {
        assert_eq!(
            b.try_take(secs(5), 1),
            Err(Wait::After(Duration::from_secs(1)))
        );
    }
}

#[test]
fn clock_going_backwards_counts_as_no_time() {
    let mut b = TokenBucket::new(per_sec(10), 1, secs(1));
    assert_eq!(b.try_take(secs(1), 1), Ok(()));
    // A step back: no refill, no panic, the wait is measured from the latest time.
    assert_eq!(b.try_take(ms(0), 1), Err(Wait::After(dms(100))));
    assert_eq!(b.reserve(ms(0), 0), Duration::ZERO);
    // Refill still counts from 1 s, not from the earlier instant.
    assert_eq!(b.try_take(ms(1099), 1), Err(Wait::After(dms(1))));
    assert_eq!(b.try_take(ms(1100), 1), Ok(()));
}

#[test]
fn burst_zero_means_burst_one() {
    let mut zero = TokenBucket::new(per_sec(10), 0, ms(0));
    let mut one = TokenBucket::new(per_sec(10), 1, ms(0));
    assert_eq!(zero.capacity(), 1);
    for b in [&mut zero, &mut one] {
        assert_eq!(b.try_take(ms(0), 1), Ok(()));
        assert_eq!(b.try_take(ms(0), 1), Err(Wait::After(dms(100))));
    }
    let mut rng = Rng::new(3);
    let mut now = 0;
    for _ in 0..5_000 {
        now += rng.below(200_000_000);
        assert_eq!(zero.try_take(Nanos(now), 1), one.try_take(Nanos(now), 1));
    }
}

#[test]
fn more_than_capacity_is_never_and_zero_is_free() {
    let mut b = TokenBucket::new(per_sec(10), 5, ms(0));
    assert_eq!(b.try_take(ms(0), 6), Err(Wait::Never));
    assert_eq!(b.try_take(ms(0), u64::MAX), Err(Wait::Never));
    assert_eq!(b.try_take(ms(0), 0), Ok(()));
    assert_eq!(b.available(ms(0)), 5);
}

#[test]
fn rate_constructor_rejects_zero_and_overlong_periods() {
    assert_eq!(Rate::new(0, Duration::from_secs(1)), None);
    assert_eq!(Rate::new(1, Duration::ZERO), None);
    assert!(Rate::new(1, Duration::from_nanos(1)).is_some());
    assert!(Rate::new(1, MAX_RATE_PERIOD).is_some());
    assert_eq!(
        Rate::new(1, MAX_RATE_PERIOD + Duration::from_nanos(1)),
        None
    );
    assert_eq!(Rate::new(1, Duration::MAX), None);
    assert_eq!(Rate::per_second(0), None);
}

#[test]
fn reserve_shapes_without_dropping() {
    let mut b = TokenBucket::new(per_sec(1000), 1000, ms(0));
    assert_eq!(b.reserve(ms(0), 500), Duration::ZERO);
    assert_eq!(b.reserve(ms(0), 500), Duration::ZERO);
    assert_eq!(b.reserve(ms(0), 500), dms(500));
    assert_eq!(b.reserve(ms(0), 1000), dms(1500));
    // In debt, try_take of anything fails until the debt is repaid.
    assert_eq!(b.try_take(ms(1000), 0), Err(Wait::After(dms(500))));
    assert_eq!(b.available(ms(1000)), 0);
    assert_eq!(b.reserve(ms(1500), 0), Duration::ZERO);
}

#[test]
fn reserve_with_chunks_larger_than_burst_keeps_the_exact_rate() {
    // 1000 B/s, burst 1000, 10_000-byte writes; the sender sleeps each wait.
    let mut b = TokenBucket::new(per_sec(1000), 1000, ms(0));
    let mut now = ms(0);
    for chunk in 0..5u64 {
        let wait = b.reserve(now, 10_000);
        let expected = if chunk == 0 { 9 } else { 10 };
        assert_eq!(wait, Duration::from_secs(expected), "chunk {chunk}");
        now = now.saturating_add(wait);
    }
    assert_eq!(now, secs(49)); // 50_000 B = 1000 B burst + 49 s at 1000 B/s
}

#[test]
fn huge_values_saturate_instead_of_panicking() {
    let mut b = TokenBucket::new(per_sec(1), u64::MAX, Nanos(0));
    assert_eq!(b.try_take(Nanos(0), u64::MAX), Ok(()));
    assert_eq!(
        b.try_take(Nanos(0), 1),
        Err(Wait::After(Duration::from_secs(1)))
    );

    let mut slow = TokenBucket::new(rate(1, MAX_RATE_PERIOD), 1, Nanos(0));
    let max_wait = Duration::from_nanos(u64::MAX);
    assert_eq!(slow.reserve(Nanos(0), u64::MAX), max_wait);
    assert_eq!(slow.reserve(Nanos(0), u64::MAX), max_wait);
    assert_eq!(slow.reserve(Nanos::MAX, u64::MAX), max_wait);
    assert_eq!(slow.available(Nanos::MAX), 0);

    let mut fast = TokenBucket::new(rate(u64::MAX, Duration::from_nanos(1)), u64::MAX, Nanos(0));
    assert_eq!(fast.try_take(Nanos(0), u64::MAX), Ok(()));
    assert_eq!(fast.try_take(Nanos(1), u64::MAX), Ok(()));
    assert_eq!(fast.try_take(Nanos::MAX, u64::MAX), Ok(()));
    assert_eq!(fast.full_at(), Nanos::MAX);
}

#[test]
fn refund_is_capped_at_capacity() {
    let mut b = TokenBucket::new(per_sec(1), 2, ms(0));
    assert_eq!(b.try_take(ms(0), 1), Ok(()));
    b.refund(1);
    assert_eq!(b.available(ms(0)), 2);
    b.refund(u64::MAX);
    assert_eq!(b.available(ms(0)), 2);
}

#[test]
fn full_at_and_available_do_not_change_state() {
    let mut b = TokenBucket::new(per_sec(10), 3, ms(0));
    assert_eq!(b.full_at(), ms(0));
    assert_eq!(b.try_take(ms(0), 2), Ok(()));
    assert_eq!(b.full_at(), ms(200));
    assert_eq!(b.available(ms(150)), 2);
    assert_eq!(b.available(ms(99)), 1);
    assert_eq!(b.try_take(ms(0), 2), Err(Wait::After(dms(100))));
}

#[test]
fn reconfigure_keeps_the_level() {
    let mut b = TokenBucket::new(per_sec(10), 10, ms(0));
    assert_eq!(b.try_take(ms(0), 10), Ok(()));
    b.reconfigure(ms(0), per_sec(100), 50);
    assert_eq!(b.available(ms(0)), 0);
    assert_eq!(b.try_take(ms(0), 1), Err(Wait::After(dms(10))));
    assert_eq!(b.available(ms(20)), 2);

    let mut full = TokenBucket::new(per_sec(10), 10, ms(0));
    full.reconfigure(ms(0), per_sec(10), 5);
    assert_eq!(full.available(ms(0)), 5);
    assert_eq!(full.capacity(), 5);
}

#[test]
fn rate_display_is_the_parser_spelling() {
    assert_eq!(per_sec(100).to_string(), "100/s");
    assert_eq!(rate(6000, Duration::from_secs(60)).to_string(), "6000/m");
    assert_eq!(rate(1, Duration::from_secs(3600)).to_string(), "1/h");
    assert_eq!(rate(5, Duration::from_secs(10)).to_string(), "5/10s");
    assert_eq!(rate(1, dms(1500)).to_string(), "1/1s500ms");
}

#[test]
fn reconfigure_keeps_fractions_of_a_token() {
    // 1/h: 0.9 token accrued after 54 min must survive a switch to 2/h (where it
    // is worth 27 min of refill), not be rounded away.
    let hour = Duration::from_secs(3600);
    let mut b = TokenBucket::new(rate(1, hour), 1, Nanos(0));
    assert_eq!(b.try_take(Nanos(0), 1), Ok(()));
    b.reconfigure(secs(54 * 60), rate(2, hour), 1);
    assert_eq!(
        b.try_take(secs(54 * 60), 1),
        Err(Wait::After(Duration::from_secs(180)))
    );
}
