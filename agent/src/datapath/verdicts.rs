//! Fast-reject verdicts: `SM_VERDICTS`, the one place the agent tells `connect4/6` to refuse
//! a pod's connections to a peer at once, without a proxy round trip. The agent writes one
//! when a peer's breaker opens or its connection-rate bucket runs dry; the verdict carries
//! its own expiry (CLOCK_MONOTONIC ns), so the kernel lifts it by itself even if the agent
//! is gone, and the agent lifts it early on a reload or when the pod leaves.
use std::{net::SocketAddr, sync::Mutex};

use aya::maps::{HashMap, MapData};
use sockmesh_common::{SockAddr, Verdict, VerdictKey};
use tracing::warn;

use crate::sys::lock::lock;

pub struct Verdicts {
    map: Mutex<HashMap<MapData, VerdictKey, Verdict>>,
}

impl Verdicts {
    pub fn new(map: HashMap<MapData, VerdictKey, Verdict>) -> Verdicts {
        Verdicts {
            map: Mutex::new(map),
        }
    }

    /// Refuse the pod's connect() to `peer` in the kernel until `until_ns` (CLOCK_MONOTONIC).
    pub fn refuse(&self, netns_cookie: u64, peer: SocketAddr, until_ns: u64) {
        if let Err(e) = lock(&self.map).insert(key(netns_cookie, peer), Verdict { until_ns }, 0) {
            warn!(netns_cookie, %peer, error = %e, "could not write the fast-reject verdict");
        }
    }

    /// Lift a verdict written by `refuse` before it expires (a policy reload).
    pub fn lift(&self, netns_cookie: u64, peer: SocketAddr) {
        // Already gone (expired and removed by the kernel, or evicted) is fine.
        let _ = lock(&self.map).remove(&key(netns_cookie, peer));
    }

    /// A pod left: lift every verdict of its namespace.
    pub fn forget_pod(&self, netns_cookie: u64) {
        let mut m = lock(&self.map);
        let keys: Vec<VerdictKey> = m
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.netns_cookie == netns_cookie)
            .collect();
        for k in keys {
            let _ = m.remove(&k);
        }
    }
}

fn key(netns_cookie: u64, peer: SocketAddr) -> VerdictKey {
    VerdictKey {
        netns_cookie,
        peer: SockAddr::from_std(peer),
        _pad: 0,
    }
}
