//! Per-peer figures as the proxy produces them, kept in memory and handed to the flusher in
//! batches. Recording is one short mutex hold per connection event (never per byte, never a
//! syscall); the flusher turns what changed into map writes about once a second.
//!
//! Additive figures (connections, bytes, timeouts, throttles, failures) are kept as deltas
//! since the last flush and *added* to the pinned entry, so a restarted agent continues the
//! totals a previous one left. Gauges (active connections, breaker, adaptive ratio, last
//! error, connect latency) are set.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use sockmesh_common::{
    peer::{
        breaker_state, direction, peer_error, throttle_reason, timeout_kind, PeerKey as MapKey,
        PeerState,
    },
    SockAddr,
};

use crate::{
    policy::{BreakerState, ConnectFailure, Direction, PeerKey, PeerView, RejectReason},
    sys::lock::lock,
    telemetry::conn::{Counts, End, Relayed},
};

/// Connect latencies kept per peer for the p50/p99 figures.
const LATENCY_SAMPLES: usize = 64;

/// What one flush adds to, and sets in, one peer's pinned entry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    /// Only the additive fields are used.
    pub add: PeerState,
    pub active: u64,
    pub breaker: u8,
    pub breaker_open_until_ns: u64,
    pub adaptive_reject_ppm: u32,
    /// `peer_error::NONE` keeps the entry's older error.
    pub last_error: u8,
    pub last_error_unix_ms: u64,
    pub connect_p50_us: u32,
    pub connect_p99_us: u32,
    /// The peer's tier and why (`tier_reason::UNKNOWN` keeps the entry's older one).
    pub tier: u8,
    pub tier_reason: u8,
    /// The kernel tier's bytes (out, in) as of the last look at the open direct connections
    /// (`PeerState::direct_bytes_*_floor`): the entry keeps the larger of it and its own.
    pub direct_bytes_floor: (u64, u64),
}

impl Delta {
    pub fn apply_to(&self, v: &mut PeerState) {
        let a = &self.add;
        v.conns_total = v.conns_total.wrapping_add(a.conns_total);
        v.bytes_out = v.bytes_out.wrapping_add(a.bytes_out);
        v.bytes_in = v.bytes_in.wrapping_add(a.bytes_in);
        for (t, d) in v.timeouts.iter_mut().zip(a.timeouts) {
            *t = t.wrapping_add(d);
        }
        for (t, d) in v.throttled.iter_mut().zip(a.throttled) {
            *t = t.wrapping_add(d);
        }
        v.connect_failures = v.connect_failures.wrapping_add(a.connect_failures);
        v.resets = v.resets.wrapping_add(a.resets);
        v.dns_queries = v.dns_queries.wrapping_add(a.dns_queries);
        v.conns_active = self.active;
        v.breaker = self.breaker;
        v.breaker_open_until_ns = self.breaker_open_until_ns;
        v.adaptive_reject_ppm = self.adaptive_reject_ppm;
        if self.last_error != peer_error::NONE {
            v.last_error = self.last_error;
            v.last_error_unix_ms = self.last_error_unix_ms;
        }
        if self.connect_p50_us != 0 {
            v.connect_p50_us = self.connect_p50_us;
            v.connect_p99_us = self.connect_p99_us;
        }
        if self.tier_reason != sockmesh_common::peer::tier_reason::UNKNOWN {
            v.tier = self.tier;
            v.tier_reason = self.tier_reason;
        }
        v.direct_bytes_out_floor = v.direct_bytes_out_floor.max(self.direct_bytes_floor.0);
        v.direct_bytes_in_floor = v.direct_bytes_in_floor.max(self.direct_bytes_floor.1);
    }
}

/// An open connection's byte counts and how much of them the flushes already took.
struct Open {
    bytes: Arc<Counts>,
    seen: (u64, u64),
}

impl Open {
    /// Bytes since the last look, (a_to_b, b_to_a).
    fn take(&mut self, now: (u64, u64)) -> (u64, u64) {
        let d = (
            now.0.saturating_sub(self.seen.0),
            now.1.saturating_sub(self.seen.1),
        );
        self.seen = now;
        d
    }
}

/// (bytes out of the pod, bytes into it) for a connection's (a_to_b, b_to_a): a is the
/// client, so for outbound a_to_b leaves the pod; for inbound the client is the peer.
fn out_in(direction: Direction, (a_to_b, b_to_a): (u64, u64)) -> (u64, u64) {
    match direction {
        Direction::Outbound => (a_to_b, b_to_a),
        Direction::Inbound => (b_to_a, a_to_b),
    }
}

#[derive(Default)]
struct Obs {
    pending: PeerState,
    active: u64,
    /// Relayed connections whose bytes each flush adds as they flow.
    open: Vec<Open>,
    last_error: u8,
    last_error_unix_ms: u64,
    latencies_us: Vec<u32>,
    next_sample: usize,
    /// See [`Delta::direct_bytes_floor`].
    direct_bytes_floor: (u64, u64),
    /// Changed since the last flush.
    dirty: bool,
    /// Has gauges that move without traffic (open connections, a breaker not closed, a
    /// non-zero reject ratio): flushed every time.
    live: bool,
}

impl Obs {
    fn error(&mut self, code: u8, now_ms: u64) {
        self.last_error = code;
        self.last_error_unix_ms = now_ms;
    }

    fn sample(&mut self, us: u32) {
        if self.latencies_us.len() < LATENCY_SAMPLES {
            self.latencies_us.push(us);
        } else {
            self.latencies_us[self.next_sample] = us;
        }
        self.next_sample = (self.next_sample + 1) % LATENCY_SAMPLES;
    }

    /// Nearest-rank quantiles of the kept samples.
    fn quantiles(&self) -> (u32, u32) {
        if self.latencies_us.is_empty() {
            return (0, 0);
        }
        let mut s = self.latencies_us.clone();
        s.sort_unstable();
        let rank = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        (rank(0.50), rank(0.99))
    }
}

/// How a DNS query to a server ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsOutcome {
    Answered,
    TimedOut,
    Failed,
}

pub type UnixClock = Box<dyn Fn() -> u64 + Send + Sync>;

struct Inner {
    peers: HashMap<PeerKey, Obs>,
    /// Figures lost because the table was full of unflushed or busy peers.
    dropped: u64,
}

impl Inner {
    /// Full of unflushed figures: the pods share the room. A pod holding its share (`cap` /
    /// pods with records) or more gets none (its record is dropped, counted); one under its
    /// share takes the place of an idle record (no open connection, nothing live) of the pod
    /// holding the most, whose unflushed figures are counted as dropped. So one pod talking to
    /// very many peers loses its own figures, not another pod's.
    fn make_room(&mut self, pod: u64, cap: usize) -> bool {
        let mut held: HashMap<u64, usize> = HashMap::new();
        for k in self.peers.keys() {
            *held.entry(k.netns_cookie).or_default() += 1;
        }
        let mine = held.get(&pod).copied().unwrap_or(0);
        let share = cap / (held.len() + usize::from(mine == 0)).max(1);
        if mine >= share {
            return false;
        }
        let Some((&big, _)) = held.iter().max_by_key(|(c, n)| (**n, **c)) else {
            return false;
        };
        let victim = self
            .peers
            .iter()
            .find(|(k, o)| k.netns_cookie == big && !o.live && o.active == 0 && o.open.is_empty())
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => {
                self.peers.remove(&k);
                self.dropped += 1;
                true
            }
            None => false,
        }
    }
}

pub struct Recorder {
    inner: Mutex<Inner>,
    cap: usize,
    clock: UnixClock,
}

impl Recorder {
    /// `cap`: most peers kept in memory (flushed, idle ones are dropped first; they live on
    /// in the pinned map). `clock`: Unix time in ms, for "last error at".
    pub fn new(cap: usize, clock: UnixClock) -> Self {
        Recorder {
            inner: Mutex::new(Inner {
                peers: HashMap::new(),
                dropped: 0,
            }),
            cap: cap.max(1),
            clock,
        }
    }

    fn with(&self, key: &PeerKey, f: impl FnOnce(&mut Obs, u64)) {
        let now = (self.clock)();
        let mut inner = lock(&self.inner);
        if !inner.peers.contains_key(key) && inner.peers.len() >= self.cap {
            // Flushed, idle entries lose nothing when dropped: their figures are in the map.
            inner.peers.retain(|_, o| o.dirty || o.live);
            if inner.peers.len() >= self.cap && !inner.make_room(key.netns_cookie, self.cap) {
                inner.dropped += 1;
                return;
            }
        }
        let obs = inner.peers.entry(key.clone()).or_default();
        f(obs, now);
        obs.dirty = true;
    }

    /// The agent closed a kernel-tier (direct) connection to the peer at its idle timeout.
    pub fn kernel_idle_closed(&self, key: &PeerKey) {
        self.with(key, |o, now| {
            o.pending.timeouts[timeout_kind::IDLE] += 1;
            o.error(peer_error::IDLE_TIMEOUT, now);
        });
    }

    /// Connect latencies (µs) of the peer's direct connections, measured by the kernel tier:
    /// into the same samples as the proxy's upstream connects (the kernel counts the
    /// connections themselves).
    pub fn kernel_connected(&self, key: &PeerKey, latencies_us: &[u32]) {
        self.with(key, |o, _| {
            for &us in latencies_us {
                o.sample(us.max(1));
            }
        });
    }

    /// The kernel tier's bytes of the peer's direct connections, ended and open, as the agent
    /// last looked (`inpod::live_bytes`): a floor of its totals, only ever raised.
    pub fn kernel_bytes_floor(&self, key: &PeerKey, floor: (u64, u64)) {
        self.with(key, |o, _| {
            o.direct_bytes_floor.0 = o.direct_bytes_floor.0.max(floor.0);
            o.direct_bytes_floor.1 = o.direct_bytes_floor.1.max(floor.1);
        });
    }

    /// Something of the peer changed outside the proxy (the kernel tier opened its breaker):
    /// flush it with the next batch.
    pub fn touched(&self, key: &PeerKey) {
        self.with(key, |_, _| {});
    }

    pub fn rejected(&self, key: &PeerKey, reason: RejectReason) {
        let idx = match reason {
            RejectReason::BreakerOpen => throttle_reason::BREAKER,
            RejectReason::AdaptiveThrottle => throttle_reason::ADAPTIVE,
            RejectReason::RateLimited => throttle_reason::RATE,
            RejectReason::ConcurrencyFull => throttle_reason::CONCURRENCY,
            RejectReason::QueueTimeout => throttle_reason::QUEUE_TIMEOUT,
        };
        self.with(key, |o, now| {
            o.pending.throttled[idx] += 1;
            o.error(peer_error::THROTTLED, now);
        });
    }

    /// The upstream connect ended: on success a relayed connection starts.
    pub fn connected(&self, key: &PeerKey, result: Result<Duration, ConnectFailure>) {
        self.with(key, |o, now| match result {
            Ok(took) => {
                o.active += 1;
                o.pending.conns_total += 1;
                o.sample(took.as_micros().clamp(1, u32::MAX as u128) as u32);
            }
            Err(kind) => {
                o.pending.connect_failures += 1;
                let code = match kind {
                    ConnectFailure::Timeout => {
                        o.pending.timeouts[timeout_kind::CONNECT] += 1;
                        peer_error::CONNECT_TIMEOUT
                    }
                    ConnectFailure::Refused => peer_error::CONNECT_REFUSED,
                    ConnectFailure::Reset => peer_error::CONNECT_RESET,
                    ConnectFailure::Unreachable => peer_error::UNREACHABLE,
                };
                o.error(code, now);
            }
        });
    }

    /// A connection to `key` is relaying and counts its bytes in `bytes`: flushes add them
    /// while it is open (after a successful [`Recorder::connected`]; [`Recorder::ended`]
    /// stops it).
    pub fn relaying(&self, key: &PeerKey, bytes: &Arc<Counts>) {
        self.with(key, |o, _| {
            o.open.push(Open {
                bytes: bytes.clone(),
                seen: (0, 0),
            })
        });
    }

    /// A relayed connection ended (after a successful [`Recorder::connected`]). `bytes`:
    /// its counts if it was registered with [`Recorder::relaying`]; only what the flushes
    /// have not yet taken of `r`'s totals is added, so no byte is counted twice.
    pub fn ended(&self, key: &PeerKey, r: &Relayed, bytes: Option<&Arc<Counts>>) {
        self.with(key, |o, now| {
            o.active = o.active.saturating_sub(1);
            let mut seen = (0, 0);
            if let Some(b) = bytes {
                if let Some(i) = o.open.iter().position(|c| Arc::ptr_eq(&c.bytes, b)) {
                    seen = o.open.swap_remove(i).seen;
                }
            }
            let rest = (
                r.a_to_b.saturating_sub(seen.0),
                r.b_to_a.saturating_sub(seen.1),
            );
            let (out, inn) = out_in(key.direction, rest);
            o.pending.bytes_out += out;
            o.pending.bytes_in += inn;
            match r.end {
                End::Closed => {}
                End::Reset => {
                    o.pending.resets += 1;
                    o.error(peer_error::RESET, now);
                }
                End::IdleTimeout => {
                    o.pending.timeouts[timeout_kind::IDLE] += 1;
                    o.error(peer_error::IDLE_TIMEOUT, now);
                }
                End::MaxLifetime => {
                    o.pending.timeouts[timeout_kind::LIFETIME] += 1;
                    o.error(peer_error::LIFETIME, now);
                }
            }
        });
    }

    pub fn dns(&self, key: &PeerKey, outcome: DnsOutcome) {
        self.with(key, |o, now| {
            o.pending.dns_queries += 1;
            match outcome {
                DnsOutcome::Answered => {}
                DnsOutcome::TimedOut => {
                    o.pending.timeouts[timeout_kind::DNS] += 1;
                    o.error(peer_error::DNS_TIMEOUT, now);
                }
                DnsOutcome::Failed => o.error(peer_error::DNS_FAILED, now),
            }
        });
    }

    /// Takes what the next flush writes: every changed or live peer, with its deltas (reset
    /// here) and gauges. `view` gives the policy table's current view of a peer, and
    /// `kernel_ns` turns its breaker deadline into CLOCK_MONOTONIC. Also returns, and resets,
    /// the count of dropped records.
    pub fn drain(
        &self,
        view: impl Fn(&PeerKey) -> Option<PeerView>,
        kernel_ns: impl Fn(crate::policy::Nanos) -> u64,
    ) -> (Vec<(MapKey, Delta)>, u64) {
        let mut inner = lock(&self.inner);
        let Inner { peers, dropped } = &mut *inner;
        let mut out = Vec::new();
        for (key, o) in peers.iter_mut().filter(|(_, o)| o.dirty || o.live) {
            for c in &mut o.open {
                let (out, inn) = out_in(key.direction, c.take(c.bytes.get()));
                o.pending.bytes_out += out;
                o.pending.bytes_in += inn;
            }
            let v = view(key);
            let (breaker, until) = match v.and_then(|v| v.breaker) {
                None => (breaker_state::NONE, 0),
                Some(BreakerState::Closed { .. }) => (breaker_state::CLOSED, 0),
                Some(BreakerState::Open { until }) => (breaker_state::OPEN, kernel_ns(until)),
                Some(BreakerState::HalfOpen { .. }) => (breaker_state::HALF_OPEN, 0),
            };
            let ratio = v.and_then(|v| v.reject_probability).unwrap_or(0.0);
            let ppm = (ratio.clamp(0.0, 1.0) * 1e6).round() as u32;
            let (p50, p99) = o.quantiles();
            let tier = v.map(|v| v.tier).unwrap_or_default();
            let delta = Delta {
                tier: tier.tier,
                tier_reason: tier.reason,
                add: std::mem::take(&mut o.pending),
                active: o.active,
                breaker,
                breaker_open_until_ns: until,
                adaptive_reject_ppm: ppm,
                last_error: std::mem::replace(&mut o.last_error, peer_error::NONE),
                last_error_unix_ms: o.last_error_unix_ms,
                connect_p50_us: p50,
                connect_p99_us: p99,
                direct_bytes_floor: o.direct_bytes_floor,
            };
            o.dirty = false;
            o.live = o.active > 0
                || matches!(breaker, breaker_state::OPEN | breaker_state::HALF_OPEN)
                || ppm > 0;
            out.push((map_key(key), delta));
        }
        (out, std::mem::take(dropped))
    }

    /// A pod left: forget its peers, so a pod enrolled again starts afresh.
    /// Flush first: figures not yet flushed are kept, and so are peers with connections still
    /// winding down, whose last bytes must be added once, when they end.
    pub fn forget_pod(&self, netns_cookie: u64) {
        lock(&self.inner).peers.retain(|k, o| {
            if k.netns_cookie != netns_cookie {
                return true;
            }
            o.latencies_us.clear();
            o.next_sample = 0;
            o.dirty || o.active > 0 || !o.open.is_empty()
        });
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.inner).peers.len()
    }
}

/// The maps' key for a policy key.
pub fn map_key(key: &PeerKey) -> MapKey {
    MapKey {
        netns_cookie: key.netns_cookie,
        peer: SockAddr::from_std(canonical(key.peer)),
        direction: match key.direction {
            Direction::Outbound => direction::OUTBOUND,
            Direction::Inbound => direction::INBOUND,
        },
        _pad: 0,
    }
}

/// A v4-mapped IPv6 peer is stored as IPv4, as the kernel programs store it.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(ip4) => SocketAddr::new(ip4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

#[cfg(test)]
#[path = "recorder_tests.rs"]
mod tests;
