//! Idle TCP connections of the calling thread's network namespace, and closing them from
//! outside (NETLINK_SOCK_DIAG's dump with `tcp_info`, and SOCK_DESTROY, which is `ss -K`):
//! how the agent enforces the idle timeout of connections it does not own (the kernel fast
//! path's direct connections). Needs CONFIG_INET_DIAG_DESTROY (checked by
//! [`destroy_supported`]) and CAP_NET_ADMIN in the namespace's owner.
use super::sockdiag::{ack_errno, attribute, diag_socket, dump, recv, request, send, u32_at};
use std::{io, net::SocketAddr};

const SOCK_DESTROY: u16 = 21;
const NLM_F_ACK: u16 = 0x4;
const TCP_ESTABLISHED: u32 = 1;
/// `INET_DIAG_INFO`: the `tcp_info` attribute (asked for with bit `INET_DIAG_INFO - 1`).
const INET_DIAG_INFO: u16 = 2;
/// Offsets in `struct tcp_info` of `tcpi_last_data_sent` and `tcpi_last_data_recv` (ms ago).
const LAST_DATA_SENT: usize = 44;
const LAST_DATA_RECV: usize = 52;
/// Offsets of `tcpi_bytes_acked` and `tcpi_bytes_received` (u64; since Linux 4.1/4.2).
const BYTES_ACKED: usize = 120;
const BYTES_RECEIVED: usize = 128;

/// One established TCP connection and how long it has moved no data either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub cookie: u64,
    pub idle_ms: u32,
    /// Payload bytes the peer acknowledged, and received from it (the SYN's sequence number
    /// taken out of `tcpi_bytes_acked`: the connection is established, so not yet a FIN).
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// The kernel's socket id (`inet_diag_sockid`), as SOCK_DESTROY wants it back.
    sockid: [u8; 48],
    family: u8,
}

/// The established TCP connections of the calling thread's namespace for which `keep` is
/// true: `keep` sees every one as the dump is read, so a namespace with many connections costs
/// no memory for those it drops.
pub fn established_where(mut keep: impl FnMut(&Conn) -> bool) -> io::Result<Vec<Conn>> {
    let mut out = Vec::new();
    dump(1 << TCP_ESTABLISHED, 1 << (INET_DIAG_INFO - 1), |m| {
        let Some(info) = attribute(m.attrs, INET_DIAG_INFO) else {
            return;
        };
        if info.len() < LAST_DATA_RECV + 4 {
            return;
        }
        let c = Conn {
            local: m.local,
            remote: m.remote,
            cookie: m.cookie,
            idle_ms: u32_at(info, LAST_DATA_SENT).min(u32_at(info, LAST_DATA_RECV)),
            bytes_out: u64_at(info, BYTES_ACKED).saturating_sub(1),
            bytes_in: u64_at(info, BYTES_RECEIVED),
            sockid: m.sockid,
            family: m.family,
        };
        if keep(&c) {
            out.push(c);
        }
    })?;
    Ok(out)
}

/// A u64 at byte `i` of a kernel structure (native order); 0 if it is not there.
fn u64_at(b: &[u8], i: usize) -> u64 {
    b.get(i..i + 8)
        .and_then(|x| <[u8; 8]>::try_from(x).ok())
        .map_or(0, u64::from_ne_bytes)
}

/// Closes `c` as `ss -K` does: the kernel aborts it (the local app's next call fails with
/// ECONNABORTED, the peer gets a reset).
pub fn destroy(c: &Conn) -> io::Result<()> {
    let fd = diag_socket()?;
    send(
        &fd,
        &request(
            c.family,
            SOCK_DESTROY,
            NLM_F_ACK,
            1 << TCP_ESTABLISHED,
            0,
            Some(&c.sockid),
        ),
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
        bytes_out: 0,
        bytes_in: 0,
        sockid: [0; 48],
        family: libc::AF_INET as u8,
    };
    !matches!(
        destroy(&probe).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EOPNOTSUPP))
    )
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
        assert_eq!((mine.bytes_out, mine.bytes_in), (1, 0), "{mine:?}");
        destroy(mine).expect("destroy");
        let err = c.write_all(b"y").and_then(|()| c.write_all(b"z"));
        assert_eq!(
            err.expect_err("aborted").raw_os_error(),
            Some(libc::ECONNABORTED)
        );
    }
}
