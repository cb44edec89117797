//! DNS: queries the kernel sent to the pod's DNS listener are forwarded, from the pod's own
//! namespace, to the server the app asked (`SM_DNS_ORIG` by client port); the reply goes back
//! from the listener, and recvmsg4/6 shows the app the original server as its source. A
//! server that does not answer within the DNS timeout earns the client a SERVFAIL.
use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use sockmesh_common::{DnsKey, AF_INET, AF_INET6};
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use super::{
    dns_msg::{check_query, is_reply_to, servfail},
    PodCtx, Shared,
};
use crate::{
    policy::{Direction, PeerKey},
    sys::{lock::lock, sockets},
    telemetry::recorder::DnsOutcome,
};

use super::dns_msg::MAX_MSG;

pub async fn serve(sock: UdpSocket, pod: PodCtx, shared: Shared) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; MAX_MSG];
    loop {
        let (n, client) = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => { warn!(pod = %pod.name, error = %e, "dns receive failed"); continue; }
            },
        };
        if let Err(why) = check_query(&buf[..n]) {
            // Not a DNS query: nothing sensible to forward or answer.
            debug!(pod = %pod.name, %client, len = n, why, "dropping a malformed DNS datagram");
            continue;
        }
        let query = buf[..n].to_vec();
        let (sock2, pod2, shared2) = (sock.clone(), pod.clone(), shared.clone());
        shared
            .tasks
            .spawn(async move { answer(sock2, query, client, pod2, shared2).await });
    }
}

async fn answer(
    sock: Arc<UdpSocket>,
    query: Vec<u8>,
    client: SocketAddr,
    pod: PodCtx,
    shared: Shared,
) {
    let key = DnsKey {
        netns_cookie: pod.cookie,
        port: client.port().to_be(),
        family: if client.is_ipv4() { AF_INET } else { AF_INET6 },
        _pad: 0,
    };
    let server = lock(&shared.maps.dns_origins)
        .get(&key, 0)
        .ok()
        .and_then(|s| s.to_std());
    let reply = match server {
        Some(server) => match forward(&query, server, &pod, &shared).await {
            Ok(r) => Some(r),
            Err(e) => {
                debug!(pod = %pod.name, %server, error = %e, "dns upstream failed; answering SERVFAIL");
                servfail(&query)
            }
        },
        None => {
            debug!(pod = %pod.name, %client, "dns query with no known server; answering SERVFAIL");
            servfail(&query)
        }
    };
    if let Some(reply) = reply {
        if let Err(e) = sock.send_to(&reply, client).await {
            debug!(pod = %pod.name, %client, error = %e, "dns reply not delivered");
        }
    }
}

async fn forward(
    query: &[u8],
    server: SocketAddr,
    pod: &PodCtx,
    shared: &Shared,
) -> anyhow::Result<Vec<u8>> {
    let key = PeerKey {
        pod: pod.name.clone(),
        netns_cookie: pod.cookie,
        direction: Direction::Outbound,
        peer: server,
    };
    let result = exchange(query, server, &key, pod, shared).await;
    let outcome = match &result {
        Ok(_) => DnsOutcome::Answered,
        Err(e) if e.is::<tokio::time::error::Elapsed>() => DnsOutcome::TimedOut,
        Err(_) => DnsOutcome::Failed,
    };
    shared.recorder.dns(&key, outcome);
    result
}

/// Sends the query from the pod's namespace and waits (up to the DNS timeout) for its answer.
async fn exchange(
    query: &[u8],
    server: SocketAddr,
    key: &PeerKey,
    pod: &PodCtx,
    shared: &Shared,
) -> anyhow::Result<Vec<u8>> {
    let mark = shared.cfg.mark;
    let std = pod
        .worker
        .run(move || sockets::udp_for(server, mark))
        .await??;
    let up = UdpSocket::from_std(std)?;
    up.connect(server).await?;
    up.send(query).await?;
    let mut buf = vec![0u8; MAX_MSG];
    let wait = async {
        loop {
            let n = up.recv(&mut buf).await?;
            // Ignore stray datagrams that are not the answer to this query: the timeout
            // then answers SERVFAIL rather than passing garbage to the app.
            if is_reply_to(query, &buf[..n]) {
                return Ok::<_, std::io::Error>(buf[..n].to_vec());
            }
        }
    };
    let Some(limit) = shared.policy.resolve(key).timeouts.dns else {
        return wait.await.map_err(Into::into);
    };
    // The Elapsed error stays the root cause, so the caller can tell a timeout apart.
    tokio::time::timeout(limit, wait)
        .await
        .with_context(|| format!("no answer within {limit:?}"))?
        .map_err(Into::into)
}
