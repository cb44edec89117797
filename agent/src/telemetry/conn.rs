//! What a proxied connection did, as the relay reports it to the recorder: its live byte
//! counts while it is open, and how it ended.
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex,
};

use crate::datapath::relay::Forwarded;
use crate::sys::lock::lock;

/// How a relayed connection ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed normally.
    #[default]
    Closed,
    /// A side failed or reset; both were reset.
    Reset,
    /// No byte either way for the idle timeout: both sides closed.
    IdleTimeout,
    /// The connection reached its maximum lifetime: both sides closed gracefully.
    MaxLifetime,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes from the first stream to the second (written to the second).
    pub a_to_b: u64,
    pub b_to_a: u64,
    pub end: End,
}

/// Bytes a connection has relayed so far, by direction: the pumps add what they write (one
/// relaxed atomic add per chunk, no lock, no syscall) and the recorder reads them while the
/// connection is still open, so a long-lived connection's bytes show before it ends. While
/// the kernel relays it, the kernel's running count is added (read from its map on `get`,
/// about once a second, by the recorder's flush).
#[derive(Default)]
pub struct Counts {
    pub a_to_b: AtomicU64,
    pub b_to_a: AtomicU64,
    kernel: Mutex<Option<Forwarded>>,
}

impl Counts {
    /// (a_to_b, b_to_a) now.
    pub fn get(&self) -> (u64, u64) {
        let own = (
            self.a_to_b.load(Ordering::Relaxed),
            self.b_to_a.load(Ordering::Relaxed),
        );
        let kernel = lock(&self.kernel)
            .as_ref()
            .map(Forwarded::get)
            .unwrap_or((0, 0));
        (own.0 + kernel.0, own.1 + kernel.1)
    }

    /// The kernel relays the connection from now on: `get` adds what it has forwarded.
    pub fn in_kernel(&self, f: Forwarded) {
        *lock(&self.kernel) = Some(f);
    }

    /// The kernel relay ended, having written exactly `a_to_b`/`b_to_a`: those replace its
    /// running count. One lock, so a reader sees either the running or the final figures.
    pub fn out_of_kernel(&self, a_to_b: u64, b_to_a: u64) {
        let mut k = lock(&self.kernel);
        self.a_to_b.fetch_add(a_to_b, Ordering::Relaxed);
        self.b_to_a.fetch_add(b_to_a, Ordering::Relaxed);
        *k = None;
    }
}
