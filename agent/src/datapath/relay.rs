//! The in-kernel relay's half in the datapath: the verdict program attached to its sockhash,
//! and arming/disarming a connection (its two sockets in the maps, each pointing at the
//! other). What runs per connection around it lives in `proxy/relay/kernel.rs`.
use std::{
    os::fd::RawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::{sk_skb::SkSkbLink, SkSkb},
    Ebpf,
};
use sockmesh_common::relay::{self as names, RelayPeer};

use super::object::take;
use crate::sys::lock::lock;

/// Which connections the in-kernel relay takes (`--kernel-relay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// None: splice only.
    Off,
    /// Every unshaped connection, from its start.
    On,
    /// Unshaped connections that turn out to be request/response, once they do.
    Auto,
}

pub struct RelayMaps {
    /// `On` or `Auto` (the maps exist only for those).
    pub mode: Mode,
    socks: Mutex<SockHash<MapData, u64>>,
    tx: Mutex<SockHash<MapData, u64>>,
    peers: Arc<Peers>,
    /// Connections armed right now, and ever.
    active: AtomicU64,
    armed: AtomicU64,
    /// Held so the program stays attached to `socks` as long as the maps are used.
    _link: SkSkbLink,
}

/// Why a connection could not be armed.
#[derive(Debug, PartialEq, Eq)]
pub enum ArmError {
    /// Nothing was forwarded yet and everything is undone: relay it another way.
    NotArmed,
    /// One side was already forwarding when the other failed (it closed in between): some of
    /// its bytes may be queued towards the other side, so the connection cannot be handed to
    /// another relay without losing or reordering them.
    Partial,
}

impl RelayMaps {
    /// Load the verdict program, attach it to the sockhash and take the maps.
    pub fn attach(ebpf: &mut Ebpf, mode: Mode) -> Result<RelayMaps> {
        let socks: SockHash<MapData, u64> = take(ebpf, names::SOCKS)?;
        let tx = take(ebpf, names::TX)?;
        let peers = take(ebpf, names::PEERS)?;
        let prog: &mut SkSkb = ebpf
            .program_mut(names::VERDICT)
            .ok_or_else(|| anyhow!("program {} missing", names::VERDICT))?
            .try_into()?;
        prog.load().context("load the relay verdict program")?;
        let id = prog
            .attach(socks.fd())
            .context("attach the relay verdict program to its sockhash")?;
        let link = prog.take_link(id)?;
        Ok(RelayMaps {
            mode,
            socks: Mutex::new(socks),
            tx: Mutex::new(tx),
            peers: Arc::new(Mutex::new(peers)),
            active: AtomicU64::new(0),
            armed: AtomicU64::new(0),
            _link: link,
        })
    }

    /// Forward what either socket receives out of the other, in the kernel, until the guard is
    /// dropped. Order matters: both become redirect targets and know their peer before either
    /// starts forwarding, so the program never meets a socket whose peer is missing.
    pub fn arm(&self, a: (u64, RawFd), b: (u64, RawFd)) -> Result<Armed<'_>, ArmError> {
        // From here on, dropping `armed` undoes whatever part was done.
        let mut armed = Armed {
            maps: self,
            cookies: [a.0, b.0],
            counted: false,
        };
        let staged = {
            let mut tx = lock(&self.tx);
            tx.insert(a.0, a.1, 0).and(tx.insert(b.0, b.1, 0))
        }
        .and_then(|()| {
            let mut p = lock(&self.peers);
            let to = |peer| RelayPeer { peer, forwarded: 0 };
            p.insert(a.0, to(b.0), 0).and(p.insert(b.0, to(a.0), 0))
        });
        if staged.is_err() {
            return Err(ArmError::NotArmed);
        }
        let mut socks = lock(&self.socks);
        socks.insert(a.0, a.1, 0).map_err(|_| ArmError::NotArmed)?;
        socks.insert(b.0, b.1, 0).map_err(|_| ArmError::Partial)?;
        drop(socks);
        self.active.fetch_add(1, Ordering::Relaxed);
        self.armed.fetch_add(1, Ordering::Relaxed);
        armed.counted = true;
        Ok(armed)
    }

    /// Reads what the kernel has forwarded from the two sockets of a connection while it is
    /// armed (for live figures; usable from anywhere, it holds the map, not the relay).
    pub fn forwarded(&self, cookies: [u64; 2]) -> Forwarded {
        Forwarded {
            peers: self.peers.clone(),
            cookies,
        }
    }

    /// Connections relayed in the kernel right now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Connections ever armed.
    pub fn armed(&self) -> u64 {
        self.armed.load(Ordering::Relaxed)
    }

    /// Whether any of the three maps still holds this socket cookie (a leak once its
    /// connection ended).
    #[cfg(test)]
    pub fn holds(&self, cookie: u64) -> bool {
        let in_hash = |m: &Mutex<SockHash<MapData, u64>>| {
            lock(m).keys().filter_map(|k| k.ok()).any(|k| k == cookie)
        };
        let in_peers = lock(&self.peers).get(&cookie, 0).is_ok();
        in_peers || in_hash(&self.socks) || in_hash(&self.tx)
    }
}

type Peers = Mutex<HashMap<MapData, u64, RelayPeer>>;

/// A connection's running forwarded counts, see [`RelayMaps::forwarded`].
pub struct Forwarded {
    peers: Arc<Peers>,
    cookies: [u64; 2],
}

impl Forwarded {
    /// Bytes forwarded from the first socket and from the second so far; 0 for a socket no
    /// longer in the map (its connection has been disarmed).
    pub fn get(&self) -> (u64, u64) {
        let p = lock(&self.peers);
        let one = |c: &u64| p.get(c, 0).map_or(0, |v| v.forwarded);
        (one(&self.cookies[0]), one(&self.cookies[1]))
    }
}

/// A connection's entries in the relay maps; dropping it removes every one (the kernel also
/// drops a socket from the sockhashes when it closes, but not from the plain peers map).
pub struct Armed<'m> {
    maps: &'m RelayMaps,
    cookies: [u64; 2],
    /// Fully armed: counted in `active`.
    counted: bool,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        // Forwarding stops first, then the targets and peers go: no verdict runs half-undone.
        // Entries already gone (the socket closed) are fine.
        for m in [&self.maps.socks, &self.maps.tx] {
            let mut m = lock(m);
            for c in &self.cookies {
                let _ = m.remove(c);
            }
        }
        let mut p = lock(&self.maps.peers);
        for c in &self.cookies {
            let _ = p.remove(c);
        }
        if self.counted {
            self.maps.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
