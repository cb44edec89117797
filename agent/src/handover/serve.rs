//! The old agent's side: listen on the root-only control socket, and when a successor asks,
//! hand it every listening socket and the pin-dir lock, then wait for its `Drain`. Until
//! `Drain` nothing changes here, so a successor that fails leaves this agent serving as before.
use std::{
    io,
    os::{
        fd::{AsFd, OwnedFd},
        unix::{
            fs::{MetadataExt, PermissionsExt},
            net::UnixStream,
        },
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use tokio::{net::UnixListener, task::JoinHandle};
use tracing::warn;

use super::{
    proto::{self, Offered, Reply, Request, MAX_FDS, VERSION},
    transport,
};

/// What the control socket has for the main loop.
pub enum Step {
    /// A root peer connected: answer it with [`Control::answer`].
    Asked(UnixStream),
    /// The handover in progress ended: `Ok` once the successor asked to drain.
    Done(Result<(), String>),
}

pub struct Control {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's inode: removed at exit only if a successor has not replaced it.
    ino: u64,
    busy: Option<Busy>,
}

struct Busy {
    task: JoinHandle<Result<(), String>>,
    /// A second handle on the connection, to cut the exchange short at shutdown.
    stream: UnixStream,
}

impl Control {
    /// Listen on the control socket of `bpffs_dir` (mode 0600). A file already there is a
    /// dead agent's or the predecessor's (this agent holds the pin-dir lock): replaced.
    pub fn bind(bpffs_dir: &Path) -> Result<Control> {
        let path = proto::control_path(bpffs_dir);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("remove {}", path.display()))
            }
            _ => {}
        }
        let listener =
            UnixListener::bind(&path).with_context(|| format!("listen on {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
        let ino = std::fs::metadata(&path)?.ino();
        Ok(Control {
            listener,
            path,
            ino,
            busy: None,
        })
    }

    /// The next thing to act on: a successor asking, or the end of a handover in progress.
    /// Cancel-safe (used in a `select!`).
    pub async fn next(&mut self) -> Step {
        if let Some(b) = self.busy.as_mut() {
            let r = (&mut b.task)
                .await
                .unwrap_or_else(|e| Err(format!("handover task failed: {e}")));
            self.busy = None;
            return Step::Done(r);
        }
        loop {
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    continue;
                }
            };
            // The file mode already keeps others out; the peer check holds even if it changes.
            match stream.peer_cred().map(|c| c.uid()) {
                Ok(0) => {}
                Ok(uid) => {
                    warn!(uid, "control socket: refusing a non-root peer");
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "control socket: no peer credentials");
                    continue;
                }
            }
            match stream.into_std().and_then(|s| {
                s.set_nonblocking(false)?;
                Ok(s)
            }) {
                Ok(s) => return Step::Asked(s),
                Err(e) => warn!(error = %e, "control socket: cannot use the connection"),
            }
        }
    }

    /// Answer a successor on a blocking thread: the sockets (and the HTTP listeners in `http`
    /// if it asks for them), the lock, then wait for `Drain`.
    pub fn answer(
        &mut self,
        stream: UnixStream,
        mut offers: Vec<(Offered, OwnedFd)>,
        http: Vec<(Offered, OwnedFd)>,
        lock: OwnedFd,
    ) {
        let second = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "control socket: cannot use the connection");
                return;
            }
        };
        let task = tokio::task::spawn_blocking(move || {
            let wants_http = ask(&stream)?;
            if wants_http {
                offers.extend(http);
            }
            exchange(&stream, &offers, &lock)
        });
        self.busy = Some(Busy {
            task,
            stream: second,
        });
    }

    /// Whether a successor is being answered.
    pub fn busy(&self) -> bool {
        self.busy.is_some()
    }

    /// The successor owns the socket file now (it binds its own there): leave it at exit.
    pub fn leave_path(&mut self) {
        self.ino = 0;
    }

    /// End a handover in progress (shutdown): the blocking exchange fails at once.
    pub fn abort(&mut self) {
        if let Some(b) = self.busy.take() {
            let _ = b.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.abort();
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The successor's request: whether it asks for the HTTP listeners too.
fn ask(stream: &UnixStream) -> Result<bool, String> {
    let (body, _) = transport::recv(stream).map_err(|e| format!("handover: {e}"))?;
    match proto::decode::<Request>(&body)? {
        Request::Listeners { version, http } if version == VERSION => Ok(http),
        other => {
            let message = format!("expected listeners of version {VERSION}, got {other:?}");
            let _ = transport::send(
                stream,
                &proto::encode(&Reply::Error {
                    message: message.clone(),
                }),
                &[],
            );
            Err(message)
        }
    }
}

fn exchange(
    stream: &UnixStream,
    offers: &[(Offered, OwnedFd)],
    lock: &OwnedFd,
) -> Result<(), String> {
    let fail = |e: io::Error| format!("handover: {e}");
    let list: Vec<Offered> = offers.iter().map(|(o, _)| *o).collect();
    let mut start = 0;
    for (chunk, last) in proto::chunks(&list, MAX_FDS) {
        // Chunks come in order: the i-th socket of this one is offer start + i.
        let fds: Vec<_> = offers[start..start + chunk.len()]
            .iter()
            .map(|(_, fd)| fd.as_fd())
            .collect();
        start += chunk.len();
        let reply = Reply::Sockets {
            version: VERSION,
            pid: std::process::id(),
            sockets: chunk.to_vec(),
            last,
        };
        transport::send(stream, &proto::encode(&reply), &fds).map_err(fail)?;
    }
    transport::send(stream, &proto::encode(&Reply::Lock), &[lock.as_fd()]).map_err(fail)?;
    // The successor now prepares its pods and attaches: no deadline here, it may take a while;
    // a successor that dies closes the socket, which ends this read.
    let (body, _) = transport::recv(stream).map_err(fail)?;
    match proto::decode::<Request>(&body)? {
        Request::Drain => {
            transport::send(stream, &proto::encode(&Reply::Draining), &[]).map_err(fail)?;
            Ok(())
        }
        other => Err(format!("expected drain, got {other:?}")),
    }
}
