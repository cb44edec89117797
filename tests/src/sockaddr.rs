//! Raw socket-address plumbing: what the kernel hands back from getpeername, getsockname and
//! getsockopt(SO_ORIGINAL_DST), converted to `std::net::SocketAddr` and back.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h), at level `SOL_IP`.
pub const SO_ORIGINAL_DST: libc::c_int = 80;
/// `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv6/ip6_tables.h), at level `SOL_IPV6`.
pub const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// Parses a `sockaddr_in` / `sockaddr_in6` of `len` bytes. `None` for other families or a
/// length too short for the family (a kernel or hook returning a truncated address is a bug
/// tests should see, not paper over).
pub fn parse_sockaddr(
    storage: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: family and length say this storage holds a sockaddr_in, and
            // sockaddr_storage is large and aligned enough for it.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The inverse of [`parse_sockaddr`].
pub fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: storage is large and aligned enough for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

type NameFn =
    unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int;

fn sock_name(fd: &impl AsRawFd, f: NameFn, what: &str) -> io::Result<SocketAddr> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid fd and a buffer of the stated length.
    if unsafe {
        f(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    parse_sockaddr(&storage, len).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}: family {}", storage.ss_family),
        )
    })
}

/// getpeername(2) on `fd`, parsed: what an application sees as "the other end" (the
/// getpeername hooks rewrite this for redirected sockets).
pub fn getpeername(fd: &impl AsRawFd) -> io::Result<SocketAddr> {
    sock_name(fd, libc::getpeername, "getpeername")
}

/// getsockname(2) on `fd`, parsed.
pub fn getsockname(fd: &impl AsRawFd) -> io::Result<SocketAddr> {
    sock_name(fd, libc::getsockname, "getsockname")
}

/// The original destination of a redirected TCP connection, as a transparent proxy asks for it:
/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` for IPv4 sockets (including IPv4-mapped ones on a
/// dual-stack listener, as iptables REDIRECT expects) and `getsockopt(SOL_IPV6,
/// IP6T_SO_ORIGINAL_DST)` for IPv6. An error (ENOENT, ENOPROTOOPT) means nobody knows one.
pub fn original_dst(fd: &impl AsRawFd) -> io::Result<SocketAddr> {
    let local = getsockname(fd)?;
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let (level, opt) = if v4 {
        (libc::SOL_IP, SO_ORIGINAL_DST)
    } else {
        (libc::SOL_IPV6, IP6T_SO_ORIGINAL_DST)
    };
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid fd and a buffer of the stated length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    parse_sockaddr(&storage, len).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_ORIGINAL_DST: family {}", storage.ss_family),
        )
    })
}

/// Unwraps IPv4-mapped IPv6 addresses (what a dual-stack socket reports for IPv4 peers), so
/// tests can compare with the pod's IPv4 address directly.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_v4_and_v6() {
        for s in [
            "10.77.0.10:15001",
            "127.0.0.1:0",
            "[fd77::10]:443",
            "[::1]:15053",
            "[fe80::1%3]:80",
        ] {
            let a: SocketAddr = s.parse().unwrap();
            let (st, len) = to_sockaddr(&a);
            assert_eq!(parse_sockaddr(&st, len), Some(a), "{s}");
        }
    }

    #[test]
    fn wire_layout_is_network_order() {
        let (st, len) = to_sockaddr(&"1.2.3.4:258".parse().unwrap());
        assert_eq!(len as usize, size_of::<libc::sockaddr_in>());
        // SAFETY: just written as a sockaddr_in.
        let sin = unsafe { &*(&st as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
        assert_eq!(sin.sin_port.to_ne_bytes(), [1, 2]);
        assert_eq!(sin.sin_addr.s_addr.to_ne_bytes(), [1, 2, 3, 4]);
    }

    #[test]
    fn rejects_short_or_foreign() {
        let (st, len) = to_sockaddr(&"[::1]:1".parse().unwrap());
        assert_eq!(parse_sockaddr(&st, len - 1), None);
        let (mut st, len) = to_sockaddr(&"1.2.3.4:5".parse().unwrap());
        assert_eq!(parse_sockaddr(&st, 4), None);
        st.ss_family = libc::AF_UNIX as libc::sa_family_t;
        assert_eq!(parse_sockaddr(&st, len), None);
    }

    #[test]
    fn unmap_mapped() {
        assert_eq!(
            unmap("[::ffff:10.77.0.10]:80".parse().unwrap()),
            "10.77.0.10:80".parse().unwrap()
        );
        assert_eq!(
            unmap("[fd77::10]:80".parse().unwrap()),
            "[fd77::10]:80".parse().unwrap()
        );
    }

    #[test]
    fn names_of_a_real_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(getpeername(&s).unwrap(), l.local_addr().unwrap());
        assert_eq!(getsockname(&s).unwrap(), s.local_addr().unwrap());
        // No redirect happened: either nobody knows an original destination (no conntrack),
        // or conntrack reports the untranslated one, i.e. the address actually connected to.
        let (acc, _) = l.accept().unwrap();
        if let Ok(orig) = original_dst(&acc) {
            assert_eq!(orig, l.local_addr().unwrap());
        }
    }
}
