//! Inbound: when an app's wildcard bind is moved to loopback by bind4/6, listen on the pod's
//! own addresses at that port and forward to the app; the app sees the real client because
//! the agent records it in `SM_IN_PEERS` for getpeername()/accept() to answer.
use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
};

use sockmesh_common::{event_kind, Event, SockAddr, TupleKey, AF_INET6};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{accept, connection, loopback, shares::Slot, PodCtx, Shared};
use crate::{
    events,
    handover::proto::{Kind, Offered},
    policy::{Direction, PeerKey},
    sys::{lock::lock, sockets},
};

/// Which app binds exist for one (pod, port), and the listeners serving it.
#[derive(Default)]
struct PortState {
    /// The app's binds; shared with the accept loops so they pick the target at accept time.
    targets: Arc<Mutex<Targets>>,
    v4_listeners: Option<Listening>,
    v6_listeners: Option<Listening>,
}

#[derive(Default, Clone, Copy)]
struct Targets {
    v4_bound: bool,
    v6_bound: bool,
}

impl Targets {
    /// The app's loopback address for a client of this family: the same family when the app
    /// bound it, else the other (a dual-stack `[::]` socket serves IPv4 clients too).
    fn for_client(&self, client_v6: bool, port: u16) -> SocketAddr {
        let v6 = if client_v6 {
            self.v6_bound || !self.v4_bound
        } else {
            !self.v4_bound && self.v6_bound
        };
        SocketAddr::new(loopback(v6), port)
    }
}

/// Turns bind/unbind events into listeners.
#[derive(Default)]
pub struct Inbound {
    /// Each pod with its own `Shared`, whose token stops exactly that pod's listeners.
    pods: HashMap<u64, (PodCtx, Shared)>,
    ports: HashMap<(u64, u16), PortState>,
}

impl Inbound {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serve `pod`'s binds with `shared` (its cancellation token stops them all).
    pub fn add_pod(&mut self, pod: PodCtx, shared: Shared) {
        self.pods.insert(pod.cookie, (pod, shared));
    }

    /// Forget a removed pod: its listeners stop (their tokens are cancelled) and its ports go.
    pub fn remove_pod(&mut self, cookie: u64) {
        self.pods.remove(&cookie);
        self.ports.retain(|(c, _), st| {
            if *c == cookie {
                for l in [st.v4_listeners.take(), st.v6_listeners.take()]
                    .into_iter()
                    .flatten()
                {
                    l.stop.cancel();
                }
            }
            *c != cookie
        });
    }

    /// Serve inbound listeners handed over by the agent being replaced. Which family the app
    /// bound is inferred from the listeners: an IPv6 one exists only for an IPv6 bind (which
    /// also serves IPv4 clients), IPv4 ones alone mean an IPv4 bind.
    pub fn adopt(&mut self, cookie: u64, handed: Vec<(SocketAddr, OwnedFd)>) -> anyhow::Result<()> {
        if handed.is_empty() {
            return Ok(());
        }
        let Some((pod, shared)) = self.pods.get(&cookie).cloned() else {
            anyhow::bail!("inbound listeners handed over for a pod that is not enrolled");
        };
        let mut by_port: HashMap<u16, Vec<(SocketAddr, std::net::TcpListener)>> = HashMap::new();
        for (addr, fd) in handed {
            by_port
                .entry(addr.port())
                .or_default()
                .push((addr, std::net::TcpListener::from(fd)));
        }
        for (port, ls) in by_port {
            let st = self.ports.entry((cookie, port)).or_default();
            let (v6, v4): (Vec<_>, Vec<_>) = ls.into_iter().partition(|(a, _)| a.is_ipv6());
            {
                let mut t = lock(&st.targets);
                t.v6_bound = !v6.is_empty();
                t.v4_bound = v6.is_empty();
            }
            st.v4_listeners = start(&pod, &shared, port, st.targets.clone(), v4);
            st.v6_listeners = start(&pod, &shared, port, st.targets.clone(), v6);
            info!(pod = %pod.name, port, "inbound listeners taken over");
        }
        Ok(())
    }

    /// Duplicates of every inbound listener, for a successor agent.
    pub fn offers(&self) -> anyhow::Result<Vec<(Offered, OwnedFd)>> {
        let mut out = Vec::new();
        for ((cookie, _), st) in &self.ports {
            for l in [&st.v4_listeners, &st.v6_listeners].into_iter().flatten() {
                for (addr, fd) in &l.fds {
                    let o = Offered {
                        netns_cookie: *cookie,
                        kind: Kind::Inbound,
                        addr: *addr,
                    };
                    out.push((o, fd.try_clone()?));
                }
            }
        }
        Ok(out)
    }

    /// Close the duplicates kept for a successor (at shutdown).
    pub fn close_offers(&mut self) {
        for st in self.ports.values_mut() {
            for l in [&mut st.v4_listeners, &mut st.v6_listeners]
                .into_iter()
                .flatten()
            {
                l.fds.clear();
            }
        }
    }

    pub async fn on_event(&mut self, ev: Event) {
        let Some((pod, shared)) = self.pods.get(&ev.netns_cookie).cloned() else {
            return;
        };
        let key = (ev.netns_cookie, ev.port);
        let st = self.ports.entry(key).or_default();
        let v6 = ev.family == AF_INET6;
        let binds = {
            let mut t = lock(&st.targets);
            match ev.kind {
                event_kind::BIND if v6 => t.v6_bound = true,
                event_kind::BIND => t.v4_bound = true,
                event_kind::UNBIND if v6 => t.v6_bound = false,
                event_kind::UNBIND => t.v4_bound = false,
                _ => return,
            }
            *t
        };
        // IPv4 clients are served while any bind exists (dual-stack), IPv6 ones only for a v6 bind.
        let want_v4 = binds.v4_bound || binds.v6_bound;
        let want_v6 = binds.v6_bound;
        let targets = st.targets.clone();
        let mut opened = Vec::new();
        if want_v4 && st.v4_listeners.is_none() {
            st.v4_listeners = open(&pod, &shared, ev.port, false, targets.clone()).await;
            opened.extend(st.v4_listeners.as_ref().map(|_| "ipv4"));
        }
        if want_v6 && st.v6_listeners.is_none() {
            st.v6_listeners = open(&pod, &shared, ev.port, true, targets).await;
            opened.extend(st.v6_listeners.as_ref().map(|_| "ipv6"));
        }
        // Reported once every family of this bind listens, so whoever reacts to the first
        // event can already connect over either family.
        for family in opened {
            info!(pod = %pod.name, port = ev.port, family, "inbound listeners open");
            events::emit(serde_json::json!({
                "event": "inbound_listening", "netns_cookie": pod.cookie, "port": ev.port, "family": family,
            }));
        }
        if !want_v4 {
            close(&pod, &mut st.v4_listeners, ev.port, "ipv4").await;
        }
        if !want_v6 {
            close(&pod, &mut st.v6_listeners, ev.port, "ipv6").await;
        }
        if !want_v4 && !want_v6 {
            self.ports.remove(&key);
        }
    }
}

/// One family's listeners for a port: the token that stops their accept loops, and the loops,
/// awaited on close so `inbound_closed` is only reported once the sockets are really closed.
struct Listening {
    stop: CancellationToken,
    loops: Vec<tokio::task::JoinHandle<()>>,
    /// Duplicates of the listening sockets, for a successor agent; closed with the loops.
    fds: Vec<(SocketAddr, OwnedFd)>,
}

async fn close(pod: &PodCtx, slot: &mut Option<Listening>, port: u16, family: &str) {
    if let Some(l) = slot.take() {
        l.stop.cancel();
        drop(l.fds);
        for h in l.loops {
            let _ = h.await;
        }
        info!(pod = %pod.name, port, family, "inbound listeners closed");
        events::emit(serde_json::json!({
            "event": "inbound_closed", "netns_cookie": pod.cookie, "port": port, "family": family,
        }));
    }
}

/// Listen on every pod address of one family at `port`. None if no address could be used.
async fn open(
    pod: &PodCtx,
    shared: &Shared,
    port: u16,
    v6: bool,
    targets: Arc<Mutex<Targets>>,
) -> Option<Listening> {
    let addrs: Vec<SocketAddr> = pod
        .addrs
        .iter()
        .filter(|ip| ip.is_ipv6() == v6)
        .map(|ip| SocketAddr::new(*ip, port))
        .collect();
    if addrs.is_empty() {
        return None;
    }
    let mark = shared.cfg.mark;
    let opened = pod
        .worker
        .run(move || {
            addrs
                .into_iter()
                .map(|a| (a, sockets::tcp_listener(a, mark, 1024)))
                .collect::<Vec<_>>()
        })
        .await
        .ok()?;
    let listeners = opened.into_iter().filter_map(|(addr, res)| match res {
        Ok(l) => Some((addr, l)),
        Err(e) => {
            // Reported, not fatal: the app keeps its loopback bind, other pods are unaffected.
            warn!(pod = %pod.name, %addr, error = %e, "cannot open inbound listener");
            None
        }
    });
    start(pod, shared, port, targets, listeners.collect())
}

/// Serve already-open listeners of one family at `port`. None if none could be served.
fn start(
    pod: &PodCtx,
    shared: &Shared,
    port: u16,
    targets: Arc<Mutex<Targets>>,
    listeners: Vec<(SocketAddr, std::net::TcpListener)>,
) -> Option<Listening> {
    let token = shared.cancel.child_token();
    let mut loops = Vec::new();
    let mut fds = Vec::new();
    for (addr, l) in listeners {
        // Accepted sockets inherit it (see `sys::sockets::tcp_listener`); a listener handed
        // over by an older agent may lack it.
        let _ = socket2::SockRef::from(&l).set_nodelay(true);
        let dup = l.try_clone().map(OwnedFd::from);
        let listener = match dup.and_then(|d| Ok((d, TcpListener::from_std(l)?))) {
            Ok((d, l)) => {
                fds.push((addr, d));
                l
            }
            Err(e) => {
                warn!(pod = %pod.name, %addr, error = %e, "cannot serve inbound listener");
                continue;
            }
        };
        let (pod2, shared2, token2, targets2) =
            (pod.clone(), shared.clone(), token.clone(), targets.clone());
        loops.push(
            shared
                .tasks
                .spawn(async move { serve(listener, pod2, shared2, token2, targets2, port).await }),
        );
    }
    if loops.is_empty() {
        return None;
    }
    Some(Listening {
        stop: token,
        loops,
        fds,
    })
}

async fn serve(
    listener: TcpListener,
    pod: PodCtx,
    shared: Shared,
    stop: CancellationToken,
    targets: Arc<Mutex<Targets>>,
    port: u16,
) {
    while let Some((client, peer, slot)) =
        accept::next(&listener, &pod, &shared, &stop, "inbound").await
    {
        let t = *lock(&targets);
        let target = t.for_client(peer.is_ipv6(), port);
        let (pod2, shared2) = (pod.clone(), shared.clone());
        shared
            .tasks
            .spawn(async move { handle(client, slot, peer, target, pod2, shared2).await });
    }
}

/// The real-client entry of one connection, removed when the connection is done however it
/// ends (also when the task is dropped at shutdown).
struct PeerEntry<'a> {
    shared: &'a Shared,
    key: Mutex<Option<TupleKey>>,
}

impl PeerEntry<'_> {
    fn record(&self, tuple: TupleKey, client: SocketAddr) {
        let ok = lock(&self.shared.maps.inbound_peers)
            .insert(tuple, SockAddr::from_std(client), 0)
            .is_ok();
        if ok {
            *lock(&self.key) = Some(tuple);
        }
    }
}

impl Drop for PeerEntry<'_> {
    fn drop(&mut self) {
        let key = lock(&self.key).take();
        if let Some(key) = key {
            let _ = lock(&self.shared.maps.inbound_peers).remove(&key);
        }
    }
}

async fn handle(
    client: TcpStream,
    slot: Slot,
    peer: SocketAddr,
    target: SocketAddr,
    pod: PodCtx,
    shared: Shared,
) {
    // The peer of inbound policy is the client's address with the port the pod serves.
    let key = PeerKey {
        pod: pod.name.clone(),
        netns_cookie: pod.cookie,
        direction: Direction::Inbound,
        peer: SocketAddr::new(peer.ip(), target.port()),
    };
    let entry = PeerEntry {
        shared: &shared,
        key: Mutex::new(None),
    };
    // The agent's socket is bound before it connects, so the kernel can tell the app who the
    // real client is from the first accept().
    let record = |local: SocketAddr| {
        let tuple = TupleKey {
            netns_cookie: pod.cookie,
            src: SockAddr::from_std(local),
            dst: SockAddr::from_std(target),
        };
        entry.record(tuple, peer);
    };
    connection::proxy(client, slot, key, target, Some(&record), &pod, &shared).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_the_apps_binds() {
        let v4only = Targets {
            v4_bound: true,
            v6_bound: false,
        };
        assert_eq!(
            v4only.for_client(false, 80),
            "127.0.0.1:80".parse().expect("addr")
        );
        let v6only = Targets {
            v4_bound: false,
            v6_bound: true,
        };
        assert_eq!(
            v6only.for_client(false, 80),
            "[::1]:80".parse().expect("addr")
        );
        assert_eq!(
            v6only.for_client(true, 80),
            "[::1]:80".parse().expect("addr")
        );
        let both = Targets {
            v4_bound: true,
            v6_bound: true,
        };
        assert_eq!(
            both.for_client(false, 80),
            "127.0.0.1:80".parse().expect("addr")
        );
        assert_eq!(both.for_client(true, 80), "[::1]:80".parse().expect("addr"));
    }
}
