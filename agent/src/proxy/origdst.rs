//! SO_ORIGINAL_DST: the same question a proxy behind iptables REDIRECT asks; here the kernel
//! programs answer it.
use std::{
    io,
    net::{SocketAddr, SocketAddrV6},
    os::fd::AsFd,
};

use socket2::{SockAddr, SockRef};

/// The destination the app originally connected to, for a connection accepted on a listener
/// of the given family: getsockopt(SOL_IP, SO_ORIGINAL_DST), or (SOL_IPV6,
/// IP6T_SO_ORIGINAL_DST) for IPv6.
pub fn original_dst(sock: &impl AsFd, ipv6: bool) -> io::Result<SocketAddr> {
    let sock = SockRef::from(sock);
    let answer = if ipv6 {
        sock.original_dst_ipv6()
    } else {
        sock.original_dst()
    }?;
    from_answer(&answer)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad SO_ORIGINAL_DST answer"))
}

/// The address in a getsockopt answer: an IPv4 or IPv6 one at least up to its address bytes.
/// A v4-mapped IPv6 answer means the app used a dual-stack socket for an IPv4 peer: that
/// peer's IPv4 address. Only the address and port count (no flow info, no scope).
fn from_answer(a: &SockAddr) -> Option<SocketAddr> {
    // Family (2 bytes), port (2), then the address: 4 bytes from offset 4 in a sockaddr_in,
    // 16 from offset 8 in a sockaddr_in6.
    let needed = match i32::from(a.family()) {
        libc::AF_INET => 8,
        libc::AF_INET6 => 24,
        _ => return None,
    };
    if (a.len() as usize) < needed {
        return None;
    }
    Some(match a.as_socket()? {
        SocketAddr::V6(v6) => unmapped(v6),
        v4 => v4,
    })
}

fn unmapped(a: SocketAddrV6) -> SocketAddr {
    match a.ip().to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(v4.into(), a.port()),
        None => SocketAddr::new((*a.ip()).into(), a.port()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

    use super::*;

    #[test]
    fn parses_sockaddr_in_and_in6() {
        let v4 = SockAddr::from(SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 11), 8080));
        assert_eq!(
            from_answer(&v4),
            Some("10.77.0.11:8080".parse().expect("addr"))
        );

        let ip6 = "fd77::b".parse::<Ipv6Addr>().expect("ip");
        let v6 = SockAddr::from(SocketAddrV6::new(ip6, 443, 0, 0));
        assert_eq!(
            from_answer(&v6),
            Some("[fd77::b]:443".parse().expect("addr"))
        );
        // Flow info and scope are not part of the destination.
        let v6 = SockAddr::from(SocketAddrV6::new(ip6, 443, 7, 3));
        assert_eq!(
            from_answer(&v6),
            Some("[fd77::b]:443".parse().expect("addr"))
        );

        let mapped = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped();
        let v6 = SockAddr::from(SocketAddrV6::new(mapped, 443, 0, 0));
        assert_eq!(
            from_answer(&v6),
            Some("10.0.0.1:443".parse().expect("addr"))
        );

        let mut short = v4;
        // SAFETY: shortening the length only: every byte it still covers is initialised.
        unsafe { short.set_length(5) };
        assert_eq!(from_answer(&short), None);
        let other = SockAddr::unix("/x").expect("a unix address");
        assert_eq!(from_answer(&other), None);
    }
}
