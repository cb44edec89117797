//! What per-peer state is keyed by.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

/// Which way a connection goes, seen from the pod.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// The pod connects out; the peer is the original destination.
    Outbound,
    /// A client connects to the pod; the peer is the client.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    /// `outbound` or `inbound` (exactly).
    pub fn parse(s: &str) -> Option<Direction> {
        match s {
            "outbound" => Some(Direction::Outbound),
            "inbound" => Some(Direction::Inbound),
            _ => None,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whose share of the per-peer table an entry counts against: the pod it belongs to. A full
/// table makes room from the pod that holds its share or more, never from one under it.
pub trait Tenant {
    fn tenant(&self) -> u64;
}

/// The tests' keys: (pod, inbound, peer).
#[cfg(test)]
impl Tenant for (u32, bool, u32) {
    fn tenant(&self) -> u64 {
        u64::from(self.0)
    }
}

/// What per-peer state is keyed by: the `K` of `PeerTable<PeerKey>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// The pod's name (its netns path as given to `--pod`, or `namespace/name` from the
    /// API): what rules match and logs show.
    pub pod: Arc<str>,
    /// The pod's network-namespace cookie: its identity in every kernel map.
    pub netns_cookie: u64,
    pub direction: Direction,
    /// Outbound: the original destination ip:port. Inbound: the client's ip, with
    /// the port the pod listens on (not the client's ephemeral port).
    pub peer: SocketAddr,
}

impl Tenant for PeerKey {
    fn tenant(&self) -> u64 {
        self.netns_cookie
    }
}

impl PeerKey {
    #[cfg(test)]
    pub fn new(
        pod: impl Into<Arc<str>>,
        netns_cookie: u64,
        direction: Direction,
        peer: SocketAddr,
    ) -> PeerKey {
        PeerKey {
            pod: pod.into(),
            netns_cookie,
            direction,
            peer,
        }
    }
}
