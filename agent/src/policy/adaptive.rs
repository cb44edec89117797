//! Client-side adaptive throttling (Google SRE book, "Handling Overload").
//!
//! Over a sliding window, an attempt is rejected locally with probability
//!
//! ```text
//!   p = max(0, (requests - K * accepts) / (requests + 1))
//! ```
//!
//! where, for a proxy, a *request* is an upstream connect attempt that finished
//! (either way) **or** an attempt this throttle rejected, and an *accept* is a
//! successful connect. Counting local rejections as requests is what makes the
//! throttle self-limiting, as in the book. Attempts rejected by *other* local
//! knobs (rate limit, full queue) never reached the peer and are not counted.
//!
//! The window is a ring of [`BUCKETS`] time buckets of `window / BUCKETS` each.
//! Buckets carry their epoch (absolute bucket number), so stale ones are simply
//! ignored on read and reset on write: no rotation step, reads take `&self`. A
//! sample therefore counts for between `window - width` and `window` (110–120 s
//! with the defaults).
//!
//! Randomness is injected (`rand01`), so tests pin decisions exactly.

use super::clock::{duration_to_nanos, Nanos};
use std::time::Duration;

/// Number of buckets in the window ring.
pub const BUCKETS: usize = 12;

#[derive(Copy, Clone, Debug, PartialEq)]
pub struct AdaptiveConfig {
    /// Sliding window length (default 2 min, as in the SRE book).
    pub window: Duration,
    /// K: how many requests per accept are tolerated before throttling starts.
    /// Default 2.0. NaN reads as the default; values below 1.0 read as 1.0, since
    /// with K < 1 a peer that accepts everything would still be throttled;
    /// +infinity disables throttling.
    pub k: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            window: Duration::from_secs(120),
            k: 2.0,
        }
    }
}

impl AdaptiveConfig {
    /// K after the NaN / lower-bound guards described on the field.
    pub fn effective_k(&self) -> f64 {
        if self.k.is_nan() {
            2.0
        } else {
            self.k.max(1.0)
        }
    }

    fn bucket_ns(&self) -> u64 {
        // At least 1 ns so a zero window cannot divide by zero.
        (duration_to_nanos(self.window) / BUCKETS as u64).max(1)
    }
}

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
struct Bucket {
    epoch: u64,
    requests: u64,
    accepts: u64,
}

/// Answer to [`AdaptiveThrottle::admit`] when it rejects.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct Throttled {
    /// The rejection probability that was applied.
    pub probability: f64,
}

#[derive(Clone, Debug)]
pub struct AdaptiveThrottle {
    config: AdaptiveConfig,
    buckets: [Bucket; BUCKETS],
    /// Highest epoch seen; a clock stepping backwards keeps writing here.
    latest: u64,
}

impl AdaptiveThrottle {
    pub fn new(config: AdaptiveConfig) -> AdaptiveThrottle {
        AdaptiveThrottle {
            config,
            buckets: [Bucket::default(); BUCKETS],
            latest: 0,
        }
    }

    /// Rejects with the probability above when `rand01 < p`; the rejection itself
    /// is recorded as a request. A NaN `rand01` admits (fail open on a broken
    /// random source rather than reject everything).
    pub fn admit(&mut self, now: Nanos, rand01: f64) -> Result<(), Throttled> {
        let probability = self.reject_probability(now);
        // `p > 0` first: with nothing to throttle, even an out-of-range `rand01`
        // (negative) must not reject.
        if probability > 0.0 && rand01 < probability {
            let bucket = self.bucket_mut(now);
            bucket.requests = bucket.requests.saturating_add(1);
            return Err(Throttled { probability });
        }
        Ok(())
    }

    /// Records a finished upstream connect attempt: one request, and one accept if
    /// it succeeded.
    pub fn on_result(&mut self, now: Nanos, accepted: bool) {
        let bucket = self.bucket_mut(now);
        bucket.requests = bucket.requests.saturating_add(1);
        if accepted {
            bucket.accepts = bucket.accepts.saturating_add(1);
        }
    }

    /// `(requests, accepts)` inside the window ending at `now`.
    pub fn totals(&self, now: Nanos) -> (u64, u64) {
        let current = self.epoch(now).max(self.latest);
        self.buckets
            .iter()
            // Live buckets are the BUCKETS epochs ending at `current`.
            .filter(|b| b.epoch <= current && current - b.epoch < BUCKETS as u64)
            .fold((0u64, 0u64), |(r, a), b| {
                (r.saturating_add(b.requests), a.saturating_add(b.accepts))
            })
    }

    /// The rejection probability at `now`, in `[0, 1)`; never NaN.
    pub fn reject_probability(&self, now: Nanos) -> f64 {
        let (requests, accepts) = self.totals(now);
        let k = self.config.effective_k();
        // Guard 0 * inf = NaN: with no accepts the allowance is 0 whatever K is.
        let allowance = if accepts == 0 {
            0.0
        } else {
            k * accepts as f64
        };
        let requests = requests as f64;
        let p = (requests - allowance) / (requests + 1.0);
        if p.is_nan() || p <= 0.0 {
            0.0
        } else {
            p
        }
    }

    /// The instant every recorded sample has left the window (`Nanos::ZERO` if
    /// none is recorded): until then, forgetting this state would reset the throttle.
    pub fn clear_at(&self) -> Nanos {
        let width = self.config.bucket_ns();
        self.buckets
            .iter()
            .filter(|b| b.requests > 0 || b.accepts > 0)
            .map(|b| Nanos(b.epoch.saturating_add(BUCKETS as u64).saturating_mul(width)))
            .max()
            .unwrap_or(Nanos::ZERO)
    }

    /// Forgets every sample: the breaker calls for it when its half-open ramp
    /// closes (see `peer.rs`).
    pub fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
        self.latest = 0;
    }

    /// A new window length or K. Recorded counts are kept; if the bucket width
    /// changed, they are dropped, since their epochs no longer mean the same time.
    pub fn set_config(&mut self, config: AdaptiveConfig) {
        if config.bucket_ns() != self.config.bucket_ns() {
            self.buckets = [Bucket::default(); BUCKETS];
            self.latest = 0;
        }
        self.config = config;
    }

    fn epoch(&self, now: Nanos) -> u64 {
        now.0 / self.config.bucket_ns()
    }

    fn bucket_mut(&mut self, now: Nanos) -> &mut Bucket {
        self.latest = self.latest.max(self.epoch(now));
        let epoch = self.latest;
        let bucket = &mut self.buckets[(epoch % BUCKETS as u64) as usize];
        if bucket.epoch != epoch {
            *bucket = Bucket {
                epoch,
                requests: 0,
                accepts: 0,
            };
        }
        bucket
    }
}
