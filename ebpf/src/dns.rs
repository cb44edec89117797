//! DNS capture: UDP to port 53 goes to the agent's DNS listener on the pod's loopback; the
//! original server is kept by (netns, source port) so the agent knows where to forward and
//! recvmsg() can show the reply as coming from that server.
use aya_ebpf::{
    bindings::sockaddr,
    helpers::{bpf_bind, bpf_get_prandom_u32},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use core::mem::size_of;
use sockmesh_common::{
    counter,
    peer::{direction, peer_counter},
    socket_kind, DnsKey, GlobalConfig, SockAddr, SocketEntry, AF_INET, AF_INET6,
};

use crate::{
    addr::{is_loopback, redirect_to_loopback, sock_type, user_addr, write_user_addr, Sock},
    capture::{capture, outbound_target, Captured, Target},
    maps::DNS_ORIGINS,
    store::{insert_counted, remove_counted, Quota, Stored, SOCK_STORE},
    util::{count, count_peer, pod_for},
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

// The lengths handed to bpf_bind below.
const _: () = assert!(size_of::<SockaddrIn>() == 16 && size_of::<SockaddrIn6>() == 28);

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
/// server under it. Returns that port (network order); `Err(OverQuota)` if the pod holds its
/// quota of DNS origins (refuse the connect), another `Err` if the socket must be left alone.
#[inline(always)]
pub fn remember_connected(
    ctx: &SockAddrContext,
    sk: Sock,
    v6: bool,
    netns: u64,
    cfg: &GlobalConfig,
    dst: &SockAddr,
) -> Result<u16, Stored> {
    let mut port = sk.src_port();
    let mut tries = 0;
    while port == 0 && tries < 4 {
        tries += 1;
        // SAFETY: no arguments, no preconditions.
        let random = unsafe { bpf_get_prandom_u32() };
        let candidate = (EPHEMERAL_LO + random % EPHEMERAL_SPAN) as u16;
        // SAFETY: `ctx.sock_addr` is the kernel's context pointer of this connect4/6 program
        // (the only programs calling this, and the only ones the verifier lets call bpf_bind);
        // `a` is a sockaddr_in(6) on this stack frame, live across the call, exactly the
        // length passed (asserted above), and the helper only reads it.
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
    if port == 0 {
        return Err(Stored::Full);
    }
    match remember(netns, cfg, port, dst) {
        Stored::Yes => Ok(port.to_be()),
        other => Err(other),
    }
}

/// The server of the pod's DNS socket bound to `port` (host order), against the pod's quota
/// (a socket sending again only refreshes its entry).
#[inline(always)]
fn remember(netns: u64, cfg: &GlobalConfig, port: u16, dst: &SockAddr) -> Stored {
    insert_counted(
        &DNS_ORIGINS,
        &dns_key(netns, port.to_be(), dst.family),
        dst,
        netns,
        Quota::Dns,
        cfg.pod_dns_quota,
    )
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sm_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sm_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, true)
}

/// sendto() on an unconnected UDP socket (already autobound by the kernel at this point).
/// 1 lets it proceed (possibly rewritten); 0 fails it (EPERM): the pod holds its quota of
/// DNS origins.
#[inline(always)]
fn sendmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    let ty = sock_type(ctx);
    let dst = user_addr(ctx, v6);
    // Only DNS: the sendmsg hooks leave every other datagram alone.
    let Some(target @ Target::Dns(_)) = outbound_target(ty, &dst) else {
        return 1;
    };
    let Some(Captured { netns, cfg, sk }) = capture(ctx, target) else {
        return 1;
    };
    let port = sk.src_port();
    if port == 0 {
        return 1;
    }
    match remember(netns, cfg, port, &dst) {
        Stored::Yes => {}
        Stored::OverQuota => return 0,
        Stored::Full => return 1,
    }
    let entry = SocketEntry {
        origin: dst,
        key_port: port.to_be(),
        kind: socket_kind::DNS,
        ..Default::default()
    };
    if !SOCK_STORE.set(sk.ptr(), &entry) {
        // Without its entry the socket's release could not forget the origin: go direct.
        forget(netns, &entry);
        count(netns, counter::MAP_FULL);
        return 1;
    }
    redirect_to_loopback(ctx, v6, dst.family, cfg.dns_port);
    count(netns, counter::REDIRECT_DNS);
    count_peer(netns, direction::OUTBOUND, &dst, peer_counter::REDIRECT_DNS);
    1
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
    let Some((netns, cfg, _pod)) = pod_for(ctx) else {
        return;
    };
    let sk = Sock::of_sock_addr(ctx);
    let src = user_addr(ctx, v6);
    if u16::from_be(src.port) != cfg.dns_port || !is_loopback(&src) {
        return;
    }
    let port = sk.src_port().to_be();
    // SAFETY: the value stays mapped while the program runs and `SockAddr` is plain integers,
    // valid for any bytes; it is only copied into the context. The map allocates per insert,
    // so the element is not reused while this program holds it; no pod can evict it.
    if let Some(origin) = unsafe { DNS_ORIGINS.get(&dns_key(netns, port, src.family)) } {
        if write_user_addr(ctx, v6, origin) {
            count(netns, counter::PEER_RESTORED);
        }
    }
}

/// Forget a released UDP socket's DNS origin (called from sock_release).
#[inline(always)]
pub fn forget(netns: u64, entry: &SocketEntry) {
    remove_counted(
        &DNS_ORIGINS,
        &dns_key(netns, entry.key_port, entry.origin.family),
        netns,
        Quota::Dns,
    );
}
