//! `run --takeover` as the agent runs it, and answering a successor: the glue between the
//! handover protocol (`handover/`) and the agent's pods and datapath.
use std::{os::unix::net::UnixStream, path::Path};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};

use crate::{
    datapath::{stats, Datapath},
    handover::{
        client::{self, Taken},
        serve::Control,
    },
    inpod::manager::{PodManager, PodTemplate},
};

/// Check the running agent is compatible, then take its sockets and pin-dir lock. Nothing
/// changes for the running agent until [`finish`].
pub fn begin(bpffs_dir: &Path, ours: &PodTemplate) -> Result<Taken> {
    // Pods keep their listener ports, and the operator's routing rules the agent's mark (the
    // programs know each agent's sockets by cookie, not by mark): the pinned config says what
    // the running agent uses.
    if let Ok(cfg) = stats::read_config(bpffs_dir) {
        let (mark, out, dns) = (cfg.agent_mark, cfg.outbound_port, cfg.dns_port);
        // 0: an agent from before inbound steering (no inbound listener to keep).
        let inb = cfg.inbound_port;
        if (mark, out, dns) != (ours.mark, ours.outbound_port, ours.dns_port)
            || (inb != 0 && inb != ours.inbound_port)
        {
            bail!(
                "--takeover: the running agent uses --mark {mark} --outbound-port {out} --dns-port {dns} --inbound-port {inb}; give this one the same values"
            );
        }
    }
    let taken = client::take_over(bpffs_dir)?;
    info!(
        from = taken.pid,
        "took the running agent's sockets and pin-dir lock"
    );
    Ok(taken)
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

/// A successor asked: hand it duplicates of every listener and of the pin-dir lock. This
/// agent keeps serving on its own copies until the successor asks it to drain.
pub fn answer(control: Option<&mut Control>, conn: UnixStream, pods: &PodManager, dp: &Datapath) {
    let Some(control) = control else { return };
    let lock = dp
        .lock_fd()
        .try_clone_to_owned()
        .context("duplicate the pin-dir lock");
    match pods.offers().and_then(|o| Ok((o, lock?))) {
        Ok((offers, lock)) => {
            info!(sockets = offers.len(), "a successor asks for the listeners");
            control.answer(conn, offers, lock);
        }
        Err(e) => warn!(error = format!("{e:#}"), "cannot answer a successor"),
    }
}
