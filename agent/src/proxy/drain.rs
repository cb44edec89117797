//! Graceful drain's hard edge: at the drain deadline a connection still relaying is reset on
//! both sides (RST, not FIN), so neither end mistakes a cut-off transfer for a complete one.
use std::{
    os::fd::{AsRawFd, BorrowedFd},
    sync::Arc,
};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::relay::{self, Counts, End, Limits, Relayed};

/// [`relay::relay`] until it ends by itself or `abort` fires; then both sides are reset.
pub async fn relay_until(
    a: TcpStream,
    b: TcpStream,
    limits: Limits<'_>,
    bytes: Arc<Counts>,
    abort: &CancellationToken,
) -> Relayed {
    let fds = [a.as_raw_fd(), b.as_raw_fd()];
    let mut relaying = Box::pin(relay::relay(a, b, limits, bytes.clone()));
    tokio::select! {
        r = &mut relaying => return r,
        _ = abort.cancelled() => {}
    }
    for fd in fds {
        // SAFETY: the relay future still owns both streams (it is dropped below), so these
        // fds are open and are exactly those sockets.
        relay::reset(&unsafe { BorrowedFd::borrow_raw(fd) });
    }
    // Dropping the future closes both streams; with linger 0 the close sends RST.
    drop(relaying);
    // What went through before the cut still counts.
    relay::relayed(&bytes, End::Reset)
}
