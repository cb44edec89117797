//! DNS capture: UDP to port 53 goes to the agent's DNS listener on the pod's loopback; the
//! original server is kept by (netns, source port) so the agent knows where to forward and
//! recvmsg() can show the reply as coming from that server.
use aya_ebpf::{
    bindings::{bpf_sock, sockaddr},
    helpers::{bpf_bind, bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use core::ptr::read_volatile;
use sockmesh_common::{
    counter,
    peer::{direction, peer_counter},
    socket_kind, DnsKey, SockAddr, SocketEntry, AF_INET, AF_INET6,
};

use crate::{
    addr::{redirect_to_loopback, user_addr, write_user_addr},
    capture::{capture, outbound_target, Captured, Target},
    maps::{DNS_ORIGINS, SOCKETS},
    util::*,
};

/// The kernel's default ephemeral range (net.ipv4.ip_local_port_range).
const EPHEMERAL_LO: u32 = 32768;
const EPHEMERAL_SPAN: u32 = 60999 - 32768 + 1;

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

fn dns_key(netns: u64, port_be: u16, family: u16) -> DnsKey {
    DnsKey {
        netns_cookie: netns,
        port: port_be,
        family,
        _pad: 0,
    }
}

/// connect() on UDP: the kernel picks the source port only after this hook, so bind one now
/// (a random ephemeral port on the wildcard address, as autobind would) and remember the
/// server under it. Returns that port (network order), or None if the socket must be left
/// alone.
#[inline(always)]
pub fn remember_connected(
    ctx: &SockAddrContext,
    sk: *const bpf_sock,
    v6: bool,
    netns: u64,
    dst: &SockAddr,
) -> Option<u16> {
    let mut port = unsafe { read_volatile(&(*sk).src_port) } as u16;
    let mut tries = 0;
    while port == 0 && tries < 4 {
        tries += 1;
        let candidate = (EPHEMERAL_LO + unsafe { bpf_get_prandom_u32() } % EPHEMERAL_SPAN) as u16;
        let rc = unsafe {
            if v6 {
                let mut a = SockaddrIn6 {
                    family: AF_INET6,
                    port: candidate.to_be(),
                    flowinfo: 0,
                    addr: [0; 4],
                    scope_id: 0,
                };
                bpf_bind(ctx.sock_addr, &mut a as *mut _ as *mut sockaddr, 28)
            } else {
                let mut a = SockaddrIn {
                    family: AF_INET,
                    port: candidate.to_be(),
                    addr: 0,
                    zero: [0; 8],
                };
                bpf_bind(ctx.sock_addr, &mut a as *mut _ as *mut sockaddr, 16)
            }
        };
        if rc == 0 {
            port = candidate;
        }
    }
    if port == 0 || !remember(netns, port, dst) {
        return None;
    }
    Some(port.to_be())
}

#[inline(always)]
fn remember(netns: u64, port: u16, dst: &SockAddr) -> bool {
    if DNS_ORIGINS
        .insert(&dns_key(netns, port.to_be(), dst.family), dst, 0)
        .is_err()
    {
        count(netns, counter::MAP_FULL);
        return false;
    }
    true
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sm_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, false);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sm_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, true);
    1
}

/// sendto() on an unconnected UDP socket (already autobound by the kernel at this point).
#[inline(always)]
fn sendmsg(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    let ty = unsafe { read_volatile(&(*sa).type_) };
    let dst = user_addr(sa, v6);
    // Only DNS: the sendmsg hooks leave every other datagram alone.
    let Some(target @ Target::Dns(_)) = outbound_target(ty, &dst) else {
        return;
    };
    let Some(Captured { netns, cfg, sk }) = capture(ctx, target) else {
        return;
    };
    let port = unsafe { read_volatile(&(*sk).src_port) } as u16;
    if port == 0 || !remember(netns, port, &dst) {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let entry = SocketEntry {
        origin: dst,
        key_port: port.to_be(),
        kind: socket_kind::DNS,
        ..Default::default()
    };
    let _ = SOCKETS.insert(&cookie, &entry, 0);
    redirect_to_loopback(sa, v6, dst.family, cfg.dns_port);
    count(netns, counter::REDIRECT_DNS);
    count_peer(netns, direction::OUTBOUND, &dst, peer_counter::REDIRECT_DNS);
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sm_recvmsg4(ctx: SockAddrContext) -> i32 {
    recvmsg(&ctx, false);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sm_recvmsg6(ctx: SockAddrContext) -> i32 {
    recvmsg(&ctx, true);
    1
}

/// A reply from the DNS listener is shown as coming from the server the app asked.
#[inline(always)]
fn recvmsg(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    let Some((netns, cfg, _pod)) = pod_for(ctx, sk) else {
        return;
    };
    let src = user_addr(sa, v6);
    if u16::from_be(src.port) != cfg.dns_port || !is_loopback(&src) {
        return;
    }
    let port = (unsafe { read_volatile(&(*sk).src_port) } as u16).to_be();
    if let Some(origin) = unsafe { DNS_ORIGINS.get(&dns_key(netns, port, src.family)) } {
        if write_user_addr(sa, v6, origin) {
            count(netns, counter::PEER_RESTORED);
        }
    }
}

/// Forget a released UDP socket's DNS origin (called from sock_release).
#[inline(always)]
pub fn forget(netns: u64, entry: &SocketEntry) {
    let _ = DNS_ORIGINS.remove(&dns_key(netns, entry.key_port, entry.origin.family));
}
