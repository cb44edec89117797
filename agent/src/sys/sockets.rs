//! Creating the agent's sockets. Each one is made known to the kernel programs as the
//! agent's own before it is used (its cookie registered through the installed [`Owner`]), so
//! the agent's traffic is never redirected (no loops); and each carries the agent's SO_MARK,
//! which the programs do not trust (a pod can set any mark) but the operator's routing and
//! firewall rules may use. Call these on a pod's netns worker: the socket joins the namespace
//! it is created in.
use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{Arc, OnceLock},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// What makes a fresh socket the agent's own in the kernel programs' eyes (the datapath
/// registers its cookie). Installed once the programs are loaded, with [`set_owner`].
pub trait Owner: Send + Sync {
    fn own(&self, socket: &Socket) -> io::Result<()>;
}

static OWNER: OnceLock<Arc<dyn Owner>> = OnceLock::new();

/// Every socket made from now on is registered with `owner` before it is returned (a socket
/// that cannot be registered is not returned at all: unregistered, it would be captured).
/// Until one is installed (unit tests, and the listeners a `--takeover` or start-up prepares
/// before the programs load) sockets are not registered: none of those connects, sends to
/// port 53 or binds a wildcard address, the only things the programs capture. Once per
/// process (an agent loads its programs once): a second owner is refused.
pub fn set_owner(owner: Arc<dyn Owner>) -> io::Result<()> {
    OWNER
        .set(owner)
        .map_err(|_| io::Error::other("the agent's socket owner is already installed"))
}

fn marked(domain: Domain, ty: Type, proto: Protocol, mark: u32) -> io::Result<Socket> {
    let s = Socket::new(domain, ty, Some(proto))?;
    if let Some(owner) = OWNER.get() {
        owner.own(&s)?;
    }
    s.set_mark(mark)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn domain_of(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// A listening TCP socket on exactly `addr`. TCP_NODELAY is set on it (accepted sockets
/// inherit it): the relay forwards segments as they come, and Nagle would hold a small reply
/// behind an un-acked one for a delayed-ACK wait.
pub fn tcp_listener(addr: SocketAddr, mark: u32, backlog: i32) -> io::Result<TcpListener> {
    let s = marked(domain_of(&addr), Type::STREAM, Protocol::TCP, mark)?;
    s.set_nodelay(true)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&SockAddr::from(addr))?;
    s.listen(backlog)?;
    Ok(s.into())
}

/// A UDP socket bound to exactly `addr`.
pub fn udp_bound(addr: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let s = marked(domain_of(&addr), Type::DGRAM, Protocol::UDP, mark)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&SockAddr::from(addr))?;
    Ok(s.into())
}

/// An unconnected TCP socket for reaching `dst`, optionally bound to `local` first; with
/// TCP_NODELAY, like the listeners.
pub fn tcp_for(dst: SocketAddr, local: Option<SocketAddr>, mark: u32) -> io::Result<TcpStream> {
    let s = marked(domain_of(&dst), Type::STREAM, Protocol::TCP, mark)?;
    s.set_nodelay(true)?;
    if let Some(local) = local {
        s.bind(&SockAddr::from(local))?;
    }
    Ok(s.into())
}

/// An unbound UDP socket for talking to `dst`.
pub fn udp_for(dst: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let s = marked(domain_of(&dst), Type::DGRAM, Protocol::UDP, mark)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay relies on it: it no longer sets TCP_NODELAY per connection.
    #[test]
    fn accepted_and_upstream_sockets_come_with_nodelay() {
        let l = tcp_listener("127.0.0.1:0".parse().expect("addr"), 0x5eed, 8).expect("listen");
        let addr = l.local_addr().expect("addr");
        let c = std::net::TcpStream::connect(addr).expect("connect");
        l.set_nonblocking(false).expect("blocking");
        let (accepted, _) = l.accept().expect("accept");
        assert!(
            accepted.nodelay().expect("nodelay"),
            "inherited from the listener"
        );
        assert!(
            !c.nodelay().expect("nodelay"),
            "a plain socket has Nagle on"
        );
        let up = tcp_for(addr, None, 0x5eed).expect("socket");
        assert!(socket2::SockRef::from(&up).nodelay().expect("nodelay"));
    }
}
