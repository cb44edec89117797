//! What bounds one relayed connection, whichever relay carries it: the peer's limits, when the
//! connection last saw a byte, and the one timer that ends it at the idle timeout or at its
//! maximum lifetime.
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

use crate::datapath::relay::RelayMaps;
use crate::policy::{
    timeouts::{TimeoutKind, Timeouts},
    Nanos,
};
use crate::telemetry::conn::End;

/// Debits bytes from the peer's bandwidth bucket; returns how long to hold them back.
pub type Shaper<'a> = &'a (dyn Fn(u64) -> Duration + Sync);

/// Per-connection limits from the peer's policy.
#[derive(Default)]
pub struct Limits<'a> {
    pub idle: Option<Duration>,
    pub lifetime: Option<Duration>,
    /// `None` (no bandwidth limit) lets the bytes go by splice, never through the agent.
    pub shape: Option<Shaper<'a>>,
    /// The in-kernel relay, used for unshaped connections when present.
    pub kernel: Option<&'a RelayMaps>,
}

/// When the connection last saw a byte, as nanoseconds since it started (both pumps write it,
/// the timer reads it; the task is Send, so no Cell).
pub struct Activity {
    pub start: Instant,
    last_ns: AtomicU64,
}

impl Activity {
    /// A connection starting now.
    pub fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ns: AtomicU64::new(0),
        }
    }

    pub fn touch(&self) {
        let ns = self.start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last_ns.store(ns, Ordering::Relaxed);
    }

    pub fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
    }
}

/// Fires when the idle timeout or the lifetime is reached; pending forever if neither is set.
/// `last` tells when the connection (started at `start`) last saw a byte. One timer, armed
/// at the engine's next deadline and re-armed only when activity has moved it.
pub async fn deadline(
    limits: &Limits<'_>,
    start: Instant,
    last: &(dyn Fn() -> Instant + Sync),
) -> End {
    let timeouts = Timeouts {
        connect: None,
        idle: limits.idle,
        max_lifetime: limits.lifetime,
        dns: None,
    };
    // Instants on the engine's clock: time since the connection started.
    let since_start = |t: Instant| Nanos::from_duration(t.saturating_duration_since(start));
    loop {
        let Some((at, _)) = timeouts.next_deadline(Nanos::ZERO, since_start(last())) else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(start + at.as_duration()).await;
        match timeouts.expired(
            Nanos::ZERO,
            since_start(last()),
            since_start(Instant::now()),
        ) {
            Some(TimeoutKind::MaxLifetime) => return End::MaxLifetime,
            Some(TimeoutKind::Idle) => return End::IdleTimeout,
            // Activity since the timer was armed moved the idle deadline: sleep again.
            None => {}
        }
    }
}
