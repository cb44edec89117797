use super::{dms, ms};
use crate::policy::clock::{duration_to_nanos, Clock, Nanos};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Test clock: time moves only when told to. `Send + Sync` (an atomic), so it can be
/// shared with the owner of a table behind an `Arc` the same way a real clock is.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    pub fn new(start: Nanos) -> Self {
        ManualClock {
            now: AtomicU64::new(start.0),
        }
    }

    /// Moves time forward by `d`, saturating at [`Nanos::MAX`].
    pub fn advance(&self, d: Duration) {
        let step = duration_to_nanos(d);
        // fetch_update with a closure that always returns Some cannot fail.
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(step))
            });
    }

    /// Sets the time to any instant, including an earlier one (to test how the
    /// state machines cope with a clock that steps backwards).
    pub fn set(&self, t: Nanos) {
        self.now.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        Nanos(self.now.load(Ordering::SeqCst))
    }
}
