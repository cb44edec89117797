//! Upstream sockets, made ahead of time. A socket joins the namespace of the thread that
//! creates it, so every upstream socket must come from the pod's netns worker thread. Asking
//! that thread per connection costs two cross-thread wake-ups (the worker's futex, then the
//! waiting task's) on the short-connection path: about a tenth of the agent's CPU per
//! connection in a profile of `wrk` with `Connection: close`. So each pod keeps a few spare
//! marked sockets per address family, and the worker tops them up in the background when
//! they run low: a connection takes one without leaving its tokio thread, and the worker is
//! woken once per batch instead of once per connection.
//!
//! Bounded: at most [`SPARE`] unconnected sockets per (pod, family), made only once the pod
//! has connected upstream in that family, closed when the pod goes. They are counted in
//! [`pooled`] (the status event's `sockets_pooled`), so a leak check can tell them apart from
//! connections that were not closed.
use std::{
    io,
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use crate::sys::{lock::lock, netns::NetnsWorker, sockets};

/// Spare sockets kept per (pod, family): a batch the worker makes in one wake-up.
pub const SPARE: usize = 8;
/// Top up when a take leaves this many or fewer, so a steady stream of connections finds
/// one ready while the worker makes the next batch.
const LOW: usize = SPARE / 2;

/// Spare sockets across every pod, for the status event.
static POOLED: AtomicUsize = AtomicUsize::new(0);

/// How many spare upstream sockets the agent holds now.
pub fn pooled() -> usize {
    POOLED.load(Ordering::Relaxed)
}

/// One pod's spare upstream sockets, by family.
#[derive(Debug, Default)]
pub struct UpstreamSockets {
    v4: Arc<Spares>,
    v6: Arc<Spares>,
}

#[derive(Debug, Default)]
struct Spares {
    sockets: Mutex<Vec<TcpStream>>,
    /// A top-up is queued on the worker: one at a time.
    refilling: AtomicBool,
}

impl Drop for Spares {
    fn drop(&mut self) {
        let n = lock(&self.sockets).len();
        POOLED.fetch_sub(n, Ordering::Relaxed);
    }
}

impl UpstreamSockets {
    /// An unconnected, unbound, non-blocking TCP socket in the pod's namespace, carrying the
    /// agent's mark, of `dst`'s family. From the spares when there is one (no wake-up of the
    /// worker unless they run low); else made by the worker now.
    pub async fn take(
        &self,
        worker: &NetnsWorker,
        dst: SocketAddr,
        mark: u32,
    ) -> io::Result<TcpStream> {
        let spares = if dst.is_ipv4() { &self.v4 } else { &self.v6 };
        let (got, low) = {
            let mut s = lock(&spares.sockets);
            let got = s.pop();
            (got, s.len() <= LOW)
        };
        if got.is_some() {
            POOLED.fetch_sub(1, Ordering::Relaxed);
        }
        if low && !spares.refilling.swap(true, Ordering::AcqRel) {
            refill(worker, spares.clone(), dst, mark);
        }
        match got {
            Some(s) => Ok(s),
            None => worker
                .run(move || sockets::tcp_for(dst, None, mark))
                .await
                .map_err(io::Error::other)?,
        }
    }
}

/// Queues a top-up to [`SPARE`] on the worker; it fills the spares itself, so nothing waits
/// for it. A socket that cannot be made (out of fds) ends the batch: the next take retries.
fn refill(worker: &NetnsWorker, spares: Arc<Spares>, dst: SocketAddr, mark: u32) {
    let job = {
        let spares = spares.clone();
        move || {
            let want = SPARE.saturating_sub(lock(&spares.sockets).len());
            let made: Vec<TcpStream> = (0..want)
                .map_while(|_| sockets::tcp_for(dst, None, mark).ok())
                .collect();
            let n = made.len();
            lock(&spares.sockets).extend(made);
            POOLED.fetch_add(n, Ordering::Relaxed);
            spares.refilling.store(false, Ordering::Release);
        }
    };
    if worker.spawn(job).is_err() {
        // The worker is gone (the pod is going): no top-up, and none pending.
        spares.refilling.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::netns::Netns;
    use std::os::fd::AsRawFd;

    fn worker() -> NetnsWorker {
        Netns::open(std::path::Path::new("/proc/self/ns/net"))
            .and_then(|ns| ns.worker())
            .expect("a worker in this namespace (needs root)")
    }

    fn mark_of(s: &TcpStream) -> u32 {
        socket2::SockRef::from(s).mark().expect("SO_MARK")
    }

    fn nonblocking(s: &TcpStream) -> bool {
        // SAFETY: F_GETFL on an open fd.
        let fl = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_GETFL) };
        fl & libc::O_NONBLOCK != 0
    }

    /// The worker runs jobs in order: once this returns, every job queued before has run.
    async fn barrier(w: &NetnsWorker) {
        w.run(|| ()).await.expect("worker");
    }

    #[tokio::test]
    async fn takes_come_from_spares_without_the_worker_and_are_topped_up() {
        const MARK: u32 = 0x5e11;
        let w = worker();
        let pool = UpstreamSockets::default();
        let v4: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();

        // First take: nothing spare, the worker makes it, and a top-up is queued.
        let first = pool.take(&w, v4, MARK).await.expect("socket");
        assert_eq!(mark_of(&first), MARK);
        assert!(nonblocking(&first));
        assert!(first.local_addr().expect("addr").is_ipv4());
        barrier(&w).await;
        assert_eq!(lock(&pool.v4.sockets).len(), SPARE);
        assert_eq!(lock(&pool.v6.sockets).len(), 0, "families are kept apart");

        // With the worker busy (blocked), takes are still served: from the spares.
        let (unblock, blocked) = std::sync::mpsc::channel::<()>();
        w.spawn(move || {
            let _ = blocked.recv();
        })
        .expect("spawn");
        for _ in 0..SPARE {
            let s = pool.take(&w, v4, MARK).await.expect("spare");
            assert_eq!(mark_of(&s), MARK);
            assert!(nonblocking(&s));
        }
        assert_eq!(lock(&pool.v4.sockets).len(), 0);
        unblock.send(()).expect("unblock");
        barrier(&w).await;
        // The top-up queued when they ran low has refilled them, never beyond the bound.
        assert_eq!(lock(&pool.v4.sockets).len(), SPARE);

        let s6 = pool.take(&w, v6, MARK).await.expect("v6");
        assert!(s6.local_addr().expect("addr").is_ipv6());
        barrier(&w).await;
        assert_eq!(lock(&pool.v6.sockets).len(), SPARE);
    }

    #[tokio::test]
    async fn spares_are_closed_with_the_pod() {
        let inode = |fd: i32| {
            // SAFETY: `stat` is plain integers, for which all zeroes is a valid value.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat on a number that may or may not be open (it fails if closed);
            // `st` is a valid out pointer of the right type.
            let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
            ok.then_some(st.st_ino)
        };
        let w = worker();
        let pool = UpstreamSockets::default();
        let dst: SocketAddr = "192.0.2.1:80".parse().unwrap();
        drop(pool.take(&w, dst, 1).await.expect("socket"));
        barrier(&w).await;
        let held: Vec<(i32, Option<u64>)> = lock(&pool.v4.sockets)
            .iter()
            .map(|s| (s.as_raw_fd(), inode(s.as_raw_fd())))
            .collect();
        assert_eq!(held.len(), SPARE);
        drop(pool);
        for (fd, ino) in held {
            // Closed, or the number reused by something else (another socket inode).
            assert!(ino.is_some());
            assert_ne!(inode(fd), ino, "spare socket fd {fd} still open");
        }
    }
}
