use super::{dms, ms};
use crate::policy::clock::{Clock, ManualClock, MonotonicClock, Nanos};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn manual_clock_moves_only_when_told() {
    let clock = ManualClock::new(ms(5));
    assert_eq!(clock.now(), ms(5));
    assert_eq!(clock.now(), ms(5));
    clock.advance(dms(10));
    assert_eq!(clock.now(), ms(15));
    clock.set(ms(1));
    assert_eq!(clock.now(), ms(1), "set may step backwards");
    clock.advance(Duration::MAX);
    assert_eq!(clock.now(), Nanos::MAX);
}

#[test]
fn clock_is_usable_through_references_and_arcs() {
    fn read(c: impl Clock) -> Nanos {
        c.now()
    }
    let clock = Arc::new(ManualClock::new(ms(7)));
    assert_eq!(read(&*clock), ms(7));
    assert_eq!(read(Arc::clone(&clock)), ms(7));
    let shared: Arc<dyn Clock + Send + Sync> = clock;
    assert_eq!(read(shared), ms(7));
}

#[test]
fn monotonic_clock_never_goes_backwards() {
    let clock = MonotonicClock::new();
    let mut last = clock.now();
    for _ in 0..1000 {
        let now = clock.now();
        assert!(now >= last);
        last = now;
    }
}

#[test]
fn nanos_arithmetic_saturates() {
    assert_eq!(
        Nanos::MAX.saturating_add(Duration::from_nanos(1)),
        Nanos::MAX
    );
    assert_eq!(Nanos(5).saturating_add(Duration::MAX), Nanos::MAX);
    assert_eq!(ms(3).saturating_since(ms(5)), Duration::ZERO);
    assert_eq!(ms(5).saturating_since(ms(3)), dms(2));
    assert_eq!(Nanos::from_duration(Duration::MAX), Nanos::MAX);
    assert_eq!(Nanos::from_duration(dms(2)), ms(2));
    assert_eq!(ms(2).as_duration(), dms(2));
}
