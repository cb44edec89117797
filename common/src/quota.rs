//! Per-pod quotas on the kernel maps that are not keyed by the socket.
//!
//! What the programs remember per socket lives in the socket's own storage (`SM_SOCK_STORE`,
//! `BPF_MAP_TYPE_SK_STORAGE`): it is freed with the socket and has no capacity to share, so
//! no pod can evict another pod's entry however many sockets it makes. Two maps cannot be
//! keyed by the socket, because another socket looks them up: `SM_ORIG_TUPLE` (read by the
//! agent's accepted socket, SO_ORIGINAL_DST) and `SM_DNS_ORIG` (read by the agent for a
//! query's source port). Those are plain hashes (no LRU eviction) and each pod may hold at
//! most its quota of entries in each, counted here; the defaults times 110 pods fit in the
//! maps (`map_sizes`), so one pod at its quota takes nothing from the others. Two more maps
//! are shared by all pods and counted the same way: `SM_IN_BINDS` (keyed by pod and port:
//! `sk_lookup` reads it for a connection, not a socket) and `SM_FAST_SOCKS` (the kernel
//! tier's direct sockets, by cookie, since their end is counted from `sock_ops`).

/// `SM_POD_QUOTA[netns cookie]`: the pod's live entries in each tuple-keyed map. Created by
/// the agent at enrolment; the programs add one per entry they insert and take one away per
/// entry they delete (atomic adds), and refuse an insert at the quota. Signed: a pod
/// re-enrolled while old entries lived may count below zero as those go, never wrap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodQuota {
    /// Entries of `SM_ORIG_TUPLE` (redirected connections, established and not yet closed).
    pub origins: i64,
    /// Entries of `SM_DNS_ORIG` (UDP sockets that sent DNS, not yet released).
    pub dns: i64,
    /// Entries of `SM_IN_BINDS` the bind hook made (wildcard TCP binds, not yet released).
    /// The binds the agent records at enrolment (servers listening before) are not counted
    /// here: the agent records at most a quota of them per pod itself.
    pub binds: i64,
    /// Entries of `SM_FAST_SOCKS` (connections the kernel tier let go direct, not yet ended).
    pub fast: i64,
}

/// Default quotas: each times 110 pods fits in its map.
pub mod defaults {
    /// Live redirected connections per pod: above the agent's `--pod-max-conns` (1024 each
    /// way) plus a full accept queue's worth waiting; 110 x 2048 < `map_sizes::ORIG_TUPLES`.
    pub const ORIGINS: u32 = 2048;
    /// UDP sockets with a DNS query out, per pod (resolvers use one per lookup and close it);
    /// 110 x 512 < `map_sizes::DNS_ORIGINS`.
    pub const DNS: u32 = 512;
    /// Ports with a wildcard TCP listener, per pod (a pod serves a handful). Twice over in
    /// the map: the hook's binds and, as many again at most, the servers the agent found
    /// listening at enrolment; 110 x 2 x 128 < `map_sizes::INBOUND_BINDS`.
    pub const BINDS: u32 = 128;
    /// Live direct (kernel-tier) connections per pod; past it a pod's new connections to
    /// kernel-tier peers take the proxy (slower, policed the same). 110 x 2048 <
    /// `map_sizes::FAST_SOCKETS` (the default `--fast-path-sockets`).
    pub const FAST: u32 = 2048;
}

// The point of the defaults: a node of 110 pods each at its quotas fits in the maps.
const _: () = assert!(110 * defaults::ORIGINS <= crate::map_sizes::ORIG_TUPLES);
const _: () = assert!(110 * defaults::DNS <= crate::map_sizes::DNS_ORIGINS);
const _: () = assert!(110 * 2 * defaults::BINDS <= crate::map_sizes::INBOUND_BINDS);
const _: () = assert!(110 * defaults::FAST <= crate::map_sizes::FAST_SOCKETS);

/// Whether a pod holding `live` entries is at its `quota` (0: no quota).
#[inline(always)]
pub fn at_quota(live: i64, quota: u32) -> bool {
    quota != 0 && live >= quota as i64
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], Copy, two i64 (no padding), every bit pattern valid.
unsafe impl aya::Pod for PodQuota {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_is_reached_at_its_value_and_zero_means_none() {
        assert!(!at_quota(2047, 2048));
        assert!(at_quota(2048, 2048));
        assert!(!at_quota(-3, 1), "a count below zero is under any quota");
        assert!(!at_quota(i64::MAX, 0));
    }
}
