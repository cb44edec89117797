//! `run --takeover` as the agent runs it, and answering a successor: the glue between the
//! handover protocol (`handover/`) and the agent's pods and datapath.
use std::{
    net::SocketAddr,
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};

use crate::{
    cli::TakeoverMode,
    datapath::{stats, Datapath},
    handover::{
        client::{self, Taken},
        proto::Offered,
        serve::Control,
        Handed,
    },
    inpod::manager::{PodManager, PodTemplate},
    kube::controller::Controller,
    observe,
};

/// Check the running agent is compatible, then take its sockets and pin-dir lock. Nothing
/// changes for the running agent until [`finish`]. `None` without `--takeover`, or with
/// `--takeover=if-running` when no agent runs on these pins.
pub fn begin(bpffs_dir: &Path, ours: &PodTemplate, mode: TakeoverMode) -> Result<Option<Taken>> {
    let required = match mode {
        TakeoverMode::Off => return Ok(None),
        TakeoverMode::Always => true,
        TakeoverMode::IfRunning => false,
    };
    // Pods keep their listener ports, and the operator's routing rules the agent's mark (the
    // programs know each agent's sockets by cookie, not by mark): the pinned config says what
    // the running agent uses. (Checked before asking, so a mismatch leaves the running agent
    // untouched; with `if-running` the pins may be a dead agent's, which the check skips
    // below when nothing answers.)
    let pinned = stats::read_config(bpffs_dir).ok();
    let Some(taken) = client::take_over(bpffs_dir, required)? else {
        info!(
            dir = %bpffs_dir.display(),
            "--takeover=if-running: no agent runs on these pins; starting afresh"
        );
        return Ok(None);
    };
    if let Some(cfg) = pinned {
        let (mark, out, dns) = (cfg.agent_mark, cfg.outbound_port, cfg.dns_port);
        // 0: an agent from before inbound steering (no inbound listener to keep).
        let inb = cfg.inbound_port;
        if (mark, out, dns) != (ours.mark, ours.outbound_port, ours.dns_port)
            || (inb != 0 && inb != ours.inbound_port)
        {
            // Dropping `taken` closes the connection before `Drain`: the old agent serves on.
            bail!(
                "--takeover: the running agent uses --mark {mark} --outbound-port {out} --dns-port {dns} --inbound-port {inb}; give this one the same values"
            );
        }
    }
    info!(
        from = taken.pid,
        "took the running agent's sockets and pin-dir lock"
    );
    Ok(Some(taken))
}

/// Close the handed-over sockets no pod of this agent took (the old agent keeps its own
/// copies until it exits).
pub fn close_unclaimed(handed: &Handed) {
    let n = client::close_unclaimed(handed);
    if n > 0 {
        info!(
            sockets = n,
            "closed the handed-over sockets of pods this agent does not enrol"
        );
    }
}

/// The HTTP listener for `addr` (`flag` names it in errors): the old agent's, if it handed
/// one over bound exactly there, else a new one.
pub fn http_listener(
    addr: SocketAddr,
    flag: &str,
    handed: Option<&mut Vec<(SocketAddr, OwnedFd)>>,
) -> Result<std::net::TcpListener> {
    if let Some(list) = handed {
        if let Some(i) = list.iter().position(|(a, _)| *a == addr) {
            let l = std::net::TcpListener::from(list.swap_remove(i).1);
            l.set_nonblocking(true)
                .with_context(|| format!("{flag} {addr}: the handed-over listener"))?;
            info!(%addr, flag, "serving HTTP on the old agent's listener");
            return Ok(l);
        }
    }
    observe::http::bind(addr, flag)
}

/// How long a successor in Kubernetes waits for the API's first list of this node's pods.
/// Past it the takeover fails (the old agent serves on, untouched) and the container's
/// restart tries again.
const KUBE_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// Enrol the pods the Kubernetes API lists on this node, before the old agent is told to
/// drain: pods it had that the API still lists are served on its sockets, new ones get their
/// own, and the ones the API no longer lists are left out (and dropped by [`finish`]).
pub async fn sync_kube(k: &mut Controller, pods: &mut PodManager, dp: &mut Datapath) -> Result<()> {
    let listed = async {
        while !k.synced() {
            let input = k.next().await;
            k.handle(input, pods, dp);
        }
    };
    tokio::time::timeout(KUBE_SYNC_TIMEOUT, listed)
        .await
        .map_err(|_| {
            anyhow!(
                "--takeover: the Kubernetes API did not list this node's pods within {KUBE_SYNC_TIMEOUT:?}; the running agent serves on: check the API server and the agent's RBAC, then start again"
            )
        })
}

/// Every pod is enrolled on the handed-over sockets: stop capturing pods of the old agent
/// that this one does not serve, then tell the old agent to drain.
pub async fn finish(
    dp: &mut Datapath,
    pods: &PodManager,
    stream: UnixStream,
    pid: u32,
) -> Result<()> {
    dp.unenrol_except(&pods.cookies());
    tokio::task::spawn_blocking(move || client::drain(&stream))
        .await
        .map_err(|e| anyhow!("--takeover: {e}"))??;
    info!(
        event = "took_over",
        from = pid,
        "the old agent drains; serving its pods"
    );
    Ok(())
}

/// A successor asked: hand it duplicates of every listener, of the HTTP listeners in `http`
/// (if it asks for them) and of the pin-dir lock. This agent keeps serving on its own copies
/// until the successor asks it to drain.
pub fn answer(
    control: Option<&mut Control>,
    conn: UnixStream,
    pods: &PodManager,
    http: &[(Offered, OwnedFd)],
    dp: &Datapath,
) {
    let Some(control) = control else { return };
    let lock = dp
        .lock_fd()
        .try_clone_to_owned()
        .context("duplicate the pin-dir lock");
    let http = http
        .iter()
        .map(|(o, fd)| Ok((*o, fd.try_clone().context("duplicate an HTTP listener")?)))
        .collect::<Result<Vec<_>>>();
    match pods.offers().and_then(|o| Ok((o, http?, lock?))) {
        Ok((offers, http, lock)) => {
            info!(sockets = offers.len(), "a successor asks for the listeners");
            control.answer(conn, offers, http, lock);
        }
        Err(e) => warn!(error = format!("{e:#}"), "cannot answer a successor"),
    }
}
