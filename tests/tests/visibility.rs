//! What sockmesh captures and what it cannot see: one test per claim of the README's
//! "What the mesh sees" table, each asserting what this kernel really does. The client pod is
//! enrolled and acts as a container would (the runtime's default capabilities: CAP_NET_RAW,
//! no CAP_NET_ADMIN); the server pod runs an echo server on port 8080.
//!
//! Captured means: the connection reaches the server through the agent (the app's own end is
//! the pod's loopback, where the agent listens; the server sees the pod's address) and the
//! pod's `redirect_tcp` counter moves. Not captured means: the packets reach the server
//! directly and the counter does not move.
//!
//! Tier: the default (`--fast-path auto`); each test's connection is its peer's first, which
//! the proxy takes, so a redirect tells a captured connection from one the hook never saw.
mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use common::{counter, ECHO_PORT, T};
use socket2::{Domain, Protocol, Socket, Type};
use sockmesh_tests::caps;
use sockmesh_tests::rawpkt::{self, await_syn_ack, tcp_syn_v4};
use sockmesh_tests::sockaddr::to_sockaddr;
use sockmesh_tests::*;

const IPPROTO_MPTCP: i32 = 262;
const IPPROTO_SCTP: i32 = 132;

/// The cast of every test here: an enrolled client pod, a server pod with an echo server,
/// and the agent with `extra` flags.
struct Mesh {
    cluster: Cluster,
    client: Pod,
    server_pod: Pod,
    server: TcpServer,
    agent: Agent,
}

impl Mesh {
    fn start(extra: &[&str]) -> Mesh {
        let (cluster, client, server_pod, server) = common::client_and_echo_server();
        let mut args = vec!["--pod".to_string(), pod_spec(&client, "")];
        args.extend(extra.iter().map(|s| s.to_string()));
        let agent = Agent::start(&args).expect("agent");
        agent.wait_ready().expect("ready");
        Mesh {
            cluster,
            client,
            server_pod,
            server,
            agent,
        }
    }

    fn dst(&self) -> SocketAddr {
        self.server_pod.addr4(ECHO_PORT)
    }

    fn redirects(&self) -> u64 {
        counter(&self.agent, &self.client, "redirect_tcp")
    }

    /// The connection whose app end is `local` was captured: it went through the agent, the
    /// server saw it from the client pod's address, and `redirect_tcp` moved by one.
    fn assert_captured(&self, what: &str, local: SocketAddr, before: u64) {
        assert!(
            local.ip().is_loopback(),
            "{what}: the app's end is {local}, want the pod's loopback (the agent)"
        );
        let acc = self.server.next_accept(T).expect("the server got it");
        assert_eq!(unmap(acc.peer).ip(), self.client.ip4(), "{what}");
        assert_eq!(self.redirects(), before + 1, "{what}: redirect_tcp");
    }
}

/// One echo round trip on `s`.
fn echo(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(T)).expect("timeout");
    s.write_all(what.as_bytes()).expect("write");
    let mut back = vec![0u8; what.len()];
    s.read_exact(&mut back).expect("echo");
    assert_eq!(back, what.as_bytes());
}

fn errno(r: io::Result<OwnedFd>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn socket(family: i32, ty: i32, proto: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is new and owned here.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A source port for a hand-written SYN: unused by any socket of the client pod, so its
/// kernel answers the SYN-ACK with a RST and nothing else.
fn spare_port() -> u16 {
    40000 + (std::process::id() % 20000) as u16
}

/// A raw IP socket sends a TCP SYN past every socket hook: the server answers it directly.
#[test]
fn raw_ip_sockets_reach_peers_directly() {
    let m = Mesh::start(&[]);
    let me = SocketAddrV4::new(m.client.ip4(), spare_port());
    let SocketAddr::V4(server) = m.dst() else {
        unreachable!()
    };
    let answered = m.client.run(|| -> io::Result<bool> {
        caps::become_container()?;
        let rx = rawpkt::raw_tcp_receiver()?;
        let tx = rawpkt::raw_ip_sender()?;
        rawpkt::send_raw_ip(&tx, &tcp_syn_v4(me, server, 1), *server.ip())?;
        await_syn_ack(&rx, server, me, T)
    });
    assert!(answered.expect("raw sockets"), "no SYN-ACK from the server");
    assert_eq!(m.redirects(), 0, "nothing was captured");
}

/// `--deny-raw-sockets`: every raw IP socket of an enrolled pod is refused at socket() with
/// EPERM and counted; other sockets of the pod, and raw sockets of a pod that is not
/// enrolled, are not affected.
#[test]
fn deny_raw_sockets_refuses_raw_ip_sockets_of_enrolled_pods_only() {
    let m = Mesh::start(&["--deny-raw-sockets"]);
    let refused = m.client.run(|| {
        caps::become_container().expect("capset");
        [
            (libc::AF_INET, libc::IPPROTO_TCP),
            (libc::AF_INET, libc::IPPROTO_RAW),
            (libc::AF_INET, libc::IPPROTO_ICMP),
            (libc::AF_INET6, libc::IPPROTO_ICMPV6),
            (libc::AF_INET6, libc::IPPROTO_RAW),
        ]
        .map(|(f, p)| errno(socket(f, libc::SOCK_RAW, p)))
    });
    assert_eq!(refused, [Some(libc::EPERM); 5], "every raw socket refused");
    assert_eq!(counter(&m.agent, &m.client, "raw_denied"), 5);
    // The pod's ordinary sockets are untouched, and still captured.
    let before = m.redirects();
    let mut c = tcp_connect(&m.client, m.dst(), T).expect("connect");
    echo(&mut c.stream, "tcp");
    m.assert_captured("TCP beside the refused raw sockets", c.local, before);
    let udp = m.client.run(|| socket(libc::AF_INET, libc::SOCK_DGRAM, 0));
    udp.expect("a UDP socket");
    // A pod that is not enrolled keeps its raw sockets.
    let other = m.cluster.add_pod("other").expect("pod");
    other
        .run(|| {
            caps::become_container()?;
            socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP)
        })
        .expect("raw socket in a pod that is not enrolled");
    assert_eq!(counter(&m.agent, &m.client, "raw_denied"), 5);
}

/// The MAC address of `pod`'s eth0.
fn mac_of(pod: &Pod) -> [u8; 6] {
    let out = pod.ip(&["link", "show", "eth0"]).expect("ip link");
    let hex = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no link/ether in {out}"));
    let mut mac = [0u8; 6];
    for (b, h) in mac.iter_mut().zip(hex.split(':')) {
        *b = u8::from_str_radix(h, 16).expect("hex");
    }
    mac
}

/// Packet sockets are beyond every cgroup socket hook: `cgroup/sock_create` runs only for
/// AF_INET/AF_INET6 sockets, so even with `--deny-raw-sockets` a pod with CAP_NET_RAW opens
/// one, and a SYN it sends that way reaches the server directly.
#[test]
fn packet_sockets_are_neither_refused_nor_captured() {
    let m = Mesh::start(&["--deny-raw-sockets"]);
    let me = SocketAddrV4::new(m.client.ip4(), spare_port());
    let SocketAddr::V4(server) = m.dst() else {
        unreachable!()
    };
    let mac = mac_of(&m.server_pod);
    let (legacy, answered) = m
        .client
        .run(|| -> io::Result<(io::Result<OwnedFd>, bool)> {
            caps::become_container()?;
            // The legacy spelling of a packet socket (SOCK_PACKET = 10, protocol ETH_P_ALL),
            // which the kernel turns into an AF_PACKET one, is not an inet socket either.
            let legacy = socket(libc::AF_INET, 10, i32::from(0x0003u16.to_be()));
            let fd = rawpkt::packet_socket()?;
            let eth0 = rawpkt::ifindex("eth0")?;
            rawpkt::send_packet(&fd, &tcp_syn_v4(me, server, 7), eth0, mac)?;
            Ok((legacy, await_syn_ack(&fd, server, me, T)?))
        })
        .expect("packet socket");
    legacy.expect("socket(AF_INET, SOCK_PACKET) is allowed");
    assert!(answered, "no SYN-ACK from the server");
    assert_eq!(m.redirects(), 0, "nothing was captured");
    assert_eq!(
        counter(&m.agent, &m.client, "raw_denied"),
        0,
        "nothing refused"
    );
}

/// TCP Fast Open: `sendto(MSG_FASTOPEN)` on an unconnected socket connects and sends in one
/// call, and the kernel runs the connect hook on that path too.
#[test]
fn tcp_fast_open_is_captured() {
    let m = Mesh::start(&[]);
    let before = m.redirects();
    let dst = m.dst();
    let (mut s, local) = m
        .client
        .run(|| -> io::Result<(TcpStream, SocketAddr)> {
            caps::become_container()?;
            let fd = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
            let (sa, len) = to_sockaddr(&dst);
            // SAFETY: valid fd, a 4-byte buffer, and a sockaddr_in of the given length.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    b"tfo!".as_ptr().cast(),
                    4,
                    libc::MSG_FASTOPEN,
                    (&sa as *const libc::sockaddr_storage).cast(),
                    len,
                )
            };
            if n != 4 {
                return Err(io::Error::last_os_error());
            }
            let s = TcpStream::from(fd);
            let local = getsockname(&s)?;
            Ok((s, local))
        })
        .expect("sendto(MSG_FASTOPEN)");
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut back = [0u8; 4];
    s.read_exact(&mut back)
        .expect("echo of the data sent with the SYN");
    assert_eq!(&back, b"tfo!");
    m.assert_captured("MSG_FASTOPEN", local, before);
}

/// An MPTCP echo server: one listener thread, one exchange per connection, stopped (the
/// listener shut down, the thread joined) on drop.
struct MptcpEcho {
    listener: std::sync::Arc<std::net::TcpListener>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MptcpEcho {
    fn start(pod: &Pod, addr: SocketAddr) -> MptcpEcho {
        let listener = pod
            .run(|| -> io::Result<std::net::TcpListener> {
                let s = Socket::new(
                    Domain::IPV4,
                    Type::STREAM,
                    Some(Protocol::from(IPPROTO_MPTCP)),
                )?;
                s.set_reuse_address(true)?;
                s.bind(&addr.into())?;
                s.listen(16)?;
                Ok(s.into())
            })
            .expect("MPTCP listener");
        let listener = std::sync::Arc::new(listener);
        let l = listener.clone();
        let thread = std::thread::spawn(move || {
            while let Ok((mut c, _)) = l.accept() {
                let _ = c.set_read_timeout(Some(T));
                let mut buf = [0u8; 64];
                if let Ok(n) = c.read(&mut buf) {
                    let _ = c.write_all(&buf[..n]);
                }
            }
        });
        MptcpEcho {
            listener,
            thread: Some(thread),
        }
    }
}

impl Drop for MptcpEcho {
    fn drop(&mut self) {
        // SAFETY: a valid listening fd; shutdown wakes the thread blocked in accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether an MPTCP socket's connection fell back to plain TCP: `getsockopt(SOL_MPTCP,
/// MPTCP_INFO)` then fails with EOPNOTSUPP (the socket passes SOL_MPTCP options to its one
/// TCP subflow, which knows none).
fn mptcp_fell_back(s: &TcpStream) -> bool {
    const SOL_MPTCP: i32 = 284;
    const MPTCP_INFO: i32 = 1;
    let mut info = [0u8; 64];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: valid fd and a buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            SOL_MPTCP,
            MPTCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "MPTCP_INFO: {e}");
        return true;
    }
    // mptcpi_flags, after six u8 fields; MPTCP_INFO_FLAG_FALLBACK is bit 0.
    let flags = u32::from_ne_bytes([info[8], info[9], info[10], info[11]]);
    flags & 1 != 0
}

/// MPTCP from `pod` to `dst`: the connected socket and its app end.
fn mptcp_connect(pod: &Pod, dst: SocketAddr) -> (TcpStream, SocketAddr) {
    pod.run(|| -> io::Result<(TcpStream, SocketAddr)> {
        caps::become_container()?;
        let s = Socket::new(
            Domain::IPV4,
            Type::STREAM,
            Some(Protocol::from(IPPROTO_MPTCP)),
        )?;
        assert_eq!(s.protocol()?, Some(Protocol::from(IPPROTO_MPTCP)));
        s.connect_timeout(&dst.into(), T)?;
        let local = getsockname(&s)?;
        Ok((s.into(), local))
    })
    .expect("MPTCP connect")
}

/// MPTCP: `socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)` then connect() is captured like TCP,
/// and the connection falls back to plain TCP: the agent's listener and its upstream socket
/// are TCP. Between two pods without the mesh the same client and server keep MPTCP.
#[test]
fn mptcp_is_captured_and_falls_back_to_tcp() {
    let m = Mesh::start(&[]);
    let before = m.redirects();
    let (mut s, local) = mptcp_connect(&m.client, m.dst());
    echo(&mut s, "mptcp");
    m.assert_captured("MPTCP", local, before);

    let mptcp = m.server_pod.addr4(8443);
    let _server = MptcpEcho::start(&m.server_pod, mptcp);
    let other = m.cluster.add_pod("other").expect("pod");
    let (mut direct, _) = mptcp_connect(&other, mptcp);
    echo(&mut direct, "direct");
    assert!(
        !mptcp_fell_back(&direct),
        "without the mesh, MPTCP end to end"
    );
    let (mut meshed, local) = mptcp_connect(&m.client, mptcp);
    echo(&mut meshed, "meshed");
    assert!(local.ip().is_loopback(), "captured");
    assert!(mptcp_fell_back(&meshed), "through the agent, plain TCP");
    assert_eq!(m.redirects(), before + 2);
}

/// SCTP is not built into this kernel (`# CONFIG_IP_SCTP is not set`, and modules cannot be
/// loaded): no SCTP socket can be made, so there is nothing to capture or to miss. A
/// one-to-one socket (SOCK_STREAM) fails with EPROTONOSUPPORT; a one-to-many one
/// (SOCK_SEQPACKET), which no built-in inet protocol offers, with ESOCKTNOSUPPORT.
#[test]
fn sctp_is_not_available_in_this_kernel() {
    let m = Mesh::start(&[]);
    let got = m.client.run(|| {
        [libc::SOCK_STREAM, libc::SOCK_SEQPACKET]
            .map(|ty| errno(socket(libc::AF_INET, ty, IPPROTO_SCTP)))
    });
    assert_eq!(
        got,
        [Some(libc::EPROTONOSUPPORT), Some(libc::ESOCKTNOSUPPORT)]
    );
}

/// io_uring: IORING_OP_CONNECT on a TCP socket of the pod.
#[test]
fn io_uring_connect_is_captured() {
    let m = Mesh::start(&[]);
    let before = m.redirects();
    let dst = m.dst();
    let (mut s, local) = m
        .client
        .run(|| -> io::Result<(TcpStream, SocketAddr)> {
            caps::become_container()?;
            let fd = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
            let (sa, len) = to_sockaddr(&dst);
            let mut ring = io_uring::IoUring::new(4)?;
            let op = io_uring::opcode::Connect::new(
                io_uring::types::Fd(fd.as_raw_fd()),
                (&sa as *const libc::sockaddr_storage).cast(),
                len,
            )
            .build()
            .user_data(7);
            // SAFETY: the entry's buffers (`sa`, the fd) outlive the submission, which is
            // waited for right below.
            unsafe { ring.submission().push(&op) }.map_err(io::Error::other)?;
            ring.submit_and_wait(1)?;
            let cqe = ring.completion().next().expect("a completion");
            assert_eq!(cqe.user_data(), 7);
            if cqe.result() < 0 {
                return Err(io::Error::from_raw_os_error(-cqe.result()));
            }
            let s = TcpStream::from(fd);
            let local = getsockname(&s)?;
            Ok((s, local))
        })
        .expect("IORING_OP_CONNECT");
    echo(&mut s, "uring");
    m.assert_captured("IORING_OP_CONNECT", local, before);
}

/// UDP is captured only to port 53 (DNS): other datagrams, QUIC among them, go straight to
/// their destination.
#[test]
fn udp_other_than_dns_goes_direct() {
    let m = Mesh::start(&[]);
    let quic = m.server_pod.addr4(443);
    let server = UdpEchoServer::start(&m.server_pod, quic).expect("udp echo");
    let r = udp_sendto(&m.client, quic, b"quic", T).expect("an answer");
    assert_eq!(r.data, b"quic");
    assert_eq!(r.from, quic);
    let (src, _) = server.next_datagram(T).expect("the server got it");
    assert_eq!(src.ip(), m.client.ip4(), "from the pod's own address");
    assert_eq!(src.port(), r.local.port(), "from the app's own socket");
    assert_eq!(counter(&m.agent, &m.client, "redirect_dns"), 0);
}
