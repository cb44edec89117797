//! The in-kernel relay (`--kernel-relay on`, unshaped connections): once both sockets are in
//! the relay maps, the `sk_skb` verdict program sends what one receives out of the other, so
//! the agent is not woken per message. The agent keeps what the kernel does not do:
//!
//! - **FIN**: the sockets leave tokio's reactor (which would be woken by every byte) and sit in
//!   an epoll of their own that asks only for EPOLLRDHUP (EPOLLERR/EPOLLHUP are implied), so
//!   the agent wakes for a close, never for data. A FIN from one side becomes shutdown(SHUT_WR)
//!   of the other, but only once every byte received before it has left through the other
//!   socket: the kernel forwards from a work queue, after the FIN is already visible.
//! - **RST**: an error on either side resets both.
//! - **Counts and idle time**: from TCP_INFO, exact. Bytes written to a socket are
//!   `bytes_acked + SIOCOUTQ` (acked plus still queued); the last byte either way is the
//!   smaller `last_data_recv` of the two sockets.
//! - **Idle timeout, lifetime, drain**: the same timer as the other relays; a limit takes the
//!   sockets out of the maps and closes them like the splice relay does.
use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use tokio::{io::unix::AsyncFd, net::TcpStream, time::Instant};

use super::{
    ending::{finish, relayed, reset_all},
    limits::{deadline, Limits},
};
use crate::datapath::relay::{ArmError, RelayMaps};
use crate::telemetry::conn::{Counts, End, Relayed};

/// What became of a connection handed to the kernel relay.
pub enum Outcome {
    Done(Relayed),
    /// Could not be armed; nothing was forwarded: relay it another way.
    Fallback(TcpStream, TcpStream),
}

/// How long to wait, at most, between two checks that a half-closing direction has flushed.
/// The kernel signals nothing when its forwarding queue empties; the first check (right at the
/// FIN) almost always passes, later ones back off from 1 ms to this.
const FLUSH_RECHECK_MAX: Duration = Duration::from_millis(64);

/// Relays `a` and `b` in the kernel until the connection ends. `start`: when the connection
/// started (its lifetime counts from there, also if it was spliced before); `bytes` holds
/// what was relayed before, and gets the kernel's running count while it runs and the exact
/// figures when it ends.
pub async fn relay(
    a: TcpStream,
    b: TcpStream,
    limits: &Limits<'_>,
    maps: &RelayMaps,
    start: Instant,
    bytes: &Counts,
) -> Outcome {
    let (Ok(ca), Ok(cb)) = (cookie(a.as_raw_fd()), cookie(b.as_raw_fd())) else {
        return Outcome::Fallback(a, b);
    };
    // Off tokio's reactor: it registers EPOLLIN, and the kernel wakes readers per message.
    let (a, b) = match (a.into_std(), b.into_std()) {
        (Ok(a), Ok(b)) => (a, b),
        // Only a failed epoll_ctl(DEL) gets here (the socket it failed for is closed): the
        // connection cannot be relayed safely.
        (a, b) => return Outcome::Done(reset_all([a, b].into_iter().flatten(), bytes)),
    };
    let back = |a: std::net::TcpStream, b: std::net::TcpStream| match (
        TcpStream::from_std(a),
        TcpStream::from_std(b),
    ) {
        (Ok(a), Ok(b)) => Outcome::Fallback(a, b),
        // Neither is left to reset: a failed conversion closed its socket.
        _ => Outcome::Done(relayed(bytes, End::Reset)),
    };
    let socks = [a.as_raw_fd(), b.as_raw_fd()];
    // What the agent relayed before (by splice, its pipes now empty): read from a and from b.
    let (from_a, from_b) = bytes.get();
    let prior = [from_a, from_b];
    // Counted from here: TCP's counters started at the handshake, and the agent may have
    // relayed bytes itself before.
    let base = [written(socks[0]), written(socks[1])];
    let ep = match closes(socks) {
        Ok(ep) => ep,
        Err(_) => return back(a, b),
    };
    let armed = match maps.arm((ca, socks[0]), (cb, socks[1])) {
        Ok(g) => g,
        Err(ArmError::NotArmed) => return back(a, b),
        Err(ArmError::Partial) => {
            tracing::debug!("a side closed while the kernel relay was armed; resetting");
            return Outcome::Done(reset_all([a, b], bytes));
        }
    };
    bytes.in_kernel(maps.forwarded([ca, cb]));
    // Bytes that arrived before the program was attached wait in the receive queue for a
    // data-ready callback; setting SO_RCVLOWAT calls it now.
    for fd in socks {
        kick(fd);
    }
    let last = || last_activity(start, socks);
    let timer = deadline(limits, start, &last);
    tokio::pin!(timer);
    let mut st = Sides::default();
    let end = loop {
        st.flush(socks, base, prior);
        if st.read_done == [true, true] && st.pending == [false, false] {
            break End::Closed;
        }
        let recheck = st.recheck();
        tokio::select! {
            r = events(&ep) => match r {
                Ok(evs) if st.on_events(&evs, socks) => {}
                _ => break End::Reset,
            },
            e = &mut timer => break e,
            _ = recheck => {}
        }
    };
    // Our FIN takes a sequence number too: not a byte.
    let sent =
        |side: usize| written(socks[side]).saturating_sub(base[side] + u64::from(st.shut[side]));
    // Before the maps are cleared: a reader must never see the running count drop to 0.
    bytes.out_of_kernel(sent(1), sent(0));
    // Out of the maps and the epoll before the sockets are ended like any relay's: what still
    // arrives is the agent's to read (and discard, on a graceful close).
    drop(armed);
    drop(ep);
    Outcome::Done(finish(a, b, end, bytes).await)
}

/// Per side (0 = a, 1 = b): its FIN seen, that FIN still to be passed on, our FIN sent to it.
#[derive(Default)]
struct Sides {
    read_done: [bool; 2],
    pending: [bool; 2],
    shut: [bool; 2],
    rechecks: u32,
}

impl Sides {
    /// Handle epoll events; false means a side failed (reset both).
    fn on_events(&mut self, evs: &[(usize, u32)], socks: [RawFd; 2]) -> bool {
        for &(side, flags) in evs {
            let errored = flags & libc::EPOLLERR as u32 != 0 || so_error(socks[side]);
            if errored {
                return false;
            }
            if flags & libc::EPOLLRDHUP as u32 != 0 && !self.read_done[side] {
                self.read_done[side] = true;
                self.pending[side] = true;
            }
        }
        true
    }

    /// Pass on each pending FIN whose bytes have all been written to the other side. `base`:
    /// each socket's written count when the kernel took over; `prior`: bytes the agent had
    /// read from each before (and written to the other, so they are in `base` too).
    fn flush(&mut self, socks: [RawFd; 2], base: [u64; 2], prior: [u64; 2]) {
        for side in 0..2 {
            let other = 1 - side;
            if !self.pending[side] {
                continue;
            }
            // bytes_received counts the FIN's sequence number too: one more than the data.
            let received = tcp_info(socks[side])
                .map(|i| i.bytes_received.saturating_sub(1 + prior[side]))
                .unwrap_or(0);
            let sent = written(socks[other]).saturating_sub(base[other]);
            // A peer that is gone takes no more bytes: stop waiting, its error resets both.
            if sent >= received || closed_for_good(socks[other]) {
                let _ = socket2::SockRef::from(&borrow(socks[other])).shutdown(Shutdown::Write);
                self.shut[other] = true;
                self.pending[side] = false;
                self.rechecks = 0;
            }
        }
    }

    /// Sleeps before the next flush check while a FIN waits; pending forever otherwise.
    async fn recheck(&mut self) {
        if self.pending == [false, false] {
            return std::future::pending().await;
        }
        let wait = Duration::from_millis(1u64 << self.rechecks.min(6)).min(FLUSH_RECHECK_MAX);
        self.rechecks += 1;
        tokio::time::sleep(wait).await;
    }
}

/// An epoll holding both sockets for closes and errors only.
fn closes(socks: [RawFd; 2]) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: plain syscall; the fd returned is owned below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    for (side, fd) in socks.into_iter().enumerate() {
        let mut ev = libc::epoll_event {
            // No EPOLLIN: data is the kernel's business. Edge-triggered: RDHUP stays set after
            // a FIN, and only the next change (an error, the last close) should wake again.
            events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: side as u64,
        };
        // SAFETY: both fds are open; `ev` is a valid epoll_event.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: the AsyncFd owns the epoll fd (an OwnedFd, whose as_raw_fd never changes), so
    // it stays open and the same file as long as it is registered.
    unsafe { AsyncFd::register(ep) }.map_err(|e| e.into_parts().1)
}

/// The next batch of (side, flags) from the connection's epoll.
async fn events(ep: &AsyncFd<OwnedFd>) -> io::Result<Vec<(usize, u32)>> {
    loop {
        let mut guard = ep.readable().await?;
        let r = guard.try_io(|ep| {
            let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
            // SAFETY: the buffer holds 4 events; timeout 0 never blocks.
            let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), evs.as_mut_ptr(), 4, 0) };
            match n {
                n if n < 0 => Err(io::Error::last_os_error()),
                0 => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(evs[..n as usize]
                    .iter()
                    .map(|e| ((e.u64 as usize).min(1), e.events))
                    .collect()),
            }
        });
        match r {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

/// When a byte last arrived on either socket: TCP_INFO's `last_data_recv` (ms ago).
fn last_activity(start: Instant, socks: [RawFd; 2]) -> Instant {
    let now = Instant::now();
    let ago = socks
        .iter()
        .filter_map(|&fd| tcp_info(fd).ok())
        .map(|i| i.last_data_recv_ms)
        .min()
        .unwrap_or(0);
    now.checked_sub(Duration::from_millis(u64::from(ago)))
        .map_or(start, |t| t.max(start))
}

fn borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only called with the relay's two sockets, open for the whole relay, and each
    // borrow is used at once and not kept.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// SO_RCVLOWAT makes TCP re-check its receive queue and call data-ready (the verdict).
fn kick(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: the value is a live c_int and the length given is its size; the kernel only
    // reads it.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

pub(super) fn cookie(fd: RawFd) -> io::Result<u64> {
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// A getsockopt whose value is a plain `T` the kernel fills (up to its size).
fn getsockopt<T: Default>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut v = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` (the size of `T`) bytes into `v`. `T` is only
    // ever an integer or `TcpInfo` (integers only), for which any bytes are a valid value.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut T).cast(), &mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Consumes the socket's pending error, as a failed read would.
fn so_error(fd: RawFd) -> bool {
    matches!(
        socket2::SockRef::from(&borrow(fd)).take_error(),
        Ok(Some(_)) | Err(_)
    )
}

/// Whether the socket is closed for good (reset or fully closed): TCP_CLOSE.
fn closed_for_good(fd: RawFd) -> bool {
    tcp_info(fd).map_or(true, |i| i.state == 7)
}

/// The part of `struct tcp_info` (linux/tcp.h) the relay reads; the kernel fills what fits.
#[repr(C)]
#[derive(Default)]
struct TcpInfo {
    state: u8,
    _u8s: [u8; 7],
    _rto_to_fackets: [u32; 9],
    _last_data_sent: u32,
    _last_ack_sent: u32,
    last_data_recv_ms: u32,
    _last_ack_recv: u32,
    _metrics: [u32; 11],
    _pacing: [u64; 2],
    bytes_acked: u64,
    bytes_received: u64,
}

fn tcp_info(fd: RawFd) -> io::Result<TcpInfo> {
    getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// Bytes ever written to the socket: acknowledged by its peer plus still in its send queue.
fn written(fd: RawFd) -> u64 {
    let acked = tcp_info(fd).map(|i| i.bytes_acked).unwrap_or(0);
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int, into `queued`, a c_int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
        queued = 0;
    }
    acked + queued.max(0) as u64
}
