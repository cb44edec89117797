//! Per-peer circuit breaker on upstream connect failures.
//!
//! ```text
//!            F consecutive failures                  now >= until
//!   Closed ─────────────────────────▶ Open{until} ─────────────────▶ HalfOpen{share}
//!     ▲                                  ▲                               │  │
//!     │ share reaches 100 %              └──── any failure (until=now+D) ┘  │
//!     └──────────────────────────────────────── success: share doubles ◀────┘
//! ```
//!
//! * **Half-open admission is counter based, not random**, so tests (and operators
//!   reading logs) can tell exactly which attempt goes through: an accumulator gains
//!   `share` points per attempt and admits whenever it reaches 100. It starts at
//!   `100 - share`, so the *first* attempt after the open period is the probe
//!   (waiting for the 10th would leave a quiet peer rejected for 10 attempts),
//!   then exactly 1 in `100/share` thereafter.
//! * **Ramp: the share doubles on each half-open success** (10 → 20 → 40 → 80 →
//!   100 %, then Closed): four good probes close the breaker, quick for a quiet peer,
//!   yet each step risks at most twice the traffic the previous step proved safe.
//!   The accumulator carries over across steps.
//! * Outcomes that arrive while Open are stale (attempts admitted before it opened)
//!   and are ignored; they neither extend nor shorten the open period.
//! * Open → HalfOpen happens lazily, on the first call at or after `until`.

use super::clock::Nanos;
use std::time::Duration;

/// Breaker knobs. Out-of-range values are clamped where used, never rejected here
/// (the flag parser is where a bad value becomes an error).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// F: consecutive connect failures that open the breaker (0 is treated as 1).
    pub failure_threshold: u32,
    /// D: how long the breaker stays open before probing.
    pub open_for: Duration,
    /// Share of attempts admitted on entering half-open, in percent (clamped 1..=100).
    pub half_open_start_pct: u8,
}

impl Default for BreakerConfig {
    /// F = 5, D = 15 s, 10 %: the design brief's values. Five in a row is well past
    /// the odd refused connect during a rolling restart, and 15 s covers a typical
    /// pod restart without hiding a recovered peer for long.
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(15),
            half_open_start_pct: 10,
        }
    }
}

/// How an upstream connect failed. The caller maps errno/timeouts onto these; all
/// kinds count equally toward the breaker, the kind is kept for counters.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ConnectFailure {
    /// ECONNREFUSED.
    Refused,
    /// ECONNRESET during the handshake.
    Reset,
    /// The connect timeout fired.
    Timeout,
    /// EHOSTUNREACH / ENETUNREACH.
    Unreachable,
}

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 4] = [
        ConnectFailure::Refused,
        ConnectFailure::Reset,
        ConnectFailure::Timeout,
        ConnectFailure::Unreachable,
    ];

    /// Position in [`ConnectFailure::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Observable breaker state.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed { consecutive_failures: u32 },
    Open { until: Nanos },
    HalfOpen { share_pct: u8 },
}

/// Answer to [`Breaker::admit`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BreakerDecision {
    Admit,
    /// `retry_after` is the rest of the open period, or `None` when half-open (the
    /// next attempt may well be admitted; there is no time to wait for).
    Reject {
        retry_after: Option<Duration>,
    },
}

/// A state change worth telling the owner about (it writes or clears the kernel
/// fast-reject verdict and counts transitions).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BreakerTransition {
    Opened { until: Nanos },
    Closed,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Nanos },
    HalfOpen { share: u8, acc: u8 },
}

#[derive(Clone, Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: State,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            config,
            state: State::Closed { failures: 0 },
        }
    }

    /// New knobs apply from the next transition; the current state is kept.
    pub fn set_config(&mut self, config: BreakerConfig) {
        self.config = config;
    }

    /// The state as of `now`, without changing anything (a lapsed Open reads as
    /// HalfOpen at the starting share).
    pub fn state(&self, now: Nanos) -> BreakerState {
        match self.state_at(now) {
            State::Closed { failures } => BreakerState::Closed {
                consecutive_failures: failures,
            },
            State::Open { until } => BreakerState::Open { until },
            State::HalfOpen { share, .. } => BreakerState::HalfOpen { share_pct: share },
        }
    }

    /// While open: the instant the open period ends (the kernel fast-reject
    /// verdict's expiry). `None` in any other state.
    pub fn open_until(&self, now: Nanos) -> Option<Nanos> {
        match self.state_at(now) {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    pub fn admit(&mut self, now: Nanos) -> BreakerDecision {
        self.state = self.state_at(now);
        match &mut self.state {
            State::Closed { .. } => BreakerDecision::Admit,
            State::Open { until } => BreakerDecision::Reject {
                retry_after: Some(until.saturating_since(now)),
            },
            State::HalfOpen { share, acc } => {
                // acc < 100 and share <= 100, so this fits in u8 (max 199).
                *acc += *share;
                if *acc >= 100 {
                    *acc -= 100;
                    BreakerDecision::Admit
                } else {
                    BreakerDecision::Reject { retry_after: None }
                }
            }
        }
    }

    pub fn on_success(&mut self, now: Nanos) -> Option<BreakerTransition> {
        self.state = self.state_at(now);
        match &mut self.state {
            State::Closed { failures } => {
                *failures = 0;
                None
            }
            State::Open { .. } => None,
            State::HalfOpen { share, .. } => {
                *share = share.saturating_mul(2).min(100);
                if *share == 100 {
                    self.state = State::Closed { failures: 0 };
                    return Some(BreakerTransition::Closed);
                }
                None
            }
        }
    }

    pub fn on_failure(&mut self, now: Nanos) -> Option<BreakerTransition> {
        self.state = self.state_at(now);
        match &mut self.state {
            State::Closed { failures } => {
                *failures = failures.saturating_add(1);
                if *failures >= self.config.failure_threshold.max(1) {
                    return Some(self.open(now));
                }
                None
            }
            State::Open { .. } => None,
            State::HalfOpen { .. } => Some(self.open(now)),
        }
    }

    /// An attempt adaptive throttling refused locally while the breaker is
    /// closed: it counts toward the consecutive-failure streak (see `peer.rs` for
    /// why). Ignored in any other state: half-open probes are never throttled,
    /// and nothing reaches the throttle while open.
    pub fn on_local_reject(&mut self, now: Nanos) -> Option<BreakerTransition> {
        self.state = self.state_at(now);
        match self.state {
            State::Closed { .. } => self.on_failure(now),
            _ => None,
        }
    }

    /// Opens until `until`, whatever the state: the kernel tier counted the failures that
    /// opened it (`crate::policy::fast`), so this breaker probes half-open after it.
    pub fn force_open(&mut self, until: Nanos) {
        self.state = State::Open { until };
    }

    /// Whether an attempt admitted at `now` is a half-open probe.
    pub fn is_probing(&self, now: Nanos) -> bool {
        matches!(self.state_at(now), State::HalfOpen { .. })
    }

    fn open(&mut self, now: Nanos) -> BreakerTransition {
        let until = now.saturating_add(self.config.open_for);
        self.state = State::Open { until };
        BreakerTransition::Opened { until }
    }

    fn state_at(&self, now: Nanos) -> State {
        match self.state {
            State::Open { until } if now >= until => {
                let share = self.config.half_open_start_pct.clamp(1, 100);
                State::HalfOpen {
                    share,
                    acc: 100 - share,
                }
            }
            s => s,
        }
    }
}
