//! Telling request/response connections from bulk ones, for `--kernel-relay auto`: the
//! in-kernel relay forwards each message without waking the agent (lower latency), but moves
//! a bulk stream slower than splice (the kernel sends redirected data one skb at a time from a
//! work queue, where splice moves 256 KiB per call). So a connection starts on splice, and
//! moves to the kernel once it has shown a few small exchanges each way and nothing bulk.
//!
//! A *burst* is what one direction moves between two idle moments (its pipe empty, nothing
//! more to read). Request/response traffic is small bursts taking turns; a bulk stream is one
//! long burst, or bursts bigger than a message. The decision is one-way: once a connection is
//! in the kernel it stays there (taking its sockets out again could drop bytes the kernel has
//! queued), and once a connection has moved bulk it stays on splice.
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Small bursts each direction must have shown before a connection moves to the kernel: one
/// exchange is not a pattern (a one-shot HTTP request would pay the move for nothing).
pub const MIN_TURNS: u32 = 4;

/// The largest burst that still counts as a message; anything bigger is bulk.
pub const MAX_MESSAGE: u64 = 64 * 1024;

/// One connection's bursts so far (both pumps of the connection share it; they run in the
/// same task, so relaxed atomics are only there to keep the task `Send`).
#[derive(Default)]
pub struct Turns {
    small: [AtomicU32; 2],
    bulk: AtomicBool,
}

impl Turns {
    /// Direction `dir` (0 or 1) just fell idle after moving `bytes`; `other_idle`: the other
    /// direction is idle too (waiting for bytes with an empty pipe). True: move the connection
    /// to the kernel now.
    pub fn burst(&self, dir: usize, bytes: u64, other_idle: bool) -> bool {
        if bytes > MAX_MESSAGE {
            self.bulk.store(true, Ordering::Relaxed);
        }
        if self.bulk.load(Ordering::Relaxed) {
            return false;
        }
        let seen = self.small[dir & 1]
            .load(Ordering::Relaxed)
            .saturating_add(1);
        self.small[dir & 1].store(seen, Ordering::Relaxed);
        other_idle
            && self
                .small
                .iter()
                .all(|c| c.load(Ordering::Relaxed) >= MIN_TURNS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_response_moves_after_enough_small_turns_each_way() {
        let t = Turns::default();
        for _ in 0..MIN_TURNS - 1 {
            assert!(!t.burst(0, 64, true));
            assert!(!t.burst(1, 64, true));
        }
        assert!(!t.burst(0, 64, true), "the reply side has one turn to go");
        assert!(t.burst(1, 64, true));
    }

    #[test]
    fn never_while_the_other_direction_holds_bytes() {
        let t = Turns::default();
        for _ in 0..MIN_TURNS {
            assert!(!t.burst(0, 100, false));
            assert!(!t.burst(1, 100, false));
        }
        assert!(!t.burst(0, 100, false));
        assert!(t.burst(0, 100, true), "as soon as both are idle");
    }

    #[test]
    fn one_direction_talking_is_not_an_exchange() {
        let t = Turns::default();
        for _ in 0..100 {
            assert!(!t.burst(0, 1000, true));
        }
    }

    #[test]
    fn a_bulk_burst_keeps_the_connection_on_splice_for_good() {
        let t = Turns::default();
        assert!(!t.burst(0, MAX_MESSAGE + 1, true));
        for _ in 0..10 {
            assert!(!t.burst(0, 64, true));
            assert!(!t.burst(1, 64, true));
        }
        let t = Turns::default();
        assert!(
            !t.burst(1, MAX_MESSAGE, true),
            "a message of the largest size is still one"
        );
        for _ in 0..MIN_TURNS {
            t.burst(0, 64, true);
        }
        assert!(
            !t.burst(1, 64 * 1024 + 1, true),
            "bulk after small turns also counts"
        );
        assert!(!t.burst(1, 64, true));
    }
}
