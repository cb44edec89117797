//! Deterministic tests for the policy engine, one file per module, through the
//! public API. The helpers are shared with the configuration's tests (`rules::tests`). Times are built from milliseconds/nanoseconds so every expected
//! number in an assertion can be checked by hand.

mod adaptive;
mod breaker;
mod clock;
mod concurrency;
mod interplay;
mod outlier;
mod table;
mod table_lru;
mod table_tenants;
mod timeouts;
mod token_bucket;

use super::clock::Nanos;
use std::time::Duration;

/// `n` milliseconds after the epoch.
pub(crate) fn ms(n: u64) -> Nanos {
    Nanos(n * 1_000_000)
}

/// `n` seconds after the epoch.
pub(crate) fn secs(n: u64) -> Nanos {
    Nanos(n * 1_000_000_000)
}

pub(crate) fn dms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// xorshift64*: a tiny deterministic generator for property-style tests, so a
/// failure reproduces exactly (no external crate, no seed from the environment).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A value whose magnitude is spread over all bit widths, not just huge ones.
    pub(crate) fn any_magnitude(&mut self) -> u64 {
        let bits = self.below(65) as u32;
        if bits == 0 {
            0
        } else {
            self.next() >> (64 - bits)
        }
    }
}
