//! Which DestinationRule applies to a client pod's connection to a Service: host matching
//! and Istio's precedence. Pure.
//!
//! * **Host.** A name without a dot is short for `NAME.<rule's namespace>.svc.cluster.local`;
//!   a name with dots is taken as written (Istio does the same: `reviews.prod` matches
//!   nothing, write the FQDN). `*` matches every host, `*.SUFFIX` every host ending in
//!   `.SUFFIX`. An exact host is more specific than any wildcard, a longer wildcard suffix
//!   more than a shorter one.
//! * **Visibility.** A rule is seen by clients of its own namespace always, and by others
//!   when its `exportTo` includes their namespace (absent: everyone).
//! * **Precedence** (Istio's sidecar scope): a rule of the client's namespace, else one of
//!   the Service's namespace, else one of the root namespace (`istio-system` unless
//!   configured). Within the deciding namespace the most specific host wins, then the older
//!   rule (creation time), then the name: one rule, not a merge.
use std::sync::Arc;

use super::parse::{DestinationRule, Export};

/// The cluster's DNS domain (what `svc.cluster.local` ends in).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The FQDN of Service `name` in `namespace`.
pub fn fqdn(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
}

/// How well `rule`'s host matches `svc_fqdn`: `None` no match; greater is more specific.
pub fn host_rank(rule: &DestinationRule, svc_fqdn: &str) -> Option<usize> {
    let h = rule.host.as_str();
    if h == "*" {
        return Some(0);
    }
    if let Some(suffix) = h.strip_prefix("*.") {
        let hit = svc_fqdn
            .strip_suffix(suffix)
            .is_some_and(|head| head.ends_with('.') && head.len() > 1);
        return hit.then_some(suffix.len() + 1);
    }
    let full = if h.contains('.') {
        h.to_string()
    } else {
        fqdn(h, &rule.namespace)
    };
    // Exact beats any wildcard, whatever its length.
    (full == svc_fqdn).then_some(usize::MAX)
}

/// Whether a client in `client_ns` sees `rule`.
pub fn visible(rule: &DestinationRule, client_ns: &str) -> bool {
    rule.namespace == client_ns
        || match &rule.export {
            Export::All => true,
            Export::Namespaces(n) => n.iter().any(|n| n == client_ns),
        }
}

/// The rule for a client in `client_ns` (`None`: a pod outside Kubernetes) connecting to
/// Service `name` of `namespace`.
pub fn select<'a>(
    rules: impl Iterator<Item = &'a Arc<DestinationRule>> + Clone,
    name: &str,
    namespace: &str,
    client_ns: Option<&str>,
    root_ns: &str,
) -> Option<&'a Arc<DestinationRule>> {
    let host = fqdn(name, namespace);
    let client = client_ns.unwrap_or("");
    let order = [client_ns, Some(namespace), Some(root_ns)];
    order.into_iter().flatten().find_map(|ns| {
        rules
            .clone()
            .filter(|r| r.namespace == ns && visible(r, client))
            .filter_map(|r| host_rank(r, &host).map(|rank| (rank, r)))
            // Highest rank, then oldest, then first name: max_by with reversed tie-breaks.
            .max_by(|(ra, a), (rb, b)| {
                ra.cmp(rb)
                    .then_with(|| b.created.cmp(&a.created))
                    .then_with(|| b.name.cmp(&a.name))
            })
            .map(|(_, r)| r)
    })
}
