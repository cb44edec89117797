//! SO_ORIGINAL_DST: the same question a proxy behind iptables REDIRECT asks; here the kernel
//! programs answer it.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
};

const SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination the app originally connected to, for a connection accepted on a listener
/// of the given family.
pub fn original_dst(sock: &impl AsRawFd, ipv6: bool) -> io::Result<SocketAddr> {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let level = if ipv6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    // SAFETY: storage is large enough for any sockaddr; len tells the kernel its size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            &mut storage as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: storage is initialised (zeroed, then written by the kernel) and outlives the view.
    let bytes =
        unsafe { std::slice::from_raw_parts(&storage as *const _ as *const u8, len as usize) };
    parse_sockaddr(bytes)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad SO_ORIGINAL_DST answer"))
}

/// Parse a `sockaddr_in` / `sockaddr_in6` as raw bytes (family in host order, port and
/// address in network order).
pub fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*b.first()?, *b.get(1)?]) as i32;
    let port = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
    match family {
        libc::AF_INET if b.len() >= 8 => Some(SocketAddr::new(
            Ipv4Addr::new(b[4], b[5], b[6], b[7]).into(),
            port,
        )),
        libc::AF_INET6 if b.len() >= 24 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[8..24]);
            let ip = Ipv6Addr::from(a);
            // A v4-mapped answer means the app used a dual-stack socket for an IPv4 peer.
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), port),
                None => SocketAddr::new(ip.into(), port),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockaddr_in_and_in6() {
        let mut v4 = vec![0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[10, 77, 0, 11]);
        assert_eq!(
            parse_sockaddr(&v4),
            Some("10.77.0.11:8080".parse().expect("addr"))
        );

        let mut v6 = vec![0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&443u16.to_be_bytes());
        v6[8..24].copy_from_slice(&"fd77::b".parse::<Ipv6Addr>().expect("ip").octets());
        assert_eq!(
            parse_sockaddr(&v6),
            Some("[fd77::b]:443".parse().expect("addr"))
        );

        v6[8..24].copy_from_slice(&Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets());
        assert_eq!(
            parse_sockaddr(&v6),
            Some("10.0.0.1:443".parse().expect("addr"))
        );

        assert_eq!(parse_sockaddr(&v4[..5]), None);
        assert_eq!(parse_sockaddr(&[0u8; 16]), None);
    }
}
