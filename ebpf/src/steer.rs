//! Inbound steering: the `sk_lookup` program the agent attaches to each enrolled pod's network
//! namespace. When a connection (its SYN) arrives for a port an app of the pod bound on its
//! wildcard address (`SM_IN_BINDS`, written by the bind hook), the program hands it to the
//! agent's inbound listener of that pod (`SM_IN_LISTENERS`) instead of the app's socket. The
//! app keeps its own bind, so whenever the program does not steer, the kernel's usual lookup
//! finds the app: nothing is ever stranded behind a dead agent.
//!
//! This program lives in its own object (`bin/steer.rs`), loaded once per pod: `sk_lookup`
//! programs may not call `bpf_get_netns_cookie`, so each instance is told its pod's cookie as
//! a load-time constant, and has its own two-slot map of that pod's listeners.
//!
//! It does not steer, and the app gets the connection directly, when:
//! - the destination is a loopback address: the agent itself reaches the app that way, and a
//!   connection from inside the pod to its own loopback was never captured;
//! - the pod is not (or no longer) enrolled, or its inbound capture is off;
//! - no app bound the port on a wildcard address (of the packet's family, or a dual-stack
//!   IPv6 bind for an IPv4 packet);
//! - the agent's heartbeat is stale (hung or dead agent, counted `bypass_stale`);
//! - the agent has no listener in the map: it never had one, or its listener closed (the
//!   kernel drops a closed socket from the map), e.g. the agent was killed;
//! - another program attached to the namespace already chose a socket.
use aya_ebpf::{
    bindings::sk_action,
    macros::{map, sk_lookup},
    maps::SockMap,
    programs::SkLookupContext,
};
use core::ptr::read_volatile;
use sockmesh_common::{
    counter, pod_flags,
    steer::{SLOTS, V4, V6},
    BindKey, AF_INET, AF_INET6, SCHEMA_VERSION,
};

use crate::{
    addr::{is_loopback4, is_loopback6, read_ip6},
    maps::{CONFIG, INBOUND_BINDS, PODS},
    util::{count, now_ns},
};

const IPPROTO_TCP: u32 = 6;

/// This instance's pod (netns cookie), set by the agent when it loads the instance
/// (`steer::POD_NETNS_COOKIE`); read-only once loaded.
#[unsafe(no_mangle)]
static POD_NETNS_COOKIE: u64 = 0;

/// The pod's inbound listeners: slot `V4` takes IPv4 connections, `V6` IPv6 ones. Not pinned:
/// each instance (each pod, each agent) has its own.
#[map(name = "SM_IN_LISTENERS")]
pub static IN_LISTENERS: SockMap = SockMap::with_max_entries(SLOTS, 0);

#[sk_lookup]
pub fn sm_sk_lookup(ctx: SkLookupContext) -> u32 {
    steer(&ctx);
    // Always PASS: with a socket assigned the connection goes to it, without one the kernel
    // carries on with its usual lookup. Never DROP: the mesh never refuses what the app would
    // have taken.
    sk_action::SK_PASS
}

#[inline(always)]
fn steer(ctx: &SkLookupContext) {
    let l = ctx.lookup;
    // SAFETY: `l` is the context pointer the kernel passed to this sk_lookup program;
    // `protocol`, `family`, `local_ip4`, the words of `local_ip6` and `local_port` are readable
    // 4-byte fields (verifier-checked), `local_ip6` borrowed only for `read_ip6`'s word-by-word
    // volatile reads.
    let (protocol, family, port, loopback) = unsafe {
        let family = read_volatile(&(*l).family);
        let loopback = if family == AF_INET as u32 {
            is_loopback4(read_volatile(&(*l).local_ip4))
        } else {
            is_loopback6(&read_ip6(&(*l).local_ip6))
        };
        (
            read_volatile(&(*l).protocol),
            family as u16,
            read_volatile(&(*l).local_port) as u16,
            loopback,
        )
    };
    if protocol != IPPROTO_TCP || loopback {
        return;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    if cfg.schema_version != SCHEMA_VERSION {
        return;
    }
    // SAFETY: a plain u64 in the object's read-only data, which the loader set before the
    // program was loaded; volatile so the compiler reads the loaded value, not the 0 above.
    let netns = unsafe { read_volatile(&POD_NETNS_COOKIE) };
    // SAFETY: mapped while the program runs, plain integers; only `flags` is read. A pod
    // unenrolled meanwhile makes this one connection steered or not, nothing else.
    let Some(pod) = (unsafe { PODS.get(netns) }) else {
        return;
    };
    if !pod.has(pod_flags::INBOUND) || !app_bound(netns, port, family) {
        return;
    }
    if cfg.is_stale(now_ns()) {
        count(netns, counter::BYPASS_STALE);
        return;
    }
    let slot = if family == AF_INET { V4 } else { V6 };
    // Flags 0: a socket another program already chose stays chosen (-EEXIST here).
    if IN_LISTENERS.redirect_sk_lookup(ctx, slot, 0).is_ok() {
        count(netns, counter::INBOUND_STEERED);
    }
}

/// Whether an app of the pod holds a wildcard bind of `port` that takes connections of
/// `family`: a bind of that family, or for IPv4 a dual-stack `[::]` bind too. (An IPv6-only
/// `[::]` socket is recorded the same way; the agent's connection to it over IPv4 is then
/// refused and the client reset, as it would have been refused without the mesh.)
#[inline(always)]
fn app_bound(netns: u64, port: u16, family: u16) -> bool {
    let key = |family| BindKey {
        netns_cookie: netns,
        port,
        family,
        _pad: 0,
    };
    INBOUND_BINDS.get_ptr(key(family)).is_some()
        || (family == AF_INET && INBOUND_BINDS.get_ptr(key(AF_INET6)).is_some())
}
