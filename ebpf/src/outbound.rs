//! Outbound capture: connect() to the in-pod listener, the origin kept per socket and per
//! 4-tuple, SO_ORIGINAL_DST and getpeername() answered from it.
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    helpers::bpf_set_retval,
    macros::{cgroup_sock_addr, cgroup_sockopt, sock_ops},
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::debug;
use core::ptr::{read_volatile, write_volatile};
use sockmesh_common::{
    counter,
    peer::{direction, peer_counter},
    socket_kind, SockAddr, SocketEntry, TupleKey, AF_INET,
};

use crate::{
    addr::{
        is_loopback, redirect_to_loopback, sock_type, sockaddr6, user_addr, write_user_addr, Sock,
        V4_MAPPED_WORD,
    },
    capture::{capture, outbound_target, Captured, Target},
    dns, endpoints,
    fast::{self, Police},
    maps::{CONFIG, INBOUND_PEERS, ORIGIN_BY_TUPLE},
    store::{insert_counted, remove_counted, Quota, Stored, SOCK_STORE},
    util::{count, count_peer, netns_cookie, pod_for},
};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST share the number.
const SO_ORIGINAL_DST: i32 = 80;

const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn sm_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn sm_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, true)
}

/// 1 lets connect() proceed (possibly rewritten); 0 fails it with the retval set here.
#[inline(always)]
fn connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let ty = sock_type(ctx);
    let dst = user_addr(ctx, v6);
    let Some(target) = outbound_target(ty, &dst) else {
        return 1;
    };
    let Some(Captured { netns, cfg, sk }) = capture(ctx, target) else {
        return 1;
    };
    let tcp = matches!(target, Target::Tcp(_));
    let (listen_port, redirected, per_peer) = if tcp {
        (
            cfg.outbound_port,
            counter::REDIRECT_TCP,
            peer_counter::REDIRECT,
        )
    } else {
        (
            cfg.dns_port,
            counter::REDIRECT_DNS,
            peer_counter::REDIRECT_DNS,
        )
    };
    if tcp {
        match fast::connect(ctx, netns, &dst) {
            Police::Proxy => {}
            // On the kernel tier: policed, and left alone to go direct (to the endpoint the
            // agent's DestinationRule picking chose, for such a Service).
            Police::Direct => {
                endpoints::pick_endpoint(ctx, v6, netns, &dst);
                return 1;
            }
            Police::Refuse => {
                // A verdict (breaker open, rate bucket empty) or the kernel tier's own
                // rate or cap: refuse now, without a round trip to the proxy.
                // SAFETY: takes a plain integer; connect programs may set the errno their 0
                // verdict returns (the verifier refuses the call in program types that may
                // not).
                unsafe { bpf_set_retval(-ECONNREFUSED) };
                return 0;
            }
        }
    }
    let mut entry = SocketEntry {
        origin: dst,
        kind: socket_kind::TCP_REDIRECT,
        ..Default::default()
    };
    if !tcp {
        // A DNS client's reply is matched by its source port, which connect() on UDP only
        // picks after this hook: pick one now.
        match dns::remember_connected(ctx, sk, v6, netns, cfg, &dst) {
            Ok(port_be) => entry.key_port = port_be,
            // The pod holds its quota of DNS origins: its connect() fails (EPERM).
            Err(Stored::OverQuota) => return 0,
            Err(_) => return 1,
        }
        entry.kind = socket_kind::DNS;
    }
    if !SOCK_STORE.set(sk.ptr(), &entry) {
        // Never redirect what could not be remembered: the proxy could not forward it.
        if !tcp {
            dns::forget(netns, &entry);
        }
        count(netns, counter::MAP_FULL);
        return 1;
    }
    redirect_to_loopback(ctx, v6, dst.family, listen_port);
    count(netns, redirected);
    count_peer(netns, direction::OUTBOUND, &dst, per_peer);
    debug!(
        ctx,
        "sockmesh: redirect netns={} port={}",
        netns,
        u16::from_be(dst.port)
    );
    1
}

#[sock_ops]
pub fn sm_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => fast::on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            endpoints::on_endpoint_result(&ctx, true);
            if !fast::on_established(&ctx) {
                on_established(&ctx)
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            if ctx.arg(0) == BPF_TCP_SYN_SENT {
                endpoints::on_endpoint_result(&ctx, false);
            }
            // SAFETY: `ops` is the context pointer the kernel passed to this sock_ops
            // program; `bytes_acked` and `bytes_received` are readable u64 fields.
            let bytes = unsafe { ((*ctx.ops).bytes_acked, (*ctx.ops).bytes_received) };
            fast::on_end(&ctx, Some(ctx.arg(0)), bytes);
            on_close(&ctx)
        }
        _ => {}
    }
    1
}

/// The (app addr, listener addr) key of a connection, seen from the app's socket.
#[inline(always)]
fn app_tuple(ctx: &SockOpsContext) -> TupleKey {
    let local_port = (ctx.local_port() as u16).to_be();
    let remote_port = (u32::from_be(ctx.remote_port()) as u16).to_be();
    let (src, dst) = if ctx.family() == AF_INET as u32 {
        (
            SockAddr::v4(ctx.local_ip4(), local_port),
            SockAddr::v4(ctx.remote_ip4(), remote_port),
        )
    } else {
        (
            sockaddr6(ctx.local_ip6(), local_port),
            sockaddr6(ctx.remote_ip6(), remote_port),
        )
    };
    TupleKey {
        netns_cookie: netns_cookie(ctx),
        src,
        dst,
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    // SAFETY: `ctx.ops` is the context pointer the kernel passed to this sock_ops program;
    // `sk` is a readable 8-byte field (the verifier types it a possibly-null socket, checked
    // below before any helper sees it).
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // Written by this socket's connect, which has returned; the socket's own storage, which
    // no other socket's insert can evict or reuse.
    let Some(entry) = SOCK_STORE.get(sk as *mut _) else {
        return;
    };
    if entry.kind != socket_kind::TCP_REDIRECT {
        return;
    }
    let key = app_tuple(ctx);
    let quota = CONFIG.get(0).map_or(0, |c| c.pod_origin_quota);
    // At its quota (or the map full), the pod's connection keeps no origin: the proxy finds
    // none and resets it. Counted against the pod (`origin_quota`) or as `map_full`.
    let stored = insert_counted(
        &ORIGIN_BY_TUPLE,
        &key,
        &entry.origin,
        key.netns_cookie,
        Quota::Origins,
        quota,
    );
    if stored != Stored::Yes {
        return;
    }
    // Ask for state changes so the tuple entry goes when the connection closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let key = app_tuple(ctx);
    remove_counted(&ORIGIN_BY_TUPLE, &key, key.netns_cookie, Quota::Origins);
}

/// SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST on the agent's accepted socket, answered like
/// iptables REDIRECT would: a sockaddr_in / sockaddr_in6 with the app's original destination.
#[cgroup_sockopt(getsockopt)]
pub fn sm_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: `so` is the context pointer the kernel passed to this sockopt program; `level`
    // and `optname` are readable 4-byte fields.
    let (level, optname) = unsafe { (read_volatile(&(*so).level), read_volatile(&(*so).optname)) };
    let v6 = match (level, optname) {
        (SOL_IP, SO_ORIGINAL_DST) => false,
        (SOL_IPV6, SO_ORIGINAL_DST) => true,
        _ => return 1,
    };
    let sk = Sock::of_sockopt(&ctx);
    if sk.is_null() {
        return 1;
    }
    let netns = netns_cookie(&ctx);
    let key = TupleKey {
        netns_cookie: netns,
        src: sk.remote(),
        dst: sk.local(),
    };
    // SAFETY: the value stays mapped while the program runs and `SockAddr` is plain
    // integers, valid for any bytes; it is only copied into optval. The entry goes when the
    // app's connection closes (sock_ops); the map allocates per insert, so an element is not
    // reused while this program holds it, and no pod can evict another's entry.
    let Some(origin) = (unsafe { ORIGIN_BY_TUPLE.get(&key) }) else {
        count(netns, counter::ORIGIN_MISS);
        return 1;
    };
    // SAFETY: `so` is the kernel's context pointer; `optval` and `optval_end` are readable
    // 8-byte fields (the verifier types them packet pointers: start and end of the kernel's
    // copy of the caller's optval buffer).
    let (optval, end) = unsafe {
        (
            (*so).__bindgen_anon_2.optval as *mut u8,
            (*so).__bindgen_anon_3.optval_end as *mut u8,
        )
    };
    let len: i32 = if v6 { 28 } else { 16 };
    // `wrapping_add`: for a buffer shorter than `len` the sum lies past its end, which `add`
    // would promise LLVM it does not; it is only compared with `end` here.
    if optval.is_null() || optval.wrapping_add(len as usize) > end {
        return 1;
    }
    // SAFETY: `optval..optval + len` was checked against `optval_end` just above, the packet
    // bounds check the verifier itself tracks (it refuses any store it cannot prove inside),
    // and the buffer is the kernel's copy of the caller's optval, the program's to fill.
    // Alignment: a kmalloc'ed buffer is 8-aligned, but for optlen <= 32 (16 and 28 here) the
    // kernel uses an on-stack `u8[32]` whose alignment it does not promise; a BPF store is a
    // plain machine store after JIT, which x86-64 and arm64 do unaligned, so the u16/u32
    // stores are correct there even though `write_volatile` documents aligned pointers.
    // `optlen` and `retval` are 4-byte fields a getsockopt program may write.
    unsafe {
        if v6 {
            let a = if origin.family == AF_INET {
                [0, 0, V4_MAPPED_WORD, origin.addr[0]]
            } else {
                origin.addr
            };
            write_volatile(optval as *mut u16, sockmesh_common::AF_INET6);
            write_volatile(optval.add(2) as *mut u16, origin.port);
            write_volatile(optval.add(4) as *mut u32, 0);
            write_volatile(optval.add(8) as *mut u32, a[0]);
            write_volatile(optval.add(12) as *mut u32, a[1]);
            write_volatile(optval.add(16) as *mut u32, a[2]);
            write_volatile(optval.add(20) as *mut u32, a[3]);
            write_volatile(optval.add(24) as *mut u32, 0);
        } else {
            if origin.family != AF_INET {
                return 1;
            }
            write_volatile(optval as *mut u16, AF_INET);
            write_volatile(optval.add(2) as *mut u16, origin.port);
            write_volatile(optval.add(4) as *mut u32, origin.addr[0]);
            write_volatile(optval.add(8) as *mut u32, 0);
            write_volatile(optval.add(12) as *mut u32, 0);
        }
        write_volatile(&mut (*so).optlen, len);
        write_volatile(&mut (*so).retval, 0);
    }
    count(netns, counter::ORIGIN_HIT);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn sm_getpeername4(ctx: SockAddrContext) -> i32 {
    getpeername(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn sm_getpeername6(ctx: SockAddrContext) -> i32 {
    getpeername(&ctx, true);
    1
}

/// Both directions of transparency: the app that connected sees its original destination;
/// the app that accepted from the agent sees the real client.
#[inline(always)]
fn getpeername(ctx: &SockAddrContext, v6: bool) {
    let Some((netns, cfg, _pod)) = pod_for(ctx) else {
        return;
    };
    let sk = Sock::of_sock_addr(ctx);
    let peer = user_addr(ctx, v6);
    if !is_loopback(&peer) {
        // A direct socket connect() sent to a picked endpoint shows its Service VIP.
        if let Some(vip) = endpoints::picked_origin(ctx, &peer) {
            if write_user_addr(ctx, v6, &vip) {
                count(netns, counter::PEER_RESTORED);
            }
        }
        return;
    }
    let port = u16::from_be(peer.port);
    if port == cfg.outbound_port || port == cfg.dns_port {
        // The socket's own storage, written by its own connect or bind before any
        // getpeername.
        if let Some(entry) = SOCK_STORE.get(sk.ptr()) {
            if entry.kind != socket_kind::BIND && write_user_addr(ctx, v6, &entry.origin) {
                count(netns, counter::PEER_RESTORED);
            }
            return;
        }
    }
    let key = TupleKey {
        netns_cookie: netns,
        src: peer,
        dst: sk.local(),
    };
    // SAFETY: mapped while the program runs, plain integers, only copied into the context.
    // The agent writes the entry before the accepted connection reaches the app and deletes
    // it when the connection ends; racing either, or an LRU reuse, the app could be shown
    // another client's address, nothing outside the map is read.
    if let Some(client) = unsafe { INBOUND_PEERS.get(&key) } {
        if write_user_addr(ctx, v6, client) {
            count(netns, counter::PEER_RESTORED);
        }
    }
}
