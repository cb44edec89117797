//! The policy engine at work on real connections: one place where the proxy asks "may this
//! connection go ahead?", waits in the peer's queue without polling, reports connect outcomes,
//! shapes bandwidth, and writes the kernel fast-reject verdict whenever the engine says the
//! next attempts are refused for certain (breaker open, rate bucket empty until the next
//! token). The algorithms live in `crate::policy`; this is only the async and kernel glue.
//! [`endpoints`] picks the endpoint of a Service an Istio DestinationRule covers.
pub mod endpoints;

use std::{
    collections::HashMap,
    hash::Hash,
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::oneshot;
use tracing::{debug, info};

use crate::policy::fast::{kernel_entry, kernel_policy, Tier};
use crate::policy::{
    BreakerTransition, Clock, ConnectFailure, Decision, Lease, Nanos, PeerTable, PolicySource,
    RejectReason, Tenant, Ticket, Timeouts,
};
use crate::sys::{clock::monotonic_ns, lock::lock};
use sockmesh_common::{
    fast::{refusal, Verdict},
    peer::tier_reason,
};

/// Monotonic time since the admission layer started, convertible both to tokio instants
/// (for sleeping until a queue deadline) and to CLOCK_MONOTONIC (for kernel verdicts).
#[derive(Clone, Copy, Debug)]
pub struct ProxyClock {
    base: tokio::time::Instant,
    base_monotonic_ns: u64,
}

impl ProxyClock {
    pub fn new() -> Self {
        ProxyClock {
            base: tokio::time::Instant::now(),
            base_monotonic_ns: monotonic_ns(),
        }
    }

    pub fn instant(&self, t: Nanos) -> tokio::time::Instant {
        self.base + Duration::from_nanos(t.0)
    }

    /// The same moment on the clock `bpf_ktime_get_ns` reads.
    pub fn kernel_ns(&self, t: Nanos) -> u64 {
        self.base_monotonic_ns.saturating_add(t.0)
    }

    /// The inverse of [`ProxyClock::kernel_ns`] (moments before this clock's start read as
    /// its start).
    pub fn of_kernel_ns(&self, ns: u64) -> Nanos {
        Nanos(ns.saturating_sub(self.base_monotonic_ns))
    }
}

impl Default for ProxyClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ProxyClock {
    fn now(&self) -> Nanos {
        Nanos(self.base.elapsed().as_nanos().min(u64::MAX as u128) as u64)
    }
}

/// What admission keys need: hashable, cloneable, and printable in logs.
pub trait PeerId: Hash + Eq + Clone + std::fmt::Debug + Tenant {}
impl<T: Hash + Eq + Clone + std::fmt::Debug + Tenant> PeerId for T {}

/// Tells the kernel about a peer: `Some((t, why))`: refuse the pod's connect()s to it until
/// `t` (CLOCK_MONOTONIC ns), counted as throttled for `why` (`fast::refusal`); `None`: stop
/// refusing them now (a reload lifts every verdict).
pub type OnVerdict<K> = Box<dyn Fn(&K, Option<(u64, u32)>) + Send + Sync>;

/// Writes the kernel-tier entry of a peer; `Err(tier_reason)` keeps it on the proxy.
pub type OnPromote<K> = Box<dyn Fn(&K, &Verdict) -> Result<(), u8> + Send + Sync>;

/// The kernel tier as admission drives it (`--fast-path`).
pub struct KernelTier<K> {
    /// `--fast-path auto`: hand peers over when their policy allows; `off`: never.
    pub auto: bool,
    /// Whether the agent can close idle direct connections (sock_diag destroy): without it,
    /// a peer with an idle timeout stays on the proxy.
    pub idle_sweep: bool,
    /// Writes the kernel entry for a peer; `Err(tier_reason)` keeps it on the proxy
    /// (inbound peers, a map that refused the entry).
    pub promote: OnPromote<K>,
    /// Takes every peer off the kernel tier (a reload).
    pub demote_all: Box<dyn Fn() -> usize + Send + Sync>,
}

/// Verdicts tracked beyond this many get their expired ones dropped (bounds the map; the
/// kernel map itself is an LRU).
const VERDICTS_PRUNE_AT: usize = 4096;

pub struct Admission<K> {
    table: Mutex<PeerTable<K>>,
    waiters: Mutex<HashMap<Ticket, oneshot::Sender<()>>>,
    clock: ProxyClock,
    rng: AtomicU64,
    on_verdict: OnVerdict<K>,
    /// Verdicts written and maybe not yet expired, so a reload can lift them.
    verdicts: Mutex<HashMap<K, Nanos>>,
    kernel: Option<KernelTier<K>>,
}

/// Why a connection was not admitted.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The peer's policy refused it (counted per peer).
    Policy(RejectReason),
    /// It would have waited in the peer's queue, but its pod already has its share of
    /// connections waiting (counted per pod).
    PodQueue,
}

/// An admitted connection's slot; dropping it frees the slot (and may wake a waiter).
pub struct Permit<K: PeerId> {
    admission: Arc<Admission<K>>,
    key: K,
    lease: Lease,
    pub timeouts: Timeouts,
}

impl<K: PeerId> Drop for Permit<K> {
    fn drop(&mut self) {
        self.admission.release(&self.key, self.lease);
    }
}

/// Removes a waiter that gave up (client gone, shutdown) without losing a grant that raced it.
struct Waiting<'a, K: PeerId> {
    admission: &'a Arc<Admission<K>>,
    key: &'a K,
    lease: Lease,
    ticket: Ticket,
    armed: bool,
}

impl<K: PeerId> Drop for Waiting<'_, K> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let a = self.admission;
        let now = a.clock.now();
        let still_waiting = lock(&a.table).cancel_wait(now, self.key, self.lease, self.ticket);
        lock(&a.waiters).remove(&self.ticket);
        if !still_waiting {
            // Granted while we were leaving: hand the slot back.
            a.release(self.key, self.lease);
        }
    }
}

impl<K: PeerId> Admission<K> {
    pub fn with_kernel_tier(
        table: PeerTable<K>,
        on_verdict: OnVerdict<K>,
        kernel: Option<KernelTier<K>>,
    ) -> Arc<Self> {
        let clock = ProxyClock::new();
        Arc::new(Admission {
            table: Mutex::new(table),
            waiters: Mutex::new(HashMap::new()),
            rng: AtomicU64::new(monotonic_ns() | 1),
            clock,
            on_verdict,
            verdicts: Mutex::new(HashMap::new()),
            kernel,
        })
    }

    /// A reload: new connections follow `source`, and every kernel verdict is lifted, since
    /// it was decided under the old policy (a raised rate, a breaker turned off). Those still
    /// warranted come back with the next attempt the agent sees.
    pub fn set_source(&self, source: PolicySource<K>) {
        lock(&self.table).set_source(source);
        // Kernel-tier peers were handed over under the old policy: back to the proxy, which
        // hands them over again under the new one on their next connection.
        if let Some(k) = &self.kernel {
            let n = (k.demote_all)();
            debug!(
                peers = n,
                "policy reload: every peer back on the proxy tier"
            );
        }
        let now = self.clock.now();
        let lifted: Vec<(K, Nanos)> = lock(&self.verdicts).drain().collect();
        for (key, until) in lifted {
            if until > now {
                (self.on_verdict)(&key, None);
            }
        }
    }

    /// Who peers are changed (a Service's endpoints, a pod's labels): new and existing peers
    /// follow `source` from their next use, as after a reload. Kernel verdicts stay: each
    /// lapses by itself by the end of its breaker period or rate interval, and lifting them
    /// all at every endpoint change in a busy cluster would defeat the fast reject. Changed
    /// DestinationRules (`rules_changed`) are a policy change, so a reload ([`set_source`]):
    /// kernel-tier peers were handed over under the old rules (a removed `maxConnections`
    /// would stay in the kernel otherwise).
    ///
    /// [`set_source`]: Admission::set_source
    pub fn refresh_source(&self, source: PolicySource<K>, rules_changed: bool) {
        if rules_changed {
            return self.set_source(source);
        }
        lock(&self.table).set_source(source);
    }

    /// Lets the kernel refuse `key` until `until`, for `why` (`fast::refusal`).
    fn refuse_until(&self, key: &K, until: Nanos, why: u32) {
        (self.on_verdict)(key, Some((self.clock.kernel_ns(until), why)));
        let mut verdicts = lock(&self.verdicts);
        if verdicts.len() >= VERDICTS_PRUNE_AT {
            let now = self.clock.now();
            verdicts.retain(|_, t| *t > now);
        }
        verdicts.insert(key.clone(), until);
    }

    /// Forgets every peer matching `matches` (a pod that left): its policy state, and the
    /// verdicts a reload would otherwise lift for it (the kernel's went with the pod).
    pub fn forget(&self, matches: impl Fn(&K) -> bool) -> usize {
        lock(&self.verdicts).retain(|k, _| !matches(k));
        lock(&self.table).remove_where(matches)
    }

    pub fn clock(&self) -> ProxyClock {
        self.clock
    }

    pub fn with_table<R>(&self, f: impl FnOnce(&mut PeerTable<K>) -> R) -> R {
        f(&mut lock(&self.table))
    }

    /// xorshift64*: uniform enough for a throttling coin, no crate, no lock.
    fn rand01(&self) -> f64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Admit a new connection to `key`, waiting in the peer's queue if the policy says so and
    /// `may_wait` hands out a place to wait (the pod's share of queued connections, held
    /// until the wait ends); without one the connection is refused with [`Refused::PodQueue`].
    pub async fn admit<G>(
        self: &Arc<Self>,
        key: K,
        may_wait: impl FnOnce() -> Option<G>,
    ) -> Result<Permit<K>, Refused> {
        let now = self.clock.now();
        let (decision, _place) = {
            let mut table = lock(&self.table);
            let d = table.admit(now, &key, self.rand01());
            // Register the waiter under the table lock: a grant cannot slip in between.
            if let Decision::Queue { lease, ticket, .. } = d {
                let Some(place) = may_wait() else {
                    table.cancel_wait(now, &key, lease, ticket);
                    return Err(Refused::PodQueue);
                };
                let (tx, rx) = oneshot::channel();
                lock(&self.waiters).insert(ticket, tx);
                ((d, Some(rx)), Some(place))
            } else {
                ((d, None), None)
            }
        };
        match decision {
            (Decision::Admit { lease, timeouts }, _) => Ok(Permit {
                admission: self.clone(),
                key,
                lease,
                timeouts,
            }),
            (
                Decision::Reject {
                    reason,
                    fast_reject_until,
                    ..
                },
                _,
            ) => {
                if let Some(until) = fast_reject_until {
                    if reason == RejectReason::AdaptiveThrottle {
                        info!(event = "breaker_opened", peer = ?key, reason = "throttled_attempts", "breaker opened");
                    } else {
                        debug!(peer = ?key, reason = reason.as_str(), "kernel fast-reject verdict");
                    }
                    let why = match reason {
                        RejectReason::RateLimited => refusal::RATE,
                        _ => refusal::BREAKER,
                    };
                    self.refuse_until(&key, until, why);
                }
                Err(Refused::Policy(reason))
            }
            (
                Decision::Queue {
                    lease,
                    ticket,
                    deadline,
                },
                Some(rx),
            ) => {
                let mut guard = Waiting {
                    admission: self,
                    key: &key,
                    lease,
                    ticket,
                    armed: true,
                };
                let granted = tokio::select! {
                    r = rx => r.is_ok(),
                    _ = tokio::time::sleep_until(self.clock.instant(deadline)) => {
                        let timed_out = lock(&self.table).queue_timeout(self.clock.now(), &key, lease, ticket);
                        lock(&self.waiters).remove(&ticket);
                        !timed_out
                    }
                };
                guard.armed = false;
                drop(guard);
                if !granted {
                    return Err(Refused::Policy(RejectReason::QueueTimeout));
                }
                let timeouts = lock(&self.table)
                    .policy(&key)
                    .map(|p| p.timeouts)
                    .unwrap_or_default();
                Ok(Permit {
                    admission: self.clone(),
                    key,
                    lease,
                    timeouts,
                })
            }
            (Decision::Queue { .. }, None) => Err(Refused::Policy(RejectReason::ConcurrencyFull)),
        }
    }

    fn release(&self, key: &K, lease: Lease) {
        let now = self.clock.now();
        let mut table = lock(&self.table);
        if let Some(ticket) = table.on_close(now, key, lease) {
            if let Some(tx) = lock(&self.waiters).remove(&ticket) {
                let _ = tx.send(());
            }
        }
        self.consider_kernel_tier(&mut table, now, key);
    }

    /// Decides the peer's tier now that a proxied connection resolved its policy (its
    /// upstream connect succeeded, or it ended): the kernel tier if `--fast-path auto`, every
    /// knob of the policy is one the kernel enforces, the breaker is closed, and (with a
    /// concurrency cap, which the kernel counts from zero) no proxied connection is left.
    fn consider_kernel_tier(&self, table: &mut PeerTable<K>, now: Nanos, key: &K) {
        let Some(k) = &self.kernel else {
            return;
        };
        let Some(h) = table.kernel_handoff(now, key) else {
            return;
        };
        if h.tier == Tier::KERNEL {
            // Handed over already (a proxied connection still ending): the kernel's entry
            // holds the live state, which a second write would reset.
            return;
        }
        let tier = match kernel_policy(&h.policy, k.idle_sweep) {
            _ if !k.auto => Tier::proxy(tier_reason::FAST_PATH_OFF),
            Err(reason) => Tier::proxy(reason),
            Ok(_) if !h.breaker_closed => Tier::proxy(tier_reason::BREAKER),
            Ok(p) if p.max_conns != 0 && h.active > 0 => Tier::proxy(tier_reason::HANDOVER_PENDING),
            Ok(p) => {
                let entry = kernel_entry(&p, self.clock.kernel_ns(now), h.rate_level, h.window);
                match (k.promote)(key, &entry) {
                    Ok(()) => {
                        debug!(peer = ?key, "peer handed over to the kernel tier");
                        Tier::KERNEL
                    }
                    Err(reason) => Tier::proxy(reason),
                }
            }
        };
        table.set_tier(key, tier);
    }

    /// The kernel opened a kernel-tier peer's breaker (`until`, CLOCK_MONOTONIC) and handed
    /// it back: the proxy's breaker opens until then too, and refuses in the kernel meanwhile.
    /// Returns the peer's key, if it is tracked.
    pub fn kernel_opened_breaker(&self, matches: impl Fn(&K) -> bool, until_ns: u64) -> Option<K> {
        let now = self.clock.now();
        let until = self.clock.of_kernel_ns(until_ns);
        let mut table = lock(&self.table);
        let key = table.keys().find(|k| matches(k)).cloned()?;
        table.kernel_opened_breaker(now, &key, until);
        drop(table);
        info!(event = "breaker_opened", peer = ?key, reason = "kernel_connect_failures", "breaker opened");
        if until > now {
            self.refuse_until(&key, until, refusal::BREAKER);
        }
        Some(key)
    }

    /// Report how the upstream connect ended (feeds the breaker and adaptive throttling).
    /// Returns the breaker transition it caused, if any.
    pub fn connect_result(
        &self,
        key: &K,
        result: &Result<(), ConnectFailure>,
    ) -> Option<BreakerTransition> {
        let now = self.clock.now();
        let mut table = lock(&self.table);
        let t = table.on_connect_result(now, key, *result);
        if result.is_ok() {
            self.consider_kernel_tier(&mut table, now, key);
        }
        drop(table);
        if let Some(BreakerTransition::Opened { until }) = t {
            info!(event = "breaker_opened", peer = ?key, reason = "connect_failures", "breaker opened");
            self.refuse_until(key, until, refusal::BREAKER);
        }
        t
    }

    /// How long to hold back `bytes` to keep the peer within its bandwidth.
    pub fn shape(&self, key: &K, bytes: u64) -> Duration {
        lock(&self.table).shape(self.clock.now(), key, bytes)
    }

    /// Whether the peer has a bandwidth limit: only then must its bytes pass through `shape`
    /// (the relay copies them); otherwise they can be spliced without touching the agent.
    pub fn shaped(&self, key: &K) -> bool {
        lock(&self.table)
            .policy(key)
            .is_some_and(|p| p.bandwidth.is_some())
    }
}

/// Which breaker failure an upstream connect error is.
pub fn failure_kind(e: &io::Error) -> ConnectFailure {
    match e.kind() {
        io::ErrorKind::TimedOut => ConnectFailure::Timeout,
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => ConnectFailure::Reset,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            ConnectFailure::Unreachable
        }
        _ => ConnectFailure::Refused,
    }
}
