//! The idle timeout of the kernel tier's direct connections. The agent does not own them (the
//! pod's app does, and no byte passes the agent), so it looks at them from outside: every
//! sweep lists each pod's established connections with their idle time (sock_diag, run on the
//! pod's namespace worker), and closes those to a kernel-tier peer that moved no byte either
//! way for the peer's idle timeout (SOCK_DESTROY). What the app sees differs from the proxy
//! tier's FIN on both sides: its next call fails with ECONNABORTED and the peer gets a reset.
use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use tracing::{debug, warn};

use crate::{
    policy::{Direction, PeerKey},
    proxy::Shared,
    sys::{netns::NetnsWorker, sockdiag_idle},
};

/// One sweep of `pods` (name, netns cookie, worker): spawns a task per pod that has a
/// kernel-tier peer with an idle timeout (`idle`: (pod, peer) -> the timeout).
pub fn sweep<'a>(
    pods: impl Iterator<Item = (&'a Arc<str>, u64, &'a NetnsWorker)>,
    idle: &HashMap<(u64, SocketAddr), Duration>,
    shared: &Shared,
) {
    if idle.is_empty() {
        return;
    }
    for (name, cookie, worker) in pods {
        let mine: HashMap<SocketAddr, Duration> = idle
            .iter()
            .filter(|((pod, _), _)| *pod == cookie)
            .map(|((_, peer), t)| (*peer, *t))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let (name, worker, s) = (name.clone(), worker.clone(), shared.clone());
        shared.tasks.spawn(async move {
            let conns = match worker.run(sockdiag_idle::established).await.map(|r| r.map_err(anyhow::Error::from)) {
                Ok(Ok(c)) => c,
                Ok(Err(e)) | Err(e) => {
                    warn!(pod = %name, error = %e, "cannot list the pod's connections for the idle timeout");
                    return;
                }
            };
            for c in conns {
                let Some(t) = mine.get(&c.remote) else {
                    continue;
                };
                if u128::from(c.idle_ms) < t.as_millis() || !s.maps.verdicts.is_direct(c.cookie) {
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
