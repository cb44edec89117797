//! Endpoint picking on real connections: for a connection to a Service whose DestinationRule
//! asks for outlier detection (or a load balancer), the proxy connects to an endpoint the
//! agent chose ([`crate::policy::outlier::Pool`]) instead of the ClusterIP, and reports the
//! connect's outcome back so a failing endpoint is ejected. The algorithm is in `policy`;
//! this is the lookup, the caching and the clock.
//!
//! Which pool a connection uses is resolved once per (pod, destination) and cached until the
//! identity index or the rules change (their generations); the pool's endpoints are re-read
//! from the index then too, and keep their state (an ejected endpoint stays ejected through
//! an EndpointSlice update).
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use sockmesh_common::fast::MAX_KERNEL_ENDPOINTS;
use tracing::info;

use super::ProxyClock;
use crate::policy::{clock::Nanos, outlier::Outcome, outlier::Pool, Clock, PeerKey};
use crate::rules::PolicyHandle;
use crate::sys::lock::lock;

/// (Service namespace, name, port, rule `ns/name`).
type PoolKey = Arc<(String, String, u16, String)>;

/// Routes cached beyond this many are dropped wholesale (bounds memory; a miss only costs a
/// lookup).
const ROUTES_MAX: usize = 65_536;

pub struct Endpoints {
    policy: Arc<PolicyHandle>,
    clock: ProxyClock,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    generation: (u64, u64),
    routes: HashMap<(Arc<str>, SocketAddr), Option<PoolKey>>,
    pools: HashMap<PoolKey, Pool>,
    /// Kernel-tier (pod netns, VIP) whose endpoints connect4/6 picks: the peer, and the set
    /// last written to `SM_ENDPOINTS`.
    kernel: HashMap<(u64, SocketAddr), (PeerKey, Vec<SocketAddr>)>,
}

/// Direct connect results of one endpoint since the last look (`SM_EP_RESULTS` differences).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct KernelResult {
    pub netns_cookie: u64,
    pub vip: SocketAddr,
    pub endpoint: SocketAddr,
    pub successes: u64,
    pub failures: u64,
    /// Failures since the last success (they end the run).
    pub consecutive: u64,
}

/// An endpoint chosen for one connection; counted as active until dropped.
pub struct Picked {
    pub addr: SocketAddr,
    pool: PoolKey,
    owner: Arc<Endpoints>,
}

impl Picked {
    /// The upstream connect's outcome: a failure counts toward the endpoint's ejection.
    pub fn connect_result(&self, ok: bool) {
        let now = self.owner.clock.now();
        let mut st = lock(&self.owner.state);
        if let Some(pool) = st.pools.get_mut(&self.pool) {
            report(
                &self.pool,
                self.addr,
                pool.connect_result(self.addr, ok, now),
                now,
            );
        }
    }
}

/// Says what a connect result did to its endpoint.
fn report(pool: &PoolKey, addr: SocketAddr, outcome: Outcome, now: Nanos) {
    let (ns, name, port, rule) = &**pool;
    match outcome {
        Outcome::Ejected(until) => {
            let for_ms = until.0.saturating_sub(now.0) / 1_000_000;
            info!(service = %format!("{name}.{ns}:{port}"), endpoint = %addr, rule = %rule, for_ms, "endpoint ejected");
            crate::events::emit(serde_json::json!({
                "event": "endpoint_ejected", "service": format!("{name}.{ns}"), "port": port,
                "endpoint": addr.to_string(), "rule": rule, "for_ms": for_ms,
            }));
        }
        Outcome::CapReached => {
            tracing::debug!(endpoint = %addr, "failing endpoint kept: ejection cap reached")
        }
        Outcome::Counted => {}
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        if let Some(p) = lock(&self.owner.state).pools.get_mut(&self.pool) {
            p.release(self.addr);
        }
    }
}

impl Endpoints {
    pub fn new(policy: Arc<PolicyHandle>, clock: ProxyClock) -> Arc<Endpoints> {
        Arc::new(Endpoints {
            policy,
            clock,
            state: Mutex::new(State::default()),
        })
    }

    /// The endpoint for `key`'s connection, or `None`: connect to the destination as given
    /// (no rule picks for it, or its Service has no ready endpoint).
    pub fn pick(self: &Arc<Self>, key: &PeerKey) -> Option<Picked> {
        let drs = self.policy.destination_rules();
        if drs.is_empty() {
            return None;
        }
        let now = self.clock.now();
        let mut st = lock(&self.state);
        let pool_key = self.route(key, &mut st)?;
        let addr = st.pools.get_mut(&pool_key)?.pick(now)?;
        Some(Picked {
            addr,
            pool: pool_key,
            owner: self.clone(),
        })
    }

    /// The pool `key`'s connections use (cached per pod and destination).
    fn route(&self, key: &PeerKey, st: &mut State) -> Option<PoolKey> {
        let generation = self.policy.inputs_generation();
        if st.generation != generation {
            st.generation = generation;
            st.routes.clear();
        }
        let route = (key.pod.clone(), key.peer);
        if let Some(k) = st.routes.get(&route) {
            return k.clone();
        }
        let resolved = self.resolve(key, st);
        if st.routes.len() >= ROUTES_MAX {
            st.routes.clear();
        }
        st.routes.insert(route, resolved.clone());
        resolved
    }

    /// A peer going to the kernel tier: the endpoints connect4/6 is to pick from for it,
    /// `Ok(None)` if no rule has the agent pick (or its Service has no ready endpoint: the
    /// VIP as given, as on the proxy), `Err(())` if they are more than the kernel's array
    /// holds (the peer stays on the proxy). Remembered for [`Endpoints::kernel_pass`].
    pub fn kernel_set(&self, key: &PeerKey) -> Result<Option<Vec<SocketAddr>>, ()> {
        if self.policy.destination_rules().is_empty() {
            return Ok(None);
        }
        let now = self.clock.now();
        let mut st = lock(&self.state);
        let Some(pool_key) = self.route(key, &mut st) else {
            return Ok(None);
        };
        let set = st
            .pools
            .get_mut(&pool_key)
            .map(|p| p.usable(now))
            .unwrap_or_default();
        if set.len() > MAX_KERNEL_ENDPOINTS {
            return Err(());
        }
        st.kernel
            .insert((key.netns_cookie, key.peer), (key.clone(), set.clone()));
        Ok((!set.is_empty()).then_some(set))
    }

    /// Every second: the kernel tier's connect results go to the pools the proxy uses (an
    /// endpoint failing there is ejected as it would be here), then each kernel-tier Service
    /// gets its endpoints in service now (an ejection, a return, a slice change). Returns the
    /// sets that changed (empty: connect to the VIP as given; `None`: more than the kernel
    /// holds, take the peer off the kernel tier).
    pub fn kernel_pass(
        &self,
        results: &[KernelResult],
    ) -> Vec<(u64, SocketAddr, Option<Vec<SocketAddr>>)> {
        let now = self.clock.now();
        let mut st = lock(&self.state);
        if st.kernel.is_empty() {
            return Vec::new();
        }
        for r in results {
            let Some((key, _)) = st.kernel.get(&(r.netns_cookie, r.vip)) else {
                continue;
            };
            let key = key.clone();
            let Some(pool_key) = self.route(&key, &mut st) else {
                continue;
            };
            let Some(pool) = st.pools.get_mut(&pool_key) else {
                continue;
            };
            let outcome =
                pool.connect_results(r.endpoint, r.successes, r.failures, r.consecutive, now);
            report(&pool_key, r.endpoint, outcome, now);
        }
        let routes: Vec<((u64, SocketAddr), PeerKey)> = st
            .kernel
            .iter()
            .map(|(k, (p, _))| (*k, p.clone()))
            .collect();
        let mut changed = Vec::new();
        for (at, key) in routes {
            let set = match self.route(&key, &mut st) {
                Some(pk) => st
                    .pools
                    .get_mut(&pk)
                    .map(|p| p.usable(now))
                    .unwrap_or_default(),
                None => Vec::new(),
            };
            if set.len() > MAX_KERNEL_ENDPOINTS {
                // Grown past the kernel's array: the peer goes back to the proxy.
                st.kernel.remove(&at);
                changed.push((at.0, at.1, None));
            } else if let Some((_, written)) = st.kernel.get_mut(&at) {
                if *written != set {
                    written.clone_from(&set);
                    changed.push((at.0, at.1, Some(set)));
                }
            }
        }
        changed
    }

    /// The kernel tier let go of these peers (a pod gone, a demotion): stop following them.
    pub fn kernel_forget(&self, keep: impl Fn(u64, SocketAddr) -> bool) {
        lock(&self.state).kernel.retain(|(n, a), _| keep(*n, *a));
    }

    /// Which pool `key` uses, creating or refreshing it (endpoints and settings as they are
    /// now).
    fn resolve(&self, key: &PeerKey, st: &mut State) -> Option<PoolKey> {
        let ids = self.policy.identities().read();
        let applied = self
            .policy
            .destination_rules()
            .lookup(key, &ids)
            .filter(|a| a.picks_endpoints())?;
        let (ns, name, port) = applied.service.clone();
        let endpoints = ids.service_endpoints(&ns, &name, port);
        let pool_key: PoolKey = Arc::new((ns, name, port, applied.rule.label()));
        let (cfg, lb) = applied.picking();
        let now = self.clock.now();
        let pool = st
            .pools
            .entry(pool_key.clone())
            .or_insert_with(|| Pool::new(cfg, lb, now));
        pool.configure(cfg, lb);
        pool.set_endpoints(endpoints);
        // Pools of rules or Services gone are dropped when nothing resolves to them any more:
        // bounded by the rules in the cluster, so a sweep at each refresh is enough.
        if st.pools.len() > 1024 {
            st.pools.retain(|_, p| p.len() > 0);
        }
        Some(pool_key)
    }
}
