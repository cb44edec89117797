use super::{dms, ms, Rng};
use crate::policy::clock::Nanos;
use crate::policy::concurrency::{Acquire, ConcurrencyConfig, ConcurrencyLimiter, Ticket};

fn limiter(max: u32, queue: u32) -> ConcurrencyLimiter {
    ConcurrencyLimiter::new(ConcurrencyConfig {
        max_concurrent: max,
        max_queue: queue,
        standing_wait: dms(5),
        interval: dms(100),
    })
}

fn queued(ticket: u64, deadline: Nanos) -> Acquire {
    Acquire::Queued {
        ticket: Ticket(ticket),
        deadline,
    }
}

#[test]
fn defaults_are_the_papers() {
    let c = ConcurrencyConfig::default();
    assert_eq!((c.standing_wait, c.interval), (dms(5), dms(100)));
    assert_eq!((c.max_concurrent, c.max_queue), (100, 128));
}

#[test]
fn slots_then_bounded_queue_then_reject() {
    let mut l = limiter(2, 3);
    assert_eq!(l.try_acquire(ms(0)), Acquire::Acquired);
    assert_eq!(l.try_acquire(ms(0)), Acquire::Acquired);
    // First waiter in an empty queue: up to N = 100 ms.
    assert_eq!(l.try_acquire(ms(0)), queued(0, ms(100)));
    // Queue not yet standing: a later waiter gets the rest of the interval.
    assert_eq!(l.try_acquire(ms(10)), queued(1, ms(100)));
    assert_eq!(l.try_acquire(ms(20)), queued(2, ms(100)));
    assert_eq!(l.try_acquire(ms(20)), Acquire::Rejected);
    assert_eq!((l.active(), l.queued()), (2, 3));
    assert_eq!(l.next_deadline(), Some(ms(100)));
}

#[test]
fn fifo_while_the_queue_is_not_standing() {
    let mut l = limiter(1, 10);
    l.try_acquire(ms(0));
    l.try_acquire(ms(0)); // T0
    l.try_acquire(ms(10)); // T1
    l.try_acquire(ms(20)); // T2
    assert!(!l.is_standing(ms(50)));
    assert_eq!(l.release(ms(50)), Some(Ticket(0)));
    assert_eq!(l.release(ms(60)), Some(Ticket(1)));
    assert_eq!(l.release(ms(70)), Some(Ticket(2)));
    assert_eq!(l.active(), 1, "each grant hands the slot over");
    assert_eq!(l.release(ms(80)), None);
    assert_eq!(l.active(), 0);
}

#[test]
fn lifo_and_short_deadlines_once_standing() {
    let mut l = limiter(1, 10);
    l.try_acquire(ms(0));
    assert_eq!(l.try_acquire(ms(0)), queued(0, ms(100)));
    // Just before the queue stands: still "up to the end of N".
    assert_eq!(l.try_acquire(ms(98)), queued(1, ms(103)));
    assert!(!l.is_standing(Nanos(100_000_000 - 1)));
    assert!(l.is_standing(ms(100)));
    // Standing: newcomers wait at most M = 5 ms.
    assert_eq!(l.try_acquire(ms(100)), queued(2, ms(105)));
    assert_eq!(l.try_acquire(ms(101)), queued(3, ms(106)));
    // LIFO: newest first; T0 (deadline 100 ms) is past and never granted.
    assert_eq!(l.release(ms(102)), Some(Ticket(3)));
    assert_eq!(l.release(ms(102)), Some(Ticket(2)));
    assert_eq!(l.release(ms(102)), Some(Ticket(1)));
    assert_eq!(l.release(ms(102)), None);
    assert_eq!(l.expire(ms(102)), vec![Ticket(0)]);
    assert_eq!(l.queued(), 0);
}

#[test]
fn same_queue_served_fifo_or_lifo_depending_on_standing() {
    let build = || {
        let mut l = limiter(1, 10);
        l.try_acquire(ms(0));
        for t in [0, 20, 40] {
            l.try_acquire(ms(t));
        }
        l
    };
    assert_eq!(build().release(ms(99)), Some(Ticket(0)));
    // At 100 ms T0–T2 (all deadline 100 ms) are past; add live ones to compare.
    let mut l = build();
    l.try_acquire(ms(100)); // T3, deadline 105
    l.try_acquire(ms(100)); // T4, deadline 105
    assert_eq!(l.release(ms(100)), Some(Ticket(4)));
}

#[test]
fn an_empty_queue_resets_the_interval() {
    let mut l = limiter(1, 10);
    l.try_acquire(ms(0));
    l.try_acquire(ms(0)); // T0
    assert!(l.cancel(ms(150), Ticket(0)));
    // Emptied at 150 ms: the next waiter gets a full N again.
    assert_eq!(l.try_acquire(ms(160)), queued(1, ms(260)));
    assert!(!l.is_standing(ms(259)));
    assert!(l.is_standing(ms(260)));
}

#[test]
fn deadlines_expire_at_the_exact_instant() {
    let mut l = limiter(1, 10);
    l.try_acquire(ms(0));
    l.try_acquire(ms(0)); // T0 → 100
    l.try_acquire(ms(30)); // T1 → 100
    assert_eq!(l.expire(Nanos(100_000_000 - 1)), vec![]);
    assert_eq!(l.expire(ms(100)), vec![Ticket(0), Ticket(1)]);
    assert_eq!(l.next_deadline(), None);
    // A waiter past its deadline is not granted even before anyone expires it.
    l.try_acquire(ms(200)); // T2 → 300
    assert_eq!(l.release(ms(300)), None);
    assert_eq!(l.active(), 0);
    assert_eq!(l.try_acquire(ms(300)), Acquire::Acquired);
    assert_eq!(l.expire(ms(300)), vec![Ticket(2)]);
}

#[test]
fn cancel_only_removes_waiting_tickets() {
    let mut l = limiter(1, 10);
    l.try_acquire(ms(0));
    l.try_acquire(ms(0)); // T0
    l.try_acquire(ms(0)); // T1
    assert!(l.cancel(ms(1), Ticket(1)));
    assert!(!l.cancel(ms(1), Ticket(1)), "already cancelled");
    assert_eq!(l.release(ms(2)), Some(Ticket(0)));
    assert!(!l.cancel(ms(3), Ticket(0)), "already granted");
    assert!(!l.cancel(ms(3), Ticket(42)), "never issued");
    assert_eq!(l.queued(), 0);
}

#[test]
fn zero_queue_rejects_and_zero_max_is_one() {
    let mut l = limiter(0, 0);
    assert_eq!(l.try_acquire(ms(0)), Acquire::Acquired);
    assert_eq!(l.try_acquire(ms(0)), Acquire::Rejected);
    assert_eq!(l.next_deadline(), None);
}

#[test]
fn spurious_releases_never_underflow() {
    let mut l = limiter(1, 1);
    assert_eq!(l.release(ms(0)), None);
    assert_eq!(l.release(ms(0)), None);
    assert_eq!(l.active(), 0);
    assert_eq!(l.try_acquire(ms(0)), Acquire::Acquired);
    assert_eq!(l.try_acquire(ms(0)), queued(0, ms(100)));
}

#[test]
fn clock_going_backwards_uses_the_latest_time() {
    let mut l = limiter(1, 10);
    l.try_acquire(ms(100));
    assert_eq!(l.try_acquire(ms(50)), queued(0, ms(200)));
    assert_eq!(l.try_acquire(ms(0)), queued(1, ms(200)));
    assert_eq!(l.expire(ms(150)), vec![]);
    assert_eq!(l.release(ms(10)), Some(Ticket(0)));
}

#[test]
fn standing_wait_longer_than_interval_is_clamped() {
    let mut l = ConcurrencyLimiter::new(ConcurrencyConfig {
        max_concurrent: 1,
        max_queue: 10,
        standing_wait: dms(500),
        interval: dms(100),
    });
    l.try_acquire(ms(0));
    assert_eq!(l.try_acquire(ms(0)), queued(0, ms(100)));
    assert_eq!(l.try_acquire(ms(100)), queued(1, ms(200)));
}

#[test]
fn huge_times_saturate() {
    let mut l = limiter(1, 10);
    l.try_acquire(Nanos::MAX);
    assert_eq!(l.try_acquire(Nanos::MAX), queued(0, Nanos::MAX));
    assert_eq!(l.release(Nanos::MAX), None, "deadline == now is expired");
}

#[test]
fn raising_the_limit_applies_at_once() {
    let mut l = limiter(1, 10);
    l.try_acquire(ms(0));
    l.try_acquire(ms(0)); // T0
    l.set_config(ConcurrencyConfig {
        max_concurrent: 3,
        ..*l.config()
    });
    assert_eq!(l.try_acquire(ms(1)), Acquire::Acquired);
    // A release with room to spare grants the waiter.
    assert_eq!(l.release(ms(2)), Some(Ticket(0)));
    assert_eq!(l.active(), 2);
}

#[test]
fn random_operations_keep_the_accounting_exact() {
    // Model: every ticket ends exactly once (granted, cancelled or expired), the
    // active count equals acquisitions + grants - releases, and nothing is granted
    // past its deadline.
    let mut l = limiter(3, 5);
    let mut rng = Rng::new(99);
    let mut now = 0u64;
    let mut active = 0u32;
    let mut waiting: Vec<(Ticket, Nanos)> = Vec::new();
    for _ in 0..50_000 {
        now += rng.below(3_000_000);
        let t = Nanos(now);
        match rng.below(4) {
            0 | 1 => match l.try_acquire(t) {
                Acquire::Acquired => active += 1,
                Acquire::Queued { ticket, deadline } => {
                    assert!(deadline > t);
                    waiting.push((ticket, deadline));
                }
                Acquire::Rejected => assert_eq!(waiting.len(), 5),
            },
            2 if active > 0 => match l.release(t) {
                Some(ticket) => {
                    let i = waiting.iter().position(|w| w.0 == ticket).expect("known");
                    assert!(waiting.remove(i).1 > t, "granted past its deadline");
                }
                None => {
                    active -= 1;
                    assert!(
                        waiting.iter().all(|w| w.1 <= t),
                        "a live waiter was skipped"
                    );
                }
            },
            _ => {
                for ticket in l.expire(t) {
                    let i = waiting.iter().position(|w| w.0 == ticket).expect("known");
                    assert!(waiting.remove(i).1 <= t);
                }
            }
        }
        assert_eq!(l.active(), active);
        assert_eq!(l.queued(), waiting.len());
    }
}
