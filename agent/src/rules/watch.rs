//! [`PolicyWatcher`]: tells when the policy file has been replaced or rewritten,
//! so the agent reloads it without a SIGHUP. Event-driven (inotify through the
//! tokio reactor), never polling.
//!
//! What counts as a change:
//!
//! * the file written in place and **closed** (`IN_CLOSE_WRITE`): reacting to the
//!   close, not to each write, means a file is never read half-written by us;
//! * a file **renamed over** it (`IN_MOVED_TO`): how editors and config managers
//!   save atomically;
//! * a Kubernetes ConfigMap update: the kubelet swaps the `..data` symlink in
//!   the mounted directory (`IN_MOVED_TO ..data`), and the file, a symlink through
//!   `..data`, now shows the new content.
//!
//! The parent directory is watched, not the file: a watch on the file would
//! follow the old inode away on the first rename. Creating or deleting the file
//! is not a change by itself (a create is followed by the close that matters; a
//! deleted file has nothing to load).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use tokio::io::unix::AsyncFd;

use crate::sys::inotify;

/// The kubelet's ConfigMap/Secret volume data symlink.
const CONFIGMAP_DATA: &str = "..data";

/// `struct inotify_event` without its name: wd, mask, cookie, len.
const EVENT_HEADER: usize = 16;

pub struct PolicyWatcher {
    fd: AsyncFd<OwnedFd>,
    name: OsString,
}

impl PolicyWatcher {
    /// Watches the directory holding `path` for changes to it. Must be called
    /// inside a tokio runtime.
    pub fn new(path: &Path) -> io::Result<PolicyWatcher> {
        let name = path.file_name().map(OsStr::to_os_string).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a file path", path.display()),
            )
        })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mask = libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_ONLYDIR;
        let fd = inotify::watch_dir(dir, mask)?;
        Ok(PolicyWatcher { fd, name })
    }

    /// Waits until the file has changed (see the module doc). Events that arrive
    /// together (a save is often several) are folded into one return.
    ///
    /// Cancel-safe: a change is only consumed in the same poll that returns it.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            let mut guard = self.fd.readable().await?;
            let mut seen = Seen::default();
            // Drain everything queued now; then report if anything matched.
            loop {
                match guard.try_io(|fd| inotify::read(fd.get_ref(), &mut buf)) {
                    Ok(Ok(n)) => seen.add(self.scan(&buf[..n])),
                    Ok(Err(e)) => return Err(e),
                    // Would block: the queue is empty and readiness was cleared.
                    Err(_would_block) => break,
                }
            }
            if seen.changed {
                return Ok(());
            }
            if seen.gone {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "the policy file's directory was removed or unmounted; no longer watching",
                ));
            }
        }
    }

    /// What the events in `events` say about the watched file.
    fn scan(&self, mut events: &[u8]) -> Seen {
        let mut seen = Seen::default();
        while events.len() >= EVENT_HEADER {
            let word = |i: usize| {
                u32::from_ne_bytes([events[i], events[i + 1], events[i + 2], events[i + 3]])
            };
            let mask = word(4);
            let len = word(12) as usize;
            let end = (EVENT_HEADER + len).min(events.len());
            let raw_name = &events[EVENT_HEADER..end];
            let name = &raw_name[..raw_name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(raw_name.len())];
            // IN_Q_OVERFLOW: events were lost; assume the file was among them.
            if mask & libc::IN_Q_OVERFLOW != 0
                || name == self.name.as_bytes()
                || name == CONFIGMAP_DATA.as_bytes()
            {
                seen.changed = true;
            }
            // IN_IGNORED: the watch is gone (directory deleted or unmounted).
            seen.gone |= mask & libc::IN_IGNORED != 0;
            events = &events[end..];
        }
        seen
    }
}

#[derive(Default)]
struct Seen {
    changed: bool,
    gone: bool,
}

impl Seen {
    fn add(&mut self, other: Seen) {
        self.changed |= other.changed;
        self.gone |= other.gone;
    }
}
