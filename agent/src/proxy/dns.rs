//! DNS: queries the kernel sent to the pod's DNS listener are forwarded, from the pod's own
//! namespace, to the server the app asked (`SM_DNS_ORIG` by client port); the reply goes back
//! from the listener, and recvmsg4/6 shows the app the original server as its source. A
//! server that does not answer within the DNS timeout earns the client a SERVFAIL.
use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use sockmesh_common::{DnsKey, AF_INET, AF_INET6};
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use super::{PodCtx, Shared};
use crate::{
    inpod::sockets,
    observe::recorder::DnsOutcome,
    policy::{Direction, PeerKey},
};

/// Largest UDP DNS message (EDNS0 allows up to 65535 bytes).
const MAX_MSG: usize = 65_535;

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
    let server = shared
        .maps
        .dns_origins
        .lock()
        .ok()
        .and_then(|m| m.get(&key, 0).ok())
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
    let id = query
        .get(..2)
        .ok_or_else(|| anyhow::anyhow!("query too short"))?
        .to_vec();
    let key = PeerKey {
        pod: pod.name.clone(),
        direction: Direction::Outbound,
        peer: server,
    };
    let result = exchange(query, &id, server, &key, pod, shared).await;
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
    id: &[u8],
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
            // Ignore stray datagrams that are not the answer to this query.
            if n >= 12 && buf[..2] == id[..] {
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

/// A SERVFAIL answer to `query`: same id, opcode, RD and question; QR and RA set; no records.
/// None for a message too malformed to answer.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    // Walk the question section to know how much of it to echo.
    let mut pos = 12;
    for _ in 0..qdcount {
        loop {
            let len = *query.get(pos)? as usize;
            if len == 0 {
                pos += 1;
                break;
            }
            if len & 0xc0 != 0 {
                // A compression pointer ends the name.
                pos += 2;
                break;
            }
            pos += 1 + len;
        }
        pos += 4;
        if pos > query.len() {
            return None;
        }
    }
    let mut out = query[..pos].to_vec();
    out[2] = 0x80 | (query[2] & 0x79); // QR, opcode, RD; AA and TC cleared
    out[3] = 0x80 | 0x02; // RA, RCODE=SERVFAIL
    out[6..12].fill(0);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str) -> Vec<u8> {
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        // An EDNS OPT record in the additional section, which a SERVFAIL must not echo.
        q.extend_from_slice(&[0, 0, 41, 16, 0, 0, 0, 0, 0, 0, 0]);
        q
    }

    #[test]
    fn servfail_echoes_the_question_only() {
        let q = query("demo.sockmesh.test");
        let r = servfail(&q).expect("answerable");
        assert_eq!(&r[..2], &[0xab, 0xcd]);
        assert_eq!(r[2], 0x81, "QR and RD");
        assert_eq!(r[3] & 0x0f, 2, "SERVFAIL");
        assert_eq!(&r[4..6], &[0, 1], "one question");
        assert_eq!(&r[6..12], &[0; 6], "no records");
        assert_eq!(r.len(), 12 + 20 + 4);
    }

    #[test]
    fn servfail_refuses_garbage() {
        assert_eq!(servfail(&[]), None);
        assert_eq!(servfail(&[0; 11]), None);
        let mut q = query("a.b");
        q[2] |= 0x80; // a response, not a query
        assert_eq!(servfail(&q), None);
        let mut q = query("a.b");
        q.truncate(14); // question cut short
        assert_eq!(servfail(&q), None);
        let mut q = query("a.b");
        q[5] = 200; // claims 200 questions
        assert_eq!(servfail(&q), None);
    }
}
