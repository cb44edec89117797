//! Whether a program may take a socket over: the checks the capturing hooks (connect, DNS
//! sendmsg, bind) share, written once so they cannot drift apart. (`sk_lookup`, which steers
//! inbound connections, has no socket of the pod to check: see `steer.rs`.) The hooks that only restore
//! what a capture did (getpeername, recvmsg, sock_ops, getsockopt, sock_release) do not come
//! here: undoing their work would break connections already proxied.
use aya_ebpf::programs::SockAddrContext;
use sockmesh_common::{counter, pod_flags, GlobalConfig, PodConfig, SockAddr};

use crate::{
    addr::{is_loopback, Sock},
    util::{count, now_ns, pod_for, DNS_PORT_BE, SOCK_DGRAM, SOCK_STREAM},
};

/// What a hook wants to take over.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    /// A TCP connect() to this destination: it would go to the outbound listener.
    Tcp(&'a SockAddr),
    /// A UDP connect() or datagram to this port-53 destination: it would go to the DNS
    /// listener.
    Dns(&'a SockAddr),
    /// An app's explicit wildcard TCP bind of this port (host order): inbound connections to
    /// the port would be steered to the agent.
    Bind(u16),
}

impl Target<'_> {
    /// The `PodConfig` flag that turns this capture on for a pod.
    #[inline(always)]
    fn flag(self) -> u32 {
        match self {
            Target::Tcp(_) => pod_flags::OUTBOUND,
            Target::Dns(_) => pod_flags::DNS,
            Target::Bind(_) => pod_flags::INBOUND,
        }
    }
}

/// Which listener an outbound socket of type `ty` heading for `dst` would go to: TCP to any
/// port goes to the outbound listener, UDP to port 53 to the DNS listener; anything else is
/// never captured.
#[inline(always)]
pub fn outbound_target(ty: u32, dst: &SockAddr) -> Option<Target<'_>> {
    match ty {
        SOCK_STREAM => Some(Target::Tcp(dst)),
        SOCK_DGRAM if dst.port == DNS_PORT_BE => Some(Target::Dns(dst)),
        _ => None,
    }
}

/// A socket the hook may take over: its pod's network-namespace cookie, the agent's settings,
/// and the socket itself.
pub struct Captured {
    pub netns: u64,
    pub cfg: &'static GlobalConfig,
    pub sk: Sock,
}

/// Whether the socket of `ctx` may be captured for `target`, in this order:
/// - the agent runs this schema, the socket's network namespace is an enrolled pod, and the
///   socket is not one the agent registered as its own (`pod_for`); its SO_MARK plays no
///   part: a pod may set any mark, the agent's too, and is captured all the same;
/// - the pod has this capture turned on;
/// - the pod does not exclude it: loopback destinations (counted `bypass_loopback`) and the
///   pod's outbound ports/CIDRs for connect and sendmsg, the pod's inbound ports for bind
///   (both counted `bypass_excluded`);
/// - for connect and sendmsg, the agent is alive (`agent_alive`, counted `bypass_stale`
///   otherwise). A bind is recorded even while the agent is dead: recording takes nothing
///   from the app (its socket keeps its wildcard bind), `sk_lookup` checks the heartbeat for
///   every connection, and an agent that comes back on the same pins then captures the ports
///   bound while it was away.
///
/// Each check counts only when every check before it passed.
#[inline(always)]
pub fn capture(ctx: &SockAddrContext, target: Target) -> Option<Captured> {
    let (netns, cfg, pod) = pod_for(ctx)?;
    let sk = Sock::of_sock_addr(ctx);
    if !pod.has(target.flag()) {
        return None;
    }
    match target {
        Target::Tcp(dst) | Target::Dns(dst) => {
            if is_loopback(dst) {
                count(netns, counter::BYPASS_LOOPBACK);
                return None;
            }
            if outbound_excluded(pod, dst) {
                count(netns, counter::BYPASS_EXCLUDED);
                return None;
            }
        }
        Target::Bind(port) => {
            if inbound_excluded(pod, port) {
                count(netns, counter::BYPASS_EXCLUDED);
                return None;
            }
            return Some(Captured { netns, cfg, sk });
        }
    }
    if !agent_alive(netns, cfg) {
        return None;
    }
    Some(Captured { netns, cfg, sk })
}

/// Fail open: whether the agent is alive enough to be handed a new socket. A stale heartbeat
/// means the agent is dead or hung, so the socket goes direct and the pod keeps working
/// without the mesh.
#[inline(always)]
fn agent_alive(netns: u64, cfg: &GlobalConfig) -> bool {
    if cfg.is_stale(now_ns()) {
        count(netns, counter::BYPASS_STALE);
        return false;
    }
    true
}

/// Whether an enrolled pod excludes this outbound destination from capture.
#[inline(always)]
fn outbound_excluded(pod: &PodConfig, dst: &SockAddr) -> bool {
    let port = u16::from_be(dst.port);
    for r in pod.exclude_outbound_ports.iter() {
        if r.contains(port) {
            return true;
        }
    }
    for c in pod.exclude_outbound_cidrs.iter() {
        if c.contains(dst.family, &dst.addr) {
            return true;
        }
    }
    false
}

/// Whether an enrolled pod keeps this bound port (host order) out of inbound capture.
#[inline(always)]
fn inbound_excluded(pod: &PodConfig, port: u16) -> bool {
    for r in pod.exclude_inbound_ports.iter() {
        if r.contains(port) {
            return true;
        }
    }
    false
}
