//! The policy engine as `sockmesh run` wires it to the kernel: fast-reject verdicts for the
//! proxy tier, and the kernel tier's entries (`--fast-path`).
use std::sync::Arc;

use sockmesh_common::peer;
use tracing::{info, warn};

use crate::{
    admission::{
        endpoints::{Endpoints, KernelResult},
        Admission, KernelTier,
    },
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
    endpoints: &Arc<Endpoints>,
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
    let endpoints = endpoints.clone();
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
            // A Service whose endpoint the agent picks: connect4/6 picks from the same
            // endpoints (written first, so no direct connect sees the VIP without them).
            let set = endpoints
                .kernel_set(key)
                .map_err(|()| peer::tier_reason::ENDPOINT_SELECTION)?
                .unwrap_or_default();
            if !promote_maps
                .endpoints
                .write(key.netns_cookie, key.peer, &set)
            {
                return Err(peer::tier_reason::MAP_FULL);
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

/// Every second: the kernel tier's direct connect results per picked endpoint go to the
/// outlier pools the proxy uses, and each kernel-tier Service's endpoints are rewritten when
/// the endpoints in service changed (an ejection, a return, a slice change); peers no longer
/// on the kernel tier are let go.
pub fn kernel_endpoints(dp: &Datapath, endpoints: &Endpoints) {
    let maps = &dp.maps;
    endpoints.kernel_forget(|netns, vip| {
        let kernel = maps.verdicts.is_kernel(netns, vip);
        if !kernel {
            maps.endpoints.write(netns, vip, &[]);
        }
        kernel
    });
    let results: Vec<KernelResult> = maps
        .endpoints
        .take_results()
        .into_iter()
        .map(
            |(netns_cookie, vip, endpoint, successes, failures, consecutive)| KernelResult {
                netns_cookie,
                vip,
                endpoint,
                successes,
                failures,
                consecutive,
            },
        )
        .collect();
    for (netns, vip, set) in endpoints.kernel_pass(&results) {
        match set {
            Some(set) => {
                maps.endpoints.write(netns, vip, &set);
                crate::events::emit(serde_json::json!({
                    "event": "kernel_endpoints", "peer": vip.to_string(),
                    "endpoints": set.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                }));
            }
            // More endpoints than the kernel holds: the proxy takes the Service back and
            // decides its tier again (`endpoint_selection`).
            None => {
                maps.verdicts.lift(netns, vip);
                maps.endpoints.write(netns, vip, &[]);
            }
        }
    }
}
