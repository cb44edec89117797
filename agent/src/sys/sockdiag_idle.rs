//! Idle TCP connections of the calling thread's network namespace, and closing them from
//! outside (NETLINK_SOCK_DIAG's dump with `tcp_info`, and SOCK_DESTROY, which is `ss -K`):
//! how the agent enforces the idle timeout of connections it does not own (the kernel fast
//! path's direct connections). Needs CONFIG_INET_DIAG_DESTROY (checked by
//! [`destroy_supported`]) and CAP_NET_ADMIN in the namespace's owner.
use super::sockdiag::{diag_socket, recv, send, u32_at};
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_ESTABLISHED: u32 = 1;
/// `INET_DIAG_INFO`: the `tcp_info` attribute (asked for with bit `INET_DIAG_INFO - 1`).
const INET_DIAG_INFO: u16 = 2;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_msg`, then its attributes.
const DIAG_MSG: usize = 72;
/// `struct inet_diag_req_v2`.
const DIAG_REQ: usize = 56;
/// Offsets in `struct tcp_info` of `tcpi_last_data_sent` and `tcpi_last_data_recv` (ms ago).
const LAST_DATA_SENT: usize = 44;
const LAST_DATA_RECV: usize = 52;

/// One established TCP connection and how long it has moved no data either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub cookie: u64,
    pub idle_ms: u32,
    /// The kernel's socket id (`inet_diag_sockid`), as SOCK_DESTROY wants it back.
    sockid: [u8; 48],
    family: u8,
}

/// The established TCP connections of the calling thread's namespace for which `keep` is
/// true: `keep` sees every one as the dump is read, so a namespace with many connections costs
/// no memory for those it drops.
pub fn established_where(mut keep: impl FnMut(&Conn) -> bool) -> io::Result<Vec<Conn>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let fd = diag_socket()?;
        send(
            &fd,
            &request(family as u8, SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, None),
        )?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(&fd, &mut buf)?;
            if parse(&buf[..n], &mut out, &mut keep)? {
                break;
            }
        }
    }
    Ok(out)
}

/// Closes `c` as `ss -K` does: the kernel aborts it (the local app's next call fails with
/// ECONNABORTED, the peer gets a reset).
pub fn destroy(c: &Conn) -> io::Result<()> {
    let fd = diag_socket()?;
    send(
        &fd,
        &request(c.family, SOCK_DESTROY, NLM_F_ACK, Some(&c.sockid)),
    )?;
    let mut buf = vec![0u8; 4096];
    let n = recv(&fd, &mut buf)?;
    match ack_errno(&buf[..n]) {
        Some(0) | None => Ok(()),
        Some(e) => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Whether this kernel can destroy sockets from outside (CONFIG_INET_DIAG_DESTROY): a destroy
/// of a socket that does not exist answers ENOENT there, EOPNOTSUPP without it.
pub fn destroy_supported() -> bool {
    let probe = Conn {
        local: SocketAddr::from(([127, 0, 0, 1], 1)),
        remote: SocketAddr::from(([127, 0, 0, 1], 1)),
        cookie: 0,
        idle_ms: 0,
        sockid: [0; 48],
        family: libc::AF_INET as u8,
    };
    !matches!(
        destroy(&probe).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EOPNOTSUPP))
    )
}

/// A dump of the established TCP sockets of one family with their `tcp_info`, or (with a
/// socket id) a destroy of that one socket.
fn request(family: u8, ty: u16, flags: u16, sockid: Option<&[u8; 48]>) -> Vec<u8> {
    let len = NLMSG_HDR + DIAG_REQ;
    let mut r = vec![0u8; len];
    r[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    r[4..6].copy_from_slice(&ty.to_ne_bytes());
    r[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    // inet_diag_req_v2: family, protocol, extensions, pad, states, then the sockid.
    r[16] = family;
    r[17] = libc::IPPROTO_TCP as u8;
    r[18] = 1 << (INET_DIAG_INFO - 1);
    r[20..24].copy_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
    if let Some(id) = sockid {
        r[24..72].copy_from_slice(id);
    }
    r
}

/// The errno of a netlink acknowledgement (0: success), if `buf` is one.
fn ack_errno(buf: &[u8]) -> Option<i32> {
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

/// Adds the connections of one datagram of the dump that `keep` wants to `out`; true once the
/// dump is done.
fn parse(
    mut buf: &[u8],
    out: &mut Vec<Conn>,
    keep: &mut impl FnMut(&Conn) -> bool,
) -> io::Result<bool> {
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
                let cookie = u64::from(u32_at(m, 44)) | (u64::from(u32_at(m, 48)) << 32);
                let local = addr(family, &m[8..24], u16::from_be_bytes([m[4], m[5]]));
                let remote = addr(family, &m[24..40], u16::from_be_bytes([m[6], m[7]]));
                if let Some(info) = attribute(&m[DIAG_MSG..], INET_DIAG_INFO) {
                    if info.len() >= LAST_DATA_RECV + 4 {
                        let idle_ms =
                            u32_at(info, LAST_DATA_SENT).min(u32_at(info, LAST_DATA_RECV));
                        let c = Conn {
                            local,
                            remote,
                            cookie,
                            idle_ms,
                            sockid,
                            family,
                        };
                        if keep(&c) {
                            out.push(c);
                        }
                    }
                }
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
fn attribute(mut attrs: &[u8], ty: u16) -> Option<&[u8]> {
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
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn cookie_of(s: &impl AsRawFd) -> u64 {
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: SO_COOKIE writes a u64 into `cookie`, whose size `len` gives.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        cookie
    }

    /// The kernel's own answer: a connection this test opens is listed with its cookie and
    /// idle time, and destroying it aborts it for its owner.
    #[test]
    fn lists_and_destroys_a_real_connection() {
        if !destroy_supported() {
            eprintln!("skipped: this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY)");
            return;
        }
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut s, _) = l.accept().expect("accept");
        c.write_all(b"x").expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("read");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let cookie = cookie_of(&c);
        // The filter sees every connection (the listener's accepted end too) and keeps one.
        let mut seen = 0;
        let all = established_where(|x| {
            seen += 1;
            x.cookie == cookie
        })
        .expect("sock_diag");
        assert!(seen >= 2, "both ends listed, {seen} seen");
        let [mine] = all.as_slice() else {
            panic!("{cookie}: {all:?}")
        };
        assert_eq!(mine.local, c.local_addr().expect("local"));
        assert_eq!(mine.remote, l.local_addr().expect("addr"));
        assert!(mine.idle_ms >= 40, "{mine:?}");
        destroy(mine).expect("destroy");
        let err = c.write_all(b"y").and_then(|()| c.write_all(b"z"));
        assert_eq!(
            err.expect_err("aborted").raw_os_error(),
            Some(libc::ECONNABORTED)
        );
    }
}
