//! One direction of a relayed connection: bytes from `src` to `dst` until `src` ends (then the
//! half-close is passed on) or either side fails. Two ways to move them:
//! - splice: socket -> pipe -> socket inside the kernel, for unshaped peers (the common case);
//! - copy: read into a buffer, let the shaper hold the bytes back, write; for peers with a
//!   bandwidth limit, where each chunk must be debited before it goes on.
//!
//! Both wait on tokio's readiness and do the I/O with non-blocking syscalls, so a pump costs
//! no thread and no buffer while its direction is idle.
use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd, RawFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use tokio::{io::Interest, net::TcpStream};

use super::{
    limits::{Activity, Shaper},
    pipe::{PipePool, PipeSlot, PIPE_SIZE},
    turns::Turns,
};

/// The copy path's buffer, allocated on the first byte the direction sees.
const BUF_SIZE: usize = 32 * 1024;

/// Why a pump returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Its source ended and the half-close was passed on.
    Ended,
    /// Both directions are idle with empty pipes and the connection looks like
    /// request/response: hand it to the in-kernel relay (nothing is in flight in the agent).
    Upgrade,
}

/// What a splice pump reports to the upgrade watch: its direction (0: a to b) and whether it
/// waits for bytes with nothing held right now.
pub struct Watch<'a> {
    pub turns: &'a Turns,
    pub dir: usize,
    pub idle: &'a [AtomicBool; 2],
}

pub async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    total: &AtomicU64,
    last: &Activity,
    shape: Option<Shaper<'_>>,
    pool: &PipePool,
    watch: Option<Watch<'_>>,
) -> io::Result<Flow> {
    match shape {
        // Boxed: a shaped connection is the rare case, and the copy state (buffer, shaping
        // timer) would otherwise sit in every connection's task, idle ones included.
        Some(shape) => Box::pin(copy(src, dst, total, last, shape))
            .await
            .map(|()| Flow::Ended),
        None => splice(src, dst, total, last, pool, watch).await,
    }
}

/// Pass the end of stream on, keeping the other direction open.
fn half_close(dst: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(dst).shutdown(Shutdown::Write)
}

/// The largest read the small-message path copies; a read that fills it means bulk, and the
/// direction splices from then on.
const SMALL: usize = 16 * 1024;

thread_local! {
    /// The small-message path's buffer: one per worker thread, used only between a read and
    /// the write right after it (no await in between), so no connection holds one.
    static SMALL_BUF: std::cell::RefCell<Box<[u8; SMALL]>> =
        std::cell::RefCell::new(Box::new([0; SMALL]));
}

async fn splice(
    src: &TcpStream,
    dst: &TcpStream,
    total: &AtomicU64,
    last: &Activity,
    pool: &PipePool,
    watch: Option<Watch<'_>>,
) -> io::Result<Flow> {
    let (src_fd, dst_fd): (RawFd, RawFd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut slot = PipeSlot::new(pool);
    // Bytes moved since the direction last fell idle.
    let mut burst = 0u64;
    // Messages (a request, a reply) are copied: a recv and a send cost less than two splices
    // and a pipe for a few hundred bytes. The first full read switches to splice for good.
    let mut small = true;
    let set_idle = |idle: bool| {
        if let Some(w) = &watch {
            w.idle[w.dir].store(idle, Ordering::Relaxed);
        }
    };
    // Drained and nothing more yet: the direction is idle. True: move to the kernel now.
    let fell_idle = |burst: &mut u64| {
        let moved = std::mem::take(burst);
        watch.as_ref().is_some_and(|w| {
            let other_idle = w.idle[1 - w.dir].load(Ordering::Relaxed);
            moved > 0 && w.turns.burst(w.dir, moved, other_idle)
        })
    };
    loop {
        // Nothing is held here (pipe empty, every copied byte written): waiting below, this
        // direction has nothing in flight.
        set_idle(true);
        src.readable().await?;
        set_idle(false);
        if small {
            let copied = match src.try_io(Interest::READABLE, || copy_small(src_fd, dst_fd)) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if fell_idle(&mut burst) {
                        return Ok(Flow::Upgrade);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            last.touch();
            if copied.read == 0 {
                return half_close(dst).map(|()| Flow::Ended);
            }
            burst += copied.read as u64;
            total.fetch_add(copied.written as u64, Ordering::Relaxed);
            small = copied.read < SMALL;
            if let Some(rest) = copied.rest {
                write_all(dst, &rest, total).await?;
            }
            continue;
        }
        let pipe = slot.get()?;
        let n = match src.try_io(Interest::READABLE, || pipe.fill(src_fd, PIPE_SIZE)) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Idle: give the pipe back.
                slot.release();
                if fell_idle(&mut burst) {
                    return Ok(Flow::Upgrade);
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        last.touch();
        if n == 0 {
            return half_close(dst).map(|()| Flow::Ended);
        }
        burst += n as u64;
        while pipe.len > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || pipe.drain(dst_fd)) {
                Ok(m) => {
                    total.fetch_add(m as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// What one small-message copy did: bytes read (0: end of stream), written at once, and the
/// rest when `dst` could not take them all (copied out of the thread's buffer, rare).
struct Copied {
    read: usize,
    written: usize,
    rest: Option<Vec<u8>>,
}

/// One recv from `src` into the thread's buffer and one send of it to `dst`, both
/// non-blocking. WouldBlock only from the recv (the caller's readiness is `src`'s).
fn copy_small(src: RawFd, dst: RawFd) -> io::Result<Copied> {
    SMALL_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        // SAFETY: recv writes at most SMALL bytes into the buffer.
        let n = unsafe { libc::recv(src, buf.as_mut_ptr().cast(), SMALL, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let read = n as usize;
        let mut written = 0;
        while written < read {
            // SAFETY: sends bytes of the buffer that recv filled.
            let m = unsafe {
                libc::send(
                    dst,
                    buf[written..read].as_ptr().cast(),
                    read - written,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if m < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    // Not WouldBlock: the caller takes any error as the connection failing.
                    _ => return Err(io::Error::new(io::ErrorKind::BrokenPipe, e)),
                }
            }
            written += m as usize;
        }
        let rest = (written < read).then(|| buf[written..read].to_vec());
        Ok(Copied {
            read,
            written,
            rest,
        })
    })
}

/// Writes all of `bytes` to `dst`, waiting for room.
async fn write_all(dst: &TcpStream, mut bytes: &[u8], total: &AtomicU64) -> io::Result<()> {
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_write(bytes) {
            Ok(m) => {
                total.fetch_add(m as u64, Ordering::Relaxed);
                bytes = &bytes[m..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn copy(
    src: &TcpStream,
    dst: &TcpStream,
    total: &AtomicU64,
    last: &Activity,
    shape: Shaper<'_>,
) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        src.readable().await?;
        if buf.is_empty() {
            buf = vec![0u8; BUF_SIZE];
        }
        let n = match src.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        last.touch();
        if n == 0 {
            return half_close(dst);
        }
        let wait = shape(n as u64);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        write_all(dst, &buf[..n], total).await?;
    }
}
