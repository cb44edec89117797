//! The kernel tier of the fast path (see `sockmesh_common::fast`): connect() to a peer the
//! agent handed over is policed here (rate bucket, concurrency cap, connect timeout) and goes
//! direct; `sock_ops` counts what becomes of it (established, failed, timed out, closed, bytes)
//! and opens the breaker.
//!
//! The entry is shared by every CPU, so what connect() and `sock_ops` change in it is changed
//! with atomic instructions: fetch-and-add for `active` and `failures`, compare-and-swap for
//! the rate bucket (one u64, GCRA). There is no spin lock: a `bpf_spin_lock` needs the map's
//! BTF, which this toolchain cannot emit (see AYA-NOTES).
use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_SYN_SENT},
    helpers::{bpf_get_prandom_u32, bpf_setsockopt},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use core::arch::asm;
use core::ptr::{read_volatile, write_volatile};
use sockmesh_common::{
    counter,
    fast::{
        adaptive_fraction, gcra_take, payload_bytes, refusal, tier, Verdict, VerdictKey,
        ADAPTIVE_BUCKETS, LATENCY_RING,
    },
    peer::{direction, peer_counter},
    socket_kind, SockAddr, SocketEntry,
};

use crate::{
    maps::{CONFIG, FAST_SOCKETS, VERDICTS},
    store::{self, Quota, Stored},
    util::{count, count_peer, netns_cookie, now_ns, socket_cookie},
};

const SOL_TCP: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;
/// Tries at the rate bucket's compare-and-swap before giving up (the attempt is then refused
/// as over the rate: it lost to as many concurrent admissions, each of which took a token).
const CAS_TRIES: usize = 4;

/// What connect() does with a TCP connect to `dst`.
pub enum Police {
    /// No kernel-tier entry: the proxy tier (redirect) decides.
    Proxy,
    /// Policed and admitted: leave the destination alone, the connection goes direct.
    Direct,
    /// Refused (ECONNREFUSED): a current verdict, or the kernel tier's rate or cap.
    Refuse,
}

#[inline(always)]
pub fn verdict_key(netns: u64, dst: &SockAddr) -> VerdictKey {
    VerdictKey {
        netns_cookie: netns,
        peer: *dst,
        _pad: 0,
    }
}

// The atomics are written as BPF instructions (ISA v3, Linux >= 5.12, below the 5.15 sockmesh
// needs) because neither `core::sync::atomic` (no `atomic-cas` on bpfel) nor the intrinsics
// can produce them: rustc builds for the generic CPU, whose code generator refuses a
// fetch-and-add whose result is used, and aya-build sets the rustflags, so `target-cpu`
// cannot be changed. The verifier checks them like any other instruction.

/// Fetch-and-add on a u64 of a map value shared by every CPU (BPF_ATOMIC | BPF_FETCH).
///
/// # Safety
/// `p` points into a live map value, 8-aligned (every u64 field of `Verdict` is).
#[inline(always)]
pub(crate) unsafe fn fetch_add(p: *mut u64, v: u64) -> u64 {
    let mut old = v;
    // SAFETY: the caller's promise: `p` is valid, aligned map memory; the instruction reads
    // and writes those 8 bytes atomically and the old value lands in `old`.
    unsafe {
        asm!(
            "{old} = atomic_fetch_add((u64 *)({p} + 0), {old})",
            old = inout(reg) old,
            p = in(reg) p,
            options(nostack),
        );
    }
    old
}

/// `x`, as a value the compiler cannot reason about (a register move it cannot see through).
#[inline(always)]
pub(crate) fn opaque(mut x: u64) -> u64 {
    // SAFETY: one register-to-itself move: reads and writes nothing but the register.
    unsafe { asm!("{x} = {x}", x = inout(reg) x, options(nomem, nostack, preserves_flags)) };
    x
}

/// Compare-and-swap on a u64 of a map value (BPF_CMPXCHG): stores `new` iff it holds `old`.
///
/// # Safety
/// As [`fetch_add`].
#[inline(always)]
unsafe fn compare_swap(p: *mut u64, old: u64, new: u64) -> bool {
    let seen: u64;
    // SAFETY: as in `fetch_add`; the instruction compares with r0 and returns what it saw in r0.
    unsafe {
        asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {new})",
            p = in(reg) p,
            new = in(reg) new,
            inout("r0") old => seen,
            options(nostack),
        );
    }
    seen == old
}

/// The police of connect4/6 for a pod's TCP connect() to `dst`. The proxy tier's verdict
/// (refuse until a deadline) is honoured on both tiers; past it, an expired proxy-tier verdict
/// is deleted here, on the first connect() that sees it.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, netns: u64, dst: &SockAddr) -> Police {
    let key = verdict_key(netns, dst);
    let Some(v) = VERDICTS.get_ptr_mut(&key) else {
        return Police::Proxy;
    };
    let now = now_ns();
    // SAFETY: `v` points at a live value of `SM_VERDICTS` (map memory stays mapped while the
    // program runs), and `Verdict` is plain integers, valid for any bytes. The agent only
    // writes an entry whole or deletes it; were it rewritten or its LRU element reused while
    // this runs, this connect is policed against a mix of the old and new policy once.
    let (until, tier_now) = unsafe { (read_volatile(&(*v).until_ns), read_volatile(&(*v).tier)) };
    if until > now {
        count(netns, counter::FAST_REJECT);
        count_peer(netns, direction::OUTBOUND, dst, peer_counter::FAST_REJECT);
        // Throttled too, for the verdict's reason, as the proxy counts what it refuses.
        // SAFETY: as above, a plain integer read.
        match unsafe { read_volatile(&(*v).refusal) } {
            refusal::BREAKER => count_peer(
                netns,
                direction::OUTBOUND,
                dst,
                peer_counter::THROTTLED_BREAKER,
            ),
            refusal::RATE => count_peer(
                netns,
                direction::OUTBOUND,
                dst,
                peer_counter::THROTTLED_RATE,
            ),
            _ => {}
        }
        return Police::Refuse;
    }
    if tier_now != tier::KERNEL {
        // SAFETY: as above, a plain integer read.
        // An expired verdict goes, unless it is a breaker the kernel opened: that one waits
        // for the agent, which takes note (its own breaker goes half-open) and deletes it.
        if unsafe { read_volatile(&(*v).breaker_opened) } == 0 {
            let _ = VERDICTS.remove(&key);
        }
        return Police::Proxy;
    }
    // SAFETY: as above; `v` is 8-aligned map memory, so the atomics below act on whole,
    // aligned u64 fields.
    unsafe { kernel_tier(ctx, netns, dst, v, now) }
}

/// # Safety
/// `v` points at a live `SM_VERDICTS` value.
#[inline(always)]
unsafe fn kernel_tier(
    ctx: &SockAddrContext,
    netns: u64,
    dst: &SockAddr,
    v: *mut Verdict,
    now: u64,
) -> Police {
    // SAFETY: `v` is live map memory (the caller's promise); reads are of plain integers,
    // and `active`/`rate_tat` change only through atomics.
    unsafe {
        // The proxy's order: breaker (the verdict above), adaptive throttling, rate,
        // concurrency.
        if adaptive_refuses(v, now) {
            window_add(v, now, 1, 0);
            // While the breaker is closed (always, on this tier) a throttled attempt counts
            // toward it, as on the proxy.
            breaker_failure(netns, dst, v, now);
            return refuse(netns, dst, peer_counter::THROTTLED_ADAPTIVE);
        }
        let max = read_volatile(&(*v).max_conns);
        // The slot first, then the token: a connect refused for one keeps the other, as the
        // proxy refunds the token of an attempt the concurrency stage refused.
        let prev = fetch_add(&raw mut (*v).active, 1);
        if max != 0 && prev >= max {
            fetch_add(&raw mut (*v).active, u64::MAX);
            // Reported as the proxy would: the rate stage comes first there.
            let reason = if rate_has_token(v, now) {
                peer_counter::THROTTLED_CONCURRENCY
            } else {
                peer_counter::THROTTLED_RATE
            };
            return refuse(netns, dst, reason);
        }
        if !take_token(v, now) {
            fetch_add(&raw mut (*v).active, u64::MAX);
            return refuse(netns, dst, peer_counter::THROTTLED_RATE);
        }
        let entry = SocketEntry {
            origin: *dst,
            kind: socket_kind::FAST,
            started_ns: now,
            epoch_ns: read_volatile(&(*v).epoch_ns),
            ..Default::default()
        };
        // One of the pod's quota of direct sockets: past it (or the map full) the proxy
        // takes the connection, so one pod cannot take the kernel tier from the others.
        let quota = CONFIG.get(0).map_or(0, |c| c.pod_fast_quota);
        let cookie = socket_cookie(ctx);
        if store::insert_counted(&FAST_SOCKETS, &cookie, &entry, netns, Quota::Fast, quota)
            != Stored::Yes
        {
            // Untracked, its end could not give the slot back: let the proxy take it.
            fetch_add(&raw mut (*v).active, u64::MAX);
            return Police::Proxy;
        }
        let ms = read_volatile(&(*v).connect_timeout_ms);
        if ms != 0 {
            set_user_timeout(ctx.as_ptr(), ms);
        }
    }
    count_peer(netns, direction::OUTBOUND, dst, peer_counter::DIRECT);
    Police::Direct
}

#[inline(always)]
fn refuse(netns: u64, dst: &SockAddr, reason: usize) -> Police {
    // Refused in the kernel, like a verdict (`fast_rejects`), and why (`throttled`).
    count(netns, counter::FAST_REJECT);
    count_peer(netns, direction::OUTBOUND, dst, peer_counter::FAST_REJECT);
    count_peer(netns, direction::OUTBOUND, dst, reason);
    Police::Refuse
}

/// Whether the bucket has a token now, taking none.
///
/// # Safety
/// `v` points at a live `SM_VERDICTS` value.
#[inline(always)]
unsafe fn rate_has_token(v: *mut Verdict, now: u64) -> bool {
    // SAFETY: the caller's promise; plain integer reads.
    let (tokens, per, burst, epoch, tat) = unsafe {
        (
            read_volatile(&(*v).rate_tokens),
            read_volatile(&(*v).rate_per_ns),
            read_volatile(&(*v).rate_burst),
            read_volatile(&(*v).epoch_ns),
            read_volatile(&(*v).rate_tat),
        )
    };
    tokens == 0 || gcra_take(tat, now.saturating_sub(epoch), tokens, per, burst).is_some()
}

/// Takes one token from the peer's bucket (always true without a rate).
///
/// # Safety
/// `v` points at a live `SM_VERDICTS` value.
#[inline(always)]
unsafe fn take_token(v: *mut Verdict, now: u64) -> bool {
    // SAFETY: the caller's promise; plain integer reads, and `rate_tat` is changed only by
    // the compare-and-swap, so a concurrent admission makes ours retry, never lose a token.
    unsafe {
        let tokens = read_volatile(&(*v).rate_tokens);
        if tokens == 0 {
            return true;
        }
        let per = read_volatile(&(*v).rate_per_ns);
        let burst = read_volatile(&(*v).rate_burst);
        let elapsed = now.saturating_sub(read_volatile(&(*v).epoch_ns));
        for _ in 0..CAS_TRIES {
            let tat = read_volatile(&(*v).rate_tat);
            let Some(next) = gcra_take(tat, elapsed, tokens, per, burst) else {
                return false;
            };
            if compare_swap(&raw mut (*v).rate_tat, tat, next) {
                return true;
            }
        }
        false
    }
}

/// `TCP_USER_TIMEOUT` bounds the handshake: the SYN retransmission timer is clamped to it and
/// connect() fails with ETIMEDOUT when it runs out; `sock_ops` clears it once established, so
/// it never bounds the connection's later retransmissions.
#[inline(always)]
fn set_user_timeout(ctx: *mut core::ffi::c_void, ms: u32) {
    let mut val = ms as i32;
    // SAFETY: `ctx` is the running program's context (connect4/6 or sock_ops, both allowed
    // to call bpf_setsockopt on their TCP socket); `val` is a live 4-byte stack value and
    // the length passed is its size. A failure leaves the kernel's own SYN retries in force.
    unsafe {
        bpf_setsockopt(
            ctx,
            SOL_TCP,
            TCP_USER_TIMEOUT,
            &mut val as *mut i32 as *mut _,
            4,
        );
    }
}

/// This socket's entry, if connect() let it go direct.
#[inline(always)]
pub(crate) fn direct_entry(cookie: u64) -> Option<SocketEntry> {
    // SAFETY: mapped while the program runs, plain integers, copied out at once. The entry is
    // this socket's own (by cookie); an LRU element reused by another socket's insert could
    // hand back that socket's entry, whose kind is then checked like any other.
    let e = unsafe { FAST_SOCKETS.get(&cookie) }?;
    (e.kind == socket_kind::FAST).then_some(*e)
}

/// sock_ops TCP_CONNECT_CB: ask for state changes of a direct socket, so its failure and its
/// end are seen.
#[inline(always)]
pub fn on_connect(ctx: &SockOpsContext) {
    if direct_entry(socket_cookie(ctx)).is_some() {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// sock_ops ACTIVE_ESTABLISHED_CB of a direct socket: a connection, a success for the
/// breaker, and the handshake's timeout lifted. Returns whether the socket was one.
#[inline(always)]
pub fn on_established(ctx: &SockOpsContext) -> bool {
    let cookie = socket_cookie(ctx);
    let Some(entry) = direct_entry(cookie) else {
        return false;
    };
    if let Some(e) = FAST_SOCKETS.get_ptr_mut(&cookie) {
        // SAFETY: this socket's own live entry (map memory mapped while the program runs);
        // a plain store of a u32 flag its release reads.
        unsafe { write_volatile(&raw mut (*e).established, 1) };
    }
    let netns = netns_cookie(ctx);
    if let Some(v) = VERDICTS.get_ptr_mut(&verdict_key(netns, &entry.origin)) {
        // SAFETY: live map memory, an aligned u64: a plain store of 0 (consecutive failures
        // end with a success), racing at worst another socket's failure count.
        unsafe {
            if read_volatile(&(*v).epoch_ns) == entry.epoch_ns {
                let now = now_ns();
                write_volatile(&raw mut (*v).failures, 0);
                window_add(v, now, 1, 1);
                // The handshake's latency into the ring the agent samples (a slot written
                // while the agent reads it is read as the sample it held before).
                let us = (now.saturating_sub(entry.started_ns) / 1000).clamp(1, u32::MAX as u64);
                let seq = fetch_add(&raw mut (*v).latency_seq, 1);
                // Hidden from LLVM, so the bounds check stays for the verifier.
                let idx = opaque(seq % LATENCY_RING as u64) as usize;
                if idx < LATENCY_RING {
                    write_volatile(&raw mut (*v).latency_us[idx], us as u32);
                }
            }
            if read_volatile(&(*v).connect_timeout_ms) != 0 {
                set_user_timeout(ctx.as_ptr(), 0);
            }
        }
    }
    count_peer(
        netns,
        direction::OUTBOUND,
        &entry.origin,
        peer_counter::CONNS,
    );
    true
}

/// sock_ops STATE_CB to TCP_CLOSE (`old` is the state it left) or sock_release of a direct
/// socket: its end. The socket's entry is deleted first and only the call that deleted it
/// counts, so a connection ends once even though both hooks see it. An established socket
/// outlives its release (FIN exchange, TIME_WAIT): its end is left to the sock_ops close, which
/// has its byte counts.
#[inline(always)]
pub fn on_end<C: EbpfContext>(ctx: &C, old: Option<u32>, bytes: (u64, u64)) {
    let cookie = socket_cookie(ctx);
    let Some(entry) = direct_entry(cookie) else {
        return;
    };
    if old.is_none() && entry.established != 0 {
        return;
    }
    if FAST_SOCKETS.remove(&cookie).is_err() {
        return;
    }
    let netns = netns_cookie(ctx);
    store::give(netns, Quota::Fast);
    let peer = &entry.origin;
    let now = now_ns();
    let v = VERDICTS.get_ptr_mut(&verdict_key(netns, peer));
    let failed = old == Some(BPF_TCP_SYN_SENT);
    if failed {
        count_peer(
            netns,
            direction::OUTBOUND,
            peer,
            peer_counter::CONNECT_FAILURES,
        );
    } else if let Some(old) = old {
        count_peer(netns, direction::OUTBOUND, peer, peer_counter::CLOSED);
        let (out, inn) = payload_bytes(old, bytes.0, bytes.1);
        add_peer(netns, peer, peer_counter::BYTES_OUT, out);
        add_peer(netns, peer, peer_counter::BYTES_IN, inn);
    }
    let Some(v) = v else {
        return;
    };
    // SAFETY: live map memory (8-aligned u64 fields); only the entry that counted this socket
    // (same epoch) is changed, so an entry written after a reload is never pulled below zero.
    unsafe {
        if read_volatile(&(*v).epoch_ns) != entry.epoch_ns {
            return;
        }
        fetch_add(&raw mut (*v).active, u64::MAX);
        if !failed {
            return;
        }
        let ms = u64::from(read_volatile(&(*v).connect_timeout_ms));
        // A handshake that lasted (nearly) the whole connect timeout ran out of it; one
        // refused or unreachable ends well before.
        if ms != 0 && now.saturating_sub(entry.started_ns) >= ms * 900_000 {
            count_peer(
                netns,
                direction::OUTBOUND,
                peer,
                peer_counter::CONNECT_TIMEOUTS,
            );
        }
        window_add(v, now, 1, 0);
        breaker_failure(netns, peer, v, now);
    }
}

/// One more connect failure (or throttled attempt) in a row; at the threshold the kernel
/// opens the breaker and hands the peer back to the proxy.
///
/// # Safety
/// `v` points at a live `SM_VERDICTS` value.
#[inline(always)]
unsafe fn breaker_failure(netns: u64, peer: &SockAddr, v: *mut Verdict, now: u64) {
    // SAFETY: the caller's promise; aligned u64 fields, changed with atomics or plain stores.
    unsafe {
        let threshold = u64::from(read_volatile(&(*v).breaker_failures));
        let failures = fetch_add(&raw mut (*v).failures, 1) + 1;
        // `==`: exactly one failure opens it, however many race past the threshold.
        if threshold != 0 && failures == threshold {
            let open = read_volatile(&(*v).breaker_open_ns);
            write_volatile(&raw mut (*v).refusal, refusal::BREAKER);
            write_volatile(&raw mut (*v).until_ns, now.saturating_add(open));
            write_volatile(&raw mut (*v).breaker_opened, 1);
            // Back to the proxy: it refuses until `until_ns` (this entry, as a verdict), then
            // probes half-open, as it would have had the peer never left it.
            write_volatile(&raw mut (*v).tier, tier::PROXY);
            count_peer(
                netns,
                direction::OUTBOUND,
                peer,
                peer_counter::BREAKER_OPENED,
            );
        }
    }
}

/// Whether adaptive throttling refuses this attempt: the proxy's formula over the same
/// window, drawn with `bpf_get_prandom_u32`.
///
/// # Safety
/// `v` points at a live `SM_VERDICTS` value.
#[inline(always)]
unsafe fn adaptive_refuses(v: *mut Verdict, now: u64) -> bool {
    // SAFETY: the caller's promise; plain integer reads (a bucket being reset meanwhile is
    // read half old, half new: one draw against slightly off totals).
    unsafe {
        let k = read_volatile(&(*v).adaptive_k_milli);
        let width = read_volatile(&(*v).adaptive_bucket_ns);
        if k == 0 || width == 0 {
            return false;
        }
        let current = now / width;
        let (mut requests, mut accepts) = (0u64, 0u64);
        for i in 0..ADAPTIVE_BUCKETS {
            let b = &raw const (*v).window[i];
            let epoch = read_volatile(&(*b).epoch);
            if epoch <= current && current - epoch < ADAPTIVE_BUCKETS as u64 {
                requests = requests.saturating_add(read_volatile(&(*b).requests));
                accepts = accepts.saturating_add(read_volatile(&(*b).accepts));
            }
        }
        let (num, den) = adaptive_fraction(requests, accepts, k);
        // `checked_rem`: `den` is never 0, but a panic path the compiler keeps would not load.
        num != 0
            && u64::from(bpf_get_prandom_u32())
                .checked_rem(den)
                .is_some_and(|draw| draw < num)
    }
}

/// Adds to the current bucket of the adaptive window (resetting it first if it is stale).
///
/// # Safety
/// `v` points at a live `SM_VERDICTS` value.
#[inline(always)]
pub unsafe fn window_add(v: *mut Verdict, now: u64, requests: u64, accepts: u64) {
    // SAFETY: the caller's promise; aligned u64 fields. The reset is claimed by one CPU with
    // a compare-and-swap of the epoch; an add racing the claimant's zeroing may be lost (a
    // count, never memory).
    unsafe {
        let width = read_volatile(&(*v).adaptive_bucket_ns);
        if read_volatile(&(*v).adaptive_k_milli) == 0 || width == 0 {
            return;
        }
        let epoch = now / width;
        // Hidden from LLVM, so the bounds check below survives for the verifier, which does
        // not derive a range from `%`.
        let idx = opaque(epoch % ADAPTIVE_BUCKETS as u64) as usize;
        if idx >= ADAPTIVE_BUCKETS {
            return;
        }
        let b = &raw mut (*v).window[idx];
        let seen = read_volatile(&(*b).epoch);
        if seen < epoch && compare_swap(&raw mut (*b).epoch, seen, epoch) {
            write_volatile(&raw mut (*b).requests, 0);
            write_volatile(&raw mut (*b).accepts, 0);
        }
        if requests != 0 {
            fetch_add(&raw mut (*b).requests, requests);
        }
        if accepts != 0 {
            fetch_add(&raw mut (*b).accepts, accepts);
        }
    }
}

/// Adds `n` to a per-peer counter (bytes), creating the entry if needed.
#[inline(always)]
fn add_peer(netns: u64, peer: &SockAddr, idx: usize, n: u64) {
    if n != 0 {
        crate::util::add_peer(netns, direction::OUTBOUND, peer, idx, n);
    }
}
