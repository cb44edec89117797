//! The in-pod L4 proxy: outbound (apps' connections, redirected by connect4/6), inbound (to
//! apps listening on a wildcard address, whose connections sk_lookup steers to the agent) and
//! DNS.
mod accept;
mod connection;
pub mod dns;
pub mod dns_msg;
pub mod drain;
pub mod inbound;
pub mod origdst;
pub mod outbound;
pub mod relay;
pub mod shares;
pub mod upstream;

use std::{net::IpAddr, sync::Arc};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{datapath::KernelMaps, policy::PeerKey, rules::PolicyHandle, sys::netns::NetnsWorker};

use crate::admission::Admission;

/// The pod's loopback address of a family: where the agent's listeners and the captured apps
/// live.
pub fn loopback(ipv6: bool) -> IpAddr {
    if ipv6 {
        std::net::Ipv6Addr::LOCALHOST.into()
    } else {
        std::net::Ipv4Addr::LOCALHOST.into()
    }
}

/// Settings every proxy task reads.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub mark: u32,
    pub outbound_port: u16,
}

/// What a proxy task needs to know about its pod.
#[derive(Clone, Debug)]
pub struct PodCtx {
    pub name: Arc<str>,
    pub cookie: u64,
    pub worker: NetnsWorker,
    /// Spare upstream sockets made by `worker` ahead of the connections that take them.
    pub upstream: Arc<upstream::UpstreamSockets>,
    /// What this pod's caps and shares refused it.
    pub refusals: Arc<crate::telemetry::refusals::PodRefusals>,
    /// The pod's DNS query rate (`--pod-dns-rate`), shared by its DNS listeners.
    pub dns_rate: Arc<std::sync::Mutex<Option<crate::policy::token_bucket::TokenBucket>>>,
}

/// Shared by every task: configuration, kernel maps, and the shutdown plumbing (a token that
/// stops accept loops, a tracker that knows when every connection task has ended).
#[derive(Clone)]
pub struct Shared {
    pub cfg: Arc<ProxyConfig>,
    pub maps: Arc<KernelMaps>,
    /// Per-peer policy: admission, connect outcomes, shaping.
    pub admission: Arc<Admission<PeerKey>>,
    /// The endpoint of a Service whose DestinationRule has the agent pick it.
    pub endpoints: Arc<crate::admission::endpoints::Endpoints>,
    /// The current policy set (flags + file), for lookups outside admission (DNS timeout).
    pub policy: Arc<PolicyHandle>,
    /// Per-peer figures for `sockmesh peers` and `/metrics` (flushed to SM_PEER_STATE).
    pub recorder: Arc<crate::telemetry::recorder::Recorder>,
    /// Every pod's share of connections and DNS queries, and the node's caps.
    pub shares: Arc<shares::Shares>,
    pub cancel: CancellationToken,
    /// Fires at the drain deadline: connections still open are reset.
    pub abort: CancellationToken,
    pub tasks: TaskTracker,
}
