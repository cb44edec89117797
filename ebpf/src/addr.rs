//! Addresses in and out of the kernel's contexts: the `user_*` fields of a sock_addr context
//! and the addresses of a `bpf_sock`, as key addresses ([`SockAddr`]). Shared by the outbound,
//! DNS and inbound programs, and below all of them: it imports only `util`.
use aya_ebpf::bindings::{bpf_sock, bpf_sock_addr};
use core::ptr::{read_volatile, write_volatile};
use sockmesh_common::{SockAddr, AF_INET};

use crate::util::{sockaddr6, LOOPBACK4_BE, LOOPBACK6_BE, V4_MAPPED_WORD};

/// The destination (connect/sendmsg) or source (recvmsg/getpeername) in a sock_addr context.
#[inline(always)]
pub fn user_addr(sa: *mut bpf_sock_addr, v6: bool) -> SockAddr {
    let port = unsafe { read_volatile(&(*sa).user_port) } as u16;
    if v6 {
        let p = unsafe { &(*sa).user_ip6 };
        sockaddr6(read_ip6(p), port)
    } else {
        SockAddr::v4(unsafe { read_volatile(&(*sa).user_ip4) }, port)
    }
}

/// Context fields only take 4-byte accesses: read and write IPv6 words one by one.
#[inline(always)]
pub fn read_ip6(p: &[u32; 4]) -> [u32; 4] {
    unsafe {
        [
            read_volatile(&p[0]),
            read_volatile(&p[1]),
            read_volatile(&p[2]),
            read_volatile(&p[3]),
        ]
    }
}

#[inline(always)]
fn write_ip6(p: &mut [u32; 4], a: [u32; 4]) {
    unsafe {
        write_volatile(&mut p[0], a[0]);
        write_volatile(&mut p[1], a[1]);
        write_volatile(&mut p[2], a[2]);
        write_volatile(&mut p[3], a[3]);
    }
}

/// Point the socket at the agent's listener on the pod's own loopback. A dual-stack socket
/// heading for an IPv4 address (v4-mapped) goes to ::ffff:127.0.0.1, the IPv4 listener.
#[inline(always)]
pub fn redirect_to_loopback(sa: *mut bpf_sock_addr, v6: bool, family: u16, port: u16) {
    unsafe {
        if v6 {
            let lo = if family == AF_INET {
                [0, 0, V4_MAPPED_WORD, LOOPBACK4_BE]
            } else {
                LOOPBACK6_BE
            };
            write_ip6(&mut (*sa).user_ip6, lo);
        } else {
            write_volatile(&mut (*sa).user_ip4, LOOPBACK4_BE);
        }
        write_volatile(&mut (*sa).user_port, port.to_be() as u32);
    }
}

/// Show `addr` to the app (getpeername/recvmsg). An IPv4 address shown to an IPv6 socket is
/// v4-mapped; an IPv6 address cannot be shown to an IPv4 socket and is left alone.
#[inline(always)]
pub fn write_user_addr(sa: *mut bpf_sock_addr, v6: bool, addr: &SockAddr) -> bool {
    unsafe {
        if v6 {
            let a = if addr.family == AF_INET {
                [0, 0, V4_MAPPED_WORD, addr.addr[0]]
            } else {
                addr.addr
            };
            write_ip6(&mut (*sa).user_ip6, a);
        } else if addr.family == AF_INET {
            write_volatile(&mut (*sa).user_ip4, addr.addr[0]);
        } else {
            return false;
        }
        write_volatile(&mut (*sa).user_port, addr.port as u32);
    }
    true
}

/// The local address of a socket, as a key address.
#[inline(always)]
pub fn sock_local(sk: *const bpf_sock) -> SockAddr {
    unsafe {
        let port = (read_volatile(&(*sk).src_port) as u16).to_be();
        if read_volatile(&(*sk).family) == AF_INET as u32 {
            SockAddr::v4(read_volatile(&(*sk).src_ip4), port)
        } else {
            sockaddr6(read_ip6(&(*sk).src_ip6), port)
        }
    }
}

/// The remote address of a socket, as a key address.
#[inline(always)]
pub fn sock_remote(sk: *const bpf_sock) -> SockAddr {
    unsafe {
        let port = read_volatile(&(*sk).dst_port);
        if read_volatile(&(*sk).family) == AF_INET as u32 {
            SockAddr::v4(read_volatile(&(*sk).dst_ip4), port)
        } else {
            sockaddr6(read_ip6(&(*sk).dst_ip6), port)
        }
    }
}
