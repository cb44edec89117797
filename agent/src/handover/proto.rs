//! The upgrade handover protocol, pure: messages, their framing on the control socket, and
//! matching the listening sockets an old agent offers to the pods the new one enrols.
//!
//! Exchange (new agent N, old agent O, over O's root-only unix socket):
//! 1. N sends `Request::Listeners`.
//! 2. O answers with one or more `Reply::Sockets` frames, each carrying exactly as many fds
//!    (SCM_RIGHTS) as it lists sockets, the last one with `last: true`, then the pin-dir lock.
//! 3. N attaches, enrols its pods on those very sockets (no close, no re-bind) and sends
//!    `Request::Drain`; O answers `Reply::Draining` and drains its live connections, then exits.
//!
//! Anything else (a bad frame, fds and sockets that do not add up) ends the handover: N refuses
//! to start and O, which changed nothing before `Drain`, keeps running.
use std::{collections::HashMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change; both sides check it first.
pub const VERSION: u32 = 1;
/// No frame is larger: a peer announcing more is broken or hostile.
pub const MAX_FRAME: usize = 1 << 20;
/// Fds per message: the kernel's SCM_MAX_FD is 253.
pub const MAX_FDS: usize = 253;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// TCP listener on the pod's loopback (15001) that connect4/6 redirect to.
    Outbound,
    /// UDP socket on the pod's loopback (15053) that DNS is sent to.
    Dns,
    /// TCP listener on the pod's loopback (15006) that `sk_lookup` steers inbound
    /// connections to.
    Inbound,
    /// The agent's own `/metrics` or `--health-addr` listener (netns cookie 0: the node's),
    /// offered only to a successor that asks for it. On a node address with hostNetwork both
    /// agents want the same port; passing the socket means the kubelet's probes are answered
    /// by exactly one agent at a time, with no moment when nothing listens.
    Http,
}

/// One socket an old agent hands over: which pod (by netns cookie, the same key the kernel
/// uses), what for, and its local address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Offered {
    pub netns_cookie: u64,
    pub kind: Kind,
    pub addr: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Listeners {
        version: u32,
        /// Also hand over the HTTP listeners ([`Kind::Http`]). Absent from older agents'
        /// requests (they are then not offered, and an older agent ignores the field).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        http: bool,
    },
    Drain,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Reply {
    /// `sockets[i]` is the i-th fd of this message; the lock fd travels alone, after the last.
    Sockets {
        version: u32,
        pid: u32,
        sockets: Vec<Offered>,
        last: bool,
    },
    /// The pin-dir lock (one fd): the new agent shares the old one's lock, so the directory is
    /// never unowned, and the old agent keeps it if the new one gives up.
    Lock,
    Draining,
    Error {
        message: String,
    },
}

/// A frame: 4-byte big-endian length, then that many bytes of JSON.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The length a frame header announces, refused past [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, String> {
    let n = u32::from_be_bytes(header) as usize;
    if n > MAX_FRAME {
        return Err(format!("handover frame of {n} bytes (at most {MAX_FRAME})"));
    }
    Ok(n)
}

pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("bad handover message: {e}"))
}

/// The offers split into messages of at most `max` sockets (at least one message, so an
/// agent with no pods still answers), each flagged whether it is the last.
pub fn chunks(offers: &[Offered], max: usize) -> Vec<(&[Offered], bool)> {
    let max = max.max(1);
    if offers.is_empty() {
        return vec![(offers, true)];
    }
    let n = offers.len().div_ceil(max);
    offers
        .chunks(max)
        .enumerate()
        .map(|(i, c)| (c, i + 1 == n))
        .collect()
}

/// The sockets one pod takes over.
#[derive(Debug, PartialEq, Eq)]
pub struct PodSockets<F> {
    pub outbound: Vec<(SocketAddr, F)>,
    pub dns: Vec<(SocketAddr, F)>,
    pub inbound: Vec<(SocketAddr, F)>,
}

impl<F> Default for PodSockets<F> {
    fn default() -> Self {
        PodSockets {
            outbound: Vec::new(),
            dns: Vec::new(),
            inbound: Vec::new(),
        }
    }
}

/// What [`assign`] decided.
#[derive(Debug, PartialEq, Eq)]
pub struct Assignment<F> {
    /// By netns cookie, for each pod the new agent enrols that the old one served.
    pub pods: HashMap<u64, PodSockets<F>>,
    /// Sockets of pods the new agent does not enrol: closed by the new agent (the old one
    /// keeps its own copy until it exits).
    pub unclaimed: Vec<(Offered, F)>,
    /// The old agent's HTTP listeners, by address.
    pub http: Vec<(SocketAddr, F)>,
}

/// Matches offered sockets (each with its fd `F`) to the pods the new agent enrols, by netns
/// cookie and kind; the same (pod, kind, address) offered twice is an error, since two sockets
/// cannot both be bound there.
pub fn assign<F>(offered: Vec<(Offered, F)>, wanted: &[u64]) -> Result<Assignment<F>, String> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Assignment {
        pods: HashMap::new(),
        unclaimed: Vec::new(),
        http: Vec::new(),
    };
    for (o, fd) in offered {
        if !seen.insert(o) {
            return Err(format!(
                "the old agent offered {:?} {} of netns {} twice",
                o.kind, o.addr, o.netns_cookie
            ));
        }
        if o.kind == Kind::Http {
            out.http.push((o.addr, fd));
            continue;
        }
        if !wanted.contains(&o.netns_cookie) {
            out.unclaimed.push((o, fd));
            continue;
        }
        let p = out.pods.entry(o.netns_cookie).or_default();
        let list = match o.kind {
            Kind::Outbound => &mut p.outbound,
            Kind::Dns => &mut p.dns,
            Kind::Inbound => &mut p.inbound,
            Kind::Http => continue,
        };
        list.push((o.addr, fd));
    }
    Ok(out)
}

/// Where an agent serving `bpffs_dir` listens for a successor: beside its pin-dir lock.
pub fn control_path(bpffs_dir: &std::path::Path) -> std::path::PathBuf {
    crate::datapath::preflight::run_path(bpffs_dir, "sock")
}
