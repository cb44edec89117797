//! Who an address is: a Kubernetes Service, a pod of a workload, a named CIDR, or nobody
//! known (external). Policy rules (`service`, `peer_workload`, ...), `sockmesh peers` and
//! `/metrics` speak these names; the kernel maps and the per-peer table stay keyed by address.
//!
//! The [`Index`] is pure data: objects go in (from the Kubernetes watches, the pods the agent
//! enrolled, the static names file), and lookups are hash-map reads. Nothing on the
//! connection path ever waits for the API server: an address the index does not know yet is
//! simply external until a watch event says otherwise. [`Identities`] shares one index
//! between the writers (the watches, on the agent's event loop) and the readers (the policy
//! source, under the per-peer table's lock; the telemetry flush), with a generation number
//! that tells readers something changed.
mod id;
pub mod index;
pub mod names;

#[cfg(test)]
mod tests;

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

pub use id::Identity;
pub use index::{Index, PodObject, ServiceObject, SliceObject};

/// The index shared between its writers and readers. Cloning shares it.
#[derive(Clone, Default)]
pub struct Identities {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    index: RwLock<Index>,
    /// Bumped by every write that may change what an address resolves to (not by one that
    /// repeats what the index has: a pod's status update, a resync).
    generation: AtomicU64,
}

impl Identities {
    pub fn new() -> Identities {
        Identities::default()
    }

    /// Read access; hold it for one lookup (writers wait meanwhile).
    pub fn read(&self) -> RwLockReadGuard<'_, Index> {
        // A poisoned lock still guards a consistent index: every write is a set of map
        // inserts and removals that each leave it valid.
        self.inner
            .index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the index; bumps the generation if that changed anything it answers from.
    pub fn write<T>(&self, f: impl FnOnce(&mut Index) -> T) -> T {
        let mut g: RwLockWriteGuard<'_, Index> = self
            .inner
            .index
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let before = g.version();
        let out = f(&mut g);
        if g.version() != before {
            self.inner.generation.fetch_add(1, Ordering::AcqRel);
        }
        out
    }

    /// How many writes so far: readers caching names compare it with the one they saw.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }
}
