//! [`PolicyHandle`]: the live policy, swapped whole on a successful reload.
//!
//! The hot path ([`PolicyHandle::current`]) takes a read lock just long enough
//! to clone an `Arc`, so a connection resolves its policy against one complete
//! set, old or new, never a mix. [`PolicyHandle::reload`] reads and validates
//! the file with no lock held, then swaps under the write lock; on any error
//! the old set stays and the error says why (file, line, field, value).
//! Reloads are serialized, so a SIGHUP and a file-change event racing each
//! other cannot install an older read of the file over a newer one.

use super::file::PolicyError;
use super::istio::DestinationRules;
use super::knobs::Knobs;
use super::set::PolicySet;
use crate::identity::Identities;
use crate::policy::key::PeerKey;
use crate::policy::table::PolicySource;
use crate::policy::PeerPolicy;
use crate::sys::lock::lock;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

pub struct PolicyHandle {
    path: Option<PathBuf>,
    base: Knobs,
    current: RwLock<Arc<PolicySet>>,
    /// Serializes reloads (read + swap).
    reloading: Mutex<()>,
    /// Incremented on every successful swap; starts at 0.
    generation: AtomicU64,
    /// Who peers are, for the rules that match by identity.
    ids: Identities,
    /// Istio DestinationRules (filled by the Kubernetes watch; empty without `--kube`).
    drs: DestinationRules,
}

impl PolicyHandle {
    /// Loads `path` (if any) over the flag defaults `base`. An error here is a
    /// startup error: there is no old policy to keep.
    pub fn new(base: Knobs, path: Option<PathBuf>) -> Result<PolicyHandle, PolicyError> {
        let set = match &path {
            Some(p) => PolicySet::load(p, base.clone())?,
            None => PolicySet::new(base.clone()),
        };
        Ok(PolicyHandle {
            path,
            base,
            current: RwLock::new(Arc::new(set)),
            reloading: Mutex::new(()),
            generation: AtomicU64::new(0),
            ids: Identities::new(),
            drs: DestinationRules::default(),
        })
    }

    /// The policy file, if one was given.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The set in force now. Hold on to it for the length of one decision (or
    /// one connection) for a consistent view.
    pub fn current(&self) -> Arc<PolicySet> {
        // A poisoned lock still holds a complete Arc (the swap is one store).
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The policy of `key` now (the current set, the identity index as it stands).
    pub fn resolve(&self, key: &PeerKey) -> PeerPolicy {
        self.current()
            .resolve_with_rules(key, &self.ids.read(), &self.drs)
    }

    /// The DestinationRules the policy applies: the Kubernetes watch writes to them.
    pub fn destination_rules(&self) -> &DestinationRules {
        &self.drs
    }

    /// Changes whenever the identity index or the DestinationRules did: a table's source is
    /// renewed when it moves.
    pub fn inputs_generation(&self) -> (u64, u64) {
        (self.ids.generation(), self.drs.generation())
    }

    /// The identity index the rules consult: the Kubernetes watches and the pod manager
    /// write to it.
    pub fn identities(&self) -> &Identities {
        &self.ids
    }

    /// A per-peer table's policy source: the current set, with the identity index. Give
    /// the table a new one after a reload and whenever the index changed.
    pub fn source(&self) -> PolicySource<PeerKey> {
        self.current()
            .source_with_rules(self.ids.clone(), self.drs.clone())
    }

    /// How many successful reloads have happened.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Re-reads the policy file and, if it is valid, makes it the current set
    /// (for connections admitted from now on; give tables the new
    /// `current().source()`). On error the current set is untouched. Without a
    /// policy file this does nothing and succeeds.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let _serial = lock(&self.reloading);
        let set = Arc::new(PolicySet::load(path, self.base.clone())?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = set;
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}
