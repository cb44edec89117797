//! Outbound: accept what connect4/6 redirected to the pod's loopback listener, ask the kernel
//! for the original destination, and proxy there (see `connection`).

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::{connection, origdst::original_dst, relay, PodCtx, Shared};
use crate::policy::{Direction, PeerKey};

pub async fn serve(listener: TcpListener, pod: PodCtx, shared: Shared) {
    let ipv6 = listener.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
    let spawn = |client: TcpStream| {
        let (pod, shared2) = (pod.clone(), shared.clone());
        shared
            .tasks
            .spawn(async move { handle(client, ipv6, pod, shared2).await });
    };
    loop {
        let accepted = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, _)) => spawn(client),
            // Out of fds or similar: keep serving, the condition is usually transient.
            Err(e) => warn!(pod = %pod.name, error = %e, "outbound accept failed"),
        }
    }
    // Stopping: the kernel no longer redirects here, but connections it already did may wait
    // in the accept queue, and closing the listener would reset them. Serve those (they drain
    // with the rest) without waiting for more.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    while let std::task::Poll::Ready(Ok((client, _))) = listener.poll_accept(&mut cx) {
        spawn(client);
    }
}

async fn handle(client: TcpStream, ipv6: bool, pod: PodCtx, shared: Shared) {
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
    connection::proxy(client, key, origin, None, &pod, &shared).await;
}
