//! The kernel tier: which peer policies the kernel can enforce exactly, and the kernel entry
//! (`sockmesh_common::fast::Verdict`) that hands one peer over. Pure: the agent's glue
//! (`crate::admission`) decides when, `crate::datapath` writes the map.
//!
//! A peer goes to the kernel tier only when **every** knob its policy sets is one the kernel
//! enforces with the proxy's semantics: the connect timeout, the connection rate (the same
//! bucket, `gcra_take`), a concurrency cap without a queue, adaptive throttling (the same
//! formula over the same window, `adaptive_fraction`) and the breaker's opening (the kernel
//! then hands the peer back to the proxy, which owns the half-open ramp). Bandwidth shaping, a
//! queue, a lifetime and an idle timeout keep it on the proxy. A peer whose endpoint the agent
//! picks (an Istio DestinationRule) may go: `connect4` rewrites each connect to the next
//! endpoint in service (`SM_ENDPOINTS`, round robin; least connections falls back to it),
//! unless the Service has more endpoints than the kernel's array holds (the glue refuses it
//! then, with `endpoint_selection`).

use sockmesh_common::fast::{
    gcra_tat_for_level, tier, Verdict, WindowBucket, ADAPTIVE_BUCKETS, MAX_KERNEL_RATE_TOKENS,
};
use sockmesh_common::peer::tier_reason;

use super::clock::duration_to_nanos;
use super::PeerPolicy;

/// Where a peer stands: [`tier`] and [`tier_reason`], as `sockmesh peers` shows them.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Tier {
    pub tier: u8,
    pub reason: u8,
}

impl Tier {
    pub const fn proxy(reason: u8) -> Tier {
        Tier {
            tier: tier::PROXY as u8,
            reason,
        }
    }

    pub const KERNEL: Tier = Tier {
        tier: tier::KERNEL as u8,
        reason: tier_reason::KERNEL,
    };
}

/// A peer policy in the kernel's terms.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct KernelPolicy {
    pub connect_timeout_ms: u32,
    pub max_conns: u64,
    /// (tokens, per_ns) in lowest terms, and the burst.
    pub rate: Option<(u64, u64, u64)>,
    /// (failures in a row, open for ns).
    pub breaker: Option<(u32, u64)>,
    /// (K in thousandths, window bucket width ns).
    pub adaptive: Option<(u64, u64)>,
    /// Idle timeout, ms (0: off), enforced by the agent's sweep (sock_diag destroy).
    pub idle_timeout_ms: u64,
}

/// `policy` in the kernel's terms, or the `tier_reason` that keeps it on the proxy.
/// `idle_sweep`: whether this kernel lets the agent close idle connections it does not own
/// (sock_diag destroy); without it a peer with an idle timeout stays on the proxy.
pub fn kernel_policy(policy: &PeerPolicy, idle_sweep: bool) -> Result<KernelPolicy, u8> {
    if policy.bandwidth.is_some() {
        return Err(tier_reason::BANDWIDTH);
    }
    if policy.timeouts.max_lifetime.is_some() {
        return Err(tier_reason::LIFETIME);
    }
    let idle_timeout_ms = match policy.timeouts.idle {
        Some(_) if !idle_sweep => return Err(tier_reason::IDLE_TIMEOUT),
        Some(t) => u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1),
        None => 0,
    };
    let adaptive = match policy.adaptive {
        None => None,
        Some(a) => {
            let k = a.effective_k();
            let milli = k * 1000.0;
            if k.is_infinite() {
                // +inf disables throttling (the proxy never rejects).
                None
            } else if milli.fract() != 0.0 || milli > u32::MAX as f64 {
                // K must be exact in thousandths for the kernel's integer formula.
                return Err(tier_reason::ADAPTIVE);
            } else {
                let width = (duration_to_nanos(a.window) / ADAPTIVE_BUCKETS as u64).max(1);
                Some((milli as u64, width))
            }
        }
    };
    let max_conns = match policy.concurrency {
        Some(c) if c.max_queue > 0 => return Err(tier_reason::QUEUE),
        Some(c) => u64::from(c.max_concurrent.max(1)),
        None => 0,
    };
    let rate = match policy.conn_rate {
        None => None,
        Some(l) => {
            let (tokens, per) = lowest_terms(l.rate.tokens(), duration_to_nanos(l.rate.per()));
            let burst = l.burst.max(1);
            // The kernel's products must not saturate: `elapsed * tokens` (bounded by the
            // numerator) and `burst * per` (the bucket's size in scaled time).
            if tokens > MAX_KERNEL_RATE_TOKENS || burst.checked_mul(per).is_none() {
                return Err(tier_reason::RATE_INEXACT);
            }
            Some((tokens, per, burst))
        }
    };
    // Rounded up: a timeout is never shorter on the kernel tier than on the proxy.
    let connect_timeout_ms = policy.timeouts.connect.map_or(0, |t| {
        let ms = t.as_nanos().div_ceil(1_000_000).max(1);
        u32::try_from(ms).unwrap_or(u32::MAX)
    });
    let breaker = policy.breaker.map(|b| {
        (
            b.failure_threshold.max(1),
            duration_to_nanos(b.open_for).max(1),
        )
    });
    Ok(KernelPolicy {
        connect_timeout_ms,
        max_conns,
        rate,
        breaker,
        adaptive,
        idle_timeout_ms,
    })
}

/// The kernel entry for `policy`, written at `epoch_ns` (CLOCK_MONOTONIC, now): the rate
/// bucket continues from `rate_tokens_left`, what the proxy's bucket holds at that moment in
/// whole tokens and a fraction (`units` of `1/per` token, the proxy's token-ns), so a peer
/// never gets a second burst by changing tier. `window` is the proxy's adaptive-throttling
/// (requests, accepts) in its window at that moment: they continue in the kernel's current
/// bucket.
pub fn kernel_entry(
    policy: &KernelPolicy,
    epoch_ns: u64,
    rate_level: Option<RateLevel>,
    window: Option<(u64, u64)>,
) -> Verdict {
    let mut v = Verdict {
        tier: tier::KERNEL,
        idle_timeout_ms: policy.idle_timeout_ms,
        connect_timeout_ms: policy.connect_timeout_ms,
        max_conns: policy.max_conns,
        epoch_ns,
        ..Default::default()
    };
    if let Some((failures, open_ns)) = policy.breaker {
        v.breaker_failures = failures;
        v.breaker_open_ns = open_ns;
    }
    if let Some((k_milli, width)) = policy.adaptive {
        v.adaptive_k_milli = k_milli;
        v.adaptive_bucket_ns = width;
        let (requests, accepts) = window.unwrap_or_default();
        let current = epoch_ns / width;
        v.window[(current % ADAPTIVE_BUCKETS as u64) as usize] = WindowBucket {
            epoch: current,
            requests,
            accepts,
        };
    }
    if let Some((tokens, per, burst)) = policy.rate {
        // The proxy's level is in its own units (token-ns at its unreduced rate); scale it to
        // the reduced one: divide by the factor the rate was reduced by.
        let level = rate_level.map_or(burst.saturating_mul(per), |l| {
            let factor = (l.tokens / tokens).max(1);
            u64::try_from(l.units.max(0) / i128::from(factor)).unwrap_or(u64::MAX)
        });
        v.rate_tokens = tokens;
        v.rate_per_ns = per;
        v.rate_burst = burst;
        v.rate_tat = gcra_tat_for_level(level.min(burst.saturating_mul(per)), per, burst);
    }
    v
}

/// The proxy bucket's level: `units` at its rate of `tokens` per period.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RateLevel {
    pub units: i128,
    pub tokens: u64,
}

fn lowest_terms(a: u64, b: u64) -> (u64, u64) {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    let g = x.max(1);
    (a / g, b / g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::adaptive::{AdaptiveConfig, AdaptiveThrottle};
    use crate::policy::breaker::BreakerConfig;
    use crate::policy::clock::Nanos;
    use crate::policy::concurrency::ConcurrencyConfig;
    use crate::policy::peer_policy::RateLimit;
    use crate::policy::token_bucket::{Rate, TokenBucket};
    use crate::policy::Timeouts;
    use sockmesh_common::fast::{adaptive_fraction, gcra_take};
    use std::time::Duration;

    fn fast_policy() -> PeerPolicy {
        PeerPolicy {
            timeouts: Timeouts {
                idle: None,
                ..Timeouts::default()
            },
            ..PeerPolicy::default()
        }
    }

    #[test]
    fn the_default_policy_needs_the_idle_sweep() {
        assert_eq!(
            kernel_policy(&PeerPolicy::default(), false),
            Err(tier_reason::IDLE_TIMEOUT)
        );
        let k = kernel_policy(&PeerPolicy::default(), true).expect("kernel tier");
        assert_eq!(k.idle_timeout_ms, 3_600_000);
        let mut p = fast_policy();
        let k = kernel_policy(&p, false).expect("kernel tier").adaptive;
        assert_eq!(
            k,
            Some((2000, 10_000_000_000)),
            "K=2 over 2 min, 12 buckets"
        );
        p.adaptive = Some(AdaptiveConfig {
            k: 1.0 / 3.0,
            ..AdaptiveConfig::default()
        });
        assert_eq!(
            kernel_policy(&p, false).map(|k| k.adaptive),
            Ok(Some((1000, 10_000_000_000))),
            "K<1 reads as 1"
        );
        p.adaptive = Some(AdaptiveConfig {
            k: 2.0005,
            ..AdaptiveConfig::default()
        });
        assert_eq!(kernel_policy(&p, false), Err(tier_reason::ADAPTIVE));
    }

    /// The kernel's reject probability (`adaptive_fraction`, what connect4/6 draws against)
    /// is the proxy's (`AdaptiveThrottle::reject_probability`) for the same window.
    #[test]
    fn the_kernel_adaptive_formula_is_the_proxys() {
        for k in [1.0, 1.5, 2.0, 3.25, 10.0] {
            for requests in 0..60u64 {
                for accepts in 0..=requests.min(30) {
                    let mut t = AdaptiveThrottle::new(AdaptiveConfig {
                        k,
                        ..AdaptiveConfig::default()
                    });
                    for i in 0..requests {
                        t.on_result(Nanos(1), i < accepts);
                    }
                    let p = t.reject_probability(Nanos(1));
                    let (num, den) = adaptive_fraction(requests, accepts, (k * 1000.0) as u64);
                    let q = num as f64 / den as f64;
                    assert!(
                        (p - q).abs() < 1e-12,
                        "K={k} {requests}/{accepts}: {p} vs {num}/{den}"
                    );
                }
            }
        }
    }

    #[test]
    fn knobs_the_kernel_cannot_enforce_keep_the_proxy() {
        let mut p = fast_policy();
        p.concurrency = Some(ConcurrencyConfig {
            max_concurrent: 3,
            ..ConcurrencyConfig::default()
        });
        assert_eq!(kernel_policy(&p, false), Err(tier_reason::QUEUE));
        p.concurrency = Some(ConcurrencyConfig {
            max_concurrent: 3,
            max_queue: 0,
            ..ConcurrencyConfig::default()
        });
        assert_eq!(kernel_policy(&p, false).map(|k| k.max_conns), Ok(3));
        let rate = Rate::new(97, Duration::from_secs(7)).expect("rate");
        p.conn_rate = Some(RateLimit { rate, burst: 1 });
        assert_eq!(kernel_policy(&p, false), Err(tier_reason::RATE_INEXACT));
        p.conn_rate = None;
        p.timeouts.max_lifetime = Some(Duration::from_secs(1));
        assert_eq!(kernel_policy(&p, false), Err(tier_reason::LIFETIME));
        p.timeouts.max_lifetime = None;
        p.endpoint_selection = true;
        assert!(
            kernel_policy(&p, false).is_ok(),
            "connect4 rewrites to the picked endpoint"
        );
    }

    #[test]
    fn the_kernel_policy_has_the_proxy_values() {
        let mut p = fast_policy();
        p.timeouts.connect = Some(Duration::from_micros(1500));
        p.breaker = Some(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(2),
            half_open_start_pct: 10,
        });
        let rate = Rate::new(100, Duration::from_secs(1)).expect("rate");
        p.conn_rate = Some(RateLimit { rate, burst: 5 });
        let k = kernel_policy(&p, false).expect("kernel tier");
        assert_eq!(k.connect_timeout_ms, 2);
        assert_eq!(k.breaker, Some((3, 2_000_000_000)));
        assert_eq!(k.rate, Some((1, 10_000_000, 5)));
    }

    /// The kernel's bucket (`gcra_take`, the very function connect4/6 runs) against the
    /// proxy's (`TokenBucket`), driven through the same attempts at the same times, handed
    /// over mid-way at every step: they must admit exactly the same ones.
    #[test]
    fn the_kernel_bucket_admits_what_the_proxy_bucket_admits() {
        let rates = [
            (100, 1_000_000_000u64),
            (3, 1_000_000_000),
            (7, 60_000_000_000),
            (2, 1_000),
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (tokens, per) in rates {
            for burst in [1u64, 2, 5, 100] {
                let rate = Rate::new(tokens, Duration::from_nanos(per)).expect("rate");
                let kp = kernel_policy(
                    &PeerPolicy {
                        conn_rate: Some(RateLimit { rate, burst }),
                        ..fast_policy()
                    },
                    false,
                )
                .expect("kernel tier");
                let (kt, kper, kburst) = kp.rate.expect("rate");
                for handover_at in [0usize, 1, 3, 17, 60] {
                    let mut proxy = TokenBucket::new(rate, burst, Nanos(0));
                    let mut twin = TokenBucket::new(rate, burst, Nanos(0));
                    let mut now = 0u64;
                    let mut entry: Option<Verdict> = None;
                    for i in 0..200 {
                        now += next() % (per / tokens * 3 / burst.max(1) + 1);
                        if i == handover_at {
                            let level = RateLevel {
                                units: twin.level_units(Nanos(now)),
                                tokens,
                            };
                            entry = Some(kernel_entry(&kp, now, Some(level), None));
                        }
                        let expect = proxy.try_take(Nanos(now), 1).is_ok();
                        let got = match entry.as_mut() {
                            None => twin.try_take(Nanos(now), 1).is_ok(),
                            Some(v) => {
                                match gcra_take(v.rate_tat, now - v.epoch_ns, kt, kper, kburst) {
                                    Some(t) => {
                                        v.rate_tat = t;
                                        true
                                    }
                                    None => false,
                                }
                            }
                        };
                        assert_eq!(got, expect, "{tokens}/{per}ns burst {burst}, handover {handover_at}, attempt {i} at {now}");
                    }
                }
            }
        }
    }
}
