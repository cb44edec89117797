//! The idle timeout of the kernel tier's direct connections. The agent does not own them (the
//! pod's app does, and no byte passes the agent), so it looks at them from outside: every
//! sweep lists each pod's established connections with their idle time (sock_diag, run on the
//! pod's namespace worker), and closes those to a kernel-tier peer that moved no byte either
//! way for the peer's idle timeout (SOCK_DESTROY). What the app sees differs from the proxy
//! tier's FIN on both sides: its next call fails with ECONNABORTED and the peer gets a reset.
//! A pod is listed again only when one of its connections could next pass its timeout
//! (`policy::idle_sweep`), not every sweep: listing 100,000 connections is not free.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::{debug, warn};

use crate::{
    policy::{
        clock::Nanos,
        idle_sweep::{IdleSchedule, NextSweep, Timeouts},
        Direction, PeerKey,
    },
    proxy::Shared,
    sys::{clock::monotonic_ns, lock::lock, netns::NetnsWorker, sockdiag_idle},
};

/// One sweep of `pods` (name, netns cookie, worker): spawns a task per pod that has a
/// kernel-tier peer with an idle timeout (`idle`: (pod, peer) -> the timeout) and is due for
/// a listing (`schedule`).
pub fn sweep<'a>(
    pods: impl Iterator<Item = (&'a Arc<str>, u64, &'a NetnsWorker)>,
    idle: &HashMap<(u64, SocketAddr), Duration>,
    shared: &Shared,
    schedule: &Arc<Mutex<IdleSchedule>>,
) {
    lock(schedule).retain(|pod| idle.keys().any(|(p, _)| *p == pod));
    if idle.is_empty() {
        return;
    }
    let now = Nanos(monotonic_ns());
    for (name, cookie, worker) in pods {
        let mine: Timeouts = idle
            .iter()
            .filter(|((pod, _), _)| *pod == cookie)
            .map(|((_, peer), t)| (*peer, *t))
            .collect();
        if mine.is_empty() || !lock(schedule).due(cookie, &mine, now) {
            continue;
        }
        // Not due again while this listing runs; its result sets the real time.
        lock(schedule).swept(cookie, mine.clone(), now, Duration::MAX);
        let (name, worker, s) = (name.clone(), worker.clone(), shared.clone());
        let schedule = schedule.clone();
        shared.tasks.spawn(async move {
            let t = mine.clone();
            // Only connections past their timeout are kept; the rest only say when to look next.
            let listed = worker.run(move || {
                let mut next = NextSweep::new(&t);
                let past = sockdiag_idle::established_where(|c| {
                    next.see(&c.remote, Duration::from_millis(c.idle_ms.into()))
                });
                past.map(|p| (p, next.wait()))
            });
            let conns = match listed.await.map(|r| r.map_err(anyhow::Error::from)) {
                Ok(Ok((c, wait))) => {
                    lock(&schedule).swept(cookie, mine, now, wait);
                    c
                }
                Ok(Err(e)) | Err(e) => {
                    // Tried again at the next sweep.
                    lock(&schedule).swept(cookie, mine, now, Duration::ZERO);
                    warn!(pod = %name, error = %e, "cannot list the pod's connections for the idle timeout");
                    return;
                }
            };
            for c in conns {
                if !s.maps.verdicts.is_direct(c.cookie) {
                    continue;
                }
                match worker.run(move || sockdiag_idle::destroy(&c)).await.map(|r| r.map_err(anyhow::Error::from)) {
                    Ok(Ok(())) => {
                        debug!(pod = %name, peer = %c.remote, idle_ms = c.idle_ms, "idle direct connection closed");
                        let key = PeerKey {
                            pod: name.clone(),
                            netns_cookie: cookie,
                            direction: Direction::Outbound,
                            peer: c.remote,
                        };
                        s.recorder.kernel_idle_closed(&key);
                    }
                    // Gone meanwhile: nothing to close.
                    Ok(Err(e))
                        if e.downcast_ref::<std::io::Error>().and_then(|e| e.raw_os_error())
                            == Some(libc::ENOENT) => {}
                    Ok(Err(e)) | Err(e) => {
                        warn!(pod = %name, peer = %c.remote, error = %e, "cannot close an idle direct connection")
                    }
                }
            }
        });
    }
}
