//! Named network namespaces (`ip netns`), as RAII guards, and running code inside them.

use crate::names::valid_label;
use crate::sys::{self, FileLock};
use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Where `ip netns add` pins namespaces (/var/run is a symlink to /run on Debian).
pub const NETNS_DIR: &str = "/var/run/netns";
/// Where `ip netns exec` finds per-namespace overrides of /etc files.
pub const ETC_NETNS_DIR: &str = "/etc/netns";

/// A named network namespace with `lo` up. Drop kills every process living in it, deletes it
/// (`ip netns del`; its interfaces go with it, and a veth's peer in another namespace too) and
/// removes its /etc/netns/<name> overrides.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates `name` (which must be new; use [`crate::names::unique_name`]).
    pub fn create(name: &str) -> Result<Self> {
        let ok_char = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        if name.is_empty() || name.len() > 128 || !name.bytes().all(ok_char) {
            bail!("bad netns name {name:?}");
        }
        {
            // The first `ip netns add` on a machine turns /run/netns into a shared bind mount;
            // two processes doing that at once stack two mounts and one netns goes missing.
            let _lock = FileLock::acquire("smt-netns")?;
            sys::ip(&["netns", "add", name])?;
        }
        // Construct the guard first so a failure below still deletes the namespace.
        let ns = Self {
            name: name.to_owned(),
            path: Path::new(NETNS_DIR).join(name),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`: what `sockmesh run --pod` takes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        sys::ip(&full)
    }

    /// Runs `f` on a fresh OS thread that has first entered this namespace, and returns its
    /// result (a panic in `f` is re-raised here). Sockets created by `f` belong to this
    /// namespace for their whole life and may be used afterwards from any thread.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        run_in_netns(&self.path, f)
    }

    /// Writes /etc/netns/<name>/<file>: `ip netns exec` bind-mounts it over /etc/<file> for
    /// programs started in this namespace (e.g. a per-pod resolv.conf). Not seen by `run`.
    pub fn set_etc_file(&self, file: &str, contents: &str) -> Result<()> {
        if !valid_label(&file.replace('.', "_")) {
            bail!("bad /etc file name {file:?}");
        }
        let dir = Path::new(ETC_NETNS_DIR).join(&self.name);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        fs::write(dir.join(file), contents).with_context(|| format!("write {file}"))
    }

    /// Sets a network sysctl of this namespace: `key` as sysctl(8) spells it
    /// (`net.ipv4.tcp_tw_reuse`), written to /proc/sys from a thread inside the namespace
    /// (net sysctls are per namespace, resolved against the writing thread's).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| fs::write(&path, value))
            .with_context(|| format!("write {value:?} to {path} in netns {}", self.name))
    }

    /// Inode of the namespace: equal to the `ns/net` inode of any thread or process inside it.
    pub fn inode(&self) -> Result<u64> {
        Ok(sys::ns_id(&self.path)
            .with_context(|| format!("stat {}", self.path.display()))?
            .1)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Kill first: `ip netns del` only drops the name, and a namespace with processes in it
        // lives on with its addresses and interfaces.
        if let Err(e) = sys::kill_netns_processes(&self.path) {
            eprintln!("[smt] warning: scan processes in {}: {e}", self.name);
        }
        if let Err(e) = sys::ip(&["netns", "del", &self.name]) {
            eprintln!("[smt] warning: {e:#}");
        }
        let etc = Path::new(ETC_NETNS_DIR).join(&self.name);
        if etc.exists() {
            if let Err(e) = fs::remove_dir_all(&etc) {
                eprintln!("[smt] warning: remove {}: {e}", etc.display());
            }
        }
    }
}

/// Deletes the namespaces whose names start with `prefix` (non-empty), killing what runs in
/// them and removing their /etc/netns overrides, as dropping their guards would have: for a
/// tool with fixed names whose earlier run was killed. Returns the names it deleted.
pub fn delete_leftovers(prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !prefix.is_empty() && n.starts_with(prefix))
        .collect();
    names.sort();
    for name in &names {
        drop(NetNs {
            path: Path::new(NETNS_DIR).join(name),
            name: name.clone(),
        });
    }
    names
}

/// Runs `f` on a new thread that has entered the network namespace pinned at `netns_path`.
/// Only that thread changes namespace (setns on a thread is per-thread for CLONE_NEWNET), so
/// the rest of the test process is unaffected. Panics with a clear message if the namespace
/// cannot be entered: that is a harness failure, not a test outcome.
pub fn run_in_netns<T: Send, F: FnOnce() -> T + Send>(netns_path: &Path, f: F) -> T {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("smt-netns".into())
            .spawn_scoped(s, || {
                enter(netns_path).unwrap_or_else(|e| panic!("{e:#}"));
                f()
            })
            .expect("spawn netns thread");
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread into the network namespace pinned at `netns_path`, for good: for
/// a thread of its own that then makes its sockets there (other threads are unaffected).
/// Prefer [`run_in_netns`] unless the thread must outlive the call.
pub fn enter(netns_path: &Path) -> Result<()> {
    let file = File::open(netns_path).with_context(|| format!("open {}", netns_path.display()))?;
    // SAFETY: valid fd; CLONE_NEWNET only affects the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns({})", netns_path.display()));
    }
    Ok(())
}

/// Inode of the calling thread's network namespace.
pub fn current_netns_inode() -> Result<u64> {
    Ok(sys::ns_id(Path::new("/proc/thread-self/ns/net"))
        .context("stat /proc/thread-self/ns/net")?
        .1)
}
