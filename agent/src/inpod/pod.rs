//! A pod as the agent sees it: its namespace, a worker thread inside it, its namespace cookie
//! (the key the kernel programs use), its addresses, and the in-pod listeners.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
};

use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};

use crate::{
    handover::{proto::PodSockets, Handed},
    spec::PodSpec,
    sys::{
        lock::lock,
        netns::{current_addresses, current_netns_cookie, Netns, NetnsWorker},
        sockets,
    },
};

pub struct Pod {
    pub netns: Netns,
    pub worker: NetnsWorker,
    pub cookie: u64,
    pub addrs: Vec<IpAddr>,
}

/// The listeners opened in a pod at enrolment, before the kernel starts redirecting to them.
pub struct PodListeners {
    pub outbound: Vec<TcpListener>,
    pub dns: Vec<UdpSocket>,
    /// Where `sk_lookup` hands the pod's inbound connections (127.0.0.1 and ::1).
    pub inbound: Vec<TcpListener>,
}

/// The in-pod listener ports (every pod uses the same ones, on its own loopback).
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub outbound: u16,
    pub dns: u16,
    pub inbound: u16,
}

/// The handed-over socket bound at exactly `addr`, if any. One on another address (the old
/// agent ran with other ports) is left out: it closes with the handover.
fn take_addr(list: &mut Vec<(SocketAddr, OwnedFd)>, addr: SocketAddr) -> Option<OwnedFd> {
    let i = list.iter().position(|(a, _)| *a == addr)?;
    Some(list.swap_remove(i).1)
}

/// Why a listener could not be opened, with a hint when the port is taken.
fn listen_error(
    pod: &str,
    proto: &str,
    flag: &str,
    addr: SocketAddr,
    e: io::Error,
) -> anyhow::Error {
    let hint = if e.kind() == io::ErrorKind::AddrInUse {
        format!(": something in the pod already uses it; pick another with --{flag}")
    } else {
        String::new()
    };
    anyhow::anyhow!("pod {pod}: cannot listen on {proto} {addr}: {e}{hint}")
}

/// Open the pod's listeners on one of its loopback addresses, or take the handed-over ones
/// bound there (`mine`). A pod without that address (IPv6 off, or lo down for v6) gets none
/// there and keeps working on the other.
fn listen_on(
    ip: IpAddr,
    ports: Ports,
    mark: u32,
    pod: &str,
    mine: &mut PodSockets<OwnedFd>,
    l: &mut PodListeners,
) -> Result<()> {
    let tcp = |list: &mut Vec<(SocketAddr, OwnedFd)>, port: u16, flag: &str| {
        let addr = SocketAddr::new(ip, port);
        if let Some(fd) = take_addr(list, addr) {
            return Ok(Some(TcpListener::from(fd)));
        }
        match sockets::tcp_listener(addr, mark, 1024) {
            Ok(l) => Ok(Some(l)),
            Err(e) if ip.is_ipv6() && e.kind() == io::ErrorKind::AddrNotAvailable => Ok(None),
            Err(e) => Err(listen_error(pod, "TCP", flag, addr, e)),
        }
    };
    let Some(out) = tcp(&mut mine.outbound, ports.outbound, "outbound-port")? else {
        return Ok(());
    };
    l.outbound.push(out);
    l.inbound
        .extend(tcp(&mut mine.inbound, ports.inbound, "inbound-port")?);
    let dns_addr = SocketAddr::new(ip, ports.dns);
    match take_addr(&mut mine.dns, dns_addr) {
        Some(fd) => l.dns.push(UdpSocket::from(fd)),
        None => l.dns.push(
            sockets::udp_bound(dns_addr, mark)
                .map_err(|e| listen_error(pod, "UDP", "dns-port", dns_addr, e))?,
        ),
    }
    Ok(())
}

impl Pod {
    /// Open the pod's namespace, learn its cookie and addresses, and open its listeners.
    /// Nothing is written to the kernel here, so a failure leaves nothing behind.
    pub fn prepare(
        spec: &PodSpec,
        mark: u32,
        ports: Ports,
        handed: Option<Handed>,
    ) -> Result<(Pod, PodListeners)> {
        let netns = Netns::open(&spec.netns)?;
        let worker = netns.worker()?;
        let name = spec.netns.display().to_string();
        let (cookie, addrs, listeners) = worker.run_blocking(move || -> Result<_> {
            let cookie = current_netns_cookie().context("SO_NETNS_COOKIE (needs Linux 5.14+)")?;
            let addrs = current_addresses().context("list the pod's addresses")?;
            // On a takeover, the old agent's sockets of this pod: served as they are, so the
            // pod's listeners never close and nothing is re-bound.
            let mut mine = handed
                .and_then(|h| lock(&h).remove(&cookie))
                .unwrap_or_default();
            let mut l = PodListeners { outbound: Vec::new(), dns: Vec::new(), inbound: Vec::new() };
            for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
                listen_on(ip, ports, mark, &name, &mut mine, &mut l)?;
            }
            if l.outbound.is_empty() {
                bail!("pod {name}: loopback is not up (no 127.0.0.1 to listen on): run `ip link set lo up` in the pod");
            }
            Ok((cookie, addrs, l))
        })??;
        Ok((
            Pod {
                netns,
                worker,
                cookie,
                addrs,
            },
            listeners,
        ))
    }
}
