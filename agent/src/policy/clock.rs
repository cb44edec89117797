//! Monotonic time for the policy engine.
//!
//! Every state machine in this module takes `now: Nanos` as an argument instead of
//! reading a clock, so a test can replay any sequence of instants (including a clock
//! that stalls or steps backwards) and get the same answer every time. The [`Clock`]
//! trait exists only for whoever owns the [`PeerTable`](super::PeerTable): the agent
//! reads it once per event and passes the value down.

use std::time::Duration;

/// A monotonic timestamp: nanoseconds since an arbitrary, clock-specific epoch.
///
/// `u64` nanoseconds cover 584 years, so saturation is only ever reached by
/// deliberately huge inputs; all arithmetic saturates instead of panicking.
///
/// If the agent supplies a clock whose epoch is `CLOCK_MONOTONIC`'s zero, these
/// values are directly comparable with `bpf_ktime_get_ns()`, which lets a breaker's
/// `open_until` be written into a kernel map unchanged.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nanos(pub u64);

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);
    #[cfg(test)]
    pub const MAX: Nanos = Nanos(u64::MAX);

    /// The instant `d` after the epoch, saturating at [`Nanos::MAX`].
    pub fn from_duration(d: Duration) -> Nanos {
        Nanos(duration_to_nanos(d))
    }

    /// Time since the epoch.
    pub fn as_duration(self) -> Duration {
        Duration::from_nanos(self.0)
    }

    /// `self + d`, saturating at [`Nanos::MAX`].
    pub fn saturating_add(self, d: Duration) -> Nanos {
        Nanos(self.0.saturating_add(duration_to_nanos(d)))
    }

    /// How long after `earlier` this instant is; zero if `earlier` is later
    /// (a backwards step is treated as "no time passed", never as a panic).
    pub fn saturating_since(self, earlier: Nanos) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// Converts a `Duration` to whole nanoseconds, saturating at `u64::MAX`.
pub fn duration_to_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A source of monotonic time.
pub trait Clock {
    fn now(&self) -> Nanos;
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now(&self) -> Nanos {
        (**self).now()
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now(&self) -> Nanos {
        (**self).now()
    }
}
