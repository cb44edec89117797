//! Endpoint picking on the kernel tier: `SM_ENDPOINTS`, the endpoints connect4/6 sends a
//! kernel-tier connect to a Service VIP to (the agent's choice under an Istio DestinationRule),
//! and `SM_EP_RESULTS`, what became of those direct connects per endpoint, read as
//! differences since the last look.
use std::{collections::HashMap as StdHashMap, net::SocketAddr, sync::Mutex};

use aya::maps::{HashMap, MapData};
use sockmesh_common::{
    fast::{EndpointKey, EndpointResults, EndpointSet, VerdictKey, MAX_KERNEL_ENDPOINTS},
    SockAddr,
};
use tracing::warn;

use crate::sys::lock::lock;

/// One endpoint's direct connects since the last look: (pod netns, VIP, endpoint,
/// successes, failures, failures since the last success).
pub type EndpointDelta = (u64, SocketAddr, SocketAddr, u64, u64, u64);

/// `SM_EP_RESULTS`, and what it held at the last look.
type Results = (
    HashMap<MapData, EndpointKey, EndpointResults>,
    StdHashMap<EndpointKey, EndpointResults>,
);

pub struct KernelEndpoints {
    sets: Mutex<HashMap<MapData, VerdictKey, EndpointSet>>,
    results: Mutex<Results>,
}

impl KernelEndpoints {
    pub fn new(
        sets: HashMap<MapData, VerdictKey, EndpointSet>,
        results: HashMap<MapData, EndpointKey, EndpointResults>,
    ) -> KernelEndpoints {
        KernelEndpoints {
            sets: Mutex::new(sets),
            results: Mutex::new((results, StdHashMap::new())),
        }
    }

    /// connect4/6 sends the pod's direct connects to `vip` to `endpoints` (round robin);
    /// none: to `vip` as given. False if the kernel would not take it.
    pub fn write(&self, netns_cookie: u64, vip: SocketAddr, endpoints: &[SocketAddr]) -> bool {
        let key = VerdictKey {
            netns_cookie,
            peer: SockAddr::from_std(vip),
            _pad: 0,
        };
        let mut m = lock(&self.sets);
        if endpoints.is_empty() || endpoints.len() > MAX_KERNEL_ENDPOINTS {
            let _ = m.remove(&key);
            return endpoints.is_empty();
        }
        let mut set = EndpointSet {
            count: endpoints.len() as u32,
            ..Default::default()
        };
        for (slot, a) in set.addrs.iter_mut().zip(endpoints) {
            *slot = SockAddr::from_std(*a);
        }
        match m.insert(key, set, 0) {
            Ok(()) => true,
            Err(e) => {
                warn!(netns_cookie, %vip, error = %e, "could not write the Service's endpoints for the kernel tier");
                false
            }
        }
    }

    /// Direct connect results since the last call, per endpoint.
    pub fn take_results(&self) -> Vec<EndpointDelta> {
        let mut guard = lock(&self.results);
        let (map, last) = &mut *guard;
        let now: Vec<(EndpointKey, EndpointResults)> = map.iter().filter_map(|r| r.ok()).collect();
        let mut out = Vec::new();
        for (k, v) in &now {
            let seen = last.get(k).copied().unwrap_or_default();
            // Lower than last seen: the entry was evicted and counted afresh.
            let base = if v.successes < seen.successes || v.failures < seen.failures {
                EndpointResults::default()
            } else {
                seen
            };
            let (ds, df) = (v.successes - base.successes, v.failures - base.failures);
            if ds == 0 && df == 0 {
                continue;
            }
            if let (Some(vip), Some(ep)) = (k.vip.to_std(), k.endpoint.to_std()) {
                out.push((k.netns_cookie, vip, ep, ds, df, v.consecutive));
            }
        }
        *last = now.into_iter().collect();
        out
    }
}
