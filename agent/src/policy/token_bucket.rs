//! Lazy-refill token bucket, in exact integer arithmetic.
//!
//! Used twice per peer: for the connection rate (`try_take(now, 1)`, an empty
//! bucket rejects) and for bandwidth in bytes (`reserve(now, n)`, which never
//! refuses: it debits, possibly into debt, and tells the caller how long to delay
//! the data; shaping never drops).
//!
//! There are no timers: the level is brought up to date from the elapsed time
//! whenever the bucket is touched.
//!
//! Why integers: a rate is a rational `tokens / per` (e.g. 6000/m, 10 MiB/s, 1/h).
//! The level is kept in *token-nanoseconds* (one token = `per` units, a nanosecond
//! of refill adds `tokens` units), so refill and waits are exact, with no float
//! rounding drift and no NaN. `i128` holds any level: a burst of `u64::MAX` tokens
//! times the longest period (24 h < 2^47 ns) is < 2^111, and everything saturates.

use super::clock::{duration_to_nanos, Nanos};
use std::time::Duration;

/// Longest accepted rate period. Bounding it keeps `tokens * period` inside `i128`
/// with room to spare; nothing useful needs a coarser period than a day.
pub const MAX_RATE_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// A refill rate: `tokens` per `per`. Both are non-zero by construction, so a rate
/// of zero cannot exist; a disabled limiter is `None` at the config level.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    tokens: u64,
    per_ns: u64,
}

impl Rate {
    /// `None` if `tokens` is 0, or `per` is zero or longer than [`MAX_RATE_PERIOD`].
    pub fn new(tokens: u64, per: Duration) -> Option<Rate> {
        let per_ns = duration_to_nanos(per);
        if tokens == 0 || per_ns == 0 || per > MAX_RATE_PERIOD {
            return None;
        }
        Some(Rate { tokens, per_ns })
    }

    /// `tokens` per second; `None` if `tokens` is 0.
    #[cfg(test)]
    pub fn per_second(tokens: u64) -> Option<Rate> {
        Rate::new(tokens, Duration::from_secs(1))
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    pub fn per(&self) -> Duration {
        Duration::from_nanos(self.per_ns)
    }
}

/// Why `try_take` failed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Wait {
    /// `n` tokens will be available after this long (if nothing else takes them).
    After(Duration),
    /// `n` exceeds the bucket's capacity: `try_take(n)` can never succeed.
    Never,
}

/// See the module doc. Starts full.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: Rate,
    /// Capacity in tokens; never 0 (see [`TokenBucket::new`]).
    burst: u64,
    /// Level in token-nanoseconds; negative means debt (only `reserve` makes debt).
    level: i128,
    /// Last instant the level was brought up to date. Never moves backwards.
    last: Nanos,
}

impl TokenBucket {
    /// A full bucket holding at most `burst` tokens, refilled at `rate`.
    ///
    /// **Burst 0 is treated as burst 1**: strict pacing at `rate` with no burst.
    /// The other reading, "reject everything forever", is never what a rate limit
    /// means (blocking a peer is a different knob), and a limiter that cannot pass
    /// anything would turn a typo into an outage.
    pub fn new(rate: Rate, burst: u64, now: Nanos) -> TokenBucket {
        let burst = burst.max(1);
        let mut bucket = TokenBucket {
            rate,
            burst,
            level: 0,
            last: now,
        };
        bucket.level = bucket.capacity_units();
        bucket
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Capacity in tokens (≥ 1).
    pub fn capacity(&self) -> u64 {
        self.burst
    }

    /// Takes `n` tokens if they are all there now; otherwise takes nothing and says
    /// how long until they would be. Succeeds iff the refilled level is ≥ `n`
    /// (so `n = 0` fails only while `reserve` has left the bucket in debt).
    pub fn try_take(&mut self, now: Nanos, n: u64) -> Result<(), Wait> {
        self.refill(now);
        let need = self.units(n);
        if self.level >= need {
            self.level -= need;
            return Ok(());
        }
        if n > self.burst {
            return Err(Wait::Never);
        }
        Err(Wait::After(self.time_to_reach(need)))
    }

    /// Debits `n` tokens now, even into debt, and returns how long the caller must
    /// wait before sending them: zero if they were all available, else the time
    /// until the level is back to zero. Successive reservations queue behind each
    /// other, so the long-run rate is exact even for chunks larger than the burst.
    pub fn reserve(&mut self, now: Nanos, n: u64) -> Duration {
        self.refill(now);
        self.level = self.level.saturating_sub(self.units(n));
        self.time_to_reach(0)
    }

    /// Gives back `n` tokens taken earlier but not used (capped at capacity).
    pub fn refund(&mut self, n: u64) {
        self.level = self
            .level
            .saturating_add(self.units(n))
            .min(self.capacity_units());
    }

    /// Whole tokens available at `now` (0 while in debt), without changing state.
    pub fn available(&self, now: Nanos) -> u64 {
        let level = self.level_at(now);
        if level <= 0 {
            return 0;
        }
        u64::try_from(level / i128::from(self.rate.per_ns)).unwrap_or(u64::MAX)
    }

    /// The level at `now` in units of this rate (token-ns), without changing state: what
    /// the kernel tier's bucket continues from when a peer changes tier.
    pub fn level_units(&self, now: Nanos) -> i128 {
        self.level_at(now)
    }

    /// The instant the bucket will be full again if nothing is taken: until then,
    /// forgetting it would hand the peer free tokens.
    pub fn full_at(&self) -> Nanos {
        let missing = self.capacity_units().saturating_sub(self.level);
        Nanos(self.last.0.saturating_add(self.refill_ns(missing)))
    }

    /// Replaces rate and burst, keeping the current level (capped at the new
    /// capacity), so a policy reload neither refills nor drains the bucket.
    pub fn reconfigure(&mut self, now: Nanos, rate: Rate, burst: u64) {
        self.refill(now);
        let (old_per, new_per) = (i128::from(self.rate.per_ns), i128::from(rate.per_ns));
        // The same number of tokens in the new units: exact, unless that overflows,
        // in which case whole tokens (the level is then astronomically large anyway).
        let level = match self.level.checked_mul(new_per) {
            Some(scaled) => scaled / old_per,
            None => (self.level / old_per).saturating_mul(new_per),
        };
        self.rate = rate;
        self.burst = burst.max(1);
        self.level = level.min(self.capacity_units());
    }

    fn units(&self, n: u64) -> i128 {
        i128::from(n).saturating_mul(i128::from(self.rate.per_ns))
    }

    fn capacity_units(&self) -> i128 {
        self.units(self.burst)
    }

    /// The level `now` would see. A `now` before `last` (clock stepped back) is
    /// treated as "no time passed".
    fn level_at(&self, now: Nanos) -> i128 {
        let elapsed = now.0.saturating_sub(self.last.0);
        let added = i128::from(elapsed).saturating_mul(i128::from(self.rate.tokens));
        self.level.saturating_add(added).min(self.capacity_units())
    }

    fn refill(&mut self, now: Nanos) {
        self.level = self.level_at(now);
        self.last = self.last.max(now);
    }

    /// Time (rounded up to the next nanosecond) until the level reaches `target`.
    fn time_to_reach(&self, target: i128) -> Duration {
        Duration::from_nanos(self.refill_ns(target.saturating_sub(self.level)))
    }

    /// Nanoseconds of refill that add `units` (0 if `units` ≤ 0), rounded up and
    /// saturating at `u64::MAX`.
    fn refill_ns(&self, units: i128) -> u64 {
        if units <= 0 {
            return 0;
        }
        let tokens = i128::from(self.rate.tokens); // ≥ 1 by construction
        let ns = units / tokens + i128::from(units % tokens != 0);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}
