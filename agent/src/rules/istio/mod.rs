//! Istio DestinationRules as a policy layer: [`parse`] reads one object into what L4 can
//! apply (and lists what it cannot), [`host`] decides which rule a client's connection to a
//! Service falls under, and [`DestinationRules`] is the live set the Kubernetes watch fills
//! and the policy source reads.
//!
//! # Precedence against the policy file
//!
//! A peer's knobs are built in layers, each overriding the previous knob by knob: the flags,
//! the file's `[defaults]`, **the DestinationRule**, then the file's matching `[[rule]]`s.
//! The rule is the service owner's statement about their Service, so it beats the node's
//! generic defaults; the file's rules are the node operator's local, explicit overrides (the
//! way to correct a rule for this node without editing the cluster's objects), so they beat
//! the DestinationRule.
//!
//! # Mapping
//!
//! | DestinationRule | sockmesh |
//! |---|---|
//! | `connectionPool.tcp.connectTimeout` | `connect_timeout` |
//! | `connectionPool.tcp.maxConnections` | `max_conns`, `queue = 0` (Envoy refuses the overflow, it does not queue) |
//! | `connectionPool.tcp.idleTimeout` | `idle_timeout` |
//! | `connectionPool.tcp.maxConnectionDuration` | `max_lifetime` |
//! | `outlierDetection` | per-endpoint ejection ([`crate::policy::outlier`]) |
//! | `loadBalancer.simple` | round robin, or least connections for `LEAST_REQUEST`/`LEAST_CONN` |
//!
//! A rule applies to connections addressed to its Service's ClusterIP and port. When it has
//! `outlierDetection` or `loadBalancer`, the agent picks the endpoint itself (the peer stays
//! on the proxy tier: `endpoint_selection`).
pub mod host;
pub mod parse;

#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, PoisonError, RwLock,
    },
};

use parse::{DestinationRule, Settings};

use super::knobs::Overrides;
use crate::identity::Index;
use crate::policy::key::{Direction, PeerKey};
use crate::policy::outlier::{LbMode, OutlierConfig};

/// Istio's default root namespace: rules there apply mesh-wide (last).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The DestinationRules in force, shared between the watch (writer) and the policy source
/// and proxy (readers). Cloning shares them.
#[derive(Clone)]
pub struct DestinationRules {
    inner: Arc<Shared>,
}

struct Shared {
    rules: RwLock<HashMap<(String, String), Arc<DestinationRule>>>,
    generation: AtomicU64,
    /// Istio's root namespace (`meshConfig.rootNamespace`): its rules apply mesh-wide.
    root_ns: RwLock<String>,
}

impl Default for DestinationRules {
    fn default() -> Self {
        DestinationRules::new(DEFAULT_ROOT_NAMESPACE)
    }
}

/// What a rule does to one client's connections to one Service port.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    pub rule: Arc<DestinationRule>,
    /// (namespace, name, Service port) of the Service.
    pub service: (String, String, u16),
    pub settings: Settings,
}

impl Applied {
    /// Whether the agent picks the endpoint (rather than the ClusterIP's own balancing).
    pub fn picks_endpoints(&self) -> bool {
        self.settings.outlier.is_some() || self.settings.lb.is_some()
    }

    /// The ejection settings (none given: threshold 0, never ejects) and the balancing.
    pub fn picking(&self) -> (OutlierConfig, LbMode) {
        let outlier = self.settings.outlier.unwrap_or(OutlierConfig {
            threshold: 0,
            ..OutlierConfig::default()
        });
        (outlier, self.settings.lb.unwrap_or_default())
    }

    /// The knobs the rule sets (see the module doc's table).
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        if let Some(p) = &self.settings.pool {
            o.connect_timeout = p.connect_timeout.map(Some);
            o.idle_timeout = p.idle_timeout.map(Some);
            o.max_lifetime = p.max_connection_duration.map(Some);
            if let Some(n) = p.max_connections {
                o.max_conns = Some(Some(n));
                o.queue = Some(0);
            }
        }
        o
    }
}

impl DestinationRules {
    pub fn new(root_ns: &str) -> DestinationRules {
        DestinationRules {
            inner: Arc::new(Shared {
                rules: RwLock::new(HashMap::new()),
                generation: AtomicU64::new(0),
                root_ns: RwLock::new(root_ns.to_string()),
            }),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&mut HashMap<(String, String), Arc<DestinationRule>>) -> T,
    ) -> T {
        // A poisoned lock still holds a consistent map (each write is one insert or swap).
        let mut g = self
            .inner
            .rules
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let out = f(&mut g);
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        out
    }

    /// Istio's root namespace, if the mesh sets another than `istio-system`.
    pub fn set_root_namespace(&self, ns: &str) {
        *self
            .inner
            .root_ns
            .write()
            .unwrap_or_else(PoisonError::into_inner) = ns.to_string();
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn apply(&self, rule: DestinationRule) {
        let k = (rule.namespace.clone(), rule.name.clone());
        let same = self
            .inner
            .rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&k)
            .is_some_and(|r| **r == rule);
        // A resync repeating what is in force changes nothing: peers keep their policy and the
        // proxy its cached routes.
        if !same {
            self.write(|m| m.insert(k, Arc::new(rule)));
        }
    }

    pub fn delete(&self, namespace: &str, name: &str) {
        let k = (namespace.to_string(), name.to_string());
        self.write(|m| m.remove(&k));
    }

    /// A complete relist.
    pub fn replace(&self, all: Vec<DestinationRule>) {
        self.write(|m| {
            m.clear();
            for r in all {
                m.insert((r.namespace.clone(), r.name.clone()), Arc::new(r));
            }
        });
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.inner
            .rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Bumped by every change: readers caching what a rule said compare it.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// The rule for `key`'s connection, if any: outbound to a Service's ClusterIP and port,
    /// from a pod whose namespace the index knows (a `--pod` namespace has none: only the
    /// Service's and the root namespace's rules can apply to it).
    pub fn lookup(&self, key: &PeerKey, ids: &Index) -> Option<Applied> {
        if key.direction != Direction::Outbound {
            return None;
        }
        let g = self
            .inner
            .rules
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if g.is_empty() {
            return None;
        }
        let port = key.peer.port();
        let svc = ids.service_at(key.peer.ip(), port)?;
        let client = ids.local(&key.pod, None).namespace;
        let root = self
            .inner
            .root_ns
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let rule = host::select(
            g.values(),
            &svc.name,
            &svc.namespace,
            client.as_deref(),
            &root,
        )?;
        Some(Applied {
            settings: rule.for_port(port),
            rule: rule.clone(),
            service: (svc.namespace.clone(), svc.name.clone(), port),
        })
    }
}
