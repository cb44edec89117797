//! Per-pod shares of the bind/unbind events every pod sends through one kernel ring: each
//! pod's changes wait in a queue of their own, coalesced by port (only the latest state of a
//! port is applied), and are applied at most at the pod's rate, round robin between pods.
//! A pod that binds and closes in a loop therefore costs the agent at most its rate of
//! listener changes and one queue entry per port, and delays no other pod's binds. Pure: the
//! owner passes `now` and applies what [`BindQueue::pop`] hands out.
use std::collections::{HashMap, VecDeque};

use super::clock::Nanos;
use super::token_bucket::{Rate, TokenBucket, Wait};

/// Ports one pod may have changes waiting for; past it the pod's newest change is dropped.
pub const MAX_PENDING: usize = 1024;

/// What became of a pushed event.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// The pod may apply it now (it has a token and nothing older waits).
    Ready,
    /// It waits for the pod's rate (or replaced an older change of the same port that did).
    Deferred,
    /// The pod already has [`MAX_PENDING`] ports waiting: dropped.
    Dropped,
}

struct PodQueue<E> {
    bucket: Option<TokenBucket>,
    /// Ports in the order their (first waiting) change arrived.
    order: VecDeque<u32>,
    latest: HashMap<u32, E>,
}

pub struct BindQueue<E> {
    rate: Option<Rate>,
    pods: HashMap<u64, PodQueue<E>>,
    /// Pods with changes waiting, in round-robin order.
    turn: VecDeque<u64>,
}

impl<E> BindQueue<E> {
    /// `rate`: changes one pod may apply per period (burst: one period's worth); `None`: no
    /// limit (changes are still coalesced and taken round robin).
    pub fn new(rate: Option<Rate>) -> Self {
        BindQueue {
            rate,
            pods: HashMap::new(),
            turn: VecDeque::new(),
        }
    }

    /// Queues `ev`, pod `pod`'s latest change to `port` (any key naming what coalesces).
    pub fn push(&mut self, now: Nanos, pod: u64, port: u32, ev: E) -> Pushed {
        let rate = self.rate;
        let q = self.pods.entry(pod).or_insert_with(|| PodQueue {
            bucket: rate.map(|r| TokenBucket::new(r, r.tokens(), now)),
            order: VecDeque::new(),
            latest: HashMap::new(),
        });
        let was_idle = q.order.is_empty();
        if q.latest.insert(port, ev).is_none() {
            if q.order.len() >= MAX_PENDING {
                q.latest.remove(&port);
                return Pushed::Dropped;
            }
            q.order.push_back(port);
        }
        if was_idle {
            self.turn.push_back(pod);
        }
        let can_apply =
            q.order.len() == 1 && q.bucket.as_ref().is_none_or(|b| b.available(now) > 0);
        if can_apply {
            Pushed::Ready
        } else {
            Pushed::Deferred
        }
    }

    /// The next change to apply: from the first pod in turn that has a token, which then goes
    /// to the back of the turn. `None` while every waiting pod is out of tokens.
    pub fn pop(&mut self, now: Nanos) -> Option<(u64, E)> {
        for _ in 0..self.turn.len() {
            let pod = self.turn.pop_front()?;
            let Some(q) = self.pods.get_mut(&pod) else {
                continue;
            };
            let has_token = q.bucket.as_mut().is_none_or(|b| b.try_take(now, 1).is_ok());
            if !has_token {
                self.turn.push_back(pod);
                continue;
            }
            let port = q.order.pop_front()?;
            let ev = q.latest.remove(&port)?;
            if !q.order.is_empty() {
                self.turn.push_back(pod);
            }
            return Some((pod, ev));
        }
        None
    }

    /// When the next waiting change may be applied (the earliest token of a pod with changes
    /// waiting); `None` if nothing waits.
    pub fn next_due(&self, now: Nanos) -> Option<Nanos> {
        self.turn
            .iter()
            .filter_map(|p| self.pods.get(p))
            .filter(|q| !q.order.is_empty())
            .map(|q| match q.bucket.clone().map(|mut b| b.try_take(now, 1)) {
                None | Some(Ok(())) => now,
                Some(Err(Wait::After(d))) => now.saturating_add(d),
                Some(Err(Wait::Never)) => now.saturating_add(std::time::Duration::from_secs(1)),
            })
            .min()
    }

    /// Changes waiting, all pods together.
    pub fn pending(&self) -> usize {
        self.pods.values().map(|q| q.order.len()).sum()
    }

    /// Every waiting change at once, budget or not (a successor agent is about to take over
    /// the listeners and must see them all applied).
    pub fn drain_all(&mut self) -> Vec<(u64, E)> {
        let mut out = Vec::new();
        for pod in std::mem::take(&mut self.turn) {
            if let Some(q) = self.pods.get_mut(&pod) {
                while let Some(port) = q.order.pop_front() {
                    if let Some(ev) = q.latest.remove(&port) {
                        out.push((pod, ev));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::ms;

    fn q(per_second: u64) -> BindQueue<&'static str> {
        BindQueue::new(Rate::per_second(per_second))
    }

    #[test]
    fn a_bind_close_loop_coalesces_to_one_change_per_port() {
        let mut b = q(1);
        assert_eq!(b.push(ms(0), 1, 80, "bind"), Pushed::Ready);
        assert_eq!(b.pop(ms(0)), Some((1, "bind")));
        // 10,000 bind/close cycles on two ports while out of tokens: two changes wait.
        for i in 0..10_000 {
            let port = 80 + (i % 2);
            assert_eq!(b.push(ms(1), 1, port, "bind"), Pushed::Deferred);
            assert_eq!(b.push(ms(1), 1, port, "unbind"), Pushed::Deferred);
        }
        assert_eq!(b.pending(), 2);
        assert_eq!(b.pop(ms(1)), None, "out of tokens");
        assert_eq!(b.next_due(ms(1)), Some(ms(1000)));
        assert_eq!(
            b.pop(ms(1000)),
            Some((1, "unbind")),
            "the latest state of port 80"
        );
        assert_eq!(b.pop(ms(1500)), None);
        assert_eq!(b.pop(ms(2000)), Some((1, "unbind")));
        assert_eq!((b.pending(), b.next_due(ms(2000))), (0, None));
    }

    #[test]
    fn a_busy_pod_does_not_delay_another_pods_binds() {
        let mut b = q(2);
        for port in 0..100 {
            b.push(ms(0), 1, port, "hostile");
        }
        // The victim's bind waits for at most one turn of the hostile pod, not behind its
        // 99 waiting ports, and the hostile pod stops at its burst.
        assert_eq!(b.pop(ms(0)), Some((1, "hostile")));
        assert_eq!(b.push(ms(0), 2, 8080, "victim"), Pushed::Ready);
        assert_eq!(b.pop(ms(0)), Some((1, "hostile")));
        assert_eq!(b.pop(ms(0)), Some((2, "victim")));
        assert_eq!(b.pop(ms(0)), None, "hostile out of tokens");
        assert_eq!(b.pending(), 98);
    }

    #[test]
    fn past_its_pending_ports_a_pod_loses_its_newest_changes() {
        let mut b = q(1);
        b.pop(ms(0));
        for port in 0..MAX_PENDING as u32 {
            b.push(ms(0), 1, port, "bind");
        }
        assert_eq!(b.push(ms(0), 1, 99_999, "bind"), Pushed::Dropped);
        assert_eq!(
            b.push(ms(0), 1, 5, "unbind"),
            Pushed::Deferred,
            "coalesced: fits"
        );
        assert_eq!(b.pending(), MAX_PENDING);
        assert_eq!(b.push(ms(0), 2, 1, "other pod"), Pushed::Ready);
        let all = b.drain_all();
        assert_eq!(all.len(), MAX_PENDING + 1);
        assert!(all.contains(&(1, "unbind")));
        assert_eq!(b.pending(), 0);
    }

    #[test]
    fn without_a_rate_every_change_is_ready() {
        let mut b: BindQueue<u32> = BindQueue::new(None);
        for i in 0..10 {
            assert_eq!(
                b.push(ms(0), 1, i, i),
                if i == 0 {
                    Pushed::Ready
                } else {
                    Pushed::Deferred
                }
            );
        }
        assert_eq!((0..10).filter_map(|_| b.pop(ms(0))).count(), 10);
    }
}
