//! Inbound capture: an app's explicit wildcard TCP bind is recorded (`SM_IN_BINDS`) and the
//! agent is told; the bind itself is not changed. `sk_lookup` (steer.rs) then hands the
//! port's inbound connections to the agent, which forwards them to the app over loopback.
//! Socket release forgets the bind.
use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::debug;
use core::ptr::read_volatile;
use sockmesh_common::{
    counter, event_kind, socket_kind, BindKey, BindValue, Event, SocketEntry, AF_INET, AF_INET6,
};

use crate::{
    addr::{read_ip6, sock_type},
    capture::{capture, Captured, Target},
    dns,
    maps::{AGENT_SOCKETS, CONFIG, EVENTS, FOUND_BINDS, INBOUND_BINDS},
    store::{self, Quota, SOCK_STORE},
    util::{count, is_agent_socket, netns_cookie, socket_cookie, BPF_NOEXIST, SOCK_STREAM},
};

const EEXIST: i32 = 17;

/// 1 lets the bind proceed (unchanged), 0 fails it (EPERM): the pod holds its quota of
/// captured ports.
#[cgroup_sock_addr(bind4)]
pub fn sm_bind4(ctx: SockAddrContext) -> i32 {
    bind(&ctx, false) as i32
}

#[cgroup_sock_addr(bind6)]
pub fn sm_bind6(ctx: SockAddrContext) -> i32 {
    bind(&ctx, true) as i32
}

/// Whether the bind may proceed.
#[inline(always)]
fn bind(ctx: &SockAddrContext, v6: bool) -> bool {
    let sa = ctx.sock_addr;
    // bind4 fires for UDP and for port-0 binds too: only explicit TCP wildcard binds count.
    if sock_type(ctx) != SOCK_STREAM {
        return true;
    }
    // SAFETY: `sa` is the kernel's context pointer of this bind4/6 program; `user_port` is a
    // readable 4-byte field.
    let port = u16::from_be(unsafe { read_volatile(&(*sa).user_port) } as u16);
    if port == 0 {
        return true;
    }
    // SAFETY: as above; `user_ip4` and the words of `user_ip6` are readable 4-byte fields,
    // `user_ip6` borrowed only for `read_ip6`'s word-by-word volatile reads.
    let wildcard = unsafe {
        if v6 {
            read_ip6(&(*sa).user_ip6) == [0; 4]
        } else {
            read_volatile(&(*sa).user_ip4) == 0
        }
    };
    if !wildcard {
        return true;
    }
    let Some(Captured { netns, sk, .. }) = capture(ctx, Target::Bind(port)) else {
        return true;
    };
    // The bind itself is left alone: the app keeps its wildcard address. Recording the port
    // is all the capture is; `sk_lookup` steers its connections while the agent serves.
    let family = if v6 { AF_INET6 } else { AF_INET };
    let cookie = socket_cookie(ctx);
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
    // NOEXIST: the first socket to bind a port holds its entry until it is released. A
    // second bind of the port is one that is about to fail (EADDRINUSE: this hook runs before
    // the kernel checks) or one more socket of a SO_REUSEPORT group; taking the entry over
    // would let that socket's release end the capture of a port the first one still serves.
    // SAFETY: mapped while the program runs; only whether the key is there is read.
    if unsafe { INBOUND_BINDS.get(&key) }.is_some() {
        return true;
    }
    // A port more is one more entry of the pod's quota; past it the bind fails, so no port
    // of the pod is served unsteered (and so unpoliced) for want of an entry.
    let quota = CONFIG.get(0).map_or(0, |c| c.pod_bind_quota);
    if !store::take(netns, Quota::Binds, quota) {
        return false;
    }
    match INBOUND_BINDS.insert(
        &key,
        &BindValue {
            socket_cookie: cookie,
        },
        BPF_NOEXIST,
    ) {
        Ok(()) => {}
        Err(e) => {
            store::give(netns, Quota::Binds);
            if e != -EEXIST {
                count(netns, counter::MAP_FULL);
            }
            return true;
        }
    }
    if !SOCK_STORE.set(sk.ptr(), &entry) {
        // Without its socket entry the release could not forget the bind: do not keep it.
        store::remove_counted(&INBOUND_BINDS, &key, netns, Quota::Binds);
        count(netns, counter::MAP_FULL);
        return true;
    }
    send_event(netns, event_kind::BIND, family, port);
    count(netns, counter::BIND_CAPTURE);
    debug!(ctx, "sockmesh: bind captured netns={} port={}", netns, port);
    true
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
/// socket holding a captured bind goes away (its port is then no longer steered). (This hook
/// cannot read the socket's addresses: everything needed is in its storage, or, for a bind
/// the agent recorded at enrolment, in `SM_FOUND_BINDS`.)
///
/// Whether the pod is still enrolled does not matter: a socket released while no agent runs,
/// or after its pod was removed, must not leave its pod's port recorded as bound (a new agent
/// on the same pins would steer it, and the record would keep the port from the next bind).
#[cgroup_sock(sock_release)]
pub fn sm_sock_release(ctx: SockContext) -> i32 {
    let cookie = socket_cookie(&ctx);
    // Before the pod check: the agent's sockets outlive a pod's enrolment (connections
    // finishing after it left), and their entries must go with them all the same. The agent's
    // sockets are never captured, so there is nothing else to undo.
    if is_agent_socket(cookie) {
        let _ = AGENT_SOCKETS.remove(&cookie);
        return 1;
    }
    // A socket the kernel tier let go direct and whose handshake never started (no close
    // for sock_ops to see): give its slot back. An established one keeps its entry for the
    // sock_ops close, which has its byte counts (see `fast::on_end`).
    crate::fast::on_end(&ctx, None, (0, 0));
    let netns = netns_cookie(&ctx);
    // The socket's own storage (freed with it after this hook), else what the agent recorded
    // for it at enrolment.
    // Whether the bind hook made the socket's entry (and took one of the pod's quota for it),
    // or the agent did, at enrolment (counted by the agent, not in the quota).
    let mut hooked = true;
    let entry = match SOCK_STORE.get(ctx.sock as *mut _) {
        Some(e) => e,
        None => {
            hooked = false;
            // SAFETY: the value stays mapped while the program runs and `SocketEntry` is
            // plain integers, valid for any bytes; copied out at once. Only the agent writes
            // this map, and this socket's entry only before its release.
            let Some(found) = (unsafe { FOUND_BINDS.get(&cookie) }).copied() else {
                return 1;
            };
            let _ = FOUND_BINDS.remove(&cookie);
            found
        }
    };
    match entry.kind {
        socket_kind::DNS => dns::forget(netns, &entry),
        socket_kind::BIND => {
            let key = BindKey {
                netns_cookie: netns,
                port: entry.key_port,
                family: entry.family,
                _pad: 0,
            };
            // SAFETY: mapped while the program runs, plain integers. Only `socket_cookie` is
            // read, and compared with this socket's: a value rewritten meanwhile (another
            // socket's bind of the port) just fails the comparison.
            if let Some(v) = unsafe { INBOUND_BINDS.get(&key) } {
                if v.socket_cookie == cookie {
                    if hooked {
                        store::remove_counted(&INBOUND_BINDS, &key, netns, Quota::Binds);
                    } else {
                        let _ = INBOUND_BINDS.remove(&key);
                    }
                    send_event(netns, event_kind::UNBIND, entry.family, entry.key_port);
                }
            }
        }
        _ => {}
    }
    1
}
