//! Inbound: accept what `sk_lookup` steered to the pod's inbound listener (127.0.0.1 / ::1 at
//! `--inbound-port`) and forward it to the app over the pod's loopback. The app kept its
//! wildcard bind, so the port it listens on is the connection's own destination port (the
//! accepted socket's local address: `sk_lookup` hands over a connection without rewriting it),
//! and the agent's connection to it is not steered back (loopback destinations never are).
//! The app sees the real client because the agent records it in `SM_IN_PEERS` for
//! getpeername()/accept() to answer.
use std::{net::SocketAddr, sync::Mutex};

use sockmesh_common::{SockAddr, TupleKey};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::{accept, connection, loopback, relay, shares::Slot, PodCtx, Shared};
use crate::{
    policy::{Direction, PeerKey},
    sys::lock::lock,
};

pub async fn serve(listener: TcpListener, pod: PodCtx, shared: Shared) {
    let spawn = |client: TcpStream, peer: SocketAddr, slot: Slot| {
        let (pod, shared2) = (pod.clone(), shared.clone());
        shared
            .tasks
            .spawn(async move { handle(client, slot, peer, pod, shared2).await });
    };
    while let Some((client, peer, slot)) =
        accept::next(&listener, &pod, &shared, &shared.cancel, "inbound").await
    {
        spawn(client, peer, slot);
    }
    // Stopping: the kernel no longer steers here (the pod was unenrolled first), but
    // connections it already did may wait in the accept queue, and closing the listener would
    // reset them. Serve those (they drain with the rest) without waiting for more; the caps
    // still apply.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    while let std::task::Poll::Ready(Ok((client, peer))) = listener.poll_accept(&mut cx) {
        match shared.shares.conn(pod.cookie, true) {
            Ok(slot) => spawn(client, peer, slot),
            Err(why) => {
                pod.refusals.count(super::shares::conn_refusal(why));
                relay::reset(&client);
            }
        }
    }
}

/// Where a steered connection goes: the app's port on the pod's loopback, of the connection's
/// family (a dual-stack `[::]` app takes IPv4 there too). None for a connection the kernel did
/// not steer: one made to the listener's own loopback address from inside the pod.
fn app_target(local: SocketAddr) -> Option<SocketAddr> {
    if local.ip().is_loopback() || local.ip().to_canonical().is_loopback() {
        return None;
    }
    Some(SocketAddr::new(loopback(local.is_ipv6()), local.port()))
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

async fn handle(client: TcpStream, slot: Slot, peer: SocketAddr, pod: PodCtx, shared: Shared) {
    let target = match client.local_addr().map(app_target) {
        Ok(Some(t)) => t,
        Ok(None) => {
            // Nothing to forward to: someone in the pod connected to the listener directly.
            debug!(pod = %pod.name, %peer, "inbound connection not steered by the kernel; resetting");
            relay::reset(&client);
            return;
        }
        Err(e) => {
            debug!(pod = %pod.name, error = %e, "inbound connection gone before it was read");
            return;
        }
    };
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
    fn a_steered_connection_goes_to_its_own_port_on_loopback() {
        let t = |s: &str| app_target(s.parse().expect("addr"));
        assert_eq!(
            t("10.1.2.3:8080"),
            Some("127.0.0.1:8080".parse().expect("a"))
        );
        assert_eq!(t("[fd00::2]:80"), Some("[::1]:80".parse().expect("a")));
        // Not steered: someone in the pod dialled the listener itself.
        assert_eq!(t("127.0.0.1:15006"), None);
        assert_eq!(t("[::1]:15006"), None);
        assert_eq!(t("[::ffff:127.0.0.1]:15006"), None);
    }
}
