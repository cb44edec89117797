//! The TCP sockets of the calling thread's network namespace, from the kernel's socket table
//! (NETLINK_SOCK_DIAG, the interface `ss` uses), with each socket's cookie: the same number
//! `bpf_get_socket_cookie` gives the kernel programs. Call it on a pod's netns worker to see
//! that pod's sockets. This file holds the dump both users make ([`dump`]) and the listeners;
//! `sockdiag_idle` the established connections and their destruction.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
pub(super) const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_msg`, then its attributes.
const DIAG_MSG: usize = 72;
/// `struct inet_diag_req_v2`.
const DIAG_REQ: usize = 56;

/// One socket of a dump: what `inet_diag_msg` says of it, and its attributes.
pub(super) struct DiagMsg<'a> {
    pub family: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub cookie: u64,
    /// The kernel's socket id (`inet_diag_sockid`), as SOCK_DESTROY wants it back.
    pub sockid: [u8; 48],
    /// The attributes asked for (`struct rtattr`s), see [`attribute`].
    pub attrs: &'a [u8],
}

/// One listening TCP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub cookie: u64,
}

/// Every listening TCP socket (IPv4 and IPv6) of the calling thread's namespace.
pub fn tcp_listeners() -> io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    dump(1 << TCP_LISTEN, 0, |m| {
        out.push(Listener {
            addr: m.local,
            cookie: m.cookie,
        })
    })?;
    Ok(out)
}

/// Dumps the TCP sockets (IPv4, then IPv6) in `states` (a bit per TCP state) with the
/// attributes of `extensions` (a bit per `INET_DIAG_*` attribute, less one), showing each to
/// `visit` as it is read: a namespace with many sockets costs no memory for those dropped.
pub(super) fn dump(states: u32, extensions: u8, mut visit: impl FnMut(&DiagMsg)) -> io::Result<()> {
    for family in [libc::AF_INET, libc::AF_INET6] {
        let fd = diag_socket()?;
        let req = request(
            family as u8,
            SOCK_DIAG_BY_FAMILY,
            NLM_F_DUMP,
            states,
            extensions,
            None,
        );
        send(&fd, &req)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(&fd, &mut buf)?;
            if parse(&buf[..n], &mut visit)? {
                break;
            }
        }
    }
    Ok(())
}

/// A NETLINK_SOCK_DIAG socket of the calling thread's namespace (also `sockdiag_idle`'s).
pub(super) fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn send(fd: &OwnedFd, req: &[u8]) -> io::Result<()> {
    // SAFETY: `req` is a readable buffer of `req.len()` bytes for the duration of the call;
    // a netlink socket needs no destination address (the kernel is the default peer).
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a writable buffer of `buf.len()` bytes for the duration of the call.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub(super) fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// A `ty` request (`flags` beside NLM_F_REQUEST) for the TCP sockets of one family in
/// `states` with the attributes of `extensions`, or, with a socket id, for that one socket.
pub(super) fn request(
    family: u8,
    ty: u16,
    flags: u16,
    states: u32,
    extensions: u8,
    sockid: Option<&[u8; 48]>,
) -> Vec<u8> {
    let len = NLMSG_HDR + DIAG_REQ;
    let mut r = vec![0u8; len];
    r[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    r[4..6].copy_from_slice(&ty.to_ne_bytes());
    r[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    // inet_diag_req_v2: family, protocol, extensions, pad, states, then the sockid.
    r[16] = family;
    r[17] = libc::IPPROTO_TCP as u8;
    r[18] = extensions;
    r[20..24].copy_from_slice(&states.to_ne_bytes());
    if let Some(id) = sockid {
        r[24..72].copy_from_slice(id);
    }
    r
}

/// The errno of a netlink acknowledgement (0: success), if `buf` is one.
pub(super) fn ack_errno(buf: &[u8]) -> Option<i32> {
    if buf.len() < NLMSG_HDR + 4 || u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
        return None;
    }
    Some(-(u32_at(buf, NLMSG_HDR) as i32))
}

fn addr(family: u8, b: &[u8], port: u16) -> SocketAddr {
    let ip = match i32::from(family) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
        _ => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap_or_default())),
    };
    SocketAddr::new(ip, port)
}

/// Shows the sockets of one datagram of the dump to `visit`; true once the dump is done.
fn parse(mut buf: &[u8], visit: &mut impl FnMut(&DiagMsg)) -> io::Result<bool> {
    while buf.len() >= NLMSG_HDR {
        let len = u32_at(buf, 0) as usize;
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDR || len > buf.len() {
            return Err(io::Error::other("truncated sock_diag message"));
        }
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                return Err(io::Error::from_raw_os_error(
                    ack_errno(buf).unwrap_or(libc::EIO),
                ))
            }
            SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDR + DIAG_MSG => {
                let m = &buf[NLMSG_HDR..len];
                // inet_diag_msg: family, state, timer, retrans, then the sockid: sport and
                // dport (network order), src[16], dst[16], ifindex, cookie[2]; then
                // expires, rqueue, wqueue, uid, inode; then attributes.
                let family = m[0];
                let mut sockid = [0u8; 48];
                sockid.copy_from_slice(&m[4..52]);
                visit(&DiagMsg {
                    family,
                    local: addr(family, &m[8..24], u16::from_be_bytes([m[4], m[5]])),
                    remote: addr(family, &m[24..40], u16::from_be_bytes([m[6], m[7]])),
                    cookie: u64::from(u32_at(m, 44)) | (u64::from(u32_at(m, 48)) << 32),
                    sockid,
                    attrs: &m[DIAG_MSG..],
                });
            }
            _ => {}
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        buf = &buf[next.min(buf.len())..];
    }
    Ok(false)
}

/// The payload of the first attribute of type `ty` (`struct rtattr`: u16 len, u16 type).
pub(super) fn attribute(mut attrs: &[u8], ty: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let t = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if t == ty {
            return Some(&attrs[4..len]);
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(family: u8, port: u16, src: [u8; 16], cookie: u64) -> Vec<u8> {
        let len = NLMSG_HDR + DIAG_MSG;
        let mut m = vec![0u8; len];
        m[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m[16] = family;
        m[17] = TCP_LISTEN as u8;
        m[20..22].copy_from_slice(&port.to_be_bytes());
        m[24..40].copy_from_slice(&src);
        m[60..64].copy_from_slice(&(cookie as u32).to_ne_bytes());
        m[64..68].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        m
    }

    #[test]
    fn parses_listeners_until_done() {
        let mut buf = message(libc::AF_INET as u8, 8080, [0; 16], 0x1_0000_0002);
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        buf.extend(message(libc::AF_INET6 as u8, 443, v6, 7));
        let mut out = Vec::new();
        let mut listener = |m: &DiagMsg| {
            out.push(Listener {
                addr: m.local,
                cookie: m.cookie,
            })
        };
        assert!(!parse(&buf, &mut listener).expect("parse"));
        let mut done = vec![0u8; NLMSG_HDR];
        done[0..4].copy_from_slice(&(NLMSG_HDR as u32).to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        assert!(parse(&done, &mut listener).expect("parse"));
        let mut err = vec![0u8; NLMSG_HDR + 4];
        err[0..4].copy_from_slice(&((NLMSG_HDR + 4) as u32).to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::EPERM as u32).to_ne_bytes());
        assert_eq!(
            parse(&err, &mut listener)
                .expect_err("error")
                .raw_os_error(),
            Some(libc::EPERM)
        );
        assert!(!parse(&done[..8], &mut listener).expect("short"));
        assert_eq!(
            out,
            [
                Listener {
                    addr: "0.0.0.0:8080".parse().expect("addr"),
                    cookie: 0x1_0000_0002
                },
                Listener {
                    addr: "[::1]:443".parse().expect("addr"),
                    cookie: 7
                }
            ]
        );
    }

    /// The kernel's own answer: a listener this test opens is listed with its cookie.
    #[test]
    fn lists_a_real_listener_with_its_cookie() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: SO_COOKIE writes a u64 into `cookie`, whose size `len` gives.
        let rc = unsafe {
            libc::getsockopt(
                l.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        let all = tcp_listeners().expect("sock_diag");
        assert!(
            all.contains(&Listener { addr, cookie }),
            "{addr} {cookie}: {all:?}"
        );
    }
}
