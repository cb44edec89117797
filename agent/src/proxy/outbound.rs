//! Outbound: accept what connect4/6 redirected to the pod's loopback listener, ask the kernel
//! for the original destination, and proxy there (see `connection`).

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::{accept, connection, origdst::original_dst, relay, shares::Slot, PodCtx, Shared};
use crate::policy::{Direction, PeerKey};

pub async fn serve(listener: TcpListener, pod: PodCtx, shared: Shared) {
    let ipv6 = listener.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
    let spawn = |client: TcpStream, slot: Slot| {
        let (pod, shared2) = (pod.clone(), shared.clone());
        shared
            .tasks
            .spawn(async move { handle(client, slot, ipv6, pod, shared2).await });
    };
    while let Some((client, _, slot)) =
        accept::next(&listener, &pod, &shared, &shared.cancel, "outbound").await
    {
        spawn(client, slot);
    }
    // Stopping: the kernel no longer redirects here, but connections it already did may wait
    // in the accept queue, and closing the listener would reset them. Serve those (they drain
    // with the rest) without waiting for more; the caps still apply.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    while let std::task::Poll::Ready(Ok((client, _))) = listener.poll_accept(&mut cx) {
        match shared.shares.conn(pod.cookie, false) {
            Ok(slot) => spawn(client, slot),
            Err(why) => {
                pod.refusals.count(super::shares::conn_refusal(why));
                relay::reset(&client);
            }
        }
    }
}

async fn handle(client: TcpStream, slot: Slot, ipv6: bool, pod: PodCtx, shared: Shared) {
    let origin = match original_dst(&client, ipv6) {
        Ok(o) => o,
        Err(e) => {
            // Not redirected by us (someone connected to the listener directly): refuse.
            debug!(pod = %pod.name, error = %e, "no original destination; resetting");
            relay::reset(&client);
            return;
        }
    };
    if origin.ip().is_loopback() && origin.port() == shared.cfg.outbound_port {
        warn!(pod = %pod.name, %origin, "refusing a connection to the outbound listener itself");
        relay::reset(&client);
        return;
    }
    let key = PeerKey {
        pod: pod.name.clone(),
        netns_cookie: pod.cookie,
        direction: Direction::Outbound,
        peer: origin,
    };
    connection::proxy(client, slot, key, origin, None, &pod, &shared).await;
}
