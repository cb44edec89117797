//! The kernel fast path: two tiers per (pod, outbound peer).
//!
//! `SM_VERDICTS` holds one entry per (pod, peer) the kernel has to know about. Before the fast
//! path it only said "refuse until `until_ns`" (breaker open, rate bucket empty): the proxy
//! tier's fast reject. An entry whose `tier` is [`tier::KERNEL`] says more: the agent resolved
//! the peer's policy on a proxied connection, found every knob it sets enforceable in the
//! kernel, and handed the peer over. `connect4/6` then polices each connect() to that peer
//! itself (rate bucket, concurrency cap, connect timeout) and lets it go **direct**, and
//! `sock_ops` counts what happens to it. The entry has one writer at a time: the agent writes it
//! whole once (promotion) and afterwards only deletes it (reload, pod gone, restart); the
//! kernel changes `active`, `failures`, `rate_tat`, and on a breaker opening `until_ns` and
//! `tier`, in place with atomic instructions.

use crate::SockAddr;

/// `Verdict::tier`.
pub mod tier {
    /// The proxy enforces the peer's policy (the default: no entry, or a fast-reject verdict).
    pub const PROXY: u32 = 0;
    /// The kernel polices connect()s to the peer and lets them go direct.
    pub const KERNEL: u32 = 1;
}

/// Key of `SM_VERDICTS`: one outbound peer of one pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    pub netns_cookie: u64,
    pub peer: SockAddr,
    pub _pad: u32,
}

/// Value of `SM_VERDICTS`. On the proxy tier only `until_ns` matters: the fast-reject verdict
/// (breaker open or rate bucket empty) holds until this CLOCK_MONOTONIC time
/// (`bpf_ktime_get_ns`) and expires by itself, no agent needed to lift it. On the kernel tier
/// the rest is the peer's kernel policy and state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// connect() to the peer is refused (ECONNREFUSED) until then, whatever the tier.
    pub until_ns: u64,
    /// [`tier`].
    pub tier: u32,
    /// Connect timeout in ms (0: the kernel's own SYN retries): set on the socket as
    /// `TCP_USER_TIMEOUT` from connect() until the handshake completes.
    pub connect_timeout_ms: u32,
    /// Breaker: this many connect failures in a row open it (0: no breaker).
    pub breaker_failures: u32,
    /// Set by the kernel when it opened the breaker (and handed the peer back to the proxy,
    /// which owns the half-open ramp); the agent clears the entry once it has taken note.
    pub breaker_opened: u32,
    /// Breaker: how long it stays open, ns.
    pub breaker_open_ns: u64,
    /// Concurrency cap on live direct connections (0: none); never a queue.
    pub max_conns: u64,
    /// Live direct connections (kernel, atomic): +1 in connect(), -1 when the connection
    /// fails or closes.
    pub active: u64,
    /// Consecutive connect failures (kernel, atomic; 0 on each success).
    pub failures: u64,
    /// Connection rate, reduced to lowest terms: `rate_tokens` per `rate_per_ns` (0: off).
    pub rate_tokens: u64,
    pub rate_per_ns: u64,
    /// Bucket size in connections (>= 1).
    pub rate_burst: u64,
    /// When the agent wrote the entry (CLOCK_MONOTONIC ns, unique per write): the rate
    /// bucket's epoch (`rate_tat` counts from here), and the mark each direct socket keeps so
    /// its end is subtracted from the entry that counted it, never from a newer one.
    pub epoch_ns: u64,
    /// The bucket as GCRA state (kernel, compare-and-swap): see [`gcra_take`].
    pub rate_tat: u64,
    /// Adaptive throttling: K in thousandths (0: off), and the width of one window bucket
    /// (the window / [`ADAPTIVE_BUCKETS`]), ns.
    pub adaptive_k_milli: u64,
    pub adaptive_bucket_ns: u64,
    /// Idle timeout in ms (0: off). Not read by the programs: the agent closes direct
    /// connections idle this long from outside (sock_diag SOCK_DESTROY).
    pub idle_timeout_ms: u64,
    /// The window, as the proxy keeps it: a ring of buckets tagged with their absolute
    /// bucket number (`now / adaptive_bucket_ns`); stale ones are ignored on read and reset on
    /// write (kernel, atomics).
    pub window: [WindowBucket; ADAPTIVE_BUCKETS],
    /// Why a verdict refuses while `until_ns` is ahead ([`refusal`]): connect()s it refuses
    /// are counted as throttled for that reason, whichever tier wrote it.
    pub refusal: u32,
    pub _pad: u32,
    /// Kernel tier: how many direct handshakes completed under this entry; the latest
    /// [`LATENCY_RING`] connect latencies (µs, from connect() to the `sock_ops` ESTABLISHED
    /// callback) are in `latency_us[seq % LATENCY_RING]` (kernel, atomic increment then a
    /// plain store). The agent folds the new ones into the peer's samples, the same p50/p99
    /// the proxy tier reports for its upstream connects.
    pub latency_seq: u64,
    pub latency_us: [u32; LATENCY_RING],
}

/// Connect latencies an entry keeps between two reads by the agent (one a second): a peer
/// with more direct handshakes a second is sampled, the latest ones kept.
pub const LATENCY_RING: usize = 16;

/// `Verdict::refusal`.
pub mod refusal {
    /// Not said (an entry of an older agent): counted as a fast reject only.
    pub const UNSAID: u32 = 0;
    /// The peer's breaker is open (opened by the proxy, or by the kernel tier).
    pub const BREAKER: u32 = 1;
    /// The peer's connection-rate bucket is empty (the proxy tier's bucket).
    pub const RATE: u32 = 2;
}

/// The payload a direct connection moved each way, from the kernel's `bytes_acked` and
/// `bytes_received` at its close (`old`: the TCP state it left for TCP_CLOSE). Those count
/// sequence space, so the SYN (always acked on an established connection) and each FIN
/// acked or received are in them, one each: taken out here, by what the state says about
/// the FINs. LAST_ACK: both FINs done; FIN_WAIT2 and CLOSING: the close into TIME_WAIT,
/// both done (a FIN_WAIT2 that timed out without the peer's FIN, an orphan's rare end, is
/// counted one byte in too many); CLOSE_WAIT: the peer's FIN received, ours not sent;
/// anything else (a reset, an abort, FIN_WAIT1): no FIN acked or received.
#[inline(always)]
pub fn payload_bytes(old: u32, acked: u64, received: u64) -> (u64, u64) {
    const FIN_WAIT2: u32 = 5;
    const CLOSE_WAIT: u32 = 8;
    const LAST_ACK: u32 = 9;
    const CLOSING: u32 = 11;
    let (fin_out, fin_in) = match old {
        LAST_ACK | FIN_WAIT2 | CLOSING => (1, 1),
        CLOSE_WAIT => (0, 1),
        _ => (0, 0),
    };
    (
        acked.saturating_sub(1 + fin_out),
        received.saturating_sub(fin_in),
    )
}

/// Buckets in the adaptive-throttling window: the proxy's `policy::adaptive::BUCKETS`.
pub const ADAPTIVE_BUCKETS: usize = 12;

/// One bucket of the adaptive-throttling window: requests (connects that finished either way,
/// and attempts the throttle refused) and accepts (connects that succeeded).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowBucket {
    pub epoch: u64,
    pub requests: u64,
    pub accepts: u64,
}

/// Adaptive throttling's reject probability, `max(0, (requests - K * accepts) / (requests + 1))`,
/// as the fraction `num / den` in integers (K in thousandths), for a kernel without floats:
/// an attempt is refused iff a uniform draw below `den` is below `num`. A test in the agent
/// checks the fraction against the proxy's `AdaptiveThrottle::reject_probability`.
#[inline(always)]
pub fn adaptive_fraction(requests: u64, accepts: u64, k_milli: u64) -> (u64, u64) {
    let allowance = sat_mul(k_milli, accepts);
    let scaled = sat_mul(requests, 1000);
    (
        scaled.saturating_sub(allowance),
        sat_mul(requests.saturating_add(1), 1000),
    )
}

/// The largest reduced `rate_tokens` the kernel tier takes: `elapsed_ns * tokens` must fit a
/// u64 for as long as an entry may live (2^64 / 64 ns is over 9 years); a rate whose lowest
/// terms have a larger numerator (say 97/7s) stays on the proxy tier.
pub const MAX_KERNEL_RATE_TOKENS: u64 = 64;

/// The connection-rate token bucket of the kernel tier, as GCRA ("generic cell rate") in
/// exact integers, so one compare-and-swap of one u64 updates it on any CPU.
///
/// Time is scaled by `tokens`: `t = elapsed_ns * tokens`, one token is worth `per_ns`. The
/// state `tat` is when the bucket would be full again. An attempt is admitted iff
/// `tat <= t + (burst - 1) * per_ns`, i.e. iff at least one whole token is there, and then
/// `tat = max(tat, t) + per_ns`. This is the agent's `TokenBucket` (level in token-ns, lazy
/// refill, capped at `burst`) under another name: level = `burst * per_ns - (tat - t)`,
/// clamped; a test in the agent drives both through the same attempts and checks they agree.
#[inline(always)]
pub fn gcra_take(tat: u64, elapsed_ns: u64, tokens: u64, per_ns: u64, burst: u64) -> Option<u64> {
    let t = sat_mul(elapsed_ns, tokens);
    let slack = sat_mul(burst.saturating_sub(1), per_ns);
    if tat > t.saturating_add(slack) {
        return None;
    }
    Some(if tat > t { tat } else { t }.saturating_add(per_ns))
}

/// The GCRA state at the bucket's epoch for a bucket holding `level` token-units (the agent's
/// level, in the same reduced units): how the kernel continues the bucket the proxy drained.
#[inline(always)]
pub fn gcra_tat_for_level(level: u64, per_ns: u64, burst: u64) -> u64 {
    sat_mul(burst, per_ns).saturating_sub(level)
}

/// `a * b`, saturating. Not `u64::saturating_mul` (nor a division test, which LLVM turns
/// back into one): both need a 128-bit multiply, which the BPF backend cannot call
/// (`__multi3`). By bit lengths instead: `la + lb` bits never overflow 64 bits when at most
/// 64, always do when at least 66, and at 65 the half product `(a >> 1) * b` decides.
#[inline(always)]
pub fn sat_mul(a: u64, b: u64) -> u64 {
    let bits = (64 - a.leading_zeros()) + (64 - b.leading_zeros());
    if bits <= 64 {
        return a.wrapping_mul(b);
    }
    if bits >= 66 {
        return u64::MAX;
    }
    let half = (a >> 1).wrapping_mul(b); // < 2^64: its operands have 64 bits together
    if half >> 63 != 0 {
        return u64::MAX;
    }
    (half << 1).saturating_add(if a & 1 == 1 { b } else { 0 })
}

/// Endpoints an [`EndpointSet`] holds: a Service with more endpoints in service whose rule
/// has the agent pick stays on the proxy tier (`tier_reason::ENDPOINT_SELECTION`).
pub const MAX_KERNEL_ENDPOINTS: usize = 16;

/// Value of `SM_ENDPOINTS[VerdictKey { pod, Service VIP:port }]`: where connect4/6 sends a
/// kernel-tier connect to the VIP, for a Service whose Istio DestinationRule has the agent pick
/// the endpoint. The agent writes it whole whenever the endpoints in service change (slices,
/// an ejection, a return), from the same outlier pool the proxy uses; the kernel only
/// advances `cursor` (atomic). Round robin: least connections is the proxy's only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointSet {
    /// Round-robin position (kernel, fetch-and-add; taken modulo `count`).
    pub cursor: u64,
    /// Endpoints in `addrs` (1..=[`MAX_KERNEL_ENDPOINTS`]; an entry is never written empty).
    pub count: u32,
    pub _pad: u32,
    pub addrs: [SockAddr; MAX_KERNEL_ENDPOINTS],
}

/// Key of `SM_EP_RESULTS`: one endpoint of a Service, as one pod connected to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub netns_cookie: u64,
    /// The Service VIP:port the app connected to.
    pub vip: SockAddr,
    /// The endpoint connect4/6 sent it to.
    pub endpoint: SockAddr,
}

/// Value of `SM_EP_RESULTS`: what became of direct connects to one endpoint (`sock_ops`,
/// atomics), read by the agent every second and fed to the proxy's outlier pool. Totals, so
/// the agent reads differences; `consecutive` says how the last ones ended.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointResults {
    /// Handshakes completed.
    pub successes: u64,
    /// Handshakes that failed (SYN_SENT -> CLOSE: refused, unreachable, timed out).
    pub failures: u64,
    /// Failures since the last success.
    pub consecutive: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], Copy, no padding holes (explicit `_pad`, sizes checked in the
    // crate's tests), every bit pattern valid.
    unsafe impl aya::Pod for super::VerdictKey {}
    unsafe impl aya::Pod for super::Verdict {}
    unsafe impl aya::Pod for super::EndpointSet {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::EndpointResults {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence space a close leaves in the counters, by the state it closed from: the SYN
    /// always, and each FIN acked or received (observed on this kernel: a direct connection's
    /// `bytes_acked` was its payload + 2 after an orderly close).
    #[test]
    fn payload_bytes_takes_the_syn_and_the_fins_out() {
        // LAST_ACK (we closed second), FIN_WAIT2 and CLOSING (into TIME_WAIT): both FINs.
        for old in [9, 5, 11] {
            assert_eq!(
                payload_bytes(old, 100 + 2, 70 + 1),
                (100, 70),
                "state {old}"
            );
        }
        // CLOSE_WAIT then a reset or abort: the peer's FIN only.
        assert_eq!(payload_bytes(8, 100 + 1, 70 + 1), (100, 70));
        // ESTABLISHED (reset, idle-sweep abort), FIN_WAIT1 (our FIN never acked): the SYN.
        for old in [1, 4] {
            assert_eq!(payload_bytes(old, 100 + 1, 70), (100, 70), "state {old}");
        }
        // Never below zero, whatever the kernel reports.
        assert_eq!(payload_bytes(9, 0, 0), (0, 0));
    }

    #[test]
    fn sat_mul_is_saturating_mul() {
        let edges = [
            0,
            1,
            2,
            3,
            (1 << 31) - 1,
            1 << 31,
            1 << 32,
            (1 << 32) + 1,
            u64::MAX / 3,
            u64::MAX / 2,
            u64::MAX / 2 + 1,
            u64::MAX - 1,
            u64::MAX,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut samples = [0u64; 64];
        for s in samples.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *s = x >> (x % 64);
        }
        for a in edges.iter().chain(samples.iter()) {
            for b in edges.iter().chain(samples.iter()) {
                assert_eq!(sat_mul(*a, *b), a.saturating_mul(*b), "{a} * {b}");
            }
        }
    }

    #[test]
    fn a_full_bucket_passes_burst_then_one_per_period() {
        // 2 per 1000 ns (reduced: 1 per 500), burst 3.
        let (tokens, per, burst) = (1, 500, 3);
        let mut tat = gcra_tat_for_level(burst * per, per, burst);
        for _ in 0..3 {
            tat = gcra_take(tat, 0, tokens, per, burst).expect("burst");
        }
        assert_eq!(gcra_take(tat, 0, tokens, per, burst), None);
        assert_eq!(gcra_take(tat, 499, tokens, per, burst), None);
        tat = gcra_take(tat, 500, tokens, per, burst).expect("one token after a period");
        assert_eq!(gcra_take(tat, 500, tokens, per, burst), None);
    }

    #[test]
    fn a_long_quiet_spell_refills_at_most_the_burst() {
        let (tokens, per, burst) = (3, 1_000_000_000, 2);
        let mut tat = gcra_tat_for_level(0, per, burst);
        assert_eq!(gcra_take(tat, 0, tokens, per, burst), None);
        let late = 3_600_000_000_000;
        tat = gcra_take(tat, late, tokens, per, burst).expect("refilled");
        tat = gcra_take(tat, late, tokens, per, burst).expect("burst of 2");
        assert_eq!(gcra_take(tat, late, tokens, per, burst), None);
    }
}
