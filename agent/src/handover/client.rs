//! The new agent's side (`run --takeover`), blocking, before its runtime starts: ask the old
//! agent for its sockets and pin-dir lock, and once serving on them, tell it to drain.
use std::{
    collections::HashMap,
    io,
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use super::{
    proto::{self, Offered, Reply, Request, VERSION},
    transport, Handed,
};
use crate::datapath::preflight::PinDirLock;
use crate::sys::lock::lock;

/// A live old agent answers at once; one that does not is hung, and the upgrade must not
/// wait on it forever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the old agent handed over, with the connection kept open to send `Drain` later.
pub struct Taken {
    pub stream: UnixStream,
    /// The old agent's pid, for logs and the `ready` event.
    pub pid: u32,
    pub handed: Handed,
    pub lock: PinDirLock,
    /// The old agent's HTTP listeners (metrics, health), by address.
    pub http: Vec<(std::net::SocketAddr, OwnedFd)>,
}

/// Take the running agent's sockets over. `Ok(None)` when no agent runs there (nothing
/// listens on the control socket: none ever ran, or it died) and `required` is false.
pub fn take_over(bpffs_dir: &Path, required: bool) -> Result<Option<Taken>> {
    let path = proto::control_path(bpffs_dir);
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            if !required {
                return Ok(None);
            }
            bail!(
                "--takeover: no running agent to take over with --bpffs-dir {} (nothing listens on {}): start without --takeover (or with --takeover=if-running), or give the running agent's --bpffs-dir",
                bpffs_dir.display(),
                path.display()
            );
        }
        Err(e) => bail!("--takeover: connect to {}: {e}", path.display()),
    };
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    // Only root may hand sockets to this agent: anything else is not a sockmesh agent.
    let uid = transport::peer_uid(&stream).context("--takeover: SO_PEERCRED")?;
    if uid != 0 {
        bail!(
            "--takeover: {} is served by uid {uid}, not root: not a sockmesh agent",
            path.display()
        );
    }
    let (pid, offered, lock) = ask(&stream).map_err(|e| anyhow!("--takeover: {e}"))?;
    let wanted: Vec<u64> = offered.iter().map(|(o, _)| o.netns_cookie).collect();
    let assigned = proto::assign(offered, &wanted).map_err(|e| anyhow!("--takeover: {e}"))?;
    Ok(Some(Taken {
        stream,
        pid,
        handed: Arc::new(Mutex::new(assigned.pods)),
        lock: PinDirLock::adopt(lock),
        http: assigned.http,
    }))
}

type Received = (u32, Vec<(Offered, OwnedFd)>, OwnedFd);

fn ask(stream: &UnixStream) -> Result<Received, String> {
    let req = proto::encode(&Request::Listeners {
        version: VERSION,
        http: true,
    });
    transport::send(stream, &req, &[]).map_err(|e| format!("ask for listeners: {e}"))?;
    let mut offered = Vec::new();
    let pid = loop {
        let (body, fds) = recv(stream)?;
        match proto::decode::<Reply>(&body)? {
            Reply::Sockets {
                version,
                pid,
                sockets,
                last,
            } => {
                if version != VERSION {
                    return Err(format!(
                        "the running agent speaks handover version {version}, this one {VERSION}"
                    ));
                }
                if fds.len() != sockets.len() {
                    return Err(format!(
                        "{} sockets announced with {} fds",
                        sockets.len(),
                        fds.len()
                    ));
                }
                offered.extend(sockets.into_iter().zip(fds));
                if last {
                    break pid;
                }
            }
            Reply::Error { message } => {
                return Err(format!("the running agent refused: {message}"))
            }
            other => return Err(format!("unexpected reply {other:?}")),
        }
    };
    let (body, mut fds) = recv(stream)?;
    match proto::decode::<Reply>(&body)? {
        Reply::Lock if fds.len() == 1 => Ok((pid, offered, fds.remove(0))),
        other => Err(format!(
            "expected the pin-dir lock, got {other:?} with {} fds",
            fds.len()
        )),
    }
}

fn recv(stream: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), String> {
    transport::recv(stream).map_err(|e| format!("read from the running agent: {e}"))
}

/// Tell the old agent to stop accepting and drain; returns once it confirmed.
pub fn drain(stream: &UnixStream) -> Result<()> {
    transport::send(stream, &proto::encode(&Request::Drain), &[])
        .context("--takeover: ask the old agent to drain")?;
    let (body, _) = transport::recv(stream).context("--takeover: wait for the old agent")?;
    match proto::decode::<Reply>(&body).map_err(|e| anyhow!(e))? {
        Reply::Draining => Ok(()),
        other => bail!("--takeover: the old agent answered {other:?} to drain"),
    }
}

/// Sockets no pod of this agent took: closed here (the old agent keeps its own copy).
pub fn close_unclaimed(handed: &Handed) -> usize {
    let left: HashMap<_, _> = std::mem::take(&mut *lock(handed));
    left.values()
        .map(|p| p.outbound.len() + p.dns.len() + p.inbound.len())
        .sum()
}
