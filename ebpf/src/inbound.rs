//! Inbound capture: an app's wildcard TCP bind is moved to loopback and the agent is told, so
//! it listens on the pod's address and forwards to the app; socket release cleans up.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use core::ptr::{read_volatile, write_volatile};
use sockmesh_common::{
    counter, event_kind, socket_kind, BindKey, BindValue, Event, SocketEntry, AF_INET, AF_INET6,
};

use crate::{
    addr::read_ip6,
    capture::{capture, Captured, Target},
    dns,
    maps::{EVENTS, INBOUND_BINDS, PODS, SOCKETS},
    util::*,
};

#[cgroup_sock_addr(bind4)]
pub fn sm_bind4(ctx: SockAddrContext) -> i32 {
    bind(&ctx, false);
    1
}

#[cgroup_sock_addr(bind6)]
pub fn sm_bind6(ctx: SockAddrContext) -> i32 {
    bind(&ctx, true);
    1
}

#[inline(always)]
fn bind(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    // bind4 fires for UDP and for port-0 binds too: only explicit TCP wildcard binds count.
    if unsafe { read_volatile(&(*sa).type_) } != SOCK_STREAM {
        return;
    }
    let port = u16::from_be(unsafe { read_volatile(&(*sa).user_port) } as u16);
    if port == 0 {
        return;
    }
    let wildcard = if v6 {
        read_ip6(unsafe { &(*sa).user_ip6 }) == [0; 4]
    } else {
        (unsafe { read_volatile(&(*sa).user_ip4) }) == 0
    };
    if !wildcard {
        return;
    }
    let Some(Captured { netns, .. }) = capture(ctx, Target::Bind(port)) else {
        return;
    };
    unsafe {
        if v6 {
            let p = &mut (*sa).user_ip6;
            write_volatile(&mut p[0], 0);
            write_volatile(&mut p[1], 0);
            write_volatile(&mut p[2], 0);
            write_volatile(&mut p[3], LOOPBACK6_BE[3]);
        } else {
            write_volatile(&mut (*sa).user_ip4, LOOPBACK4_BE);
        }
    }
    let family = if v6 { AF_INET6 } else { AF_INET };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = BindKey {
        netns_cookie: netns,
        port,
        family,
        _pad: 0,
    };
    let entry = SocketEntry {
        key_port: port,
        kind: socket_kind::BIND,
        family,
        ..Default::default()
    };
    if INBOUND_BINDS
        .insert(
            &key,
            &BindValue {
                socket_cookie: cookie,
            },
            0,
        )
        .is_err()
        || SOCKETS.insert(&cookie, &entry, 0).is_err()
    {
        count(netns, counter::MAP_FULL);
    }
    send_event(netns, event_kind::BIND, family, port);
    count(netns, counter::BIND_CAPTURE);
    debug!(ctx, "sockmesh: bind captured netns={} port={}", netns, port);
}

#[inline(always)]
fn send_event(netns: u64, kind: u32, family: u16, port: u16) {
    let ev = Event {
        kind,
        family,
        port,
        netns_cookie: netns,
    };
    if EVENTS.output::<Event>(&ev, 0).is_err() {
        count(netns, counter::EVENT_LOST);
    }
}

/// Socket release: drop what the programs kept for this socket, and tell the agent when the
/// socket holding a captured bind goes away. (This hook cannot read the socket's addresses:
/// everything needed is in its `SM_SOCKETS` entry.)
#[cgroup_sock(sock_release)]
pub fn sm_sock_release(ctx: SockContext) -> i32 {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if unsafe { PODS.get(&netns) }.is_none() {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(entry) = (unsafe { SOCKETS.get(&cookie) }) else {
        return 1;
    };
    match entry.kind {
        socket_kind::DNS => dns::forget(netns, entry),
        socket_kind::BIND => {
            let key = BindKey {
                netns_cookie: netns,
                port: entry.key_port,
                family: entry.family,
                _pad: 0,
            };
            if let Some(v) = unsafe { INBOUND_BINDS.get(&key) } {
                if v.socket_cookie == cookie {
                    let _ = INBOUND_BINDS.remove(&key);
                    send_event(netns, event_kind::UNBIND, entry.family, entry.key_port);
                }
            }
        }
        _ => {}
    }
    let _ = SOCKETS.remove(&cookie);
    1
}
