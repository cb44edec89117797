//! [`PeerPolicy`]: every knob the engine applies to one (pod, direction, peer), as
//! configuration resolved it.

use super::adaptive::AdaptiveConfig;
use super::breaker::BreakerConfig;
use super::concurrency::ConcurrencyConfig;
use super::timeouts::Timeouts;
use super::token_bucket::Rate;

/// Every knob for one (pod, direction, peer). `None` means the knob is off.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerPolicy {
    pub timeouts: Timeouts,
    /// New connections per unit of time (token bucket, rejects when empty).
    pub conn_rate: Option<RateLimit>,
    /// Bytes per unit of time, both directions together (shapes, never drops).
    pub bandwidth: Option<RateLimit>,
    pub concurrency: Option<ConcurrencyConfig>,
    pub breaker: Option<BreakerConfig>,
    pub adaptive: Option<AdaptiveConfig>,
    /// The agent picks the peer's endpoint itself (an Istio DestinationRule with outlier
    /// detection or a load balancer): the kernel, which would connect to the address as
    /// given, cannot take the peer.
    pub endpoint_selection: bool,
}

impl Default for PeerPolicy {
    /// Timeouts, breaker (F=5, D=15 s) and adaptive throttling (K=2, 2 min) are on:
    /// they act only on a peer that is already failing. Rate, bandwidth and
    /// concurrency limits are off: no value is right for every peer.
    fn default() -> Self {
        PeerPolicy {
            timeouts: Timeouts::default(),
            conn_rate: None,
            bandwidth: None,
            concurrency: None,
            breaker: Some(BreakerConfig::default()),
            adaptive: Some(AdaptiveConfig::default()),
            endpoint_selection: false,
        }
    }
}

/// A token-bucket limit: refill `rate`, hold at most `burst` tokens.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub rate: Rate,
    /// Bucket capacity; 0 is treated as 1 (see `TokenBucket::new`).
    pub burst: u64,
}

impl RateLimit {
    /// Burst defaults to one period's worth (`100/s` → 100, `10MiB/s` → 10 MiB).
    #[cfg(test)]
    pub fn new(rate: Rate) -> RateLimit {
        RateLimit {
            rate,
            burst: rate.tokens(),
        }
    }
}
