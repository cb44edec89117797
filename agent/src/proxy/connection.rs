//! The path every proxied connection takes, outbound or inbound: admission, a socket of the
//! pod's namespace (so the connection leaves with the pod's address and routes), the
//! upstream connect within the peer's connect timeout, then the relay until it ends.
use std::net::SocketAddr;

use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, info};

use sockmesh_common::peer::pod_refusal;

use super::{
    accept::FdBackoff,
    loopback,
    relay::{self, Limits},
    shares::Slot,
    PodCtx, Shared,
};
use crate::admission::{failure_kind, Refused};
use crate::policy::{BreakerTransition, PeerKey};
use crate::sys::rlimit::out_of_fds;

/// Admit, connect, relay: the path every proxied connection (outbound or inbound) takes.
/// `local` binds the upstream socket first; `on_bound` learns its address before it connects.
/// `slot` is the connection's place in its pod's share, held until it ends.
pub async fn proxy(
    client: TcpStream,
    slot: Slot,
    key: PeerKey,
    dst: SocketAddr,
    on_bound: Option<&(dyn Fn(SocketAddr) + Sync)>,
    pod: &PodCtx,
    shared: &Shared,
) {
    let _slot = slot;
    let admitted = shared
        .admission
        .admit(key.clone(), || shared.shares.queued(pod.cookie))
        .await;
    let permit = match admitted {
        Ok(p) => p,
        Err(Refused::Policy(reason)) => {
            debug!(pod = %pod.name, peer = %key.peer, reason = reason.as_str(), "connection rejected by policy");
            shared.recorder.rejected(&key, reason);
            relay::reset(&client);
            return;
        }
        Err(Refused::PodQueue) => {
            debug!(pod = %pod.name, peer = %key.peer, "the pod has its share of connections waiting: reset");
            pod.refusals.count(pod_refusal::QUEUE_POD_CAP);
            relay::reset(&client);
            return;
        }
    };
    // A Service whose DestinationRule has the agent pick the endpoint: connect there, not to
    // the ClusterIP (held until the connection ends: least-connections counts it).
    let picked = shared.endpoints.pick(&key);
    let dst = picked.as_ref().map_or(dst, |p| p.addr);
    let local = on_bound.map(|_| SocketAddr::new(loopback(dst.is_ipv6()), 0));
    let Some(sock) = upstream_socket(pod, shared, dst, local).await else {
        relay::reset(&client);
        return;
    };
    let started = tokio::time::Instant::now();
    let upstream = async {
        let sock = sock?;
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
    if let Some(p) = &picked {
        p.connect_result(result.is_ok());
    }
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

/// The upstream socket, once there is a file descriptor for it: out of descriptors, the
/// connection (accepted into the last free one) waits for one as the accept loops do
/// ([`FdBackoff`]) instead of being reset, so a connection that waited in the backlog through
/// a shortage is served once it ends. The shortage is the agent's, not the peer's: it is
/// counted against the pod (`accept_backoff`, once per connection that waited) and is neither
/// a breaker input nor part of the connect latency. `None` at the drain deadline. Other
/// errors are the upstream connect's failure, as before.
async fn upstream_socket(
    pod: &PodCtx,
    shared: &Shared,
    dst: SocketAddr,
    local: Option<SocketAddr>,
) -> Option<std::io::Result<TcpSocket>> {
    let mut backoff = FdBackoff::new();
    loop {
        match socket_in_pod(pod, shared, dst, local).await {
            Err(e) if out_of_fds(&e) => {
                if backoff.first() {
                    pod.refusals.count(pod_refusal::ACCEPT_BACKOFF);
                    debug!(pod = %pod.name, %dst, error = %e, "no socket for the upstream connect; waiting for one");
                }
                if !backoff.wait(shared, &shared.abort).await {
                    return None;
                }
            }
            r => return Some(r),
        }
    }
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
