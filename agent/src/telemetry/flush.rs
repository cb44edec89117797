//! Writing the recorder's figures to the pinned maps: about once a second, on every `/metrics`
//! scrape (so a scrape is exact), and once more at shutdown after the connections drained (so
//! the figures are exact after the agent exits).
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use sockmesh_common::peer::{agent_counter, pod_refusal};
use tokio_util::sync::CancellationToken;

use super::{names::NameWriter, recorder::Recorder, refusals::Refusals};
use crate::{
    admission::Admission,
    datapath::sink::Sink,
    identity::Identities,
    policy::{Clock, PeerKey},
    sys::{clock::unix_ms, lock::lock},
};

/// How often changed per-peer state reaches the maps.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

pub struct Observer {
    pub recorder: Arc<Recorder>,
    /// Agent-wide events counted outside a flush (`agent_counter` indexes), added at the next.
    agent_events: [AtomicU64; agent_counter::COUNT],
    /// What each pod's caps and shares refused.
    pub refusals: Arc<Refusals>,
    admission: Arc<Admission<PeerKey>>,
    /// Held for a whole flush: two flushes interleaving their read-add-write of the same
    /// entry would lose one's additions.
    sink: Mutex<FlushState>,
}

struct FlushState {
    sink: Sink,
    /// The policy table's eviction count at the last flush (it counts from agent start; the
    /// map's counter continues across restarts).
    evicted_seen: u64,
    names: NameWriter,
}

impl Observer {
    pub fn new(
        recorder: Arc<Recorder>,
        admission: Arc<Admission<PeerKey>>,
        sink: Sink,
        ids: Identities,
    ) -> Self {
        Observer {
            recorder,
            agent_events: Default::default(),
            refusals: Arc::default(),
            admission,
            sink: Mutex::new(FlushState {
                sink,
                evicted_seen: 0,
                names: NameWriter::new(ids),
            }),
        }
    }

    pub fn pod_enrolled(&self, netns_cookie: u64, name: &str) {
        let mut st = self.state();
        st.sink.pod_enrolled(netns_cookie, name);
        st.names.pod_enrolled(netns_cookie, name);
    }

    pub fn pod_removed(&self, netns_cookie: u64) {
        self.state().sink.pod_removed(netns_cookie);
    }

    /// A pod left at runtime: its figures so far go to the maps, then its per-peer state (the
    /// recorder's and the policy table's) is dropped, so if it comes back its breakers,
    /// buckets and throttling start afresh. (At shutdown pods are not forgotten: the final
    /// flush comes after the connections drain.)
    pub fn forget_pod(&self, netns_cookie: u64, name: &str) {
        self.flush();
        self.recorder.forget_pod(netns_cookie);
        self.refusals.forget(netns_cookie);
        let dropped = self.admission.forget(|k| k.netns_cookie == netns_cookie);
        let mut st = self.state();
        st.sink.clear_policy_gauges(netns_cookie);
        st.names.forget_pod(netns_cookie);
        drop(st);
        tracing::debug!(
            pod = name,
            peers = dropped,
            "policy state of a removed pod dropped"
        );
    }

    /// Counts one agent-wide event (an `agent_counter` index); written at the next flush.
    pub fn count(&self, what: usize) {
        if let Some(c) = self.agent_events.get(what) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FlushState> {
        lock(&self.sink)
    }

    /// Writes every changed (or live) peer's figures to `SM_PEER_STATE`.
    pub fn flush(&self) {
        let mut st = self.state();
        let clock = self.admission.clock();
        let now = clock.now();
        let (batch, dropped) = self.recorder.drain(
            |k| self.admission.with_table(|t| t.view(now, k)),
            |t| clock.kernel_ns(t),
        );
        let stamp = unix_ms();
        let mut failed = 0;
        for (key, delta) in &batch {
            if !st.sink.update(*key, |v| delta.apply_to(v), stamp) {
                failed += 1;
            }
        }
        let FlushState { sink, names, .. } = &mut *st;
        names.flush(batch.iter().map(|(k, _)| k), sink);
        for (cookie, n) in self.admission.with_table(|t| t.take_evictions()) {
            self.refusals.add(cookie, pod_refusal::PEERS_EVICTED, n);
        }
        for (cookie, adds) in self.refusals.drain() {
            st.sink.add_pod_refused(cookie, &adds);
        }
        let evicted = self.admission.with_table(|t| t.counters().evicted);
        let evicted_delta = evicted.saturating_sub(st.evicted_seen);
        st.evicted_seen = evicted;
        let taken = |i: usize| (i, self.agent_events[i].swap(0, Ordering::Relaxed));
        st.sink.add_agent(&[
            (agent_counter::FLUSHES, 1),
            (agent_counter::PEER_STATE_DROPPED, dropped),
            (agent_counter::PEER_STATE_WRITE_FAILED, failed),
            (agent_counter::POLICY_PEERS_EVICTED, evicted_delta),
            taken(agent_counter::HTTP_REFUSED),
            taken(agent_counter::HTTP_EXPIRED),
        ]);
    }
}

/// Flushes every [`FLUSH_EVERY`] until cancelled (the final flush is the caller's, once the
/// connections have drained).
pub async fn run(observer: Arc<Observer>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => observer.flush(),
        }
    }
}
