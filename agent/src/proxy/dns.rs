//! DNS: queries the kernel sent to the pod's DNS listener are forwarded, from the pod's own
//! namespace, to the server the app asked (`SM_DNS_ORIG` by client port); the reply goes back
//! from the listener, and recvmsg4/6 shows the app the original server as its source. A
//! server that does not answer within the DNS timeout earns the client a SERVFAIL.
//!
//! Bounded per pod. A query is read only once the pod has a slot for it (`--pod-dns-inflight`
//! and its share of `--max-dns-inflight`: each query in flight holds an upstream socket) and
//! a token of `--pod-dns-rate`; until then the listener reads nothing, so a flood costs the
//! agent no work: the excess waits in the pod's own socket buffer and, once that is full, the
//! kernel drops it (counted through SO_RXQ_OVFL). No query waits longer than the DNS timeout,
//! or [`MAX_WAIT`] with `--dns-timeout off`. An upstream reply is read into a per-thread buffer
//! and copied at its own size, so a query in flight holds no 64 KiB buffer.
use std::{cell::RefCell, net::SocketAddr, os::fd::AsFd, sync::Arc, time::Duration};

use anyhow::Context;
use sockmesh_common::{peer::pod_refusal, DnsKey, AF_INET, AF_INET6};
use tokio::{io::Interest, net::UdpSocket};
use tracing::{debug, warn};

use super::{
    dns_msg::{check_query, is_reply_to, servfail, MAX_MSG},
    shares::Slot,
    PodCtx, Shared,
};
use crate::{
    policy::{token_bucket::Wait, Clock, Direction, PeerKey},
    sys::{dgram, lock::lock, sockets},
    telemetry::recorder::DnsOutcome,
};

/// The longest a query waits for its answer when `--dns-timeout` is `off`: resolvers gave up
/// long before (glibc: 5 s a try), and the query holds a socket and a slot until then.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

thread_local! {
    /// Where upstream replies land before they are copied out at their size.
    static REPLY: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_MSG]);
}

pub async fn serve(sock: UdpSocket, pod: PodCtx, shared: Shared) {
    let sock = Arc::new(sock);
    if let Err(e) = dgram::count_drops(sock.as_fd()) {
        debug!(pod = %pod.name, error = %e, "no SO_RXQ_OVFL: kernel drops go uncounted");
    }
    let mut buf = vec![0u8; MAX_MSG];
    let mut dropped_seen = 0u32;
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            r = sock.readable() => if let Err(e) = r {
                warn!(pod = %pod.name, error = %e, "dns listener failed");
                return;
            },
        }
        // A query waits: read it only if the pod may send one more upstream now.
        let Some(slot) = dns_slot(&pod, &shared).await else {
            return;
        };
        if !rate_token(&pod, &shared).await {
            return;
        }
        let recv = sock.try_io(Interest::READABLE, || {
            dgram::recv_from(sock.as_fd(), &mut buf)
        });
        let (n, client, dropped) = match recv {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Readiness left over from the last read: nothing was taken, give it back.
                if let Some(b) = lock(&pod.dns_rate).as_mut() {
                    b.refund(1);
                }
                continue;
            }
            Err(e) => {
                warn!(pod = %pod.name, error = %e, "dns receive failed");
                continue;
            }
        };
        if let Some(d) = dropped {
            pod.refusals.add(
                pod_refusal::DNS_DROPPED,
                u64::from(d.wrapping_sub(dropped_seen)),
            );
            dropped_seen = d;
        }
        if let Err(why) = check_query(&buf[..n]) {
            // Not a DNS query: nothing sensible to forward or answer.
            debug!(pod = %pod.name, %client, len = n, why, "dropping a malformed DNS datagram");
            continue;
        }
        let query = buf[..n].to_vec();
        let (sock2, pod2, shared2) = (sock.clone(), pod.clone(), shared.clone());
        shared
            .tasks
            .spawn(async move { answer(sock2, query, client, slot, pod2, shared2).await });
    }
}

/// A slot for one more query in flight, waiting (counted) while the pod or the node has none;
/// `None` once the agent stops.
async fn dns_slot(pod: &PodCtx, shared: &Shared) -> Option<Slot> {
    loop {
        // Registered before the try, so a slot given back in between is not missed.
        let freed = shared.shares.freed();
        match shared.shares.dns(pod.cookie) {
            Ok(slot) => return Some(slot),
            Err(why) => {
                pod.refusals.count(pod_refusal::DNS_INFLIGHT);
                debug!(pod = %pod.name, ?why, "dns: no slot for another query; waiting");
            }
        }
        tokio::select! {
            _ = shared.cancel.cancelled() => return None,
            _ = freed => {}
        }
    }
}

/// A token of the pod's DNS rate, waiting (counted) until one is due; false once the agent
/// stops.
async fn rate_token(pod: &PodCtx, shared: &Shared) -> bool {
    loop {
        let now = shared.admission.clock().now();
        let wait = match lock(&pod.dns_rate).as_mut().map(|b| b.try_take(now, 1)) {
            None | Some(Ok(())) => return true,
            Some(Err(Wait::After(d))) => d,
            // Burst is at least 1: a single token always comes.
            Some(Err(Wait::Never)) => Duration::from_secs(1),
        };
        pod.refusals.count(pod_refusal::DNS_RATE);
        tokio::select! {
            _ = shared.cancel.cancelled() => return false,
            _ = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {}
        }
    }
}

async fn answer(
    sock: Arc<UdpSocket>,
    query: Vec<u8>,
    client: SocketAddr,
    slot: Slot,
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
    // The upstream socket is closed: the slot goes back before the reply is sent.
    drop(slot);
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

/// Sends the query from the pod's namespace and waits (up to the DNS timeout, or
/// [`MAX_WAIT`]) for its answer.
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
    let wait = async {
        loop {
            up.readable().await?;
            // Ignore stray datagrams that are not the answer to this query: the timeout
            // then answers SERVFAIL rather than passing garbage to the app.
            let got = REPLY.with_borrow_mut(|buf| match up.try_recv(buf) {
                Ok(n) => Ok(is_reply_to(query, &buf[..n]).then(|| buf[..n].to_vec())),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            })?;
            if let Some(reply) = got {
                return Ok::<_, std::io::Error>(reply);
            }
        }
    };
    let limit = shared.policy.resolve(key).timeouts.dns;
    // The Elapsed error stays the root cause, so the caller can tell a timeout apart.
    tokio::time::timeout(limit.unwrap_or(MAX_WAIT), wait)
        .await
        .with_context(|| format!("no answer within {:?}", limit.unwrap_or(MAX_WAIT)))?
        .map_err(Into::into)
}
