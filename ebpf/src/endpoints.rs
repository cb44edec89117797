//! Endpoint picking on the kernel tier (an Istio DestinationRule has the agent pick a
//! Service's endpoint, see `sockmesh_common::fast::EndpointSet`): connect() to the Service's
//! address goes to the next endpoint in service, and each direct handshake's result is counted
//! for its endpoint, for the agent's outlier ejection.
use aya_ebpf::{
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use core::ptr::{read_volatile, write_volatile};
use sockmesh_common::{
    fast::{EndpointKey, EndpointResults, MAX_KERNEL_ENDPOINTS},
    SockAddr, AF_INET,
};

use crate::{
    addr::{sockaddr6, write_user_addr},
    fast::{direct_entry, fetch_add, opaque, verdict_key},
    maps::{ENDPOINTS, ENDPOINT_RESULTS},
    util::{netns_cookie, socket_cookie, BPF_NOEXIST},
};

/// A direct connect to a Service VIP whose endpoint the agent picks (an Istio
/// DestinationRule; `SM_ENDPOINTS` has the endpoints in service): rewritten to the next one,
/// round robin, as kube-proxy's DNAT would send it, but skipping what the agent ejected. The
/// socket's `SM_FAST_SOCKS` entry keeps the VIP as `origin`, so the peer's policy, counters
/// and the app's `getpeername()` stay the VIP's; the endpoint is the socket's remote address.
/// `v6`: connect6 (a constant per program: connect4 may not touch `user_ip6`).
#[inline(always)]
pub fn pick_endpoint(ctx: &SockAddrContext, v6: bool, netns: u64, dst: &SockAddr) {
    let Some(set) = ENDPOINTS.get_ptr_mut(&verdict_key(netns, dst)) else {
        return;
    };
    // SAFETY: `set` is a live `SM_ENDPOINTS` value (plain integers, valid for any bytes, the
    // cursor an aligned u64 changed only by the atomic); the agent rewrites an entry whole,
    // so a connect racing it may pick from the old list once.
    unsafe {
        let count = u64::from(read_volatile(&(*set).count));
        if count == 0 {
            return;
        }
        let turn = fetch_add(&raw mut (*set).cursor, 1);
        // Hidden from LLVM so the bounds check survives for the verifier (as `window_add`).
        let idx = opaque(turn % count) as usize;
        if idx >= MAX_KERNEL_ENDPOINTS {
            return;
        }
        let endpoint = read_volatile(&(*set).addrs[idx]);
        write_user_addr(ctx, v6, &endpoint);
    }
}

/// The VIP a direct socket's app connected to, if connect() sent it to a picked endpoint
/// instead (its peer `peer` is not its origin): what `getpeername()` shows, as after
/// kube-proxy's DNAT.
#[inline(always)]
pub fn picked_origin<C: EbpfContext>(ctx: &C, peer: &SockAddr) -> Option<SockAddr> {
    let entry = direct_entry(socket_cookie(ctx))?;
    (entry.origin != *peer).then_some(entry.origin)
}

/// sock_ops: a direct socket's handshake ended, `ok` (established) or not (SYN_SENT ->
/// CLOSE: refused, unreachable, timed out). If connect() sent it to a picked endpoint, the
/// result is counted for that endpoint (`SM_EP_RESULTS`), which the agent feeds to the
/// outlier pool the proxy shares. Call before [`on_end`], which forgets the socket.
#[inline(always)]
pub fn on_endpoint_result(ctx: &SockOpsContext, ok: bool) {
    let Some(entry) = direct_entry(socket_cookie(ctx)) else {
        return;
    };
    let port = (u32::from_be(ctx.remote_port()) as u16).to_be();
    let endpoint = if ctx.family() == u32::from(AF_INET) {
        SockAddr::v4(ctx.remote_ip4(), port)
    } else {
        sockaddr6(ctx.remote_ip6(), port)
    };
    if endpoint == entry.origin {
        return;
    }
    let key = EndpointKey {
        netns_cookie: netns_cookie(ctx),
        vip: entry.origin,
        endpoint,
    };
    if ENDPOINT_RESULTS.get_ptr_mut(&key).is_none() {
        let _ = ENDPOINT_RESULTS.insert(&key, &EndpointResults::default(), BPF_NOEXIST);
    }
    let Some(r) = ENDPOINT_RESULTS.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: live map memory, aligned u64 fields changed only with atomics, except the
    // plain store of 0 that ends a run of failures (racing at worst another socket's count).
    unsafe {
        if ok {
            fetch_add(&raw mut (*r).successes, 1);
            write_volatile(&raw mut (*r).consecutive, 0);
        } else {
            fetch_add(&raw mut (*r).failures, 1);
            fetch_add(&raw mut (*r).consecutive, 1);
        }
    }
}
