//! What the index answers: the identity of one address, or of the local pod.
use std::{collections::BTreeMap, sync::Arc};

/// Labels of a pod, shared (a pod's every peer entry refers to the same map).
pub type Labels = Arc<BTreeMap<String, String>>;

/// What an address (or the local pod) is, as far as the index knows. Every field is optional:
/// an external address has none, a ClusterIP has a Service and a namespace but no single
/// workload, a pod IP has its workload, namespace and labels and the Services whose endpoints
/// include it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// `NAME.NAMESPACE` of every Service this address:port belongs to, sorted; the first is
    /// the one shown. A ClusterIP:port has one; a pod can back several.
    pub services: Vec<Arc<str>>,
    pub namespace: Option<Arc<str>>,
    /// The owning Deployment, StatefulSet, DaemonSet or Job, else the pod's own name; for a
    /// named CIDR, the name the file gives.
    pub workload: Option<Arc<str>>,
    pub labels: Labels,
}

impl Identity {
    /// The Service shown for this address, if any.
    #[cfg(test)]
    pub fn service(&self) -> Option<&str> {
        self.services.first().map(|s| &**s)
    }

    /// Knows nothing: an external address.
    #[cfg(test)]
    pub fn is_unknown(&self) -> bool {
        self.services.is_empty() && self.namespace.is_none() && self.workload.is_none()
    }
}
