//! The per-peer state table: bounded, LRU-evicted, idle-expired, all O(log n).
//!
//! # Which entries go first
//!
//! An entry is in exactly one class, recomputed whenever it is touched:
//!
//! * **busy** — it holds connections or waiters: dropping it would lose their
//!   slots;
//! * **settling until T** — idle, but dropping it before T would forget something
//!   that still matters: an open breaker, a token bucket not yet refilled (which
//!   would hand the peer free tokens), adaptive-throttle samples still in window;
//! * **resting** — dropping it loses nothing.
//!
//! Settling entries become resting when T passes (checked lazily, oldest T
//! first). **Idle expiry** drops resting entries untouched for `idle_expiry`;
//! never busy or settling ones.
//!
//! # Whose entry goes
//!
//! Every key belongs to a tenant ([`Tenant`]: the pod), and a full table is
//! shared fairly between them. A tenant's **share** is `max_peers` divided by the
//! tenants holding entries (the newcomer included). When the table is full, a new
//! peer of a tenant holding its share or more **evicts one of that tenant's own
//! entries**; a new peer of a tenant under its share evicts one of the tenant
//! holding the most. So a pod that talks to 100,000 peers churns its own entries
//! only, and cannot evict another pod's open breakers and drained buckets while
//! that pod stays under its share. Within the chosen tenant the victim is the
//! least recently used resting entry; if there is none, the settling entry
//! closest to rest; only if all of its entries are busy, its least recently used
//! busy one (counted separately: it means `max_peers` is too small). An evicted
//! busy entry's later `on_close` is recognised by its stale [`Lease`] and ignored.
//! Evictions are counted per tenant ([`PeerTable::take_evictions`]).
//!
//! The LRU is a `BTreeMap` keyed by a use sequence number (plus one map per class),
//! kept for the whole table and per tenant (`table_index.rs`), so no external
//! crate and O(log n) per operation.

use super::breaker::{BreakerState, BreakerTransition, ConnectFailure};
use super::clock::Nanos;
use super::concurrency::Ticket;
use super::decision::{Counters, Decision, Lease, PeerView, RejectReason};
use super::fast::{RateLevel, Tier};
use super::key::Tenant;
use super::peer::PeerState;
use super::peer_policy::PeerPolicy;
use super::table_index::{Class, Index};
use super::timeouts::Timeouts;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TableConfig {
    /// Most peers tracked at once (0 is treated as 1).
    ///
    /// Default 16 384: a node's pods rarely talk to more distinct peers, and at
    /// about 1 KiB an entry (state plus indexes) a full table is ~16 MiB.
    pub max_peers: usize,
    /// Resting entries untouched this long are dropped.
    ///
    /// Default 5 min: longer than the 2 min adaptive window and the 15 s breaker, so
    /// a peer that merely paused keeps its history; short enough that churned pod
    /// IPs do not linger.
    pub idle_expiry: Duration,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            max_peers: 16_384,
            idle_expiry: Duration::from_secs(300),
        }
    }
}

/// Resolves the policy of a key (flags plus policy-file rules); called when an
/// entry is created and again after [`PeerTable::set_source`].
pub type PolicySource<K> = Box<dyn Fn(&K) -> PeerPolicy + Send + Sync>;

struct Entry {
    lease: u64,
    /// Policy-source generation the state was built from.
    epoch: u64,
    seq: u64,
    last_use: Nanos,
    class: Class,
    state: PeerState,
    /// This peer's share of the table's counters.
    counters: Counters,
    /// The tier the owner last put the peer on (reset by a reload).
    tier: Tier,
}

/// Counts one event in both the table's and the entry's counters.
fn count(table: &mut Counters, entry: &mut Entry, f: impl Fn(&mut Counters)) {
    f(table);
    f(&mut entry.counters);
}

/// Marks `entry` as used at `now` and files it under its current class.
fn touch<K: Clone + Tenant>(index: &mut Index<K>, key: &K, entry: &mut Entry, now: Nanos) {
    index.unlink(key, entry.seq, entry.class);
    entry.seq = index.next_seq();
    entry.last_use = now;
    entry.class = if entry.state.is_busy() {
        Class::Busy
    } else {
        match entry.state.rests_at(now) {
            t if t > now => Class::Settling(t),
            _ => Class::Resting,
        }
    };
    index.link(key, entry.seq, entry.class);
}

/// Entries swept by idle expiry when a new peer arrives (bounds that call's
/// latency; the owner runs [`PeerTable::expire_idle`] for the rest).
const SWEEP_ON_INSERT: usize = 8;

/// See [`PeerTable::kernel_handoff`].
#[derive(Clone, Debug)]
pub struct Handoff {
    pub policy: PeerPolicy,
    pub active: u32,
    pub breaker_closed: bool,
    pub rate_level: Option<RateLevel>,
    /// Adaptive throttling's (requests, accepts) in its window.
    pub window: Option<(u64, u64)>,
    /// The tier the owner last put it on (under the current policy).
    pub tier: Tier,
}

pub struct PeerTable<K> {
    config: TableConfig,
    source: PolicySource<K>,
    epoch: u64,
    entries: HashMap<K, Entry>,
    index: Index<K>,
    next_lease: u64,
    floor: Nanos,
    counters: Counters,
    /// Entries evicted per tenant since the last [`PeerTable::take_evictions`].
    evicted_by_tenant: HashMap<u64, u64>,
}

impl<K: Hash + Eq + Clone + Tenant> PeerTable<K> {
    pub fn new(config: TableConfig, source: PolicySource<K>) -> Self {
        PeerTable {
            config,
            source,
            epoch: 0,
            entries: HashMap::new(),
            index: Index::default(),
            next_lease: 0,
            floor: Nanos::ZERO,
            counters: Counters::default(),
            evicted_by_tenant: HashMap::new(),
        }
    }

    /// A table applying the same policy to every peer.
    #[cfg(test)]
    pub fn with_policy(config: TableConfig, policy: PeerPolicy) -> Self {
        Self::new(config, Box::new(move |_| policy.clone()))
    }

    /// Installs a new policy source (a reload). Each existing entry switches to its
    /// new policy when next touched, keeping the state of unchanged knobs.
    pub fn set_source(&mut self, source: PolicySource<K>) {
        self.source = source;
        self.epoch += 1;
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Entries evicted to make room since the last call, by tenant (the pod whose entries
    /// went), and reset: what the metrics count against each pod.
    pub fn take_evictions(&mut self) -> Vec<(u64, u64)> {
        self.evicted_by_tenant.drain().collect()
    }

    /// Decides a new connection attempt to `key`. `rand01` (uniform in [0, 1)) is
    /// used only by adaptive throttling.
    pub fn admit(&mut self, now: Nanos, key: &K, rand01: f64) -> Decision {
        let now = self.observe(now);
        if !self.entries.contains_key(key) {
            self.insert(now, key);
        }
        let Some(entry) = refreshed(&mut self.entries, &self.source, self.epoch, now, key) else {
            // Unreachable: just inserted. Failing open beats panicking.
            return Decision::Admit {
                lease: Lease(u64::MAX),
                timeouts: Timeouts::default(),
            };
        };
        let (decision, opened_breaker) = entry.state.admit(now, rand01, Lease(entry.lease));
        touch(&mut self.index, key, entry, now);
        count(&mut self.counters, entry, |c| match decision {
            Decision::Admit { .. } => c.admitted += 1,
            Decision::Queue { .. } => c.queued += 1,
            Decision::Reject {
                reason,
                fast_reject_until,
                ..
            } => {
                c.reject(reason);
                c.fast_reject_verdicts += u64::from(fast_reject_until.is_some());
                c.breaker_opened += u64::from(opened_breaker);
                c.breaker_opened_by_throttle += u64::from(opened_breaker);
            }
        });
        decision
    }

    /// Reports how an admitted attempt's upstream connect ended. Returns
    /// `Some(Opened { until })` when this opened the breaker: the owner writes the
    /// kernel fast-reject verdict with that expiry. Unknown keys are ignored.
    pub fn on_connect_result(
        &mut self,
        now: Nanos,
        key: &K,
        result: Result<(), ConnectFailure>,
    ) -> Option<BreakerTransition> {
        let now = self.observe(now);
        let entry = refreshed(&mut self.entries, &self.source, self.epoch, now, key)?;
        let transition = entry.state.on_connect_result(now, result);
        touch(&mut self.index, key, entry, now);
        count(&mut self.counters, entry, |c| {
            c.connect_result(result);
            match transition {
                Some(BreakerTransition::Opened { .. }) => c.breaker_opened += 1,
                Some(BreakerTransition::Closed) => c.breaker_closed += 1,
                None => {}
            }
        });
        transition
    }

    /// An admitted (or granted) connection ended. Returns the waiter that now owns
    /// its slot, if any: the owner wakes it as admitted.
    pub fn on_close(&mut self, now: Nanos, key: &K, lease: Lease) -> Option<Ticket> {
        let now = self.observe(now);
        let entry = leased(&mut self.entries, &self.source, self.epoch, now, key, lease)?;
        let granted = entry.state.concurrency.release(now);
        touch(&mut self.index, key, entry, now);
        if granted.is_some() {
            count(&mut self.counters, entry, |c| c.granted += 1);
        }
        granted
    }

    /// A waiter reached its deadline. `true`: it was still waiting and is now
    /// rejected (counted as `QueueTimeout`); `false`: it had already been granted,
    /// and the grant must be honoured.
    pub fn queue_timeout(&mut self, now: Nanos, key: &K, lease: Lease, ticket: Ticket) -> bool {
        self.remove_waiter(now, key, lease, ticket, |c| {
            c.reject(RejectReason::QueueTimeout)
        })
    }

    /// A waiter's client went away. Same return value as `queue_timeout`;
    /// counted as `queue_cancelled`, not as a rejection.
    pub fn cancel_wait(&mut self, now: Nanos, key: &K, lease: Lease, ticket: Ticket) -> bool {
        self.remove_waiter(now, key, lease, ticket, |c| c.queue_cancelled += 1)
    }

    /// Debits `bytes` from the peer's bandwidth bucket; returns how long to hold
    /// them back (zero when the knob is off or the peer unknown).
    pub fn shape(&mut self, now: Nanos, key: &K, bytes: u64) -> Duration {
        let now = self.observe(now);
        let Some(entry) = refreshed(&mut self.entries, &self.source, self.epoch, now, key) else {
            return Duration::ZERO;
        };
        let Some(bucket) = entry.state.bandwidth.as_mut() else {
            return Duration::ZERO;
        };
        let wait = bucket.reserve(now, bytes);
        count(&mut self.counters, entry, |c| c.shaped(bytes, wait));
        // A busy entry is re-filed on close anyway; skip the per-write B-tree work.
        if entry.class != Class::Busy {
            touch(&mut self.index, key, entry, now);
        }
        wait
    }

    /// While the peer's breaker is open: when it closes to probing.
    #[cfg(test)]
    pub fn breaker_open_until(&self, now: Nanos, key: &K) -> Option<Nanos> {
        let breaker = self.entries.get(key)?.state.breaker.as_ref()?;
        breaker.open_until(now.max(self.floor))
    }

    /// What the kernel tier needs to take the peer over, under the current policy: its
    /// policy, its live proxied connections, whether its breaker is closed with no failure
    /// since the last success (or off), and its
    /// rate bucket's level. `None` for an untracked peer.
    pub fn kernel_handoff(&mut self, now: Nanos, key: &K) -> Option<Handoff> {
        let now = now.max(self.floor);
        let e = refreshed(&mut self.entries, &self.source, self.epoch, now, key)?;
        let s = &e.state;
        Some(Handoff {
            policy: s.policy.clone(),
            active: s.concurrency.active(),
            // Closed, and its last connect succeeded: a peer is handed over only while it is
            // known to answer (a dead one stays where its failures open the breaker).
            breaker_closed: s.breaker.as_ref().is_none_or(|b| {
                matches!(
                    b.state(now),
                    BreakerState::Closed {
                        consecutive_failures: 0
                    }
                )
            }),
            rate_level: s.rate.as_ref().map(|r| RateLevel {
                units: r.level_units(now),
                tokens: r.rate().tokens(),
            }),
            window: s.adaptive.as_ref().map(|a| a.totals(now)),
            tier: e.tier,
        })
    }

    /// Every tracked peer's key.
    pub fn keys(&self) -> impl Iterator<Item = &K> + '_ {
        self.entries.keys()
    }

    /// Records the tier the owner put the peer on (shown by `sockmesh peers`).
    pub fn set_tier(&mut self, key: &K, tier: Tier) {
        let epoch = self.epoch;
        if let Some(e) = self.entries.get_mut(key).filter(|e| e.epoch == epoch) {
            e.tier = tier;
        }
    }

    /// The kernel opened the peer's breaker (its direct connects failed): the proxy's breaker
    /// opens until the same moment, so the proxy probes half-open afterwards, as it would
    /// had the failures been its own.
    pub fn kernel_opened_breaker(&mut self, now: Nanos, key: &K, until: Nanos) {
        let now = now.max(self.floor);
        if let Some(e) = refreshed(&mut self.entries, &self.source, self.epoch, now, key) {
            if let Some(b) = e.state.breaker.as_mut() {
                b.force_open(until);
            }
            e.tier = Tier::proxy(sockmesh_common::peer::tier_reason::BREAKER_OPENED);
        }
    }

    /// The policy the peer's state currently follows.
    pub fn policy(&self, key: &K) -> Option<&PeerPolicy> {
        self.entries.get(key).map(|e| &e.state.policy)
    }

    #[cfg(test)]
    pub fn peers(&self, now: Nanos) -> impl Iterator<Item = (&K, PeerView)> + '_ {
        let now = now.max(self.floor);
        self.entries
            .iter()
            .map(move |(key, e)| (key, view_of(e, now, self.epoch)))
    }

    /// One peer's view, if tracked (for the metrics flusher, which asks per changed peer).
    pub fn view(&self, now: Nanos, key: &K) -> Option<PeerView> {
        let now = now.max(self.floor);
        self.entries.get(key).map(|e| view_of(e, now, self.epoch))
    }

    /// Drops every entry whose key matches (e.g. all peers of a pod that left), busy or not:
    /// the next attempt to such a peer starts from fresh state. Leases of dropped entries go
    /// stale, so connections still winding down release nothing in a later entry. Returns
    /// how many were dropped.
    pub fn remove_where(&mut self, matches: impl Fn(&K) -> bool) -> usize {
        let keys: Vec<K> = self
            .entries
            .keys()
            .filter(|k| matches(k))
            .cloned()
            .collect();
        for k in &keys {
            self.remove(k);
        }
        keys.len()
    }

    /// Drops every resting entry untouched for `idle_expiry`; returns how many.
    #[cfg(test)]
    pub fn expire_idle(&mut self, now: Nanos) -> usize {
        let now = self.observe(now);
        self.expire_idle_up_to(now, usize::MAX)
    }

    /// Test-only: the indexes agree with the entries.
    #[cfg(test)]
    pub(super) fn assert_consistent(&self) {
        self.index.assert_tenants_consistent();
        let ix = &self.index.all;
        assert_eq!(ix.by_use.len(), self.entries.len());
        let (mut resting, mut settling) = (0, 0);
        for (key, e) in &self.entries {
            assert!(ix.by_use.get(&e.seq) == Some(key), "by_use out of sync");
            match e.class {
                Class::Unlinked => panic!("unlinked entry in table"),
                Class::Busy => {}
                Class::Resting => {
                    resting += 1;
                    assert!(ix.resting.get(&e.seq) == Some(key));
                }
                Class::Settling(t) => {
                    settling += 1;
                    assert!(ix.settling.get(&(t, e.seq)) == Some(key));
                }
            }
        }
        assert_eq!(ix.resting.len(), resting);
        assert_eq!(ix.settling.len(), settling);
    }

    fn observe(&mut self, now: Nanos) -> Nanos {
        self.floor = self.floor.max(now);
        self.floor
    }

    /// Takes a waiter out of its queue; `counted` records why, if it was still
    /// waiting.
    fn remove_waiter(
        &mut self,
        now: Nanos,
        key: &K,
        lease: Lease,
        ticket: Ticket,
        counted: impl Fn(&mut Counters),
    ) -> bool {
        let now = self.observe(now);
        // No entry (or a newer one): the waiter's queue is gone, so it was never
        // granted after this point. Report it as no longer waiting.
        let Some(entry) = leased(&mut self.entries, &self.source, self.epoch, now, key, lease)
        else {
            counted(&mut self.counters);
            return true;
        };
        let removed = entry.state.concurrency.cancel(now, ticket);
        touch(&mut self.index, key, entry, now);
        if removed {
            count(&mut self.counters, entry, counted);
        }
        removed
    }

    fn insert(&mut self, now: Nanos, key: &K) {
        self.expire_idle_up_to(now, SWEEP_ON_INSERT);
        while self.entries.len() >= self.config.max_peers.max(1) {
            if !self.evict_one(now, key.tenant()) {
                break;
            }
        }
        let entry = Entry {
            lease: self.next_lease,
            epoch: self.epoch,
            seq: 0,
            last_use: now,
            class: Class::Unlinked,
            state: PeerState::new((self.source)(key), now),
            counters: Counters::default(),
            tier: Tier::default(),
        };
        self.next_lease += 1;
        self.entries.insert(key.clone(), entry);
    }

    /// Moves settling entries whose time has come to resting.
    fn settle(&mut self, now: Nanos) {
        while let Some(((until, seq), key)) = self.index.all.settling.pop_first() {
            if until > now {
                self.index.all.settling.insert((until, seq), key);
                break;
            }
            if let Some(entry) = self.entries.get_mut(&key) {
                entry.class = Class::Resting;
                self.index.rested(&key, until, seq);
            }
        }
    }

    fn expire_idle_up_to(&mut self, now: Nanos, limit: usize) -> usize {
        self.settle(now);
        let mut expired = 0;
        while expired < limit {
            // Resting is ordered by last use, so stop at the first recent one.
            let Some(key) = self
                .index
                .all
                .resting
                .first_key_value()
                .map(|(_, k)| k.clone())
            else {
                break;
            };
            let idle_since = self.entries.get(&key).map_or(Nanos::ZERO, |e| e.last_use);
            if idle_since.saturating_add(self.config.idle_expiry) > now {
                break;
            }
            self.remove(&key);
            expired += 1;
        }
        self.counters.expired_idle += expired as u64;
        expired
    }

    /// Makes room for a new entry of `tenant` (see the module doc: the tenant's own entry
    /// while it holds its share, else one of the tenant holding the most).
    fn evict_one(&mut self, now: Nanos, tenant: u64) -> bool {
        self.settle(now);
        let Some(key) = self.index.victim_for(tenant, self.config.max_peers.max(1)) else {
            return false;
        };
        if self.remove(&key) == Some(Class::Busy) {
            self.counters.evicted_busy += 1;
        }
        self.counters.evicted += 1;
        *self.evicted_by_tenant.entry(key.tenant()).or_default() += 1;
        true
    }

    /// Removes an entry and its index records; returns the class it was in.
    fn remove(&mut self, key: &K) -> Option<Class> {
        let entry = self.entries.remove(key)?;
        self.index.unlink(key, entry.seq, entry.class);
        Some(entry.class)
    }
}

fn view_of(e: &Entry, now: Nanos, epoch: u64) -> PeerView {
    let s = &e.state;
    PeerView {
        connections: s.concurrency.active(),
        queued: s.concurrency.queued(),
        breaker: s.breaker.as_ref().map(|b| b.state(now)),
        reject_probability: s.adaptive.as_ref().map(|a| a.reject_probability(now)),
        conn_tokens: s.rate.as_ref().map(|r| r.available(now)),
        idle_for: now.saturating_since(e.last_use),
        counters: e.counters,
        tier: if e.epoch == epoch {
            e.tier
        } else {
            Tier::default()
        },
    }
}

/// The entry for `key`, switched to the current policy source if it was built
/// from an older one. (A free function over the fields it needs, so callers can
/// keep using the table's other fields while holding the entry.)
fn refreshed<'a, K: Hash + Eq>(
    entries: &'a mut HashMap<K, Entry>,
    source: &PolicySource<K>,
    epoch: u64,
    now: Nanos,
    key: &K,
) -> Option<&'a mut Entry> {
    let entry = entries.get_mut(key)?;
    if entry.epoch != epoch {
        entry.state.apply_policy(source(key), now);
        entry.epoch = epoch;
        // A reload took every peer off the kernel tier; its tier is decided anew.
        entry.tier = Tier::default();
    }
    Some(entry)
}

/// [`refreshed`], only if the entry is the incarnation `lease` was issued by.
fn leased<'a, K: Hash + Eq>(
    entries: &'a mut HashMap<K, Entry>,
    source: &PolicySource<K>,
    epoch: u64,
    now: Nanos,
    key: &K,
    lease: Lease,
) -> Option<&'a mut Entry> {
    refreshed(entries, source, epoch, now, key).filter(|e| e.lease == lease.0)
}
