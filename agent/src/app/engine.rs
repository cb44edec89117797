//! The policy engine as `sockmesh run` wires it to the kernel: fast-reject verdicts for the
//! proxy tier, and the kernel tier's entries (`--fast-path`).
use std::sync::Arc;

use sockmesh_common::peer;
use tracing::{info, warn};

use crate::{
    admission::{Admission, KernelTier},
    datapath::Datapath,
    policy::{Direction, PeerKey, PeerTable},
    rules::{PolicyArgs, PolicyHandle},
};

/// The policy engine behind every proxied connection; an open breaker or an empty rate
/// bucket becomes a kernel verdict so the pod's next connect() to that peer fails at once,
/// and an outbound peer whose policy the kernel enforces goes to the kernel tier.
pub fn admission(
    dp: &Datapath,
    args: &PolicyArgs,
    policy: &PolicyHandle,
    fast_path: crate::cli::FastPath,
) -> Arc<Admission<PeerKey>> {
    let table = PeerTable::new(args.table_config(), policy.source());
    // Entries a previous agent left (same pins) were handed over under its policy.
    let left = dp.maps.verdicts.demote_all();
    if left > 0 {
        info!(
            peers = left,
            "kernel-tier peers of a previous agent back on the proxy tier"
        );
    }
    let (maps, promote_maps, demote_maps) = (dp.maps.clone(), dp.maps.clone(), dp.maps.clone());
    let auto = fast_path == crate::cli::FastPath::Auto;
    // Probed once: without it, peers with an idle timeout stay on the proxy tier.
    let idle_sweep = auto && crate::sys::sockdiag_idle::destroy_supported();
    if auto && !idle_sweep {
        warn!("this kernel cannot destroy sockets from outside (CONFIG_INET_DIAG_DESTROY): peers with an idle timeout stay on the proxy tier");
    }
    let kernel = KernelTier {
        auto,
        idle_sweep,
        promote: Box::new(move |key: &PeerKey, entry| {
            if key.direction != Direction::Outbound {
                return Err(peer::tier_reason::INBOUND);
            }
            match promote_maps
                .verdicts
                .promote(key.netns_cookie, key.peer, entry)
            {
                true => Ok(()),
                false => Err(peer::tier_reason::MAP_FULL),
            }
        }),
        demote_all: Box::new(move || demote_maps.verdicts.demote_all()),
    };
    Admission::with_kernel_tier(
        table,
        Box::new(move |key: &PeerKey, until: Option<(u64, u32)>| {
            // Only outbound connect()s pass through the kernel hook that reads verdicts.
            if key.direction == Direction::Outbound {
                match until {
                    Some((t, why)) => maps.verdicts.refuse(key.netns_cookie, key.peer, t, why),
                    None => maps.verdicts.lift(key.netns_cookie, key.peer),
                }
            }
        }),
        Some(kernel),
    )
}
