//! How `sockmesh run` ends: a graceful drain that takes the pods out of the mesh (SIGTERM), or
//! one that leaves them to a successor agent (after a handover).
use std::time::Duration;

use tracing::{info, warn};

use crate::{
    datapath::Datapath, events, inpod::manager::PodManager, proxy::Shared,
    telemetry::flush::Observer,
};

/// What happens to the pods and pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Unenrol every pod, then detach or keep the pins per `--keep-pins`.
    Stop,
    /// Another agent serves the pods now (or still does, if a takeover failed): leave
    /// `SM_PODS` and the pins as they are.
    Release,
}

/// How long reset connections get to close after the drain deadline. Resetting is immediate;
/// this only bounds a task caught before its relay (connecting upstream, queued for
/// admission), which then ends with the runtime.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// How long the listeners keep accepting after the pods are unenrolled. A connection the
/// kernel redirected (or steered) just before sits in a listener's accept queue, and closing
/// the listener resets it: seen once in ~800 connections of a client looping through a
/// SIGTERM. After the unenrolment nothing new arrives, so this only lets the accept loops
/// take what is already queued.
const SETTLE: Duration = Duration::from_millis(100);

/// Graceful drain. Stop redirecting first (new connections go direct; not on `Release`, where
/// the successor accepts them on the same sockets), stop accepting (the accept loops end and
/// close their listeners), give live connections up to `grace` to finish, reset (RST) the ones
/// still open, then detach, or keep the pins per `--keep-pins`. Every wait is on the task
/// tracker, woken when the last task ends: nothing polls. The final per-peer figures are
/// written once every connection task has ended.
pub async fn stop(
    mut dp: Datapath,
    shared: &Shared,
    observer: &Observer,
    pods: &mut PodManager,
    grace: Duration,
    exit: Exit,
) {
    if exit == Exit::Stop {
        dp.unenrol_all();
        tokio::time::sleep(SETTLE).await;
        for c in pods.cookies() {
            observer.pod_removed(c);
            info!(
                event = "pod_removed",
                netns_cookie = c,
                reason = "agent stopping",
                "pod removed"
            );
        }
    }
    shared.cancel.cancel();
    // The serve loops end now; their sockets close with the last copy (a successor's, if any).
    pods.close_offers();
    shared.tasks.close();
    events::emit(serde_json::json!({
        "event": "draining",
        "tasks": shared.tasks.len(),
        "grace_ms": grace.as_millis() as u64,
    }));
    let mut reset = 0;
    if tokio::time::timeout(grace, shared.tasks.wait())
        .await
        .is_err()
    {
        reset = shared.tasks.len();
        warn!(
            left = reset,
            "connections still open after the drain timeout; resetting them"
        );
        shared.abort.cancel();
        if tokio::time::timeout(ABORT_WAIT, shared.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                left = shared.tasks.len(),
                "tasks still running after the reset; they end with the agent"
            );
        }
    }
    // Every connection task has ended (or was dropped): the figures are complete now.
    observer.flush();
    events::emit(serde_json::json!({ "event": "drained", "reset": reset }));
    match exit {
        Exit::Stop => dp.shutdown(),
        Exit::Release => dp.release(),
    }
}
