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
mod ending;
pub mod kernel;
#[cfg(test)]
mod kernel_tests;
mod limits;
mod pipe;
mod pump;
#[cfg(test)]
mod tests;
mod turns;

use std::sync::{atomic::AtomicBool, Arc};

use tokio::net::TcpStream;

pub use ending::{relayed, reset};
pub use limits::{Limits, Shaper};
pub use pipe::PipePool;

use crate::datapath::relay::Mode;
pub use crate::telemetry::conn::{Counts, End, Relayed};
use ending::finish;
use limits::{deadline, Activity};
use pump::{Flow, Watch};

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
    let last = Activity::new();
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
    finish(a, b, end, &bytes).await
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
