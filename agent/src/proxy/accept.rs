//! Every accept loop's step: the next connection a pod may have proxied, with its slot in the
//! pod's and the node's share. A connection over a cap is reset at once and counted against
//! its pod; an accept that fails for lack of file descriptors (EMFILE, ENFILE) or socket
//! memory backs off instead of retrying at once, which would spin: it waits until a
//! connection of any pod gives its slot back (an event) or a bounded timer, doubling from
//! 5 ms to 1 s while the condition lasts, and counts each backoff against the pod. The
//! connection stays in the listener's backlog meanwhile (a failed accept takes nothing from
//! it), and is served once descriptors are back.
use std::{net::SocketAddr, time::Duration};

use sockmesh_common::peer::pod_refusal;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    relay,
    shares::{conn_refusal, Slot},
    PodCtx, Shared,
};
use crate::sys::rlimit::out_of_fds;

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Waiting out a shortage of file descriptors without spinning: each wait ends when a
/// connection of any pod gives its slot back (it frees at least one descriptor) or after a
/// delay that doubles from [`BACKOFF_MIN`] to [`BACKOFF_MAX`] (descriptors freed by anything
/// else, say another process's exit under ENFILE, wake no one).
pub struct FdBackoff {
    delay: Duration,
    waits: u32,
}

impl FdBackoff {
    pub fn new() -> Self {
        FdBackoff {
            delay: BACKOFF_MIN,
            waits: 0,
        }
    }

    /// Whether no wait happened yet: the shortage just began (what is worth a log line).
    pub fn first(&self) -> bool {
        self.waits == 0
    }

    /// The longest the next wait lasts, then doubles (capped): the pure part of [`Self::wait`].
    fn step(&mut self) -> Duration {
        let d = self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        self.waits += 1;
        d
    }

    /// One wait; false once `stop` fires.
    pub async fn wait(&mut self, shared: &Shared, stop: &CancellationToken) -> bool {
        let delay = self.step();
        let freed = shared.shares.freed();
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = freed => true,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// The next connection on `listener` that `pod` may have proxied, with its slot; `None` once
/// `stop` fires. `what` is `outbound` or `inbound`: which of the pod's shares, and the
/// listener's name in logs.
pub async fn next(
    listener: &TcpListener,
    pod: &PodCtx,
    shared: &Shared,
    stop: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr, Slot)> {
    let mut backoff = FdBackoff::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, peer)) => match shared.shares.conn(pod.cookie, what == "inbound") {
                Ok(slot) => return Some((client, peer, slot)),
                Err(why) => {
                    pod.refusals.count(conn_refusal(why));
                    debug!(pod = %pod.name, ?why, "connection over the pod's share: reset");
                    relay::reset(&client);
                }
            },
            Err(e) if out_of_fds(&e) => {
                pod.refusals.count(pod_refusal::ACCEPT_BACKOFF);
                if backoff.first() {
                    warn!(pod = %pod.name, listener = what, error = %e, "accept: out of file descriptors; backing off until a connection ends");
                }
                if !backoff.wait(shared, stop).await {
                    return None;
                }
            }
            // A connection reset before it was accepted, and the like: the next one is fine.
            Err(e) => debug!(pod = %pod.name, listener = what, error = %e, "accept failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_to_its_cap() {
        let mut b = FdBackoff::new();
        assert!(b.first());
        let steps: Vec<u64> = (0..10).map(|_| b.step().as_millis() as u64).collect();
        assert_eq!(steps, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert!(!b.first());
    }
}
