//! Outbound: accept what connect4/6 redirected to the pod's loopback listener, ask the kernel
//! for the original destination, connect there from the pod's own namespace (so the
//! connection leaves with the pod's address and routes), relay.
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use super::{
    loopback,
    origdst::original_dst,
    relay::{self, Limits},
    PodCtx, Shared,
};
use crate::admission::failure_kind;
use crate::policy::{BreakerTransition, Direction, PeerKey};

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
    proxy(client, key, origin, None, &pod, &shared).await;
}

/// Admit, connect, relay: the path every proxied connection (outbound or inbound) takes.
/// `local` binds the upstream socket first; `on_bound` learns its address before it connects.
pub async fn proxy(
    client: TcpStream,
    key: PeerKey,
    dst: SocketAddr,
    on_bound: Option<&(dyn Fn(SocketAddr) + Sync)>,
    pod: &PodCtx,
    shared: &Shared,
) {
    let permit = match shared.admission.admit(key.clone()).await {
        Ok(p) => p,
        Err(reason) => {
            debug!(pod = %pod.name, peer = %key.peer, reason = reason.as_str(), "connection rejected by policy");
            shared.recorder.rejected(&key, reason);
            relay::reset(&client);
            return;
        }
    };
    let local = on_bound.map(|_| SocketAddr::new(loopback(dst.is_ipv6()), 0));
    let started = tokio::time::Instant::now();
    let upstream = async {
        let sock = socket_in_pod(pod, shared, dst, local).await?;
        // Only inbound asks: getsockname is a syscall on every outbound connection otherwise.
        if let Some(f) = on_bound {
            if let Ok(addr) = sock.local_addr() {
                f(addr);
            }
        }
        connect_socket(sock, dst, permit.timeouts.connect).await
    }
    .await;
    let result = upstream.as_ref().map(|_| ()).map_err(failure_kind);
    if let Some(BreakerTransition::Closed) = shared.admission.connect_result(&key, &result) {
        info!(event = "breaker_closed", pod = %key.pod, peer = %key.peer, direction = key.direction.as_str(), "breaker closed");
    }
    shared
        .recorder
        .connected(&key, result.map(|()| started.elapsed()));
    let upstream = match upstream {
        Ok(s) => s,
        Err(e) => {
            debug!(pod = %pod.name, %dst, error = %e, "upstream connect failed; resetting client");
            relay::reset(&client);
            return;
        }
    };
    let shape = |n: u64| shared.admission.shape(&key, n);
    // Decided once per connection, like its timeouts: a reload applies to new connections.
    let limits = Limits {
        idle: permit.timeouts.idle,
        lifetime: permit.timeouts.max_lifetime,
        shape: shared
            .admission
            .shaped(&key)
            .then_some(&shape as relay::Shaper<'_>),
        kernel: shared.maps.relay.as_ref(),
    };
    let bytes = std::sync::Arc::new(relay::Counts::default());
    shared.recorder.relaying(&key, &bytes);
    let r = super::drain::relay_until(client, upstream, limits, bytes.clone(), &shared.abort).await;
    shared.recorder.ended(&key, &r, Some(&bytes));
    debug!(pod = %pod.name, peer = %key.peer, sent = r.a_to_b, received = r.b_to_a, end = ?r.end, "connection closed");
}

/// A marked TCP socket of the pod's namespace, optionally bound to `local` (bind works on
/// any thread: the namespace is the socket's, fixed when it was made).
async fn socket_in_pod(
    pod: &PodCtx,
    shared: &Shared,
    dst: SocketAddr,
    local: Option<SocketAddr>,
) -> std::io::Result<TcpSocket> {
    let std = pod.upstream.take(&pod.worker, dst, shared.cfg.mark).await?;
    if let Some(local) = local {
        socket2::SockRef::from(&std).bind(&local.into())?;
    }
    Ok(TcpSocket::from_std_stream(std))
}

/// Connect within the policy's connect timeout (none: the kernel's own SYN retries).
async fn connect_socket(
    sock: TcpSocket,
    dst: SocketAddr,
    timeout: Option<std::time::Duration>,
) -> std::io::Result<TcpStream> {
    match timeout {
        Some(t) => tokio::time::timeout(t, sock.connect(dst))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect to {dst} timed out after {t:?}"),
                )
            })?,
        None => sock.connect(dst).await,
    }
}
