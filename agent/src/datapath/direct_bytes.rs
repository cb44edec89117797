//! The kernel tier's byte totals of a peer's ended direct connections (`SM_PEER_STATS`), as
//! the agent reads them to show a direct connection's bytes while it is open (see
//! `inpod::live_bytes`).
use std::{net::SocketAddr, path::Path, sync::Mutex};

use anyhow::Result;
use aya::maps::{MapData, PerCpuHashMap};
use sockmesh_common::{
    peer::{self, direction, peer_counter, PeerKernelStats, PeerKey},
    SockAddr,
};

use crate::sys::lock::lock;

pub struct DirectBytes {
    stats: Mutex<PerCpuHashMap<MapData, PeerKey, PeerKernelStats>>,
}

impl DirectBytes {
    /// A second handle on the pinned map (the kernel programs' object owns the first).
    pub fn open(dir: &Path) -> Result<DirectBytes> {
        Ok(DirectBytes {
            stats: Mutex::new(super::stats::open(dir, peer::map_names::PEER_STATS)?.try_into()?),
        })
    }

    /// (out, in) of the ended direct connections from pod `netns_cookie` to `peer`, summed
    /// over the CPUs; zeros when the kernel counted none.
    pub fn ended(&self, netns_cookie: u64, peer: SocketAddr) -> (u64, u64) {
        let key = PeerKey {
            netns_cookie,
            peer: SockAddr::from_std(peer),
            direction: direction::OUTBOUND,
            _pad: 0,
        };
        let Ok(per_cpu) = lock(&self.stats).get(&key, 0) else {
            return (0, 0);
        };
        per_cpu.iter().fold((0u64, 0u64), |(o, i), c| {
            (
                o.wrapping_add(c.counters[peer_counter::BYTES_OUT]),
                i.wrapping_add(c.counters[peer_counter::BYTES_IN]),
            )
        })
    }
}
