//! The agent's own sockets as the kernel programs know them: each one's cookie in
//! `SM_AGENT_SOCKS`, registered before the socket is used (see `sys::sockets`), removed by
//! the `sock_release` program when the socket goes. Why a cookie and not the SO_MARK or the
//! agent's pid: `is_agent_socket` in `ebpf/src/util.rs`.
use std::{
    io,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData},
    Ebpf,
};
use socket2::Socket;
use sockmesh_common::{map_names, AgentSocket};

use super::object::take;
use crate::sys::{lock::lock, sockets};

pub struct AgentSockets {
    map: Mutex<HashMap<MapData, u64, AgentSocket>>,
    me: AgentSocket,
}

impl AgentSockets {
    /// Takes the map and installs it as the owner of every socket the agent makes from now
    /// on. On a `--takeover` the running agent's entries stay: it keeps serving, on sockets
    /// it registered, until it has drained. Otherwise every entry left is a dead agent's (the
    /// pin-dir lock says no other agent runs): its sockets died with it, and cookies are
    /// never reused, so the entries are only clutter, and go.
    pub fn install(ebpf: &mut Ebpf, takeover: bool) -> Result<()> {
        let mut map: HashMap<MapData, u64, AgentSocket> = take(ebpf, map_names::AGENT_SOCKETS)?;
        if !takeover {
            let stale: Vec<u64> = map.keys().filter_map(|k| k.ok()).collect();
            for k in stale {
                let _ = map.remove(&k);
            }
        }
        let owner = Arc::new(AgentSockets {
            map: Mutex::new(map),
            me: AgentSocket {
                pid: std::process::id(),
                _pad: 0,
            },
        });
        sockets::set_owner(owner).context("install the agent's socket registry")
    }
}

impl sockets::Owner for AgentSockets {
    fn own(&self, socket: &Socket) -> io::Result<()> {
        let cookie = cookie(socket)?;
        lock(&self.map)
            .insert(cookie, self.me, 0)
            .map_err(|e| io::Error::other(format!("register socket in SM_AGENT_SOCKS: {e}")))
    }
}

/// The socket's cookie (`SO_COOKIE`): the same number `bpf_get_socket_cookie` gives the
/// programs (the kernel assigns it on first use, from either side).
pub fn cookie(socket: &Socket) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd, and a u64 buffer with its length, which the kernel fills.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
