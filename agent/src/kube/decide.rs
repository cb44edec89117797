//! Which pods to enrol, and with which options: pure functions of the Pod and Namespace
//! objects, so every rule is unit-tested without an API server.
//!
//! * a pod is considered only if it is scheduled on this node, is not `hostNetwork`, has a UID
//!   and has not finished (phase `Succeeded`/`Failed`);
//! * the pod annotation `sockmesh.io/mesh: enabled|disabled` decides when present; otherwise the
//!   namespace label `sockmesh.io/mesh=enabled` does;
//! * annotations `sockmesh.io/exclude-outbound-ports`, `sockmesh.io/exclude-outbound-cidrs`,
//!   `sockmesh.io/exclude-inbound-ports` (the `--pod` option syntax: `22;8000-8100`, `,` works
//!   too) and `sockmesh.io/policy-profile` add per-pod options. A malformed one, or one the
//!   operator does not allow (`super::allowed`), is a [`Problem`] naming the key, and the pod
//!   is enrolled with **no** per-pod options at all (never half of them), while every other
//!   pod is unaffected.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use sockmesh_common::{MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS};

use crate::spec::{shown, CidrSpec, PortRangeSpec};

pub const MESH: &str = "sockmesh.io/mesh";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "sockmesh.io/exclude-outbound-ports";
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "sockmesh.io/exclude-outbound-cidrs";
pub const EXCLUDE_INBOUND_PORTS: &str = "sockmesh.io/exclude-inbound-ports";
pub const POLICY_PROFILE: &str = "sockmesh.io/policy-profile";

/// Per-pod options from annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodOptions {
    pub exclude_outbound_ports: Vec<PortRangeSpec>,
    pub exclude_outbound_cidrs: Vec<CidrSpec>,
    pub exclude_inbound_ports: Vec<PortRangeSpec>,
    pub profile: Option<String>,
}

/// A malformed annotation on a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: &'static str,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not meshed, and why (for logs).
    Skip(&'static str),
    Enrol {
        /// `namespace/name`, or `@profile/namespace/name` with a policy profile: the name
        /// logs, events and policy rules (`pod = "..."`) see.
        name: String,
        options: PodOptions,
    },
}

/// Decide for `pod` on node `node`, given its namespace if known. Problems are returned even
/// when the pod is skipped (a bad `sockmesh.io/mesh` value is worth reporting either way).
/// `allowed` says whether the operator lets pods ask for a set of options
/// (`super::allowed`); options it refuses are problems like malformed ones.
pub fn decide(
    pod: &Pod,
    ns: Option<&Namespace>,
    node: &str,
    allowed: impl Fn(&PodOptions) -> Result<(), Problem>,
) -> (Decision, Vec<Problem>) {
    let mut problems = Vec::new();
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.node_name.as_deref()) != Some(node) {
        return (Decision::Skip("scheduled on another node"), problems);
    }
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return (Decision::Skip("hostNetwork pod"), problems);
    }
    if pod.metadata.uid.as_deref().unwrap_or("").is_empty() {
        return (Decision::Skip("no uid"), problems);
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return (Decision::Skip("pod has finished"), problems);
    }
    let pod_says = match ann.get(MESH).map(|v| v.trim()) {
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        Some(other) => {
            problems.push(Problem {
                key: MESH,
                message: format!(
                    "'{}' is not enabled or disabled; the namespace label decides",
                    shown(other)
                ),
            });
            None
        }
        None => None,
    };
    let ns_says = ns
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(MESH))
        .is_some_and(|v| v == "enabled");
    match pod_says {
        Some(false) => return (Decision::Skip("opted out by annotation"), problems),
        None if !ns_says => return (Decision::Skip("namespace not opted in"), problems),
        _ => {}
    }
    let options = match options(ann).and_then(|o| allowed(&o).map(|()| o)) {
        Ok(o) => o,
        Err(p) => {
            problems.push(p);
            PodOptions::default()
        }
    };
    let ns_name = pod.metadata.namespace.as_deref().unwrap_or("default");
    let pod_name = pod.metadata.name.as_deref().unwrap_or("");
    let name = match &options.profile {
        Some(p) => format!("@{p}/{ns_name}/{pod_name}"),
        None => format!("{ns_name}/{pod_name}"),
    };
    (Decision::Enrol { name, options }, problems)
}

/// All per-pod options, or the first malformed one.
fn options(ann: &BTreeMap<String, String>) -> Result<PodOptions, Problem> {
    let bad = |key: &'static str| move |message: String| Problem { key, message };
    let get = |k: &str| ann.get(k).map(String::as_str).unwrap_or("");
    let o = PodOptions {
        exclude_outbound_ports: PortRangeSpec::parse_list(get(EXCLUDE_OUTBOUND_PORTS))
            .map_err(bad(EXCLUDE_OUTBOUND_PORTS))?,
        exclude_outbound_cidrs: CidrSpec::parse_list(get(EXCLUDE_OUTBOUND_CIDRS))
            .map_err(bad(EXCLUDE_OUTBOUND_CIDRS))?,
        exclude_inbound_ports: PortRangeSpec::parse_list(get(EXCLUDE_INBOUND_PORTS))
            .map_err(bad(EXCLUDE_INBOUND_PORTS))?,
        profile: match ann.get(POLICY_PROFILE).map(|s| s.trim()) {
            None | Some("") => None,
            Some(p) if valid_profile(p) => Some(p.to_string()),
            Some(p) => {
                return Err(Problem {
                    key: POLICY_PROFILE,
                    message: format!(
                    "'{}' is not a profile name (lower-case letters, digits, '-', '.', at most 63)",
                    shown(p)
                ),
                })
            }
        },
    };
    // The kernel's per-pod tables are fixed-size; say so here rather than fail at enrolment.
    // (Global --exclude-* flags share the same slots and are checked again at enrolment.)
    for (key, n, max) in [
        (
            EXCLUDE_OUTBOUND_PORTS,
            o.exclude_outbound_ports.len(),
            MAX_EXCLUDED_PORTS,
        ),
        (
            EXCLUDE_INBOUND_PORTS,
            o.exclude_inbound_ports.len(),
            MAX_EXCLUDED_PORTS,
        ),
        (
            EXCLUDE_OUTBOUND_CIDRS,
            o.exclude_outbound_cidrs.len(),
            MAX_EXCLUDED_CIDRS,
        ),
    ] {
        if n > max {
            return Err(Problem {
                key,
                message: format!("{n} entries, at most {max}"),
            });
        }
    }
    Ok(o)
}

fn valid_profile(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 63
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NODE: &str = "node-a";

    /// What every annotation may ask for: these tests are about the annotations themselves.
    fn decide(pod: &Pod, ns: Option<&Namespace>, node: &str) -> (Decision, Vec<Problem>) {
        super::decide(pod, ns, node, |_| Ok(()))
    }

    fn pod(annotations: serde_json::Value) -> Pod {
        pod_with(
            annotations,
            json!({"nodeName": NODE, "containers": [{"name": "app"}]}),
        )
    }

    fn pod_with(annotations: serde_json::Value, spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "5e3bd4a2-9c1f-4b7e-8f00-0123456789ab",
                         "annotations": annotations},
            "spec": spec,
            "status": {"phase": "Running"},
        }))
        .expect("pod JSON")
    }

    fn ns(labels: serde_json::Value) -> Namespace {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": labels},
        }))
        .expect("namespace JSON")
    }

    fn enrolled(d: &Decision) -> Option<&PodOptions> {
        match d {
            Decision::Enrol { options, .. } => Some(options),
            Decision::Skip(_) => None,
        }
    }

    #[test]
    fn namespace_label_opts_in_and_annotation_overrides() {
        let on = ns(json!({"sockmesh.io/mesh": "enabled"}));
        let off = ns(json!({}));
        let (d, p) = decide(&pod(json!({})), Some(&on), NODE);
        assert!(p.is_empty());
        assert_eq!(
            d,
            Decision::Enrol {
                name: "shop/web-1".into(),
                options: PodOptions::default()
            }
        );
        assert_eq!(
            decide(&pod(json!({})), Some(&off), NODE).0,
            Decision::Skip("namespace not opted in")
        );
        // Namespace unknown yet: only an explicit annotation enrols.
        assert_eq!(
            decide(&pod(json!({})), None, NODE).0,
            Decision::Skip("namespace not opted in")
        );
        assert!(enrolled(&decide(&pod(json!({MESH: "enabled"})), Some(&off), NODE).0).is_some());
        assert!(enrolled(&decide(&pod(json!({MESH: "enabled"})), None, NODE).0).is_some());
        assert_eq!(
            decide(&pod(json!({MESH: "disabled"})), Some(&on), NODE).0,
            Decision::Skip("opted out by annotation")
        );
    }

    #[test]
    fn bad_mesh_value_is_reported_and_the_namespace_decides() {
        let on = ns(json!({"sockmesh.io/mesh": "enabled"}));
        let (d, p) = decide(&pod(json!({MESH: "yes"})), Some(&on), NODE);
        assert!(enrolled(&d).is_some());
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, MESH);
        assert!(p[0].message.contains("'yes'"), "{}", p[0].message);
    }

    #[test]
    fn other_nodes_host_network_and_finished_pods_are_never_enrolled() {
        let a = json!({MESH: "enabled"});
        assert_eq!(
            decide(&pod(a.clone()), None, "node-b").0,
            Decision::Skip("scheduled on another node")
        );
        let host = pod_with(
            a.clone(),
            json!({"nodeName": NODE, "hostNetwork": true, "containers": [{"name": "app"}]}),
        );
        assert_eq!(
            decide(&host, None, NODE).0,
            Decision::Skip("hostNetwork pod")
        );
        let unscheduled = pod_with(a.clone(), json!({"containers": [{"name": "app"}]}));
        assert_eq!(
            decide(&unscheduled, None, NODE).0,
            Decision::Skip("scheduled on another node")
        );
        let mut done = pod(a);
        done.status.as_mut().expect("status").phase = Some("Succeeded".into());
        assert_eq!(
            decide(&done, None, NODE).0,
            Decision::Skip("pod has finished")
        );
    }

    #[test]
    fn annotations_become_options() {
        let (d, p) = decide(
            &pod(json!({
                MESH: "enabled",
                EXCLUDE_OUTBOUND_PORTS: "22;8000-8100",
                EXCLUDE_OUTBOUND_CIDRS: "10.1.0.0/16, fd00::/8",
                EXCLUDE_INBOUND_PORTS: "9000",
                POLICY_PROFILE: "gold",
            })),
            None,
            NODE,
        );
        assert!(p.is_empty(), "{p:?}");
        let Decision::Enrol { name, options } = d else {
            panic!("not enrolled")
        };
        assert_eq!(name, "@gold/shop/web-1");
        assert_eq!(
            options.exclude_outbound_ports,
            vec![
                PortRangeSpec { lo: 22, hi: 22 },
                PortRangeSpec { lo: 8000, hi: 8100 }
            ]
        );
        assert_eq!(options.exclude_outbound_cidrs.len(), 2);
        assert_eq!(
            options.exclude_inbound_ports,
            vec![PortRangeSpec { lo: 9000, hi: 9000 }]
        );
        assert_eq!(options.profile.as_deref(), Some("gold"));
    }

    #[test]
    fn a_malformed_annotation_names_its_key_and_the_pod_falls_back_to_defaults() {
        for (key, value, says) in [
            (EXCLUDE_OUTBOUND_PORTS, "22;http", "'http' is not a port"),
            (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33", "0-32"),
            (EXCLUDE_INBOUND_PORTS, "90-80", "backwards"),
            (POLICY_PROFILE, "Gold Tier", "not a profile name"),
            (EXCLUDE_OUTBOUND_PORTS, "1;2;3;4;5;6;7;8;9", "at most 8"),
        ] {
            // A valid option beside the bad one, which must not be applied either.
            let mut ann = json!({MESH: "enabled", EXCLUDE_INBOUND_PORTS: "9000;9001-9002"});
            ann[key] = json!(value);
            let (d, p) = decide(&pod(ann), None, NODE);
            assert_eq!(p.len(), 1, "{key}={value}: {p:?}");
            assert_eq!(p[0].key, key);
            assert!(p[0].message.contains(says), "{key}: {}", p[0].message);
            // Enrolled, with none of its per-pod options (not even the valid ones).
            assert_eq!(
                d,
                Decision::Enrol {
                    name: "shop/web-1".into(),
                    options: PodOptions::default()
                },
                "{key}={value}"
            );
        }
    }
}
