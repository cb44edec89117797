//! The per-peer knobs as configuration sees them: `Knobs` (flat, every knob), `Overrides`
//! (what one layer sets), and one value parser per knob, shared by the flags and the policy
//! file so both accept exactly the same spellings and give the same errors.
use super::units::{
    parse_bandwidth, parse_duration, parse_rate, parse_size, parse_timeout, ParseError,
};
use crate::policy::adaptive::AdaptiveConfig;
use crate::policy::breaker::BreakerConfig;
use crate::policy::concurrency::ConcurrencyConfig;
use crate::policy::peer_policy::{PeerPolicy, RateLimit};
use crate::policy::timeouts::Timeouts;
use crate::policy::token_bucket::Rate;
use std::time::Duration;

macro_rules! knobs {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty ),* $(,)?) => {
        /// Every per-peer knob, flat: the flag defaults, and what a key resolves to
        /// before it becomes a [`PeerPolicy`] ([`Knobs::to_policy`]). Flat, unlike
        /// `PeerPolicy`, so that e.g. a burst set on one layer survives until a
        /// later layer turns the rate on.
        #[derive(Clone, Debug, PartialEq)]
        pub struct Knobs {
            $( $(#[$doc])* pub $name: $ty, )*
        }

        /// The knobs one layer (`[defaults]` or a rule) sets; `None`: not named,
        /// left as the earlier layers had it.
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct Overrides {
            $( pub $name: Option<$ty>, )*
        }

        impl Overrides {
            /// Sets, on `knobs`, every knob this layer names.
            pub fn apply_to(&self, knobs: &mut Knobs) {
                $( if let Some(v) = &self.$name { knobs.$name = v.clone(); } )*
            }

            /// The names (file keys) of the knobs this layer sets, in [`KNOB_NAMES`]
            /// order.
            #[cfg(test)]
            pub fn names(&self) -> Vec<&'static str> {
                let mut names = Vec::new();
                $( if self.$name.is_some() { names.push(stringify!($name)); } )*
                names
            }

            #[cfg(test)]
            pub fn is_empty(&self) -> bool {
                self.names().is_empty()
            }
        }

        /// Every knob's name, as spelled in the policy file.
        pub const KNOB_NAMES: &[&str] = &[$( stringify!($name) ),*];
    };
}

knobs! {
    /// `None`: off.
    connect_timeout: Option<Duration>,
    /// `None`: off.
    idle_timeout: Option<Duration>,
    /// `None`: off.
    max_lifetime: Option<Duration>,
    /// `None`: off.
    dns_timeout: Option<Duration>,
    /// New connections per period; `None`: unlimited.
    conn_rate: Option<Rate>,
    /// Token-bucket capacity for `conn_rate`; `None`: one period's worth.
    conn_burst: Option<u64>,
    /// Concurrent connections; `None`: unlimited (and `queue` unused).
    max_conns: Option<u32>,
    /// Waiters allowed while `max_conns` are busy; 0: reject at once.
    queue: u32,
    /// Bytes per period, both directions together; `None`: unlimited.
    bandwidth: Option<Rate>,
    /// Token-bucket capacity in bytes for `bandwidth`; `None`: one period's worth.
    bandwidth_burst: Option<u64>,
    /// Consecutive connect failures that open the breaker; `None`: no breaker.
    breaker_failures: Option<u32>,
    /// How long an opened breaker stays open.
    breaker_open: Duration,
    /// Adaptive throttling's K; `None`: no adaptive throttling.
    adaptive_k: Option<f64>,
    /// Adaptive throttling's sliding window.
    adaptive_window: Duration,
}

impl Default for Knobs {
    /// The same values as [`PeerPolicy::default`] (and the flags' defaults).
    fn default() -> Self {
        let concurrency = ConcurrencyConfig::default();
        let breaker = BreakerConfig::default();
        let adaptive = AdaptiveConfig::default();
        let timeouts = Timeouts::default();
        Knobs {
            connect_timeout: timeouts.connect,
            idle_timeout: timeouts.idle,
            max_lifetime: timeouts.max_lifetime,
            dns_timeout: timeouts.dns,
            conn_rate: None,
            conn_burst: None,
            max_conns: None,
            queue: concurrency.max_queue,
            bandwidth: None,
            bandwidth_burst: None,
            breaker_failures: Some(breaker.failure_threshold),
            breaker_open: breaker.open_for,
            adaptive_k: Some(adaptive.k),
            adaptive_window: adaptive.window,
        }
    }
}

impl Knobs {
    /// The engine's form. Settings without a knob (the breaker's 10 % half-open
    /// start, the queue's CoDel 5 ms / 100 ms) take their defaults; a burst
    /// without its rate is ignored.
    pub fn to_policy(&self) -> PeerPolicy {
        let limit = |rate: Option<Rate>, burst: Option<u64>| {
            rate.map(|rate| RateLimit {
                rate,
                burst: burst.unwrap_or(rate.tokens()),
            })
        };
        PeerPolicy {
            timeouts: Timeouts {
                connect: self.connect_timeout,
                idle: self.idle_timeout,
                max_lifetime: self.max_lifetime,
                dns: self.dns_timeout,
            },
            conn_rate: limit(self.conn_rate, self.conn_burst),
            bandwidth: limit(self.bandwidth, self.bandwidth_burst),
            concurrency: self.max_conns.map(|max| ConcurrencyConfig {
                max_concurrent: max,
                max_queue: self.queue,
                ..ConcurrencyConfig::default()
            }),
            breaker: self.breaker_failures.map(|failures| BreakerConfig {
                failure_threshold: failures,
                open_for: self.breaker_open,
                ..BreakerConfig::default()
            }),
            adaptive: self.adaptive_k.map(|k| AdaptiveConfig {
                k,
                window: self.adaptive_window,
            }),
            endpoint_selection: false,
        }
    }
}

// ---------------------------------------------------------------------------
// Knob values: one parser per knob, shared by the flags and the policy file, so
// both accept exactly the same spellings and give the same errors.

const COUNT_EX: &str = "50, 1000";
const COUNT_OFF_EX: &str = "50, off";
const K_EX: &str = "2, 1.5, off";
const BURST_EX: &str = "20, 100";

fn value_error(kind: &'static str, input: &str, reason: &str, ex: &'static str) -> ParseError {
    ParseError {
        kind,
        input: input.to_string(),
        reason: reason.to_string(),
        example: ex,
    }
}

fn is_off(s: &str) -> bool {
    let s = s.trim();
    s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("none")
}

/// A timeout: a duration > 0, or `off`.
pub fn parse_timeout_knob(s: &str) -> Result<Option<Duration>, ParseError> {
    parse_timeout(s)
}

/// A duration that must be > 0 (breaker open time, windows, expiry).
pub fn parse_positive_duration(s: &str) -> Result<Duration, ParseError> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(value_error("duration", s, "must be > 0", "500ms, 15s, 2m"));
    }
    Ok(d)
}

/// A connection rate (`100/s`) or `off`.
pub fn parse_rate_knob(s: &str) -> Result<Option<Rate>, ParseError> {
    if is_off(s) {
        return Ok(None);
    }
    parse_rate(s).map(Some).map_err(|mut e| {
        e.example = "100/s, 6000/m, off";
        e
    })
}

/// A bandwidth (`10MiB/s`) or `off`.
pub fn parse_bandwidth_knob(s: &str) -> Result<Option<Rate>, ParseError> {
    if is_off(s) {
        return Ok(None);
    }
    parse_bandwidth(s).map(Some).map_err(|mut e| {
        e.example = "10MiB/s, 1.5MB/s, off";
        e
    })
}

/// A whole number in `min..=u32::MAX`.
pub fn parse_count(s: &str, min: u32) -> Result<u32, ParseError> {
    let t = s.trim();
    let err = |reason: &str| value_error("count", s, reason, COUNT_EX);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("expected a whole number"));
    }
    let n: u32 = t
        .parse()
        .map_err(|_| err(&format!("too large (at most {})", u32::MAX)))?;
    if n < min {
        return Err(err(&format!("must be at least {min}")));
    }
    Ok(n)
}

/// A whole number ≥ 1, or `off`.
pub fn parse_count_or_off(s: &str) -> Result<Option<u32>, ParseError> {
    if is_off(s) {
        return Ok(None);
    }
    parse_count(s, 1).map(Some).map_err(|mut e| {
        if e.reason == "must be at least 1" {
            e.reason = "must be at least 1; use off to disable".into();
        }
        e.example = COUNT_OFF_EX;
        e
    })
}

/// A connection burst: a whole number of connections ≥ 1.
pub fn parse_conn_burst(s: &str) -> Result<u64, ParseError> {
    let t = s.trim();
    let err = |reason: &str| value_error("burst", s, reason, BURST_EX);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("expected a whole number of connections"));
    }
    match t.parse::<u64>() {
        Ok(0) => Err(err("must be at least 1")),
        Ok(n) => Ok(n),
        Err(_) => Err(err("too large")),
    }
}

/// A bandwidth burst: a size ≥ 1 byte (`1MiB`, or a bare number of bytes).
pub fn parse_bandwidth_burst(s: &str) -> Result<u64, ParseError> {
    match parse_size(s)? {
        0 => Err(value_error(
            "size",
            s,
            "must be at least 1 byte",
            "64KiB, 1MiB",
        )),
        n => Ok(n),
    }
}

/// Adaptive throttling's K: a finite number ≥ 1, or `off`.
pub fn parse_adaptive_k(s: &str) -> Result<Option<f64>, ParseError> {
    if is_off(s) {
        return Ok(None);
    }
    let t = s.trim();
    let err = |reason: &str| value_error("K", s, reason, K_EX);
    // Digits and one optional fraction only: no `inf`, `nan`, exponents or signs.
    let plain = !t.is_empty()
        && t.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && t.bytes().filter(|&b| b == b'.').count() <= 1
        && !t.starts_with('.')
        && !t.ends_with('.');
    if !plain {
        return Err(err("expected a number such as 2 or 1.5"));
    }
    let k: f64 = t.parse().map_err(|_| err("expected a number"))?;
    if !(k.is_finite() && k >= 1.0) {
        return Err(err(
            "must be at least 1 (below 1 a healthy peer would be throttled); use off to disable",
        ));
    }
    Ok(Some(k))
}

/// Parses `raw` as the knob `name` and records it in `set`. `None` if `name` is
/// not a knob.
pub(crate) fn set_knob(
    set: &mut Overrides,
    name: &str,
    raw: &str,
) -> Option<Result<(), ParseError>> {
    fn put<T>(slot: &mut Option<T>, v: Result<T, ParseError>) -> Result<(), ParseError> {
        *slot = Some(v?);
        Ok(())
    }
    Some(match name {
        "connect_timeout" => put(&mut set.connect_timeout, parse_timeout_knob(raw)),
        "idle_timeout" => put(&mut set.idle_timeout, parse_timeout_knob(raw)),
        "max_lifetime" => put(&mut set.max_lifetime, parse_timeout_knob(raw)),
        "dns_timeout" => put(&mut set.dns_timeout, parse_timeout_knob(raw)),
        "conn_rate" => put(&mut set.conn_rate, parse_rate_knob(raw)),
        "conn_burst" => put(&mut set.conn_burst, parse_conn_burst(raw).map(Some)),
        "max_conns" => put(&mut set.max_conns, parse_count_or_off(raw)),
        "queue" => put(&mut set.queue, parse_count(raw, 0)),
        "bandwidth" => put(&mut set.bandwidth, parse_bandwidth_knob(raw)),
        "bandwidth_burst" => put(
            &mut set.bandwidth_burst,
            parse_bandwidth_burst(raw).map(Some),
        ),
        "breaker_failures" => put(&mut set.breaker_failures, parse_count_or_off(raw)),
        "breaker_open" => put(&mut set.breaker_open, parse_positive_duration(raw)),
        "adaptive_k" => put(&mut set.adaptive_k, parse_adaptive_k(raw)),
        "adaptive_window" => put(&mut set.adaptive_window, parse_positive_duration(raw)),
        _ => return None,
    })
}
