//! Knowing, without polling, when an enrolled pod's namespace is gone.
//!
//! The agent itself keeps every enrolled namespace alive (it holds an fd on it and has sockets
//! and a thread inside), so "the namespace was freed" never happens while it is enrolled. What
//! can be observed is the thing that named it going away:
//!
//! * `/proc/PID/ns/net`: that process exiting, seen through a pidfd (readable on exit);
//! * any other path (`/var/run/netns/NAME`, a CNI `/var/run/netns/cni-...`): the name being
//!   deleted or replaced, seen through inotify on its directory, then confirmed by comparing the
//!   path's identity with the namespace's.
use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use tokio::io::{unix::AsyncFd, Interest};

use super::resolver::{ns_id, NsId};
use crate::sys::inotify;

/// What names a pod's namespace, and so what to watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Anchor {
    Pid(i32),
    Path(PathBuf),
}

impl Anchor {
    /// `/proc/<pid>/ns/net` is anchored by the process, anything else by the path.
    pub fn of(path: &Path) -> Anchor {
        let s = path.to_string_lossy();
        let pid = s
            .strip_prefix("/proc/")
            .and_then(|r| r.strip_suffix("/ns/net"))
            .and_then(|p| p.parse::<i32>().ok());
        match pid {
            Some(pid) => Anchor::Pid(pid),
            None => Anchor::Path(path.to_path_buf()),
        }
    }
}

/// Resolves when `anchor` no longer names the namespace `id`. Errors setting up the watch are
/// returned at once (the caller keeps the pod, since it cannot tell).
pub async fn gone(anchor: Anchor, id: NsId) -> io::Result<String> {
    match anchor {
        Anchor::Pid(pid) => pid_exit(pid, id).await,
        Anchor::Path(path) => path_gone(&path, id).await,
    }
}

async fn pid_exit(pid: i32, id: NsId) -> io::Result<String> {
    // SAFETY: plain syscall; the result is checked and owned right away.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if raw < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(format!("process {pid} has exited")),
            _ => Err(e),
        };
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // The pid may have been reused between enrolment and now: the pidfd must be of a
    // process in the namespace we enrolled.
    if ns_id(Path::new(&format!("/proc/{pid}/ns/net"))).ok() != Some(id) {
        return Ok(format!("process {pid} has left the namespace"));
    }
    // SAFETY: the AsyncFd owns the descriptor and it stays the same open file until dropped.
    let afd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
    let _ready = afd.readable().await?;
    Ok(format!("process {pid} has exited"))
}

async fn path_gone(path: &Path, id: NsId) -> io::Result<String> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mask = libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO | libc::IN_DELETE_SELF;
    let afd = inotify::watch_dir(dir, mask)?;
    let mut buf = [0u8; 4096];
    loop {
        // Checked after the watch exists, so a deletion just before it is not missed.
        if ns_id(path).ok() != Some(id) {
            return Ok(format!("{} was deleted", path.display()));
        }
        let mut guard = afd.readable().await?;
        // Drain the events; which name changed does not matter, the identity check decides.
        while matches!(inotify::read(guard.get_inner(), &mut buf), Ok(n) if n > 0) {}
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors() {
        assert_eq!(Anchor::of(Path::new("/proc/42/ns/net")), Anchor::Pid(42));
        assert_eq!(
            Anchor::of(Path::new("/var/run/netns/web")),
            Anchor::Path("/var/run/netns/web".into())
        );
        assert_eq!(
            Anchor::of(Path::new("/proc/self/ns/net")),
            Anchor::Path("/proc/self/ns/net".into())
        );
    }

    #[tokio::test]
    async fn a_child_exiting_is_seen() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        let id = ns_id(Path::new(&format!("/proc/{pid}/ns/net"))).expect("ns id");
        let watch = tokio::spawn(gone(Anchor::Pid(pid), id));
        tokio::task::yield_now().await;
        assert!(!watch.is_finished());
        child.kill().expect("kill");
        let _ = child.wait();
        let why = watch.await.expect("join").expect("watch");
        assert!(why.contains("exited"), "{why}");
    }

    #[tokio::test]
    async fn a_deleted_name_is_seen() {
        let dir = std::env::temp_dir().join(format!("sockmesh-liveness-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("ns");
        std::fs::write(&file, b"x").expect("file");
        let id = ns_id(&file).expect("id");
        let watch = tokio::spawn(gone(Anchor::Path(file.clone()), id));
        tokio::task::yield_now().await;
        // Unrelated changes in the directory are not the pod going away.
        std::fs::write(dir.join("other"), b"y").expect("other");
        std::fs::remove_file(dir.join("other")).expect("rm other");
        tokio::task::yield_now().await;
        assert!(!watch.is_finished());
        std::fs::remove_file(&file).expect("rm");
        let why = watch.await.expect("join").expect("watch");
        assert!(why.contains("deleted"), "{why}");
        let _ = std::fs::remove_dir(&dir);
    }
}
