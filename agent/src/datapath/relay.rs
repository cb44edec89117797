//! The in-kernel relay's half in the datapath: the verdict program attached to its sockhash,
//! and arming/disarming a connection (its two sockets in the maps, each pointing at the
//! other). What runs per connection around it lives in `proxy/relay/kernel.rs`.
use std::{
    os::fd::RawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::{sk_skb::SkSkbLink, SkSkb},
    Ebpf,
};
use sockmesh_common::relay as names;

use super::take;

pub struct RelayMaps {
    socks: Mutex<SockHash<MapData, u64>>,
    tx: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, u64>>,
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
    pub fn attach(ebpf: &mut Ebpf) -> Result<RelayMaps> {
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
            socks: Mutex::new(socks),
            tx: Mutex::new(tx),
            peers: Mutex::new(peers),
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
        let staged = self
            .tx
            .lock()
            .ok()
            .and_then(|mut tx| tx.insert(a.0, a.1, 0).and(tx.insert(b.0, b.1, 0)).ok())
            .and_then(|()| self.peers.lock().ok())
            .and_then(|mut p| p.insert(a.0, b.0, 0).and(p.insert(b.0, a.0, 0)).ok());
        if staged.is_none() {
            return Err(ArmError::NotArmed);
        }
        let mut socks = self.socks.lock().map_err(|_| ArmError::NotArmed)?;
        socks.insert(a.0, a.1, 0).map_err(|_| ArmError::NotArmed)?;
        socks.insert(b.0, b.1, 0).map_err(|_| ArmError::Partial)?;
        drop(socks);
        self.active.fetch_add(1, Ordering::Relaxed);
        self.armed.fetch_add(1, Ordering::Relaxed);
        armed.counted = true;
        Ok(armed)
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
    pub fn holds(&self, cookie: u64) -> bool {
        let in_hash = |m: &Mutex<SockHash<MapData, u64>>| {
            m.lock()
                .map(|m| m.keys().filter_map(|k| k.ok()).any(|k| k == cookie))
                .unwrap_or(false)
        };
        let in_peers = self
            .peers
            .lock()
            .map(|m| m.get(&cookie, 0).is_ok())
            .unwrap_or(false);
        in_peers || in_hash(&self.socks) || in_hash(&self.tx)
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
            if let Ok(mut m) = m.lock() {
                for c in &self.cookies {
                    let _ = m.remove(c);
                }
            }
        }
        if let Ok(mut p) = self.maps.peers.lock() {
            for c in &self.cookies {
                let _ = p.remove(c);
            }
        }
        if self.counted {
            self.maps.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
