//! Network namespaces: opening and validating one, and a worker thread that lives inside it.
//!
//! A socket belongs to the namespace of the thread that created it, for its whole life. So the
//! agent creates every in-pod socket (listeners, upstream sockets) on a dedicated thread that
//! has `setns`'d into the pod, then hands the socket to the tokio runtime.
use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::mpsc,
};

use anyhow::{anyhow, bail, Context, Result};

const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `_IO(0xb7, 0x3)` from linux/nsfs.h.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// An open handle on a network namespace (keeps it alive even if its name is deleted).
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| {
            anyhow!(
                "cannot open network namespace {}: {e} (give a path such as /var/run/netns/NAME or /proc/PID/ns/net)",
                path.display()
            )
        })?;
        let fd = file.as_raw_fd();
        // SAFETY: statfs is plain old data (integers only): all-zero bytes are a valid value.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open for the duration of the call; st is a valid out pointer.
        let is_nsfs = unsafe { libc::fstatfs(fd, &mut st) } == 0 && st.f_type as i64 == NSFS_MAGIC;
        // SAFETY: NS_GET_NSTYPE takes no argument and returns the CLONE_NEW* type.
        let ty = if is_nsfs {
            unsafe { libc::ioctl(fd, NS_GET_NSTYPE) }
        } else {
            -1
        };
        if ty != libc::CLONE_NEWNET {
            bail!(
                "{} is not a network namespace (give /var/run/netns/NAME or /proc/PID/ns/net)",
                path.display()
            );
        }
        Ok(Netns {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's fd, for what attaches to a namespace (`sk_lookup`).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    /// Start a worker thread inside this namespace.
    pub fn worker(&self) -> Result<NetnsWorker> {
        // The thread gets its own fd so the namespace outlives this handle if needed.
        let fd: OwnedFd = self.file.try_clone().context("dup netns fd")?.into();
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<std::io::Result<()>>(1);
        let name = format!(
            "netns-{}",
            self.path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("pod")
        );
        std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                // SAFETY: setns affects only this thread; fd is a valid netns fd.
                let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
                let res = if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                };
                let ok = res.is_ok();
                let _ = ready_tx.send(res);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })
            .context("spawn netns worker thread")?;
        ready_rx
            .recv()
            .context("netns worker thread died")?
            .with_context(|| format!("setns into {}", self.path.display()))?;
        Ok(NetnsWorker { tx })
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread inside a pod's network namespace; it ends when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct NetnsWorker {
    tx: mpsc::Sender<Job>,
}

impl NetnsWorker {
    /// Run `f` inside the namespace and wait for its result from async code.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| anyhow!("netns worker has stopped"))?;
        rx.await
            .map_err(|_| anyhow!("netns worker dropped the job"))
    }

    /// Queue `f` inside the namespace without waiting for it (background work such as
    /// making spare sockets).
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> Result<()> {
        self.tx
            .send(Box::new(f))
            .map_err(|_| anyhow!("netns worker has stopped"))
    }

    /// Run `f` inside the namespace, blocking the calling thread (start-up only).
    pub fn run_blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| anyhow!("netns worker has stopped"))?;
        rx.recv()
            .map_err(|_| anyhow!("netns worker dropped the job"))
    }
}

/// The cookie the kernel programs see for this socket's namespace (`SO_NETNS_COOKIE`, 5.14+).
pub fn netns_cookie_of(fd: &impl AsRawFd) -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's namespace cookie, via a throwaway socket.
pub fn current_netns_cookie() -> std::io::Result<u64> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    netns_cookie_of(&fd)
}

/// The calling thread's non-loopback addresses usable for listening (link-local IPv6 needs a
/// scope and is left out).
pub fn current_addresses() -> std::io::Result<Vec<std::net::IpAddr>> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur walks the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and its family tells its real type.
        let ip = unsafe {
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
        if !ip.is_loopback() && !link_local && !out.contains(&ip) {
            out.push(ip);
        }
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}
