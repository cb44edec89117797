//! Inbound steering as the agent drives it: an instance of the `sk_lookup` program attached to
//! each enrolled pod's network namespace, with its own map of the pod's inbound listeners
//! (`SM_IN_LISTENERS`), and the captured ports the bind hook records (`SM_IN_BINDS`).
//!
//! One instance per pod, each loaded from the small steering object with the pod's netns
//! cookie as a constant: an `sk_lookup` program may not call `bpf_get_netns_cookie`, and the
//! cookie keys every map it reads (`SM_PODS`, `SM_IN_BINDS`, `SM_POD_STATS`, shared with the
//! main object through their pins). An instance is a few hundred bytes of program and a
//! two-slot map; loading one takes well under a millisecond.
//!
//! Nothing here outlives the agent: the links are held by fd (never pinned) and the listener
//! maps are private to this process, so when the agent dies its namespaces lose the program
//! and its listeners leave the maps as they close. The apps kept their own binds, so
//! connections reach them directly from then on.
use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, SockMap},
    programs::SkLookup,
    Ebpf,
};
use aya_obj::generated::bpf_attach_type as at;
use sockmesh_common::{
    map_names, program_names, socket_kind, steer, BindKey, BindValue, SocketEntry,
};

use super::{
    links::Link,
    object::{loader, take},
};

/// A port an app of a pod listens on with a wildcard bind (host order), and its family.
pub type BoundPort = (u16, u16);

/// `BPF_NOEXIST` map-update flag: create only.
const BPF_NOEXIST: u64 = 1;

/// One pod's instance. Field order is drop order: the link detaches before the program and
/// its map go.
struct Instance {
    _link: Link,
    _ebpf: Ebpf,
}

pub struct Steering {
    /// The pin directory, where the instances find the maps they share with the main object.
    dir: PathBuf,
    binds: BpfHashMap<MapData, BindKey, BindValue>,
    /// Where the agent marks a socket found holding a bind at enrolment, so its release
    /// forgets it (the bind hook marks the sockets it sees in their own storage, which the
    /// agent cannot write for another process's socket).
    sockets: BpfHashMap<MapData, u64, SocketEntry>,
    pods: HashMap<u64, Instance>,
}

impl Steering {
    /// Call once the main object's maps are pinned in `dir`.
    pub fn new(main: &mut Ebpf, dir: &Path) -> Result<Steering> {
        Ok(Steering {
            dir: dir.to_path_buf(),
            binds: take(main, map_names::INBOUND_BINDS)?,
            sockets: take(main, map_names::FOUND_BINDS)?,
            pods: HashMap::new(),
        })
    }

    /// Steer the pod's captured ports to `listeners` (bound on the pod's loopback, already
    /// serving): load the pod's instance, put each listener in its slot, then attach it to the
    /// pod's namespace. On error nothing of the pod is left in place.
    pub fn attach(
        &mut self,
        cookie: u64,
        netns: BorrowedFd<'_>,
        listeners: &[BorrowedFd<'_>],
    ) -> Result<()> {
        self.detach(cookie);
        let mut ebpf = loader(&self.dir)
            .override_global(steer::POD_NETNS_COOKIE, &cookie, true)
            .load(crate::STEER_OBJECT)
            .context("load the inbound steering program")?;
        let mut slots: SockMap<MapData> = take(&mut ebpf, steer::LISTENERS)?;
        for l in listeners {
            let addr = local_addr(*l).context("the inbound listener's address")?;
            let slot = if addr.is_ipv6() { steer::V6 } else { steer::V4 };
            slots.set(slot, l, 0).with_context(|| {
                format!("put the inbound listener {addr} in {}", steer::LISTENERS)
            })?;
        }
        let prog: &mut SkLookup = ebpf
            .program_mut(program_names::SK_LOOKUP)
            .ok_or_else(|| anyhow!("program {} missing", program_names::SK_LOOKUP))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("load {}", program_names::SK_LOOKUP))?;
        let link = Link::create(prog.fd()?.as_fd(), netns, at::BPF_SK_LOOKUP as u32)
            .context("attach sk_lookup to the pod's network namespace")?;
        // The map lives on in the object (the program holds it); this handle is not needed.
        drop(slots);
        self.pods.insert(
            cookie,
            Instance {
                _link: link,
                _ebpf: ebpf,
            },
        );
        Ok(())
    }

    /// Stop steering the pod's connections: detach its instance, which goes with its map.
    pub fn detach(&mut self, cookie: u64) {
        self.pods.remove(&cookie);
    }

    /// Record a bind the hook never saw (the socket was bound before its pod was enrolled),
    /// as the hook would: the port's first holder keeps it, and the socket is marked so its
    /// release forgets the bind. False if the port is held already (or a map refused).
    pub fn record_bind(&mut self, pod: u64, (port, family): BoundPort, socket: u64) -> bool {
        let key = BindKey {
            netns_cookie: pod,
            port,
            family,
            _pad: 0,
        };
        let value = BindValue {
            socket_cookie: socket,
        };
        if self.binds.insert(key, value, BPF_NOEXIST).is_err() {
            return false;
        }
        let entry = SocketEntry {
            key_port: port,
            kind: socket_kind::BIND,
            family,
            ..Default::default()
        };
        if self.sockets.insert(socket, entry, 0).is_err() {
            let _ = self.binds.remove(&key);
            return false;
        }
        true
    }

    /// Undo [`Steering::record_bind`] for a socket that turned out to be gone (released before
    /// it was marked, so its release could not forget the bind).
    pub fn forget_bind(&mut self, pod: u64, (port, family): BoundPort, socket: u64) {
        let key = BindKey {
            netns_cookie: pod,
            port,
            family,
            _pad: 0,
        };
        if self
            .binds
            .get(&key, 0)
            .is_ok_and(|v| v.socket_cookie == socket)
        {
            let _ = self.binds.remove(&key);
        }
        let _ = self.sockets.remove(&socket);
    }

    /// Every port the bind hook recorded, by pod: what is captured now, whatever events the
    /// agent did or did not receive (a full ring loses them, a restart misses them).
    pub fn bound_ports(&self) -> HashMap<u64, Vec<BoundPort>> {
        let mut out: HashMap<u64, Vec<BoundPort>> = HashMap::new();
        for k in self.binds.keys().filter_map(|k| k.ok()) {
            out.entry(k.netns_cookie)
                .or_default()
                .push((k.port, k.family));
        }
        out
    }
}

fn local_addr(fd: BorrowedFd<'_>) -> std::io::Result<SocketAddr> {
    socket2::SockRef::from(&fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an inet socket"))
}
