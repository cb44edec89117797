//! Copying a proxied connection both ways, TCP semantics preserved: a FIN on one side becomes
//! a half-close (shutdown(SHUT_WR)) on the other while the other direction keeps flowing; a
//! reset on either side resets both.
use std::{io, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpStream,
    },
};

const BUF_SIZE: usize = 32 * 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes from the first stream to the second.
    pub a_to_b: u64,
    pub b_to_a: u64,
    /// Whether the connection ended with a reset (propagated to both sides).
    pub reset: bool,
}

async fn pump(r: &mut ReadHalf<'_>, w: &mut WriteHalf<'_>, total: &mut u64) -> io::Result<()> {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Peer sent FIN: pass the half-close on, keep the other direction open.
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        *total += n as u64;
    }
}

/// Relay until both directions have finished or either fails.
pub async fn relay(mut a: TcpStream, mut b: TcpStream) -> Relayed {
    let mut out = Relayed::default();
    let failed = {
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        let ab = pump(&mut ar, &mut bw, &mut out.a_to_b);
        let ba = pump(&mut br, &mut aw, &mut out.b_to_a);
        tokio::pin!(ab, ba);
        let (mut ab_done, mut ba_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut ab, if !ab_done => { ab_done = true; if r.is_err() { break true } }
                r = &mut ba, if !ba_done => { ba_done = true; if r.is_err() { break true } }
            }
            if ab_done && ba_done {
                break false;
            }
        }
    };
    if failed {
        out.reset = true;
        reset(&a);
        reset(&b);
    }
    out
}

/// Make the coming close send RST instead of FIN.
pub fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}
