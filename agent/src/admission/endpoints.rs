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

use tracing::info;

use super::ProxyClock;
use crate::policy::{outlier::Outcome, outlier::Pool, Clock, PeerKey};
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
        let Some(pool) = st.pools.get_mut(&self.pool) else {
            return;
        };
        let (ns, name, port, rule) = &*self.pool;
        match pool.connect_result(self.addr, ok, now) {
            Outcome::Ejected(until) => {
                let for_ms = until.0.saturating_sub(now.0) / 1_000_000;
                info!(service = %format!("{name}.{ns}:{port}"), endpoint = %self.addr, rule = %rule, for_ms, "endpoint ejected");
                crate::events::emit(serde_json::json!({
                    "event": "endpoint_ejected", "service": format!("{name}.{ns}"), "port": port,
                    "endpoint": self.addr.to_string(), "rule": rule, "for_ms": for_ms,
                }));
            }
            Outcome::CapReached => {
                tracing::debug!(endpoint = %self.addr, "failing endpoint kept: ejection cap reached")
            }
            Outcome::Counted => {}
        }
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
        let generation = self.policy.inputs_generation();
        let now = self.clock.now();
        let mut st = lock(&self.state);
        if st.generation != generation {
            st.generation = generation;
            st.routes.clear();
        }
        let route = (key.pod.clone(), key.peer);
        let pool_key = match st.routes.get(&route) {
            Some(k) => k.clone(),
            None => {
                let resolved = self.resolve(key, &mut st);
                if st.routes.len() >= ROUTES_MAX {
                    st.routes.clear();
                }
                st.routes.insert(route, resolved.clone());
                resolved
            }
        }?;
        let addr = st.pools.get_mut(&pool_key)?.pick(now)?;
        Some(Picked {
            addr,
            pool: pool_key,
            owner: self.clone(),
        })
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
