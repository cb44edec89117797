//! Fair shares of what every pod on a node shares: a count of something each pod holds
//! (proxied connections, DNS queries in flight), capped per pod and for the node, with the
//! node's last slots kept for pods that hold less than their fair share. Pure bookkeeping,
//! no I/O: the proxy keeps one [`ShareTable`] per resource behind a lock.
//!
//! # The rule
//!
//! A pod may take one more slot when all of these hold:
//!
//! 1. it holds fewer than `per_pod` (else [`ShareRefusal::PodCap`]);
//! 2. the node holds fewer than `global` (else [`ShareRefusal::GlobalCap`]);
//! 3. the node holds fewer than `global - global / RESERVE_DIV` (the *contended* mark), **or**
//!    the pod holds less than its fair share, `global / pods` (else
//!    [`ShareRefusal::GlobalShare`]).
//!
//! So pods hungrier than their share can together fill the node only up to the contended
//! mark; the last eighth is left to pods under their share. A pod that stays under its fair
//! share is refused only once the node is completely full, which needs pods over their
//! share to have taken their slots before the node was contended: with `n` pods each under
//! `global / n`, the total stays under `global`.

use std::collections::HashMap;

/// The part of the global cap kept for pods under their fair share: 1/8.
pub const RESERVE_DIV: usize = 8;

/// Caps on one resource.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ShareCaps {
    /// Most slots one pod may hold (0 is treated as 1).
    pub per_pod: usize,
    /// Most slots the node may hold (0 is treated as 1).
    pub global: usize,
}

impl ShareCaps {
    /// Below this total, any pod under its own cap gets a slot.
    pub fn contended_at(&self) -> usize {
        let g = self.global.max(1);
        g - g / RESERVE_DIV
    }

    /// A pod's fair share with `pods` pods enrolled (at least 1).
    pub fn fair_share(&self, pods: usize) -> usize {
        (self.global.max(1) / pods.max(1)).max(1)
    }
}

/// Why a pod did not get a slot.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ShareRefusal {
    /// The pod holds its own cap.
    PodCap,
    /// The node holds its cap.
    GlobalCap,
    /// The node is contended and the pod holds at least its fair share.
    GlobalShare,
}

/// Whether a pod holding `pod` slots may take one more while the node holds `total` with
/// `pods` pods enrolled (see the module doc).
pub fn may_take(
    caps: &ShareCaps,
    pod: usize,
    total: usize,
    pods: usize,
) -> Result<(), ShareRefusal> {
    if pod >= caps.per_pod.max(1) {
        return Err(ShareRefusal::PodCap);
    }
    if total >= caps.global.max(1) {
        return Err(ShareRefusal::GlobalCap);
    }
    if total >= caps.contended_at() && pod >= caps.fair_share(pods) {
        return Err(ShareRefusal::GlobalShare);
    }
    Ok(())
}

/// Slots held per pod (keyed by any pod identity, the netns cookie in the agent) and in
/// total, against [`ShareCaps`].
#[derive(Clone, Debug)]
pub struct ShareTable {
    caps: ShareCaps,
    held: HashMap<u64, usize>,
    total: usize,
    pods: usize,
}

impl ShareTable {
    pub fn new(caps: ShareCaps) -> Self {
        ShareTable {
            caps,
            held: HashMap::new(),
            total: 0,
            pods: 1,
        }
    }

    /// How many pods are enrolled: the fair share divides the node's cap among them.
    pub fn set_pods(&mut self, pods: usize) {
        self.pods = pods.max(1);
    }

    /// Takes a slot for `pod`, or says why not (taking nothing).
    pub fn try_take(&mut self, pod: u64) -> Result<(), ShareRefusal> {
        let mine = self.held.get(&pod).copied().unwrap_or(0);
        may_take(&self.caps, mine, self.total, self.pods)?;
        *self.held.entry(pod).or_insert(0) += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives back a slot `pod` took. A give without a take is ignored.
    pub fn give(&mut self, pod: u64) {
        if let Some(n) = self.held.get_mut(&pod) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.held.remove(&pod);
            }
        }
    }

    #[cfg(test)]
    pub fn held(&self, pod: u64) -> usize {
        self.held.get(&pod).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(per_pod: usize, global: usize) -> ShareCaps {
        ShareCaps { per_pod, global }
    }

    #[test]
    fn a_pod_stops_at_its_own_cap_and_frees_slots_by_giving_them_back() {
        let mut t = ShareTable::new(caps(3, 100));
        for _ in 0..3 {
            t.try_take(1).expect("under the pod cap");
        }
        assert_eq!(t.try_take(1), Err(ShareRefusal::PodCap));
        assert_eq!((t.held(1), t.total()), (3, 3), "a refusal takes nothing");
        t.try_take(2).expect("another pod is not affected");
        t.give(1);
        t.try_take(1).expect("a slot given back is free again");
        t.give(7); // never took: ignored
        assert_eq!(t.total(), 4);
    }

    #[test]
    fn the_node_cap_holds_for_everyone() {
        let mut t = ShareTable::new(caps(10, 4));
        t.set_pods(1);
        for _ in 0..4 {
            t.try_take(1).expect("under both caps");
        }
        assert_eq!(t.try_take(1), Err(ShareRefusal::GlobalCap));
        assert_eq!(t.try_take(2), Err(ShareRefusal::GlobalCap));
    }

    #[test]
    fn hungry_pods_leave_the_last_eighth_to_pods_under_their_share() {
        // 110 pods, 8000 slots: fair share 72, contended from 7000.
        let mut t = ShareTable::new(caps(1024, 8000));
        t.set_pods(110);
        // Seven hostile pods take what they can.
        let mut hostile = 0;
        for pod in 100..107 {
            while t.try_take(pod).is_ok() {
                hostile += 1;
            }
        }
        assert_eq!(hostile, 7000, "hungry pods stop at the contended mark");
        assert_eq!(t.try_take(100), Err(ShareRefusal::PodCap));
        assert_eq!(t.try_take(106), Err(ShareRefusal::GlobalShare));
        // Every other pod still gets its whole fair share.
        for pod in 0..13 {
            for _ in 0..72 {
                t.try_take(pod).expect("a pod under its fair share");
            }
            assert_eq!(t.try_take(pod), Err(ShareRefusal::GlobalShare));
        }
        assert_eq!(t.total(), 7000 + 13 * 72);
    }

    #[test]
    fn pods_under_their_share_are_refused_only_when_the_node_is_full() {
        // Randomised: whatever order pods take and give in, a pod under its fair share is
        // refused only for GlobalCap, and never while another pod is under its share and the
        // node could have left room (n pods under share sum to < global).
        let mut rng = crate::policy::tests::Rng::new(0x5a4e);
        for round in 0..50 {
            let pods = 1 + rng.below(20) as usize;
            let c = caps(1 + rng.below(400) as usize, 1 + rng.below(500) as usize);
            let mut t = ShareTable::new(c);
            t.set_pods(pods);
            for _ in 0..2000 {
                let pod = rng.below(pods as u64);
                if rng.below(3) == 0 {
                    t.give(pod);
                    continue;
                }
                let before = t.held(pod);
                match t.try_take(pod) {
                    Ok(()) => assert!(before < c.per_pod.max(1)),
                    Err(ShareRefusal::PodCap) => assert!(before >= c.per_pod.max(1)),
                    Err(ShareRefusal::GlobalCap) => assert_eq!(t.total(), c.global.max(1)),
                    Err(ShareRefusal::GlobalShare) => {
                        assert!(before >= c.fair_share(pods), "round {round}");
                        assert!(t.total() >= c.contended_at());
                    }
                }
                assert!(t.total() <= c.global.max(1));
            }
        }
    }
}
