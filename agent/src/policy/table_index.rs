//! The per-peer table's orderings (see `table.rs` for the classes): one over every entry, for
//! idle expiry and settling, and one per tenant (the pod an entry belongs to, see
//! [`Tenant`]), so that a full table can evict from the pod that should give way rather than
//! from whoever is least recently used node-wide.
use std::collections::{BTreeMap, HashMap};

use super::clock::Nanos;
use super::key::Tenant;

/// Which eviction class an entry is filed under.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Class {
    Unlinked,
    Busy,
    Settling(Nanos),
    Resting,
}

/// One set of orderings: every entry by last use, resting ones by last use, settling ones
/// by when they come to rest.
pub(super) struct Order<K> {
    pub by_use: BTreeMap<u64, K>,
    pub resting: BTreeMap<u64, K>,
    pub settling: BTreeMap<(Nanos, u64), K>,
}

impl<K> Default for Order<K> {
    fn default() -> Self {
        Order {
            by_use: BTreeMap::new(),
            resting: BTreeMap::new(),
            settling: BTreeMap::new(),
        }
    }
}

impl<K: Clone> Order<K> {
    fn file(&mut self, key: &K, seq: u64, class: Class) {
        self.by_use.insert(seq, key.clone());
        match class {
            Class::Settling(t) => {
                self.settling.insert((t, seq), key.clone());
            }
            Class::Resting => {
                self.resting.insert(seq, key.clone());
            }
            Class::Busy | Class::Unlinked => {}
        }
    }

    fn unfile(&mut self, seq: u64, class: Class) {
        match class {
            Class::Unlinked => return,
            Class::Busy => {}
            Class::Settling(t) => {
                self.settling.remove(&(t, seq));
            }
            Class::Resting => {
                self.resting.remove(&seq);
            }
        }
        self.by_use.remove(&seq);
    }

    /// The entry to evict first: the least recently used resting one, else the settling one
    /// closest to rest, else the least recently used (busy) one.
    fn victim(&self) -> Option<&K> {
        [
            self.resting.first_key_value().map(|(_, k)| k),
            self.settling.first_key_value().map(|(_, k)| k),
            self.by_use.first_key_value().map(|(_, k)| k),
        ]
        .into_iter()
        .flatten()
        .next()
    }

    pub fn len(&self) -> usize {
        self.by_use.len()
    }
}

/// Every ordering of the table.
pub(super) struct Index<K> {
    pub all: Order<K>,
    tenants: HashMap<u64, Order<K>>,
    next_seq: u64,
}

impl<K> Default for Index<K> {
    fn default() -> Self {
        Index {
            all: Order::default(),
            tenants: HashMap::new(),
            next_seq: 0,
        }
    }
}

impl<K: Clone + Tenant> Index<K> {
    /// The next use sequence number.
    pub fn next_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    pub fn link(&mut self, key: &K, seq: u64, class: Class) {
        self.all.file(key, seq, class);
        self.tenants
            .entry(key.tenant())
            .or_default()
            .file(key, seq, class);
    }

    pub fn unlink(&mut self, key: &K, seq: u64, class: Class) {
        self.all.unfile(seq, class);
        let t = key.tenant();
        if let Some(o) = self.tenants.get_mut(&t) {
            o.unfile(seq, class);
            if o.len() == 0 {
                self.tenants.remove(&t);
            }
        }
    }

    /// A settling entry came to rest (`all.settling` already popped).
    pub fn rested(&mut self, key: &K, until: Nanos, seq: u64) {
        self.all.resting.insert(seq, key.clone());
        if let Some(o) = self.tenants.get_mut(&key.tenant()) {
            o.settling.remove(&(until, seq));
            o.resting.insert(seq, key.clone());
        }
    }

    /// Entries of `tenant`.
    pub fn tenant_len(&self, tenant: u64) -> usize {
        self.tenants.get(&tenant).map_or(0, Order::len)
    }

    /// What a full table evicts to make room for a new entry of `tenant`, given the table's
    /// capacity: the tenant's own first victim while it holds its share (capacity / tenants,
    /// itself included) or more; else the first victim of the tenant holding the most. So a
    /// pod under its share never loses an entry to another pod's new peers.
    pub fn victim_for(&self, tenant: u64, capacity: usize) -> Option<K> {
        let mine = self.tenant_len(tenant);
        let tenants = self.tenants.len() + usize::from(mine == 0);
        let share = (capacity / tenants.max(1)).max(1);
        let from = if mine >= share {
            Some(tenant)
        } else {
            self.tenants
                .iter()
                .max_by_key(|(t, o)| (o.len(), **t))
                .map(|(t, _)| *t)
        };
        from.and_then(|t| self.tenants.get(&t))
            .and_then(Order::victim)
            .or_else(|| self.all.victim())
            .cloned()
    }

    /// Test-only: the per-tenant orderings agree with the global one.
    #[cfg(test)]
    pub fn assert_tenants_consistent(&self) {
        let sum: usize = self.tenants.values().map(Order::len).sum();
        assert_eq!(sum, self.all.len(), "tenant orders out of sync");
        let resting: usize = self.tenants.values().map(|o| o.resting.len()).sum();
        assert_eq!(resting, self.all.resting.len());
        let settling: usize = self.tenants.values().map(|o| o.settling.len()).sum();
        assert_eq!(settling, self.all.settling.len());
        for (t, o) in &self.tenants {
            assert!(o.len() > 0, "empty tenant {t} kept");
            assert!(o.by_use.values().all(|k| k.tenant() == *t));
        }
    }
}
