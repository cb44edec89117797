//! One poison policy for every mutex in the agent.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, keeping going after a panic elsewhere poisoned it. Every mutex the agent holds
/// guards plain data (tables, counters, map handles, socket pools) that each update leaves
/// valid, so after a panic the data is still worth more than refusing service with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
