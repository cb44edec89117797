//! How a relayed connection ends, whichever relay carried it (the agent's pumps, the kernel,
//! or the drain deadline cutting it short): the final counts, then its two sockets reset
//! (a side failed), closed gracefully (a limit was reached), or just closed (both sides did).
use std::{io, os::fd::AsFd, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::telemetry::conn::{Counts, End, Relayed};

/// One of a relay's two sockets as it ends: on tokio's reactor (the agent's relay) or off it
/// (the kernel relay keeps its sockets in an epoll of its own).
pub trait Side: AsFd {
    /// The socket on tokio's reactor, for the graceful close's reads.
    fn into_tokio(self) -> io::Result<TcpStream>;
}

impl Side for TcpStream {
    fn into_tokio(self) -> io::Result<TcpStream> {
        Ok(self)
    }
}

impl Side for std::net::TcpStream {
    fn into_tokio(self) -> io::Result<TcpStream> {
        TcpStream::from_std(self)
    }
}

/// Ends the connection `end` says ended, and returns what it relayed (`bytes`, final by now).
/// Both sockets are closed when this returns.
pub async fn finish<S: Side>(a: S, b: S, end: End, bytes: &Counts) -> Relayed {
    match end {
        End::Reset => reset_all([a, b], bytes),
        End::IdleTimeout | End::MaxLifetime => {
            let out = relayed(bytes, end);
            // Converted back onto the reactor only if they left it; one that cannot be is
            // closed as it is.
            if let (Ok(mut a), Ok(mut b)) = (a.into_tokio(), b.into_tokio()) {
                // Boxed: its read buffers would otherwise sit in every connection's task.
                Box::pin(close_gracefully(&mut a, &mut b)).await;
            }
            out
        }
        // Both sides already closed: dropping the sockets finishes the close.
        End::Closed => relayed(bytes, end),
    }
}

/// Resets every socket of a connection that failed (or was cut off), however many of them
/// are left; the connection ended with [`End::Reset`] after what `bytes` counts.
pub fn reset_all<S: AsFd>(socks: impl IntoIterator<Item = S>, bytes: &Counts) -> Relayed {
    for s in socks {
        reset(&s);
    }
    relayed(bytes, End::Reset)
}

/// What a connection ending with `end` relayed: the counts as they stand.
pub fn relayed(bytes: &Counts, end: End) -> Relayed {
    let (a_to_b, b_to_a) = bytes.get();
    Relayed {
        a_to_b,
        b_to_a,
        end,
    }
}

/// Make the coming close send RST instead of FIN.
pub fn reset(s: &impl AsFd) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
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
