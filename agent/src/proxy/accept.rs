//! Every accept loop's step: the next connection a pod may have proxied, with its slot in the
//! pod's and the node's share. A connection over a cap is reset at once and counted against
//! its pod; an accept that fails for lack of file descriptors (EMFILE, ENFILE) or socket
//! memory backs off instead of retrying at once, which would spin: it waits until a
//! connection of any pod gives its slot back (an event) or a bounded timer, doubling from
//! 5 ms to 1 s while the condition lasts, and counts each backoff against the pod.
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
    let mut backoff = BACKOFF_MIN;
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
                if backoff == BACKOFF_MIN {
                    warn!(pod = %pod.name, listener = what, error = %e, "accept: out of file descriptors; backing off until a connection ends");
                }
                let freed = shared.shares.freed();
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = freed => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            // A connection reset before it was accepted, and the like: the next one is fine.
            Err(e) => debug!(pod = %pod.name, listener = what, error = %e, "accept failed"),
        }
    }
}
