//! The in-kernel relay: for a connection the agent has admitted and connected upstream, bytes
//! received on one of its two sockets are sent out of the other without waking the agent
//! (`sk_skb` stream verdict + `bpf_sk_redirect_hash` to the peer's egress). The agent fills
//! the maps (layout in `sockmesh_common::relay`) and keeps everything else: FIN and RST
//! propagation, timers and exact byte counts (TCP_INFO), see `agent/src/proxy/relay/kernel.rs`;
//! the program only keeps a running count of what it forwarded, for live figures.
use aya_ebpf::{
    bindings::sk_action,
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
    EbpfContext,
};
use sockmesh_common::relay::{RelayPeer, MAX_SOCKETS};

/// Key: socket cookie. Attaching the verdict program here arms it for every socket inserted.
#[map(name = "SM_RELAY_SOCKS")]
pub static RELAY_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Redirect targets, key: socket cookie.
#[map(name = "SM_RELAY_TX")]
pub static RELAY_TX: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie -> its peer's cookie and the bytes forwarded to it.
#[map(name = "SM_RELAY_PEERS")]
pub static RELAY_PEERS: HashMap<u64, RelayPeer> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[stream_verdict]
pub fn sm_relay_verdict(ctx: SkBuffContext) -> u32 {
    // The empty skb a FIN arrives in carries nothing to forward, and redirected it would break
    // the peer: the kernel's egress worker takes a zero-byte send as a hard error (EPIPE).
    // TCP has already handled the FIN itself; the agent passes it on as a half-close.
    if ctx.len() == 0 {
        return sk_action::SK_DROP;
    }
    // SAFETY: `ctx.as_ptr()` is the `__sk_buff` the kernel passed to this sk_skb program, the
    // helper's only argument (sk_skb programs may call it); for an skb it reads the owning
    // socket, which the stream parser set.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(entry) = RELAY_PEERS.get_ptr_mut(&cookie) else {
        // Not (or no longer) relayed: the bytes stay readable on the socket itself.
        return sk_action::SK_PASS;
    };
    // SAFETY: `entry` points at this socket's `RelayPeer`, mapped while the program runs
    // (plain integers, valid for any bytes). Only this socket's verdict writes it, and the
    // kernel runs one socket's verdicts one at a time (under the socket lock), so the add is
    // not raced. The agent inserts the entry before arming the socket and deletes it after
    // disarming, so only a run begun just before the disarm can race the delete; then a
    // reused element gets a wrong byte count, nothing outside the map is touched.
    let peer = unsafe {
        (*entry).forwarded += u64::from(ctx.len());
        (*entry).peer
    };
    // Flags 0: out of the peer's egress. On a missing peer the helper answers SK_DROP, which
    // cannot happen while the agent keeps its order (both in RELAY_TX before either is armed).
    RELAY_TX.redirect_skb(&ctx, peer, 0) as u32
}
