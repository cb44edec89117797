//! Outbound: accept what connect4/6 redirected to the pod's loopback listener, ask the kernel
//! for the original destination, connect there from the pod's own namespace (so the
//! connection leaves with the pod's address and routes), relay.
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, warn};

use super::{origdst::original_dst, relay, PodCtx, Shared};
use crate::inpod::sockets;

pub async fn serve(listener: TcpListener, pod: PodCtx, shared: Shared) {
    let ipv6 = listener.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
    loop {
        let accepted = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, _)) => {
                let (pod, shared2) = (pod.clone(), shared.clone());
                shared
                    .tasks
                    .spawn(async move { handle(client, ipv6, pod, shared2).await });
            }
            // Out of fds or similar: keep serving, the condition is usually transient.
            Err(e) => warn!(pod = %pod.name, error = %e, "outbound accept failed"),
        }
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
    let upstream = match connect(&pod, &shared, origin).await {
        Ok(s) => s,
        Err(e) => {
            debug!(pod = %pod.name, %origin, error = %e, "upstream connect failed; resetting client");
            relay::reset(&client);
            return;
        }
    };
    let r = relay::relay(client, upstream).await;
    debug!(pod = %pod.name, %origin, sent = r.a_to_b, received = r.b_to_a, reset = r.reset, "outbound connection closed");
}

/// Connect to `dst` from the pod's namespace, with the agent's mark, within the connect timeout.
pub async fn connect(pod: &PodCtx, shared: &Shared, dst: SocketAddr) -> anyhow::Result<TcpStream> {
    let sock = socket_in_pod(pod, shared, dst, None).await?;
    connect_socket(shared, sock, dst).await
}

/// A marked TCP socket created in the pod's namespace, optionally bound to `local`.
pub async fn socket_in_pod(
    pod: &PodCtx,
    shared: &Shared,
    dst: SocketAddr,
    local: Option<SocketAddr>,
) -> anyhow::Result<TcpSocket> {
    let mark = shared.cfg.mark;
    let std = pod
        .worker
        .run(move || sockets::tcp_for(dst, local, mark))
        .await??;
    Ok(TcpSocket::from_std_stream(std))
}

pub async fn connect_socket(
    shared: &Shared,
    sock: TcpSocket,
    dst: SocketAddr,
) -> anyhow::Result<TcpStream> {
    tokio::time::timeout(shared.cfg.connect_timeout, sock.connect(dst))
        .await
        .map_err(|_| anyhow::anyhow!("connect to {dst} timed out"))?
        .map_err(Into::into)
}
