//! Endpoint picking and outlier ejection for one Service port (an Istio DestinationRule's
//! `loadBalancer` and `outlierDetection`, at L4): the agent chooses the endpoint itself
//! instead of leaving it to kube-proxy, skips the ejected ones, and brings them back.
//!
//! Semantics follow Envoy's (what Istio configures), restricted to what L4 sees: a failed
//! upstream connect (refused, timed out, unreachable) is a *local-origin* failure.
//!
//! * **Counting.** Each endpoint counts its consecutive connect failures; a success resets
//!   the count. At [`OutlierConfig::threshold`] the endpoint is ejected.
//! * **Ejection time.** `base_ejection_time × times ejected`, the multiplier growing by one
//!   per ejection (Envoy's; the issue calls it doubling on repeat: the second ejection lasts
//!   twice the first). Envoy caps it at `max_ejection_time` (300 s default): so do we.
//! * **Return.** An ejected endpoint is back once its time is up (checked lazily at each
//!   pick: no timers). Envoy returns it at the next `interval` sweep after that; the lazy
//!   check makes it at most one interval sooner, which only matters to a test with a clock.
//! * **Forgiving.** Every `interval` an endpoint spends in service takes one off its
//!   multiplier (Envoy's `num_ejections` decrement), so an endpoint that failed once a day
//!   ago is not ejected for five minutes today.
//! * **Cap.** An endpoint is ejected only while `ejected × 100 / total < max_ejection_percent`
//!   (strict, Envoy's check): with Istio's default 10 % and three endpoints, 0 % < 10 % so
//!   the first bad endpoint *is* ejected, and the second is not (33 % ≥ 10 %). So at least
//!   one endpoint can always be ejected unless the percentage is 0 (ejection off).
//! * **minHealthPercent.** While fewer than that share of endpoints is in service, picking
//!   ignores ejections (Istio: "outlier detection is disabled").
//! * **Nothing left.** If every endpoint is ejected (a 100 % cap), picking uses all of them
//!   rather than failing every connection: an ejection protects the healthy ones, it must
//!   not take the whole Service down.
//!
//! Picking is round robin or least connections over the endpoints in service.
use std::{collections::HashMap, net::SocketAddr, time::Duration};

use super::clock::Nanos;

/// Envoy's `max_ejection_time` default: no ejection lasts longer.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// How to choose among endpoints in service.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum LbMode {
    #[default]
    RoundRobin,
    /// Fewest connections open through this agent (Istio `LEAST_REQUEST`/`LEAST_CONN` at L4);
    /// ties go round robin.
    LeastConnections,
}

/// `outlierDetection`, as L4 can apply it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive connect failures that eject an endpoint; 0: never.
    pub threshold: u32,
    pub interval: Duration,
    pub base_ejection: Duration,
    /// 0-100.
    pub max_ejection_percent: u32,
    /// 0-100.
    pub min_health_percent: u32,
}

impl Default for OutlierConfig {
    /// Istio's defaults: 5 consecutive errors, 10 s sweep, 30 s base, 10 %, 0 %.
    fn default() -> Self {
        OutlierConfig {
            threshold: 5,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

/// One endpoint's state.
#[derive(Clone, Debug, Default)]
struct Endpoint {
    failures: u32,
    /// Times ejected, less one per interval in service (the ejection multiplier).
    ejections: u32,
    ejected_until: Option<Nanos>,
    /// Connections open to it through the agent.
    active: u32,
}

/// What became of a connect result.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Counted,
    /// The endpoint was ejected until then.
    Ejected(Nanos),
    /// It reached the threshold, but the cap (or minHealthPercent) kept it in.
    CapReached,
}

/// The endpoints of one Service port under one rule.
#[derive(Clone, Debug)]
pub struct Pool {
    cfg: OutlierConfig,
    lb: LbMode,
    /// In the order the caller gave (round robin walks it).
    order: Vec<SocketAddr>,
    state: HashMap<SocketAddr, Endpoint>,
    next: usize,
    last_sweep: Nanos,
}

impl Pool {
    pub fn new(cfg: OutlierConfig, lb: LbMode, now: Nanos) -> Pool {
        Pool {
            cfg,
            lb,
            order: Vec::new(),
            state: HashMap::new(),
            next: 0,
            last_sweep: now,
        }
    }

    /// A changed rule: the endpoints keep their state.
    pub fn configure(&mut self, cfg: OutlierConfig, lb: LbMode) {
        self.cfg = cfg;
        self.lb = lb;
    }

    /// The ready endpoints now (from the EndpointSlices). Those that stay keep their state
    /// (an ejected endpoint stays ejected through a slice update); those gone are forgotten.
    pub fn set_endpoints(&mut self, mut addrs: Vec<SocketAddr>) {
        addrs.sort();
        addrs.dedup();
        self.state.retain(|a, _| addrs.contains(a));
        for a in &addrs {
            self.state.entry(*a).or_default();
        }
        self.order = addrs;
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    fn in_service(&self, a: &SocketAddr, now: Nanos) -> bool {
        self.state
            .get(a)
            .is_none_or(|e| e.ejected_until.is_none_or(|t| now >= t))
    }

    fn ejected_count(&self, now: Nanos) -> usize {
        self.order
            .iter()
            .filter(|a| !self.in_service(a, now))
            .count()
    }

    /// Lazy interval sweeps: expired ejections end, and every whole interval an endpoint
    /// was in service forgives one ejection.
    fn sweep(&mut self, now: Nanos) {
        let iv = self.cfg.interval.as_nanos().max(1) as u64;
        let elapsed = now.0.saturating_sub(self.last_sweep.0);
        let sweeps = elapsed / iv;
        if sweeps == 0 {
            return;
        }
        self.last_sweep = Nanos(self.last_sweep.0 + sweeps * iv);
        let forgive = u32::try_from(sweeps).unwrap_or(u32::MAX);
        for e in self.state.values_mut() {
            match e.ejected_until {
                Some(t) if now < t => {}
                Some(t) => {
                    e.ejected_until = None;
                    // Only the sweeps after its return count as time in service.
                    let back = u32::try_from(now.0.saturating_sub(t.0) / iv).unwrap_or(u32::MAX);
                    e.ejections = e.ejections.saturating_sub(back);
                }
                None => e.ejections = e.ejections.saturating_sub(forgive),
            }
        }
    }

    /// The endpoint for the next connection (None: the Service has no ready endpoint).
    /// Counts it as active until [`Pool::release`].
    pub fn pick(&mut self, now: Nanos) -> Option<SocketAddr> {
        self.sweep(now);
        let n = self.order.len();
        if n == 0 {
            return None;
        }
        let ignore = self.ignoring_ejections(now);
        let usable = |p: &Pool, a: &SocketAddr| ignore || p.in_service(a, now);
        let start = self.next % n;
        let candidates = (0..n).map(|i| (start + i) % n);
        let chosen = match self.lb {
            RoundRobin => candidates.clone().find(|&i| usable(self, &self.order[i])),
            LeastConnections => candidates
                .filter(|&i| usable(self, &self.order[i]))
                .min_by_key(|&i| self.state.get(&self.order[i]).map_or(0, |e| e.active)),
        }?;
        self.next = chosen + 1;
        let addr = self.order[chosen];
        if let Some(e) = self.state.get_mut(&addr) {
            e.active += 1;
        }
        Some(addr)
    }

    /// minHealthPercent: below it, ejections are ignored; nothing in service: everything.
    fn ignoring_ejections(&self, now: Nanos) -> bool {
        let n = self.order.len();
        let healthy = n - self.ejected_count(now);
        healthy == 0 || healthy * 100 < self.cfg.min_health_percent as usize * n
    }

    /// The endpoints [`Pool::pick`] chooses among now, in its order: what the kernel tier
    /// picks from round robin (it has no connection counts, so least connections is the
    /// proxy's only).
    pub fn usable(&mut self, now: Nanos) -> Vec<SocketAddr> {
        self.sweep(now);
        let ignore = self.ignoring_ejections(now);
        self.order
            .iter()
            .filter(|a| ignore || self.in_service(a, now))
            .copied()
            .collect()
    }

    /// A connection picked for `addr` ended (or never connected).
    pub fn release(&mut self, addr: SocketAddr) {
        if let Some(e) = self.state.get_mut(&addr) {
            e.active = e.active.saturating_sub(1);
        }
    }

    /// The outcome of the connect to `addr`.
    pub fn connect_result(&mut self, addr: SocketAddr, ok: bool, now: Nanos) -> Outcome {
        self.sweep(now);
        let n = self.order.len();
        let ejected = self.ejected_count(now);
        let (cfg, in_service) = (self.cfg, self.in_service(&addr, now));
        let Some(e) = self.state.get_mut(&addr) else {
            return Outcome::Counted; // gone from the slices meanwhile
        };
        if ok {
            e.failures = 0;
            return Outcome::Counted;
        }
        e.failures = e.failures.saturating_add(1);
        if cfg.threshold == 0 || e.failures < cfg.threshold || !in_service {
            return Outcome::Counted;
        }
        let healthy_after = n - ejected - 1;
        let capped = ejected * 100 >= cfg.max_ejection_percent as usize * n
            || healthy_after * 100 < cfg.min_health_percent as usize * n;
        if capped {
            return Outcome::CapReached;
        }
        e.failures = 0;
        e.ejections = e.ejections.saturating_add(1);
        let time = cfg
            .base_ejection
            .saturating_mul(e.ejections)
            .min(MAX_EJECTION.max(cfg.base_ejection));
        let until = now.saturating_add(time);
        e.ejected_until = Some(until);
        Outcome::Ejected(until)
    }

    /// A batch of connect results to `addr` whose order is known only at its end (the kernel
    /// tier's counts for one second): `successes` and `failures` in all, the last
    /// `consecutive` of them failures. Fed as one success (if any), then the failures that
    /// ended the run: what decides an ejection, since a success resets the count. Returns
    /// the ejection if one happened, else whether the cap kept the endpoint in.
    pub fn connect_results(
        &mut self,
        addr: SocketAddr,
        successes: u64,
        failures: u64,
        consecutive: u64,
        now: Nanos,
    ) -> Outcome {
        let run = if successes > 0 {
            self.connect_result(addr, true, now);
            consecutive.min(failures)
        } else {
            failures
        };
        let mut last = Outcome::Counted;
        for _ in 0..run.min(u64::from(u32::MAX)) {
            match self.connect_result(addr, false, now) {
                Outcome::Counted => {}
                o @ Outcome::Ejected(_) => return o,
                o => last = o,
            }
        }
        last
    }

    /// The endpoints out of service now.
    #[cfg(test)]
    pub fn ejected(&self, now: Nanos) -> Vec<SocketAddr> {
        self.order
            .iter()
            .filter(|a| !self.in_service(a, now))
            .copied()
            .collect()
    }
}

use LbMode::{LeastConnections, RoundRobin};
