//! Addresses: loopback and v4-mapped tests, and the addresses in and out of the kernel's
//! contexts (the fields of a sock_addr context and of the `bpf_sock` it carries) as key
//! addresses ([`SockAddr`]). Used by the outbound, DNS and inbound programs and by `util`, and
//! below all of them: it imports no other module of the crate.
//!
//! Context memory is not ordinary memory: the verifier checks every access to it at load time
//! (offset, size, read or write allowed for the program type) and rewrites it into an access to
//! the kernel's own structure. Its address and port fields take only 4-byte accesses, so they are
//! read and written with volatile operations one word at a time (LLVM would otherwise merge neighbouring accesses
//! into one wider one, which the verifier refuses).
use aya_ebpf::{
    bindings::bpf_sock,
    programs::{SockAddrContext, SockoptContext},
};
use core::ptr::{read_volatile, write_volatile};
use sockmesh_common::{SockAddr, AF_INET};

/// 127.0.0.1 in network order as a u32 read on little endian.
pub const LOOPBACK4_BE: u32 = u32::from_be_bytes([127, 0, 0, 1]).to_be();
/// ::1 in network order.
pub const LOOPBACK6_BE: [u32; 4] = [0, 0, 0, 1u32.to_be()];
/// The ::ffff:0:0/96 prefix word (bytes 00 00 ff ff) as a u32 read on little endian.
pub const V4_MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();

/// The socket a sock_addr or sockopt program runs for: its context's `sk` field, the only thing
/// a `Sock` is made from. The verifier types that field PTR_TO_SOCKET: a non-null pointer to a
/// socket the kernel holds for the whole run of the program, whose `bpf_sock` fields the methods
/// below read (each read checked at load time against what the program type may read).
#[derive(Clone, Copy)]
pub struct Sock(*const bpf_sock);

impl Sock {
    #[inline(always)]
    pub fn of_sock_addr(ctx: &SockAddrContext) -> Sock {
        // SAFETY: `ctx.sock_addr` is the context pointer the kernel passed to this sock_addr
        // program; `sk` is a readable 8-byte field of it (verifier-checked).
        Sock(unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk })
    }

    #[inline(always)]
    pub fn of_sockopt(ctx: &SockoptContext) -> Sock {
        // SAFETY: `ctx.sockopt` is the context pointer the kernel passed to this sockopt
        // program; `sk` is a readable 8-byte field of it (verifier-checked).
        Sock(unsafe { (*ctx.sockopt).__bindgen_anon_1.sk })
    }

    /// The socket as the storage helpers take it (`SM_SOCK_STORE`).
    #[inline(always)]
    pub fn ptr(self) -> *mut aya_ebpf::cty::c_void {
        self.0 as *mut aya_ebpf::cty::c_void
    }

    /// Never true for a context's socket (PTR_TO_SOCKET is not nullable); the callers that
    /// checked it before this type existed still do.
    #[inline(always)]
    pub fn is_null(self) -> bool {
        self.0.is_null()
    }

    /// The bound local port, host order (0 while unbound), as the kernel stores it.
    #[inline(always)]
    pub fn src_port(self) -> u16 {
        // SAFETY: `self.0` is the context's live, non-null socket (see the type); `src_port`
        // is a readable 4-byte field of `bpf_sock`.
        unsafe { read_volatile(&(*self.0).src_port) as u16 }
    }

    /// The local address of the socket, as a key address.
    #[inline(always)]
    pub fn local(self) -> SockAddr {
        let port = self.src_port().to_be();
        // SAFETY: as in `src_port`; `family`, `src_ip4` and the words of `src_ip6` are readable
        // 4-byte fields, `src_ip6` borrowed only for `read_ip6`'s word-by-word volatile reads.
        unsafe {
            if read_volatile(&(*self.0).family) == AF_INET as u32 {
                SockAddr::v4(read_volatile(&(*self.0).src_ip4), port)
            } else {
                sockaddr6(read_ip6(&(*self.0).src_ip6), port)
            }
        }
    }

    /// The remote address of the socket, as a key address.
    #[inline(always)]
    pub fn remote(self) -> SockAddr {
        // SAFETY: as in `src_port`; `dst_port` (big-endian in its low 16 bits), `family`, `dst_ip4`
        // and the words of `dst_ip6` are readable 4-byte fields, `dst_ip6` borrowed only for
        // `read_ip6`'s word-by-word volatile reads.
        unsafe {
            let port = read_volatile(&(*self.0).dst_port);
            if read_volatile(&(*self.0).family) == AF_INET as u32 {
                SockAddr::v4(read_volatile(&(*self.0).dst_ip4), port)
            } else {
                sockaddr6(read_ip6(&(*self.0).dst_ip6), port)
            }
        }
    }
}

/// `SOCK_STREAM`, `SOCK_DGRAM`, ...: the type of the socket in a sock_addr context.
#[inline(always)]
pub fn sock_type(ctx: &SockAddrContext) -> u32 {
    // SAFETY: `ctx.sock_addr` is the kernel's context pointer for this program; `type_` is a
    // readable 4-byte field.
    unsafe { read_volatile(&(*ctx.sock_addr).type_) }
}

/// The destination (connect/sendmsg) or source (recvmsg/getpeername) in a sock_addr context.
#[inline(always)]
pub fn user_addr(ctx: &SockAddrContext, v6: bool) -> SockAddr {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel's context pointer for this program; `user_port`, `user_ip4`
    // and the words of `user_ip6` are readable 4-byte fields, `user_ip6` borrowed only for
    // `read_ip6`'s word-by-word volatile reads.
    unsafe {
        let port = read_volatile(&(*sa).user_port) as u16;
        if v6 {
            sockaddr6(read_ip6(&(*sa).user_ip6), port)
        } else {
            SockAddr::v4(read_volatile(&(*sa).user_ip4), port)
        }
    }
}

/// Context fields only take 4-byte accesses: read and write IPv6 words one by one.
#[inline(always)]
pub fn read_ip6(p: &[u32; 4]) -> [u32; 4] {
    // SAFETY: each `&p[i]` comes from a reference, so it is aligned and readable.
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
    // SAFETY: each `&mut p[i]` comes from a unique reference, so it is aligned and writable.
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
pub fn redirect_to_loopback(ctx: &SockAddrContext, v6: bool, family: u16, port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel's context pointer for this program, used by nothing else
    // while this runs; `user_ip4`, `user_port` and the words of `user_ip6` are 4-byte fields
    // a connect/sendmsg program may write (the verifier refuses the program otherwise).
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
pub fn write_user_addr(ctx: &SockAddrContext, v6: bool, addr: &SockAddr) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel's context pointer for this program, used by nothing else
    // while this runs; `user_ip4`, `user_port` and the words of `user_ip6` are 4-byte fields
    // a getpeername/recvmsg program may write (the verifier refuses the program otherwise).
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

#[inline(always)]
pub fn is_loopback4(addr_be: u32) -> bool {
    // First octet is the lowest byte of the network-order word on little endian.
    addr_be & 0xff == 127
}

#[inline(always)]
pub fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD
}

#[inline(always)]
pub fn is_loopback6(a: &[u32; 4]) -> bool {
    (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == LOOPBACK6_BE[3])
        || (is_v4_mapped(a) && is_loopback4(a[3]))
}

/// An IPv6 socket's address as a key address: v4-mapped addresses become IPv4, so both ends
/// of a connection (a dual-stack socket and an IPv4 listener) agree on the key.
#[inline(always)]
pub fn sockaddr6(a: [u32; 4], port_be: u16) -> SockAddr {
    if is_v4_mapped(&a) {
        SockAddr::v4(a[3], port_be)
    } else {
        SockAddr::v6(a, port_be)
    }
}

#[inline(always)]
pub fn is_loopback(dst: &SockAddr) -> bool {
    if dst.family == AF_INET {
        is_loopback4(dst.addr[0])
    } else {
        is_loopback6(&dst.addr)
    }
}
