//! Relaying a proxied connection both ways, TCP semantics preserved: a FIN on one side becomes
//! a half-close (shutdown(SHUT_WR)) on the other while the other direction keeps flowing; a
//! reset on either side resets both. The per-peer idle timeout and maximum lifetime end the
//! connection from a timer that is re-armed only when it fires (no polling), and bandwidth
//! shaping delays reads, never drops bytes.
//!
//! Unshaped connections are forwarded with splice(2) through a pooled pipe (zero copy, see
//! `pipe`); shaped ones are copied through a buffer so each chunk can be held back. Either
//! way nothing is allocated per read, and an idle connection holds no pipe and no buffer.
//! With the in-kernel relay (`--kernel-relay`), unshaped connections skip the agent: the
//! kernel forwards between the two sockets (see `kernel`), from the start (`on`) or once the
//! connection shows request/response traffic (`auto`, see `turns`); splice is the fallback.
#[cfg(test)]
mod auto_tests;
pub mod kernel;
#[cfg(test)]
mod kernel_tests;
mod pipe;
mod pump;
#[cfg(test)]
mod tests;
mod turns;

use std::{
    os::fd::AsFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

pub use pipe::PipePool;
pub use pump::Shaper;

use crate::datapath::relay::Mode;
use crate::policy::{
    timeouts::{TimeoutKind, Timeouts},
    Nanos,
};
pub use crate::telemetry::conn::{Counts, End, Relayed};
use pump::{Flow, Watch};

/// When the connection last saw a byte, as nanoseconds since it started (both pumps write it,
/// the timer reads it; the task is Send, so no Cell).
pub struct Activity {
    start: Instant,
    last_ns: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ns = self.start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last_ns.store(ns, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
    }
}

/// Per-connection limits from the peer's policy.
#[derive(Default)]
pub struct Limits<'a> {
    pub idle: Option<Duration>,
    pub lifetime: Option<Duration>,
    /// Debits bytes from the peer's bandwidth bucket; returns how long to hold them back.
    /// `None` (no bandwidth limit) lets the bytes go by splice, never through the agent.
    pub shape: Option<Shaper<'a>>,
    /// The in-kernel relay, used for unshaped connections when present.
    pub kernel: Option<&'a crate::datapath::relay::RelayMaps>,
}

/// Fires when the idle timeout or the lifetime is reached; pending forever if neither is set.
/// `last` tells when the connection (started at `start`) last saw a byte. One timer, armed
/// at the engine's next deadline and re-armed only when activity has moved it.
async fn deadline(limits: &Limits<'_>, start: Instant, last: &(dyn Fn() -> Instant + Sync)) -> End {
    let timeouts = Timeouts {
        connect: None,
        idle: limits.idle,
        max_lifetime: limits.lifetime,
        dns: None,
    };
    // Instants on the engine's clock: time since the connection started.
    let since_start = |t: Instant| Nanos::from_duration(t.saturating_duration_since(start));
    loop {
        let Some((at, _)) = timeouts.next_deadline(Nanos::ZERO, since_start(last())) else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(start + at.as_duration()).await;
        match timeouts.expired(
            Nanos::ZERO,
            since_start(last()),
            since_start(Instant::now()),
        ) {
            Some(TimeoutKind::MaxLifetime) => return End::MaxLifetime,
            Some(TimeoutKind::Idle) => return End::IdleTimeout,
            // Activity since the timer was armed moved the idle deadline: sleep again.
            None => {}
        }
    }
}

/// Relay until both directions have finished, either fails, or a limit is reached. `bytes`
/// counts what has been written each way as it goes; the result holds the final counts.
pub async fn relay(a: TcpStream, b: TcpStream, limits: Limits<'_>, bytes: Arc<Counts>) -> Relayed {
    relay_with(a, b, limits, PipePool::global(), bytes).await
}

async fn relay_with(
    mut a: TcpStream,
    mut b: TcpStream,
    limits: Limits<'_>,
    pool: &PipePool,
    bytes: Arc<Counts>,
) -> Relayed {
    // Both sockets come with TCP_NODELAY from where they were made (`sys::sockets`: the
    // listeners, whose accepted sockets inherit it, and the upstream sockets): two syscalls
    // per connection saved here.
    let last = Activity {
        start: Instant::now(),
        last_ns: AtomicU64::new(0),
    };
    let kernel = limits.kernel.filter(|_| limits.shape.is_none());
    let mut upgrade = kernel.is_some_and(|k| k.mode == Mode::Auto);
    let mut now_in_kernel = kernel.is_some_and(|k| k.mode == Mode::On);
    let end = loop {
        if let (true, Some(maps)) = (now_in_kernel, kernel) {
            // Boxed: its state would otherwise sit in every connection's task, spliced and
            // idle ones included (the scale figures are per idle connection).
            match Box::pin(kernel::relay(a, b, &limits, maps, last.start, &bytes)).await {
                kernel::Outcome::Done(r) => return r,
                // Not armed: nothing was forwarded, splice takes over (for good).
                kernel::Outcome::Fallback(a2, b2) => (a, b) = (a2, b2),
            }
            upgrade = false;
        }
        match spliced(&a, &b, &limits, pool, &bytes, &last, upgrade).await {
            Some(end) => break end,
            None => now_in_kernel = true,
        }
    };
    let (a_to_b, b_to_a) = bytes.get();
    let out = Relayed {
        a_to_b,
        b_to_a,
        end,
    };
    match end {
        End::Reset => {
            reset(&a);
            reset(&b);
        }
        // Boxed: its read buffers would otherwise sit in every connection's task.
        End::IdleTimeout | End::MaxLifetime => Box::pin(close_gracefully(&mut a, &mut b)).await,
        // Both sides already closed: dropping the streams finishes the close.
        End::Closed => {}
    }
    out
}

/// Relays with the pumps (splice, or copy when shaped) until the connection ends (`Some`), or,
/// when `upgrade` is set, until both directions are idle and it looks like request/response
/// (`None`: nothing is in flight in the agent, hand the sockets to the kernel).
async fn spliced(
    a: &TcpStream,
    b: &TcpStream,
    limits: &Limits<'_>,
    pool: &PipePool,
    bytes: &Counts,
    last: &Activity,
    upgrade: bool,
) -> Option<End> {
    let turns = turns::Turns::default();
    let idle = [AtomicBool::new(false), AtomicBool::new(false)];
    let watch = |dir| {
        upgrade.then_some(Watch {
            turns: &turns,
            dir,
            idle: &idle,
        })
    };
    let ab = pump::pump(a, b, &bytes.a_to_b, last, limits.shape, pool, watch(0));
    let ba = pump::pump(b, a, &bytes.b_to_a, last, limits.shape, pool, watch(1));
    let last_at = || last.last();
    let timer = deadline(limits, last.start, &last_at);
    tokio::pin!(ab, ba, timer);
    let (mut ab_done, mut ba_done) = (false, false);
    loop {
        // The pumps run in this task: when one returns `Upgrade`, the other is parked at its
        // idle wait (it said so), so dropping both here loses nothing.
        tokio::select! {
            r = &mut ab, if !ab_done => match r {
                Ok(Flow::Ended) => ab_done = true,
                Ok(Flow::Upgrade) => return None,
                Err(_) => return Some(End::Reset),
            },
            r = &mut ba, if !ba_done => match r {
                Ok(Flow::Ended) => ba_done = true,
                Ok(Flow::Upgrade) => return None,
                Err(_) => return Some(End::Reset),
            },
            e = &mut timer => return Some(e),
        }
        if ab_done && ba_done {
            return Some(End::Closed);
        }
    }
}

/// How long a connection ended by a limit may take to be closed by its ends after our FIN.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Ends a connection we cut (a limit, not a side) with a FIN both ways, never a reset: close()
/// on a socket with unread data sends RST, and bytes in flight are the normal state of a busy
/// connection reaching its lifetime. So: FIN to both, then discard what still arrives until each
/// side closes too, for at most [`DRAIN_GRACE`].
async fn close_gracefully(a: &mut TcpStream, b: &mut TcpStream) {
    let _ = a.shutdown().await;
    let _ = b.shutdown().await;
    let drain = async { tokio::join!(discard(a), discard(b)) };
    let _ = tokio::time::timeout(DRAIN_GRACE, drain).await;
}

async fn discard(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Make the coming close send RST instead of FIN.
pub fn reset(s: &TcpStream) {
    reset_fd(s.as_fd());
}

fn reset_fd(s: std::os::fd::BorrowedFd<'_>) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}
