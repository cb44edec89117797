use super::secs;
use crate::policy::clock::Nanos;
use crate::policy::timeouts::{TimeoutKind, Timeouts};
use std::time::Duration;

fn s(n: u64) -> Option<Duration> {
    Some(Duration::from_secs(n))
}

fn only(idle: Option<Duration>, max_lifetime: Option<Duration>) -> Timeouts {
    Timeouts {
        connect: None,
        idle,
        max_lifetime,
        dns: None,
    }
}

#[test]
fn defaults() {
    let t = Timeouts::default();
    assert_eq!(t.connect, s(3));
    assert_eq!(t.idle, s(3600));
    assert_eq!(t.max_lifetime, None);
    assert_eq!(t.dns, s(2));
}

#[test]
fn next_deadline_picks_the_earliest() {
    let idle_only = only(s(60), None);
    assert_eq!(
        idle_only.next_deadline(secs(0), secs(10)),
        Some((secs(70), TimeoutKind::Idle))
    );
    let both = only(s(60), s(30));
    assert_eq!(
        both.next_deadline(secs(0), secs(10)),
        Some((secs(30), TimeoutKind::MaxLifetime))
    );
    assert_eq!(
        both.next_deadline(secs(0), Nanos::ZERO),
        Some((secs(30), TimeoutKind::MaxLifetime))
    );
    let late_lifetime = only(s(60), s(100));
    assert_eq!(
        late_lifetime.next_deadline(secs(0), secs(10)),
        Some((secs(70), TimeoutKind::Idle))
    );
    assert_eq!(only(None, None).next_deadline(secs(0), secs(10)), None);
}

#[test]
fn a_tie_reports_the_lifetime() {
    let t = only(s(60), s(70));
    assert_eq!(
        t.next_deadline(secs(0), secs(10)),
        Some((secs(70), TimeoutKind::MaxLifetime))
    );
}

#[test]
fn activity_before_start_counts_from_start() {
    let t = only(s(60), None);
    assert_eq!(
        t.next_deadline(secs(100), secs(5)),
        Some((secs(160), TimeoutKind::Idle))
    );
}

#[test]
fn expired_at_the_exact_instant() {
    let t = only(s(60), s(300));
    let before = Nanos(70_000_000_000 - 1);
    assert_eq!(t.expired(secs(0), secs(10), before), None);
    assert_eq!(
        t.expired(secs(0), secs(10), secs(70)),
        Some(TimeoutKind::Idle)
    );
    // Activity moves the idle deadline; the lifetime one holds.
    assert_eq!(
        t.expired(secs(0), secs(299), secs(300)),
        Some(TimeoutKind::MaxLifetime)
    );
    assert_eq!(
        t.expired(secs(0), secs(299), Nanos(300_000_000_000 - 1)),
        None
    );
    assert_eq!(only(None, None).expired(secs(0), secs(0), Nanos::MAX), None);
}
