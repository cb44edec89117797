//! The agent's writes into the observability maps: per-peer state (flushed by the recorder),
//! pod metadata (at enrolment and removal) and agent-wide counters.
use anyhow::Result;
use aya::{
    maps::{Array, HashMap, MapData},
    Ebpf,
};
use sockmesh_common::peer::{
    breaker_state, map_names, pod_refusal, AgentStats, PeerKey, PeerNames, PeerState, PodMeta,
    PodRefused,
};
use tracing::warn;

use super::object::take;
use crate::sys::clock::unix_ms;

pub struct Sink {
    peer_state: HashMap<MapData, PeerKey, PeerState>,
    pod_meta: HashMap<MapData, u64, PodMeta>,
    agent_stats: Array<MapData, AgentStats>,
    pod_refused: HashMap<MapData, u64, PodRefused>,
    peer_names: HashMap<MapData, PeerKey, PeerNames>,
}

impl Sink {
    /// Takes the observability maps out of the loaded object (they are pinned by then).
    pub fn take(ebpf: &mut Ebpf) -> Result<Sink> {
        let mut sink = Sink {
            peer_state: take(ebpf, map_names::PEER_STATE)?,
            pod_meta: take(ebpf, map_names::POD_META)?,
            agent_stats: take(ebpf, map_names::AGENT_STATS)?,
            pod_refused: take(ebpf, map_names::POD_REFUSED)?,
            peer_names: take(ebpf, map_names::PEER_NAMES)?,
        };
        sink.forget_previous_connections();
        Ok(sink)
    }

    /// A previous agent's open connections died with it: its "active" gauges would otherwise
    /// stay up forever. Totals are kept, so counters stay monotonic across the restart.
    fn forget_previous_connections(&mut self) {
        self.update_where(|_| true, |v| std::mem::take(&mut v.conns_active) != 0);
    }

    /// A pod left and its per-peer policy state was dropped: the gauges showing that state
    /// (breaker, adaptive reject ratio) go back to none. Totals stay.
    pub fn clear_policy_gauges(&mut self, netns_cookie: u64) {
        self.update_where(
            |k| k.netns_cookie == netns_cookie,
            |v| {
                let before = (v.breaker, v.breaker_open_until_ns, v.adaptive_reject_ppm);
                v.breaker = breaker_state::NONE;
                v.breaker_open_until_ns = 0;
                v.adaptive_reject_ppm = 0;
                before != (breaker_state::NONE, 0, 0)
            },
        );
    }

    /// Rewrites the entries whose key `pick`s, when `change` says it changed one.
    fn update_where(
        &mut self,
        pick: impl Fn(&PeerKey) -> bool,
        change: impl Fn(&mut PeerState) -> bool,
    ) {
        let keys: Vec<PeerKey> = self
            .peer_state
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| pick(k))
            .collect();
        for k in keys {
            if let Ok(mut v) = self.peer_state.get(&k, 0) {
                if change(&mut v) {
                    let _ = self.peer_state.insert(k, v, 0);
                }
            }
        }
    }

    /// Changes the peer's entry (created if missing) with `change`, stamped `now_unix_ms`.
    /// Returns false if the kernel refused the write.
    pub fn update(
        &mut self,
        key: PeerKey,
        change: impl FnOnce(&mut PeerState),
        now_unix_ms: u64,
    ) -> bool {
        let mut v = self.peer_state.get(&key, 0).unwrap_or_default();
        change(&mut v);
        v.updated_unix_ms = now_unix_ms;
        match self.peer_state.insert(key, v, 0) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "could not write a peer's state to SM_PEER_STATE");
                false
            }
        }
    }

    /// Who the peer is, for readers. False if the kernel refused the write.
    pub fn set_names(&mut self, key: PeerKey, names: PeerNames) -> bool {
        match self.peer_names.insert(key, names, 0) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "could not write a peer's names to SM_PEER_NAMES");
                false
            }
        }
    }

    pub fn pod_enrolled(&mut self, netns_cookie: u64, name: &str) {
        let meta = PodMeta::new(name, unix_ms());
        if let Err(e) = self.pod_meta.insert(netns_cookie, meta, 0) {
            warn!(pod = name, error = %e, "could not write the pod's metadata");
        }
    }

    pub fn pod_removed(&mut self, netns_cookie: u64) {
        if let Ok(mut meta) = self.pod_meta.get(&netns_cookie, 0) {
            meta.removed_unix_ms = unix_ms();
            let _ = self.pod_meta.insert(netns_cookie, meta, 0);
        }
    }

    /// Adds to a pod's refusal counters (`pod_refusal` indexes), continuing what the map holds.
    pub fn add_pod_refused(&mut self, netns_cookie: u64, adds: &[u64; pod_refusal::COUNT]) {
        let mut v = self.pod_refused.get(&netns_cookie, 0).unwrap_or_default();
        for (c, n) in v.counters.iter_mut().zip(adds) {
            *c = c.wrapping_add(*n);
        }
        if let Err(e) = self.pod_refused.insert(netns_cookie, v, 0) {
            warn!(error = %e, "could not write SM_POD_REFUSED");
        }
    }

    /// Adds to agent-wide counters (`agent_counter` indexes).
    pub fn add_agent(&mut self, adds: &[(usize, u64)]) {
        if adds.iter().all(|(_, n)| *n == 0) {
            return;
        }
        let mut v = self.agent_stats.get(&0, 0).unwrap_or_default();
        for &(i, n) in adds {
            if let Some(c) = v.counters.get_mut(i) {
                *c = c.wrapping_add(n);
            }
        }
        if let Err(e) = self.agent_stats.set(0, v, 0) {
            warn!(error = %e, "could not write SM_AGENT_STATS");
        }
    }
}
