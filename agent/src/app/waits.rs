//! What the agent's event loop waits on, each cancel-safe (polled in a `select!`) and
//! pending forever when its source is off.
use sockmesh_common::Event;

use crate::{
    admission::ProxyClock,
    handover::serve::{Control, Step},
    kube::controller::{Controller, Input},
    policy::{bind_queue::BindQueue, Clock},
    rules::PolicyWatcher,
};

/// The next bind/unbind event a pod may have applied now, waiting (on a timer, not polling)
/// for the first pod's next token while every waiting pod is out of them. Cancel-safe: an
/// event leaves the queue only in the poll that returns it.
pub async fn next_bind(q: &mut BindQueue<Event>, clock: ProxyClock) -> Event {
    loop {
        let now = clock.now();
        if let Some((_, ev)) = q.pop(now) {
            return ev;
        }
        match q.next_due(now) {
            Some(t) => tokio::time::sleep_until(clock.instant(t)).await,
            None => std::future::pending().await,
        }
    }
}

/// Sleeps until `t`; never without one.
pub async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

pub async fn next_step(control: Option<&mut Control>) -> Step {
    match control {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

pub async fn next_kube(kube: Option<&mut Controller>) -> Input {
    match kube {
        Some(k) => k.next().await,
        None => std::future::pending().await,
    }
}

pub async fn policy_changed(watcher: Option<&mut PolicyWatcher>) -> std::io::Result<()> {
    match watcher {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}
