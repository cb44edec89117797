//! Pipes for splice(2): the kernel moves socket pages into a pipe and out to the other socket,
//! so payload bytes never enter the agent's memory. A pipe is held only while bytes flow
//! through its direction and goes back to a small pool when that direction falls idle, so an
//! idle connection costs no pipe (no fds, no pipe ring) however many are open.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
};

use crate::sys::lock::lock;

/// Bytes one splice may move; pipes are sized to hold this much (default pipes hold 64 KiB,
/// i.e. 16 pages; bulk throughput gains from fewer, larger splices, measured with iperf3).
pub const PIPE_SIZE: usize = 256 * 1024;

/// One pipe, both ends non-blocking; `len` counts the bytes spliced in but not yet out.
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    pub len: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two fds into `fds`, an array of exactly two.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just returned by pipe2 and are owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe is an optimisation only: past fs.pipe-max-size or the per-user pipe
        // budget the kernel refuses, and the default 64 KiB pipe still works.
        // SAFETY: plain fcntl on an fd we own.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(Pipe { r, w, len: 0 })
    }

    /// splice(2) `len` bytes from `fd` into the pipe; 0 means end of stream.
    pub fn fill(&mut self, fd: RawFd, len: usize) -> io::Result<usize> {
        let n = splice(fd, self.w.as_raw_fd(), len)?;
        self.len += n;
        Ok(n)
    }

    /// splice(2) what the pipe holds out to `fd`; returns how much went.
    pub fn drain(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = splice(self.r.as_raw_fd(), fd, self.len)?;
        self.len -= n;
        Ok(n)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds the caller owns; null offsets (neither end is seekable).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Empty pipes waiting for a direction that has bytes to move. Bounded: past `max`, a
/// returned pipe is closed, so a burst of many busy connections does not pin fds forever.
pub struct PipePool {
    free: Mutex<Vec<Pipe>>,
    max: usize,
    created: AtomicUsize,
    in_use: AtomicUsize,
}

impl PipePool {
    pub const fn new(max: usize) -> Self {
        PipePool {
            free: Mutex::new(Vec::new()),
            max,
            created: AtomicUsize::new(0),
            in_use: AtomicUsize::new(0),
        }
    }

    /// The pool every relay uses.
    pub fn global() -> &'static PipePool {
        // Enough for the directions that move bytes at the same instant on a small node.
        static POOL: PipePool = PipePool::new(64);
        &POOL
    }

    pub fn take(&self) -> io::Result<Pipe> {
        let pooled = lock(&self.free).pop();
        let pipe = match pooled {
            Some(p) => p,
            None => {
                let p = Pipe::new()?;
                self.created.fetch_add(1, Ordering::Relaxed);
                p
            }
        };
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(pipe)
    }

    /// Back to the pool if empty; a pipe still holding bytes (the transfer failed midway)
    /// is closed, which discards them.
    pub fn give(&self, pipe: Pipe) {
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        if pipe.len == 0 {
            let mut free = lock(&self.free);
            if free.len() < self.max {
                free.push(pipe);
            }
        }
    }

    /// Pipes held by a direction right now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Empty pipes kept for reuse (two fds each, held on purpose, not leaked).
    pub fn pooled(&self) -> usize {
        lock(&self.free).len()
    }

    /// Pipes ever created (a pooled pipe reused is not counted again).
    #[cfg(test)]
    pub fn created(&self) -> usize {
        self.created.load(Ordering::Relaxed)
    }
}

/// A direction's hold on a pipe: taken when bytes arrive, returned when the direction falls
/// idle, ends or is cancelled (drop), so no path leaks a pipe.
pub struct PipeSlot<'p> {
    pool: &'p PipePool,
    pipe: Option<Pipe>,
}

impl<'p> PipeSlot<'p> {
    pub fn new(pool: &'p PipePool) -> Self {
        PipeSlot { pool, pipe: None }
    }

    pub fn get(&mut self) -> io::Result<&mut Pipe> {
        match self.pipe {
            Some(ref mut p) => Ok(p),
            None => Ok(self.pipe.insert(self.pool.take()?)),
        }
    }

    pub fn release(&mut self) {
        if let Some(p) = self.pipe.take() {
            self.pool.give(p);
        }
    }
}

impl Drop for PipeSlot<'_> {
    fn drop(&mut self) {
        self.release();
    }
}
