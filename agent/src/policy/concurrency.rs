//! Per-peer concurrency limit with a CoDel-timed, adaptive-LIFO waiting queue
//! (Facebook, "Fail at Scale", 2015).
//!
//! * Up to `max_concurrent` connections hold a slot; the next ones wait in a
//!   bounded queue (`max_queue`; 0 means reject at once).
//! * **CoDel timeouts.** If the queue has not been empty within the last
//!   `interval` (N = 100 ms) it is *standing* and a newcomer may wait at most
//!   `standing_wait` (M = 5 ms); otherwise up to N. Because the queue cannot
//!   empty while a given waiter is in it, that rule gives every waiter a fixed
//!   deadline at enqueue time: `max(enqueued + M, last_empty + N)`. So the async
//!   caller can sleep until exactly that instant; there is no polling.
//! * **Adaptive LIFO.** A freed slot goes to the newest live waiter while the queue
//!   is standing (the oldest ones are the likeliest to have been given up on by
//!   their clients), and to the oldest otherwise (plain fairness when not
//!   overloaded).
//! * A waiter past its deadline is never granted. It stays queued (and counts
//!   toward `max_queue`) until its owner calls [`ConcurrencyLimiter::cancel`] at
//!   the deadline, or someone calls [`ConcurrencyLimiter::expire`]: the limiter
//!   never drops a ticket silently, so `cancel` returning `false` always means
//!   "already granted".
//!
//! Time only moves forward here: a `now` earlier than one already seen is read as
//! the latest one seen, so deadlines stay ordered whatever the clock does.

use super::clock::Nanos;
use std::collections::VecDeque;
use std::time::Duration;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ConcurrencyConfig {
    /// Connections allowed at once (0 is treated as 1: blocking a peer outright is
    /// not this knob's job).
    pub max_concurrent: u32,
    /// Waiters allowed at once; 0 disables queueing.
    pub max_queue: u32,
    /// M: the longest wait while the queue is standing (clamped to ≤ `interval`).
    pub standing_wait: Duration,
    /// N: the CoDel interval, and the longest wait when the queue is not standing.
    pub interval: Duration,
}

impl Default for ConcurrencyConfig {
    /// The limit itself has no universal value, so the knob is off unless set;
    /// these are the values used when only `max_concurrent` is given. M and N are
    /// the paper's; 128 waiters bound memory while exceeding what 100 ms of
    /// queueing can drain for any sane limit.
    fn default() -> Self {
        ConcurrencyConfig {
            max_concurrent: 100,
            max_queue: 128,
            standing_wait: Duration::from_millis(5),
            interval: Duration::from_millis(100),
        }
    }
}

/// Identifies a waiter; unique per limiter.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// A slot is held; give it back with `release`.
    Acquired,
    /// Wait; `release` hands out the ticket, or the owner gives up at `deadline`.
    Queued { ticket: Ticket, deadline: Nanos },
    /// All slots busy and the queue is full.
    Rejected,
}

#[derive(Copy, Clone, Debug)]
struct Waiter {
    ticket: Ticket,
    deadline: Nanos,
}

#[derive(Clone, Debug)]
pub struct ConcurrencyLimiter {
    config: ConcurrencyConfig,
    active: u32,
    queue: VecDeque<Waiter>,
    /// Last instant the queue was empty (set when it empties, and when the first
    /// waiter arrives in an empty queue).
    last_empty: Nanos,
    next_ticket: u64,
    /// Latest `now` seen.
    floor: Nanos,
}

impl ConcurrencyLimiter {
    pub fn new(config: ConcurrencyConfig) -> ConcurrencyLimiter {
        ConcurrencyLimiter {
            config,
            active: 0,
            queue: VecDeque::new(),
            last_empty: Nanos::ZERO,
            next_ticket: 0,
            floor: Nanos::ZERO,
        }
    }

    #[cfg(test)]
    pub fn config(&self) -> &ConcurrencyConfig {
        &self.config
    }

    /// New limits apply from the next call; held slots and waiters (with their
    /// deadlines) are kept. A raised limit is used by the next `try_acquire` or
    /// `release`.
    pub fn set_config(&mut self, config: ConcurrencyConfig) {
        self.config = config;
    }

    /// Slots held.
    pub fn active(&self) -> u32 {
        self.active
    }

    /// Waiters queued, including any past their deadline not yet cancelled.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether the queue has been non-empty for at least the CoDel interval.
    pub fn is_standing(&self, now: Nanos) -> bool {
        let now = now.max(self.floor);
        !self.queue.is_empty() && now.saturating_since(self.last_empty) >= self.config.interval
    }

    pub fn try_acquire(&mut self, now: Nanos) -> Acquire {
        let now = self.observe(now);
        if self.active < self.max_concurrent() {
            self.active += 1;
            return Acquire::Acquired;
        }
        if self.queue.len() >= self.config.max_queue as usize {
            return Acquire::Rejected;
        }
        if self.queue.is_empty() {
            self.last_empty = now;
        }
        let wait = self.config.standing_wait.min(self.config.interval);
        let deadline = now
            .saturating_add(wait)
            .max(self.last_empty.saturating_add(self.config.interval));
        let ticket = Ticket(self.next_ticket);
        self.next_ticket = self.next_ticket.wrapping_add(1);
        self.queue.push_back(Waiter { ticket, deadline });
        Acquire::Queued { ticket, deadline }
    }

    /// Gives back one slot. If a live waiter can take it, it is removed from the
    /// queue and returned: the slot is now that waiter's. A release with no slot
    /// held is ignored rather than trusted (never underflows).
    pub fn release(&mut self, now: Nanos) -> Option<Ticket> {
        let now = self.observe(now);
        self.active = self.active.saturating_sub(1);
        if self.active >= self.max_concurrent() {
            return None;
        }
        let live = |w: &Waiter| w.deadline > now;
        let index = if self.is_standing(now) {
            self.queue.iter().rposition(live)
        } else {
            self.queue.iter().position(live)
        }?;
        let waiter = self.remove_at(index, now)?;
        self.active += 1;
        Some(waiter.ticket)
    }

    /// Removes a waiter (its client left, or its deadline passed). `false` if it is
    /// not queued: it was already granted (or never existed).
    pub fn cancel(&mut self, now: Nanos, ticket: Ticket) -> bool {
        let now = self.observe(now);
        match self.queue.iter().position(|w| w.ticket == ticket) {
            Some(index) => self.remove_at(index, now).is_some(),
            None => false,
        }
    }

    /// Removes and returns every waiter whose deadline is at or before `now`, for
    /// an owner that prefers one timer (see [`Self::next_deadline`]) to one per
    /// waiter.
    #[cfg(test)]
    pub fn expire(&mut self, now: Nanos) -> Vec<Ticket> {
        let now = self.observe(now);
        let mut expired = Vec::new();
        self.queue.retain(|w| {
            let keep = w.deadline > now;
            if !keep {
                expired.push(w.ticket);
            }
            keep
        });
        if !expired.is_empty() && self.queue.is_empty() {
            self.last_empty = now;
        }
        expired
    }

    /// The earliest waiter deadline, if anyone is waiting.
    #[cfg(test)]
    pub fn next_deadline(&self) -> Option<Nanos> {
        self.queue.iter().map(|w| w.deadline).min()
    }

    fn max_concurrent(&self) -> u32 {
        self.config.max_concurrent.max(1)
    }

    fn observe(&mut self, now: Nanos) -> Nanos {
        self.floor = self.floor.max(now);
        self.floor
    }

    fn remove_at(&mut self, index: usize, now: Nanos) -> Option<Waiter> {
        let waiter = self.queue.remove(index)?;
        if self.queue.is_empty() {
            self.last_empty = now;
        }
        Some(waiter)
    }
}
