//! A direct (kernel-tier) connection's bytes while it is open. The kernel counts a direct
//! connection's bytes when it ends (`sock_ops` at the close, one writer per connection); to
//! show them before that, the agent looks at the open ones from outside and publishes, per
//! peer, a floor of the kernel's totals: the ended connections' totals (read first) plus what
//! the open ones have moved (sock_diag `tcp_info`, read after). A connection ending between
//! the two reads is in neither, so the floor is never above the truth; readers show the larger
//! of it and the kernel's totals, so the figure never goes down, and is exact once the
//! connections end. A listing costs the kernel ~3-4 µs per socket, so a pod is looked at
//! again only after twenty times its last listing took (at least every second).
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::warn;

use crate::{
    policy::{Direction, PeerKey},
    proxy::Shared,
    sys::{lock::lock, netns::NetnsWorker, sockdiag_idle},
};

/// When each pod is due for its next look.
#[derive(Default)]
pub struct LiveSchedule {
    due: HashMap<u64, Instant>,
}

/// When to look again after a listing that took `took`: the listing's cost stays under 5 %
/// of a CPU however many connections the pod has, and small pods are looked at every second.
pub fn next_look(now: Instant, took: Duration) -> Instant {
    now + took.saturating_mul(20).max(Duration::from_secs(1))
}

/// One pass over `pods` (name, netns cookie, worker) with kernel-tier peers (`peers`: (pod,
/// peer)): a task per pod that is due.
pub fn sweep<'a>(
    pods: impl Iterator<Item = (&'a Arc<str>, u64, &'a NetnsWorker)>,
    peers: &[(u64, SocketAddr)],
    shared: &Shared,
    schedule: &Arc<Mutex<LiveSchedule>>,
) {
    let mut by_pod: HashMap<u64, HashSet<SocketAddr>> = HashMap::new();
    for &(pod, peer) in peers {
        by_pod.entry(pod).or_default().insert(peer);
    }
    lock(schedule).due.retain(|pod, _| by_pod.contains_key(pod));
    let now = Instant::now();
    for (name, cookie, worker) in pods {
        let Some(mine) = by_pod.remove(&cookie) else {
            continue;
        };
        {
            let mut s = lock(schedule);
            if s.due.get(&cookie).is_some_and(|d| *d > now) {
                continue;
            }
            // Not due again while this look runs; its duration sets the next.
            s.due.insert(cookie, now + Duration::from_secs(3600));
        }
        let (name, worker, s) = (name.clone(), worker.clone(), shared.clone());
        let schedule = schedule.clone();
        shared.tasks.spawn(async move {
            // The ended connections' totals first: see the module doc.
            let ended: HashMap<SocketAddr, (u64, u64)> = mine
                .iter()
                .map(|&p| (p, s.maps.direct_bytes.ended(cookie, p)))
                .collect();
            let started = Instant::now();
            let (wanted, maps) = (mine, s.maps.clone());
            // Summed as the dump is read, nothing kept per connection: a pod may hold 100,000.
            let listed = worker
                .run(move || {
                    let mut open: HashMap<SocketAddr, (u64, u64)> = HashMap::new();
                    sockdiag_idle::established_where(|c| {
                        // By the peer connect() was given, not the remote address: the
                        // kernel may have sent it to one of a Service's endpoints.
                        let peer = maps.verdicts.direct_peer(c.cookie);
                        if let Some(peer) = peer.filter(|p| wanted.contains(p)) {
                            let o = open.entry(peer).or_default();
                            o.0 = o.0.saturating_add(c.bytes_out);
                            o.1 = o.1.saturating_add(c.bytes_in);
                        }
                        false
                    })
                    .map(|_| open)
                })
                .await;
            let took = started.elapsed();
            lock(&schedule)
                .due
                .insert(cookie, next_look(Instant::now(), took));
            let open = match listed.map(|r| r.map_err(anyhow::Error::from)) {
                Ok(Ok(o)) => o,
                Ok(Err(e)) | Err(e) => {
                    warn!(pod = %name, error = %e, "cannot list the pod's direct connections for their bytes");
                    return;
                }
            };
            for (peer, (out, inn)) in ended {
                let (o, i) = open.get(&peer).copied().unwrap_or_default();
                let key = PeerKey {
                    pod: name.clone(),
                    netns_cookie: cookie,
                    direction: Direction::Outbound,
                    peer,
                };
                s.recorder
                    .kernel_bytes_floor(&key, (out.saturating_add(o), inn.saturating_add(i)));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_looked_at_every_second_or_after_twenty_times_its_last_listing() {
        let t = Instant::now();
        assert_eq!(
            next_look(t, Duration::from_millis(2)),
            t + Duration::from_secs(1)
        );
        assert_eq!(
            next_look(t, Duration::from_millis(350)),
            t + Duration::from_secs(7),
            "100,000 sockets (~0.35 s a listing) are looked at every 7 s"
        );
    }
}
