//! `--deny-raw-sockets`: an enrolled pod may not create raw IP sockets, with which it could
//! send and receive TCP or UDP that no socket hook sees. Attached (at `cgroup/sock_create`)
//! only when the option is on, so it costs nothing otherwise.
//!
//! What this hook cannot refuse, verified on this kernel (6.18): the kernel runs
//! `cgroup/sock_create` from `inet_create`/`inet6_create` only, so it sees every AF_INET and
//! AF_INET6 socket (TCP, UDP, MPTCP, raw, ping) but never an AF_PACKET socket, nor the legacy
//! `socket(AF_INET, SOCK_PACKET, ...)`, which the kernel turns into one. Packet sockets need
//! CAP_NET_RAW too: drop that capability from pods to close them (see the README).
use aya_ebpf::{macros::cgroup_sock, programs::SockContext};
use core::ptr::read_volatile;
use sockmesh_common::{config_flags, counter, SCHEMA_VERSION};

use crate::{
    maps::{CONFIG, PODS},
    util::{count, netns_cookie},
};

const SOCK_RAW: u32 = 3;

/// 1 lets socket() succeed; 0 fails it with EPERM.
#[cgroup_sock(sock_create)]
pub fn sm_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: `ctx.sock` is the `bpf_sock` the kernel passed to this sock_create program (a
    // live socket it holds while the program runs); `type` is a readable 4-byte field.
    let ty = unsafe { read_volatile(&(*ctx.sock).type_) };
    if ty != SOCK_RAW {
        return 1;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return 1;
    };
    if cfg.schema_version != SCHEMA_VERSION || cfg.flags & config_flags::DENY_RAW_SOCKETS == 0 {
        return 1;
    }
    let netns = netns_cookie(&ctx);
    // Only whether the pod is enrolled: the value is not read.
    if PODS.get_ptr(&netns).is_none() {
        return 1;
    }
    count(netns, counter::RAW_DENIED);
    0
}
