//! Small Rust peers that run inside pods: a TCP server that reports what it sees about each
//! connection, a TCP client, and UDP helpers. They use the real kernel socket API, so whatever
//! the agent's programs rewrite (destinations, getpeername, SO_ORIGINAL_DST, recvmsg source) is
//! exactly what they report.
//!
//! All waits are blocking calls with timeouts or channel receives; nothing sleep-polls.

use crate::pod::Pod;
use crate::sockaddr::{getpeername, getsockname, original_dst};
use anyhow::{anyhow, bail, Context, Result};
use socket2::{Domain, SockRef, Socket, Type};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Read/write timeout put on every socket these helpers hand out, so a broken datapath makes a
/// test fail with an error instead of hanging. Override with `set_read_timeout` if needed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server saw for one accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The address accept() returned.
    pub from: SocketAddr,
    /// `peer_addr()` of the accepted socket (getpeername): who the server thinks the client is.
    pub peer: SocketAddr,
    /// `local_addr()` of the accepted socket (getsockname).
    pub local: SocketAddr,
    /// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on the accepted socket, if anybody answered.
    pub original_dst: Option<SocketAddr>,
}

/// What the server does with each accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMode {
    /// Echo every byte back; on EOF from the client, shut down the write side (half-close is
    /// passed on) and close.
    Echo,
    /// Keep the connection open without reading or writing until the server is dropped.
    Hold,
    /// Close at once (FIN).
    Close,
    /// Reset at once (SO_LINGER 0, then close: RST).
    Reset,
}

/// Open connections of a server (a clone to shut down, and the thread serving it, if any).
type Conns = Mutex<Vec<(TcpStream, Option<JoinHandle<()>>)>>;

/// A TCP server in a pod. Each accepted connection is reported on a channel
/// ([`TcpServer::next_accept`]) and then handled per [`ServerMode`] on its own thread.
/// Drop stops accepting, shuts down open connections and joins every thread.
pub struct TcpServer {
    local: SocketAddr,
    listener: Arc<TcpListener>,
    accepted: Mutex<Receiver<Accepted>>,
    stop: Arc<AtomicBool>,
    conns: Arc<Conns>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    /// An echo server listening on `addr` inside `pod` (port 0 picks a free port; a wildcard
    /// address is what apps typically bind, and what the agent's bind hooks act on).
    pub fn start(pod: &Pod, addr: SocketAddr) -> Result<Self> {
        Self::start_with(pod, addr, ServerMode::Echo)
    }

    pub fn start_with(pod: &Pod, addr: SocketAddr, mode: ServerMode) -> Result<Self> {
        let listener = pod
            .run(|| TcpListener::bind(addr))
            .with_context(|| format!("bind {addr} in pod {}", pod.label()))?;
        let local = listener.local_addr()?;
        let listener = Arc::new(listener);
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Conns> = Arc::default();
        let thread = {
            let (listener, stop, conns) = (listener.clone(), stop.clone(), conns.clone());
            std::thread::Builder::new()
                .name(format!("smt-accept-{local}"))
                .spawn(move || accept_loop(&listener, &stop, &conns, &tx, mode))?
        };
        Ok(Self {
            local,
            listener,
            accepted: Mutex::new(rx),
            stop,
            conns,
            thread: Some(thread),
        })
    }

    /// The address actually bound, as getsockname reports it (the mesh leaves an app's bind
    /// as it asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next accepted connection, waiting at most `timeout`.
    pub fn next_accept(&self, timeout: Duration) -> Result<Accepted> {
        let rx = self.accepted.lock().expect("accept channel lock");
        match rx.recv_timeout(timeout) {
            Ok(a) => Ok(a),
            Err(RecvTimeoutError::Timeout) => {
                bail!(
                    "no connection accepted on {} within {timeout:?}",
                    self.local
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!("accept loop on {} ended", self.local)
            }
        }
    }

    /// Connections accepted so far and not yet taken by `next_accept`.
    pub fn drain_accepted(&self) -> Vec<Accepted> {
        self.accepted
            .lock()
            .expect("accept channel lock")
            .try_iter()
            .collect()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // shutdown() on a listening socket wakes a thread blocked in accept() (EINVAL), so the
        // accept loop ends without any timeout polling.
        // SAFETY: valid fd owned by the Arc we hold.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *self.conns.lock().expect("conns lock"));
        for (stream, handle) in conns {
            let _ = stream.shutdown(Shutdown::Both);
            if let Some(h) = handle {
                let _ = h.join();
            }
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    conns: &Conns,
    tx: &mpsc::Sender<Accepted>,
    mode: ServerMode,
) {
    loop {
        let (stream, from) = match listener.accept() {
            Ok(x) => x,
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("[smt] accept on {:?}: {e}", listener.local_addr());
                return;
            }
        };
        let info = Accepted {
            from,
            peer: stream
                .peer_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            local: stream
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            original_dst: original_dst(&stream).ok(),
        };
        let _ = tx.send(info);
        match mode {
            ServerMode::Close => drop(stream),
            ServerMode::Reset => {
                let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
            }
            ServerMode::Hold => {
                conns.lock().expect("conns lock").push((stream, None));
            }
            ServerMode::Echo => {
                let Ok(clone) = stream.try_clone() else {
                    continue;
                };
                let handle = std::thread::Builder::new()
                    .name("smt-echo".into())
                    .spawn(move || echo(stream))
                    .ok();
                conns.lock().expect("conns lock").push((clone, handle));
            }
        }
    }
}

fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                // Pass the client's half-close on, as a well-behaved server does.
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// A client connection made from a pod.
#[derive(Debug)]
pub struct Connected {
    /// The socket, with [`IO_TIMEOUT`] read/write timeouts.
    pub stream: TcpStream,
    /// getsockname after connect.
    pub local: SocketAddr,
    /// getpeername after connect: what the application believes it is connected to.
    pub peer: SocketAddr,
}

/// Connects from inside `pod` to `dst` (within `timeout`). The error is the raw `io::Error`, so
/// tests can check e.g. `ErrorKind::ConnectionRefused` for a kernel fast reject.
pub fn tcp_connect(pod: &Pod, dst: SocketAddr, timeout: Duration) -> io::Result<Connected> {
    tcp_connect_from(pod, None, dst, timeout)
}

/// Like [`tcp_connect`], binding the client socket to `bind` first (e.g. a fixed source port).
pub fn tcp_connect_from(
    pod: &Pod,
    bind: Option<SocketAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<Connected> {
    let stream = pod.run(|| -> io::Result<TcpStream> {
        let sock = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
        if let Some(b) = bind {
            sock.bind(&b.into())?;
        }
        sock.connect_timeout(&dst.into(), timeout)?;
        Ok(sock.into())
    })?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(Connected {
        local: getsockname(&stream)?,
        peer: getpeername(&stream)?,
        stream,
    })
}

/// Writes `bytes`, reads the same number back and checks they are equal (an echo server on the
/// other end). Uses [`IO_TIMEOUT`] if the stream has no read timeout.
pub fn tcp_echo_roundtrip(stream: &mut TcpStream, bytes: &[u8]) -> Result<()> {
    if stream.read_timeout()?.is_none() {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
    }
    // Write from a helper thread: a payload larger than the socket buffers would otherwise
    // deadlock (we would block writing while the echo blocks writing back to us).
    let mut writer = stream.try_clone()?;
    let payload = bytes.to_vec();
    let w = std::thread::spawn(move || writer.write_all(&payload));
    let mut back = vec![0u8; bytes.len()];
    let read = stream.read_exact(&mut back);
    w.join()
        .map_err(|_| anyhow!("writer thread panicked"))?
        .context("write to echo peer")?;
    read.with_context(|| format!("read {} echoed bytes", bytes.len()))?;
    if back != bytes {
        bail!(
            "echo mismatch: sent {} bytes, got different bytes back",
            bytes.len()
        );
    }
    Ok(())
}

/// A UDP exchange as seen by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpReply {
    pub data: Vec<u8>,
    /// Source of the reply as `recv_from` reports it (the recvmsg hooks rewrite this).
    pub from: SocketAddr,
    /// Client socket's local address.
    pub local: SocketAddr,
    /// For a connected socket: getpeername after connect.
    pub peer: Option<SocketAddr>,
}

fn udp_client(dst: SocketAddr) -> io::Result<UdpSocket> {
    let bind: SocketAddr = if dst.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    UdpSocket::bind(bind)
}

/// From inside `pod`: an unconnected socket `send_to(dst)` (the sendmsg hooks' case), then
/// `recv_from` one reply within `timeout`.
pub fn udp_sendto(
    pod: &Pod,
    dst: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<UdpReply> {
    pod.run(|| {
        let sock = udp_client(dst)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send_to(payload, dst)?;
        let mut buf = vec![0u8; 65536];
        let (n, from) = sock.recv_from(&mut buf)?;
        buf.truncate(n);
        Ok(UdpReply {
            data: buf,
            from,
            local: sock.local_addr()?,
            peer: None,
        })
    })
}

/// From inside `pod`: `connect(dst)` then `send` (the UDP connect hooks' case), then
/// `recv_from` one reply within `timeout`.
pub fn udp_connected(
    pod: &Pod,
    dst: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<UdpReply> {
    pod.run(|| {
        let sock = udp_client(dst)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.connect(dst)?;
        let peer = getpeername(&sock)?;
        sock.send(payload)?;
        let mut buf = vec![0u8; 65536];
        let (n, from) = sock.recv_from(&mut buf)?;
        buf.truncate(n);
        Ok(UdpReply {
            data: buf,
            from,
            local: sock.local_addr()?,
            peer: Some(peer),
        })
    })
}

/// A UDP echo server in a pod: replies to each datagram with the same bytes, and reports the
/// source address and payload of each on a channel.
pub struct UdpEchoServer {
    sock: Arc<UdpSocket>,
    local: SocketAddr,
    seen: Mutex<Receiver<(SocketAddr, Vec<u8>)>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    pub fn start(pod: &Pod, addr: SocketAddr) -> Result<Self> {
        let sock = pod
            .run(|| UdpSocket::bind(addr))
            .with_context(|| format!("bind udp {addr} in pod {}", pod.label()))?;
        let local = sock.local_addr()?;
        let sock = Arc::new(sock);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let (sock, stop) = (sock.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("smt-udp-{local}"))
                .spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::SeqCst) {
                        match sock.recv_from(&mut buf) {
                            Ok((n, from)) => {
                                if stop.load(Ordering::SeqCst) {
                                    return;
                                }
                                let _ = tx.send((from, buf[..n].to_vec()));
                                let _ = sock.send_to(&buf[..n], from);
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) if stop.load(Ordering::SeqCst) => return,
                            Err(_) => {}
                        }
                    }
                })?
        };
        Ok(Self {
            sock,
            local,
            seen: Mutex::new(rx),
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Source and payload of the next datagram received, waiting at most `timeout`.
    pub fn next_datagram(&self, timeout: Duration) -> Result<(SocketAddr, Vec<u8>)> {
        self.seen
            .lock()
            .expect("udp channel lock")
            .recv_timeout(timeout)
            .map_err(|_| anyhow!("no datagram on {} within {timeout:?}", self.local))
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // On Linux shutdown() wakes a reader blocked on even an unconnected UDP socket (it
        // returns ENOTCONN but still marks the socket shut down and wakes waiters).
        // SAFETY: valid fd owned by the Arc we hold.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
