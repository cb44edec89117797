//! TCP without a TCP socket: a SYN written by hand and sent from a raw IP socket or a packet
//! socket, and the server's SYN-ACK read back. This is what a pod with CAP_NET_RAW can do
//! past every socket hook (connect, sendmsg, bind only see TCP and UDP sockets), so the tests
//! use it to show what sockmesh does and does not see.
//!
//! The client's own kernel has no socket for the SYN-ACK and answers it with a RST, so the
//! server is left with nothing; only the handshake's first two steps are observed.
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const ETH_P_IP: u16 = 0x0800;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// One's-complement sum of 16-bit words, folded (RFC 1071).
fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for data in chunks {
        let mut words = data.chunks_exact(2);
        for w in &mut words {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet carrying a TCP SYN from `src` to `dst`, checksums filled in.
pub fn tcp_syn_v4(src: SocketAddrV4, dst: SocketAddrV4, seq: u32) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words, no options
    tcp[13] = TCP_SYN;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.ip().octets());
    pseudo[4..8].copy_from_slice(&dst.ip().octets());
    pseudo[9] = libc::IPPROTO_TCP as u8;
    pseudo[10..12].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
    let c = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());

    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    let total = (20 + tcp.len()) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = libc::IPPROTO_TCP as u8;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let c = checksum(&[&ip[..]]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    [&ip[..], &tcp[..]].concat()
}

/// Source, destination and TCP flags of an IPv4 TCP packet.
pub fn parse_tcp_v4(pkt: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, u8)> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != libc::IPPROTO_TCP as u8 {
        return None;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let tcp = pkt.get(ihl..ihl + 20)?;
    let ip = |o: usize| Ipv4Addr::new(pkt[o], pkt[o + 1], pkt[o + 2], pkt[o + 3]);
    let port = |o: usize| u16::from_be_bytes([tcp[o], tcp[o + 1]]);
    Some((
        SocketAddrV4::new(ip(12), port(0)),
        SocketAddrV4::new(ip(16), port(2)),
        tcp[13],
    ))
}

fn socket(family: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd it returns is new and owned here.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`: sends whole IPv4 packets (header included).
pub fn raw_ip_sender() -> io::Result<OwnedFd> {
    socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)
}

/// `socket(AF_INET, SOCK_RAW, IPPROTO_TCP)`: a copy of every TCP packet the namespace
/// receives, IP header included.
pub fn raw_tcp_receiver() -> io::Result<OwnedFd> {
    socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP)
}

/// `socket(AF_PACKET, SOCK_DGRAM, ETH_P_IP)`: IPv4 packets in and out of every interface of
/// the namespace, below IP (the kernel adds and strips the link header).
pub fn packet_socket() -> io::Result<OwnedFd> {
    socket(
        libc::AF_PACKET,
        libc::SOCK_DGRAM,
        libc::c_int::from(ETH_P_IP.to_be()),
    )
}

/// Sends `pkt` (a whole IPv4 packet) from a raw IP socket to its destination address.
pub fn send_raw_ip(fd: &OwnedFd, pkt: &[u8], dst: Ipv4Addr) -> io::Result<()> {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut sin: libc::sockaddr_in = unsafe { zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
    // SAFETY: valid fd, buffer with its length, and a sockaddr_in with its size.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sin as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `pkt` (a whole IPv4 packet) out of interface `ifindex` to the link address `mac`.
pub fn send_packet(fd: &OwnedFd, pkt: &[u8], ifindex: u32, mac: [u8; 6]) -> io::Result<()> {
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_IP.to_be();
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&mac);
    // SAFETY: valid fd, buffer with its length, and a sockaddr_ll with its size.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout` on `fd` (a raw TCP receiver or a packet socket, both of which read
/// whole IPv4 packets) for the SYN-ACK that `server` sends to `client`.
pub fn await_syn_ack(
    fd: &OwnedFd,
    server: SocketAddrV4,
    client: SocketAddrV4,
    timeout: Duration,
) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if rc == 0 {
            continue;
        }
        // SAFETY: valid fd and a buffer with its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if let Some((src, dst, flags)) = parse_tcp_v4(&buf[..n as usize]) {
            if src == server && dst == client && flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
                return Ok(true);
            }
        }
    }
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syn_parses_back_and_its_checksums_verify() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 10), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 11), 8080);
        let p = tcp_syn_v4(src, dst, 0x1234_5678);
        assert_eq!(p.len(), 40);
        assert_eq!(parse_tcp_v4(&p), Some((src, dst, TCP_SYN)));
        // A correct checksum makes the sum over the covered bytes come out as zero.
        assert_eq!(checksum(&[&p[..20]]), 0, "IP header");
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&src.ip().octets());
        pseudo[4..8].copy_from_slice(&dst.ip().octets());
        pseudo[9] = 6;
        pseudo[11] = 20;
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0, "TCP segment");
    }
}
