//! inotify on a directory through the tokio reactor: the one place both event-driven watchers
//! (a pod's netns name going away, the policy file changing) set a watch up and read events.
//! A directory, not a file: a watch on a file follows its inode away on the first rename.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use tokio::io::{unix::AsyncFd, Interest};

/// A non-blocking inotify instance watching `dir` for the events in `mask`, registered with
/// the reactor (so it must be called inside a tokio runtime). Errors name the directory.
pub fn watch_dir(dir: &Path, mask: u32) -> io::Result<AsyncFd<OwnedFd>> {
    let c_dir = CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: plain syscall; the result is checked.
    let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: valid fd and NUL-terminated path; the result is checked.
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c_dir.as_ptr(), mask) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("watch {}: {e}", dir.display()),
        ));
    }
    // SAFETY: the AsyncFd takes the OwnedFd; it stays open and the same file until dropped.
    Ok(unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? })
}

/// One read(2) of queued events into `buf`; `WouldBlock` once the queue is empty.
pub fn read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes; the result is checked.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
