//! Connection and DNS timeouts: the knobs, their defaults, and pure deadline math.
//!
//! The relay arms one timer per connection at [`Timeouts::next_deadline`], and
//! when it fires asks [`Timeouts::expired`] which limit (if any) was hit; activity
//! in between only moves `last_activity`, so no timer is re-armed per byte.

use super::clock::Nanos;
use std::time::Duration;

/// Every timeout is optional: `None` disables it (no magic zero).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Upstream connect must complete within this, else the client is reset.
    ///
    /// Default **3 s**. Tencent's 500 ms suits one tuned data centre, but a
    /// general-purpose agent also fronts cross-zone/cross-region peers, and Linux
    /// retransmits a lost SYN only after a 1 s initial RTO (RFC 6298). Anything
    /// under ~1 s turns one dropped SYN into a failed connection (and a breaker
    /// strike); 3 s lets the first retransmission land with 2 s to spare, while
    /// still failing ~40x sooner than the kernel's own ~127 s SYN give-up.
    /// (Envoy defaults to 5 s; services that want 500 ms say so per peer.)
    pub connect: Option<Duration>,
    /// No byte in either direction for this long: close both sides.
    ///
    /// Default **1 h**, Envoy's TCP-proxy default: long enough for idle database
    /// pools and quiet websockets (which tend to keepalive well within an hour),
    /// short enough to reclaim connections whose peer vanished without a FIN.
    pub idle: Option<Duration>,
    /// Close (gracefully) after this long whatever the activity.
    ///
    /// Default **off**: forcibly ending healthy long-lived streams is only right
    /// when an operator wants connections rebalanced, so it is opt-in.
    pub max_lifetime: Option<Duration>,
    /// An upstream DNS query unanswered for this long gets SERVFAIL.
    ///
    /// Default **2 s**: below the 5 s per-try timeout of glibc, musl and dig, so the
    /// client receives a definite SERVFAIL instead of timing out itself and
    /// retrying into the same stuck upstream.
    pub dns: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Some(Duration::from_secs(3)),
            idle: Some(Duration::from_secs(3600)),
            max_lifetime: None,
            dns: Some(Duration::from_secs(2)),
        }
    }
}

/// Which limit of an established connection was hit.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum TimeoutKind {
    Idle,
    MaxLifetime,
}

impl Timeouts {
    /// The earliest deadline of an established connection accepted at `started`
    /// whose last byte (either way) moved at `last_activity`.
    ///
    /// A `last_activity` before `started` is read as `started`. On a tie the
    /// lifetime limit is reported: it is the one that holds regardless of traffic.
    pub fn next_deadline(
        &self,
        started: Nanos,
        last_activity: Nanos,
    ) -> Option<(Nanos, TimeoutKind)> {
        let lifetime = self
            .max_lifetime
            .map(|t| (started.saturating_add(t), TimeoutKind::MaxLifetime));
        let idle = self.idle.map(|t| {
            (
                last_activity.max(started).saturating_add(t),
                TimeoutKind::Idle,
            )
        });
        match (lifetime, idle) {
            (Some(l), Some(i)) => Some(if i.0 < l.0 { i } else { l }),
            (l, i) => l.or(i),
        }
    }

    /// Which limit an established connection has hit at `now`, if any (a deadline
    /// is hit at the exact instant it names).
    pub fn expired(&self, started: Nanos, last_activity: Nanos, now: Nanos) -> Option<TimeoutKind> {
        self.next_deadline(started, last_activity)
            .filter(|(deadline, _)| now >= *deadline)
            .map(|(_, kind)| kind)
    }
}
