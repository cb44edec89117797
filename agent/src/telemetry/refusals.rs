//! Per-pod counts of the agent's caps and shares at work ([`pod_refusal`] indexes): the proxy
//! and the pod manager count with one relaxed atomic add (no lock, no syscall), and the
//! flush adds what changed to `SM_POD_REFUSED` about once a second.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use sockmesh_common::peer::pod_refusal;

use crate::sys::lock::lock;

/// One pod's counters since the last flush.
#[derive(Debug, Default)]
pub struct PodRefusals {
    counters: [AtomicU64; pod_refusal::COUNT],
}

impl PodRefusals {
    /// Counts one event of kind `what` (a [`pod_refusal`] index).
    pub fn count(&self, what: usize) {
        self.add(what, 1);
    }

    pub fn add(&self, what: usize, n: u64) {
        if let Some(c) = self.counters.get(what) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// What was counted since the last take, reset to zero.
    fn take(&self) -> [u64; pod_refusal::COUNT] {
        std::array::from_fn(|i| self.counters[i].swap(0, Ordering::Relaxed))
    }

    /// Counted so far and not yet taken (for tests and the status event).
    #[cfg(test)]
    pub fn get(&self, what: usize) -> u64 {
        self.counters[what].load(Ordering::Relaxed)
    }
}

/// Every pod's counters, by netns cookie.
#[derive(Debug, Default)]
pub struct Refusals {
    pods: Mutex<HashMap<u64, Arc<PodRefusals>>>,
}

impl Refusals {
    /// The pod's counters (created on first use; the proxy keeps the `Arc`).
    pub fn pod(&self, netns_cookie: u64) -> Arc<PodRefusals> {
        lock(&self.pods).entry(netns_cookie).or_default().clone()
    }

    /// Counts for a pod by cookie (for counters that arrive keyed by cookie, like the policy
    /// table's evictions).
    pub fn add(&self, netns_cookie: u64, what: usize, n: u64) {
        if n > 0 {
            self.pod(netns_cookie).add(what, n);
        }
    }

    /// What every pod counted since the last drain (pods with nothing new left out).
    pub fn drain(&self) -> Vec<(u64, [u64; pod_refusal::COUNT])> {
        let pods: Vec<(u64, Arc<PodRefusals>)> = lock(&self.pods)
            .iter()
            .map(|(c, p)| (*c, p.clone()))
            .collect();
        pods.into_iter()
            .map(|(c, p)| (c, p.take()))
            .filter(|(_, v)| v.iter().any(|n| *n != 0))
            .collect()
    }

    /// A pod left: drop its counters once flushed (a task still holding the `Arc` counts
    /// into a detached copy, lost; the pod is gone).
    pub fn forget(&self, netns_cookie: u64) {
        lock(&self.pods).remove(&netns_cookie);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_drained_once_per_pod() {
        let r = Refusals::default();
        let a = r.pod(1);
        a.count(pod_refusal::CONN_POD_CAP);
        a.count(pod_refusal::CONN_POD_CAP);
        r.add(2, pod_refusal::PEERS_EVICTED, 5);
        r.add(3, pod_refusal::PEERS_EVICTED, 0);
        let mut d = r.drain();
        d.sort_by_key(|(c, _)| *c);
        assert_eq!(d.len(), 2, "a pod with nothing counted is left out");
        assert_eq!(d[0].1[pod_refusal::CONN_POD_CAP], 2);
        assert_eq!(d[1].1[pod_refusal::PEERS_EVICTED], 5);
        assert!(r.drain().is_empty(), "drained");
        a.count(pod_refusal::DNS_RATE);
        assert_eq!(r.pod(1).get(pod_refusal::DNS_RATE), 1, "same counters");
        r.forget(1);
        assert_eq!(r.pod(1).get(pod_refusal::DNS_RATE), 0, "forgotten");
    }
}
