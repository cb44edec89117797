//! Reading what the kernel programs send: bind/unbind events and (optionally) their logs.
use aya::maps::{MapData, RingBuf};
use sockmesh_common::Event;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub type Events = AsyncFd<RingBuf<MapData>>;

/// Watch the event ring buffer's fd (no polling). None: inbound capture is off.
pub fn watch_events(ring: RingBuf<MapData>) -> Option<Events> {
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => Some(fd),
        Err(e) => {
            warn!(error = %e, "cannot watch the event ring buffer; inbound capture is off");
            None
        }
    }
}

/// The next bind/unbind events. Read in the main loop, not a task of its own, so the loop can
/// stop consuming them while a successor takes over (the ring's read position is shared with
/// it through the pinned map: exactly one agent reads). Cancel-safe: events are only taken
/// from the ring after the last await.
pub async fn next_events(fd: Option<&mut Events>) -> Vec<Event> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return std::future::pending().await;
        };
        let ring = guard.get_inner_mut();
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<Event>() {
                // SAFETY: the kernel wrote a whole Event (checked length); read_unaligned copes
                // with the ring's 8-byte alignment.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) });
            }
        }
        guard.clear_ready();
        if !out.is_empty() {
            return out;
        }
    }
}

pub async fn read_kernel_logs(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    cancel: CancellationToken,
) {
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger.
    let Ok(mut fd) = (unsafe { AsyncFd::register(logger) }) else {
        return;
    };
    loop {
        let mut guard = tokio::select! {
            _ = cancel.cancelled() => return,
            g = fd.readable_mut() => match g { Ok(g) => g, Err(_) => return },
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
