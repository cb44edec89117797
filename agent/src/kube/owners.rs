//! Pods, Services and EndpointSlices as the identity index needs them: pure conversions, so
//! the rules (a pod's workload through its owner references, a headless Service, an address
//! that is no IP) are tested without an API server.
use std::net::IpAddr;

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};

use crate::identity::{PodObject, ServiceObject, SliceObject};

/// The label the Deployment controller puts on its ReplicaSets' pods; the ReplicaSet is named
/// `DEPLOYMENT-HASH`.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// The label naming an EndpointSlice's Service.
const SERVICE_NAME: &str = "kubernetes.io/service-name";

/// The pod's workload: its controller's name (a ReplicaSet's made by a Deployment is the
/// Deployment's: the name without `-HASH`, as the Deployment controller names them), else the
/// pod's own name. By name convention rather than by watching ReplicaSets: one watch fewer,
/// and the convention is what the Deployment controller does; a ReplicaSet made by hand keeps
/// its own name.
pub fn workload(pod: &Pod) -> String {
    let own = pod.metadata.name.clone().unwrap_or_default();
    let refs = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let Some(owner) = refs
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| refs.first())
    else {
        return own;
    };
    if owner.kind == "ReplicaSet" {
        let hash = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(POD_TEMPLATE_HASH));
        if let Some(deployment) = hash.and_then(|h| {
            owner
                .name
                .strip_suffix(h.as_str())
                .and_then(|n| n.strip_suffix('-'))
        }) {
            if !deployment.is_empty() {
                return deployment.to_string();
            }
        }
    }
    owner.name.clone()
}

fn parse_ips<'a>(texts: impl Iterator<Item = &'a str>) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = texts.filter_map(|t| t.trim().parse().ok()).collect();
    ips.sort();
    ips.dedup();
    ips
}

pub fn pod(p: &Pod) -> PodObject {
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    // A finished pod's address goes back to the pool and may be another pod's already; a
    // host-network pod's is the node's, shared by every such pod: neither names the pod.
    let finished = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
    let ips = if host_network || finished {
        Vec::new()
    } else {
        let listed = status.and_then(|s| s.pod_ips.as_ref());
        let many = listed.into_iter().flatten().map(|a| a.ip.as_str());
        let one = status.and_then(|s| s.pod_ip.as_deref());
        parse_ips(many.chain(one))
    };
    PodObject {
        namespace: p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: p.metadata.name.clone().unwrap_or_default(),
        ips,
        workload: workload(p),
        labels: p.metadata.labels.clone().unwrap_or_default(),
    }
}

pub fn service(s: &Service) -> ServiceObject {
    let spec = s.spec.as_ref();
    // `None` (headless) and an ExternalName Service's empty ClusterIP parse as no address.
    let many = spec
        .and_then(|sp| sp.cluster_ips.as_ref())
        .into_iter()
        .flatten()
        .map(String::as_str);
    let one = spec.and_then(|sp| sp.cluster_ip.as_deref());
    let (ports, port_names) = spec
        .and_then(|sp| sp.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                u16::try_from(p.port).ok()?,
                p.name.clone().unwrap_or_default(),
            ))
        })
        .unzip();
    ServiceObject {
        namespace: s
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: s.metadata.name.clone().unwrap_or_default(),
        cluster_ips: parse_ips(many.chain(one)),
        ports,
        port_names,
    }
}

/// An EndpointSlice, or nothing if it names no Service (one a controller made for itself).
pub fn slice(e: &EndpointSlice) -> Option<SliceObject> {
    let service = e.metadata.labels.as_ref()?.get(SERVICE_NAME)?.clone();
    // FQDN slices list names, not addresses: nothing an IP lookup can find.
    let addresses = parse_ips(
        e.endpoints
            .iter()
            .flat_map(|ep| ep.addresses.iter().map(String::as_str)),
    );
    // A terminating or unready endpoint is still who its address is, but gets no new
    // connection (`ready` absent means ready, as the API documents).
    let ready = parse_ips(
        e.endpoints
            .iter()
            .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|ep| ep.addresses.iter().map(String::as_str)),
    );
    let (ports, port_names) = e
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let n = p.port.and_then(|n| u16::try_from(n).ok())?;
            Some((n, p.name.clone().unwrap_or_default()))
        })
        .unzip();
    Some(SliceObject {
        namespace: e
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: e.metadata.name.clone().unwrap_or_default(),
        service,
        addresses,
        ports,
        port_names,
        ready,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod_json(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }

    fn owned(kind: &str, owner: &str, labels: serde_json::Value) -> Pod {
        pod_json(json!({
            "metadata": {"name": "p-1", "namespace": "shop", "labels": labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": kind, "name": owner,
                                      "uid": "u", "controller": true}]},
            "status": {"podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]},
        }))
    }

    #[test]
    fn a_deployments_pod_is_the_deployment() {
        let p = owned(
            "ReplicaSet",
            "payments-7d9f8c",
            json!({"pod-template-hash": "7d9f8c"}),
        );
        assert_eq!(workload(&p), "payments");
        let o = pod(&p);
        assert_eq!(o.ips.len(), 2, "both families, deduplicated: {:?}", o.ips);
        assert_eq!(o.namespace, "shop");
    }

    #[test]
    fn a_hand_made_replica_set_keeps_its_name() {
        let p = owned("ReplicaSet", "batch-rs", json!({}));
        assert_eq!(workload(&p), "batch-rs");
        let p = owned("ReplicaSet", "x-abc", json!({"pod-template-hash": "zzz"}));
        assert_eq!(workload(&p), "x-abc", "hash not its suffix");
    }

    #[test]
    fn stateful_daemon_and_job_pods_are_their_controller() {
        for kind in ["StatefulSet", "DaemonSet", "Job"] {
            assert_eq!(workload(&owned(kind, "ctl", json!({}))), "ctl", "{kind}");
        }
    }

    #[test]
    fn a_bare_pod_is_itself() {
        let p = pod_json(json!({"metadata": {"name": "debug", "namespace": "ops"}}));
        assert_eq!(workload(&p), "debug");
        assert!(pod(&p).ips.is_empty());
    }

    #[test]
    fn host_network_and_finished_pods_name_no_address() {
        let p = pod_json(
            json!({"metadata": {"name": "h", "namespace": "kube-system"},
            "spec": {"hostNetwork": true, "containers": []}, "status": {"podIP": "192.0.2.1"}}),
        );
        assert!(pod(&p).ips.is_empty());
        let p = pod_json(json!({"metadata": {"name": "j", "namespace": "batch"},
            "status": {"podIP": "10.1.0.9", "phase": "Succeeded"}}));
        assert!(pod(&p).ips.is_empty());
    }

    #[test]
    fn services_and_slices() {
        let s: Service = serde_json::from_value(json!({
            "metadata": {"name": "payments", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"port": 80, "targetPort": 8080}]},
        }))
        .expect("svc");
        let o = service(&s);
        assert_eq!(
            o.cluster_ips,
            vec!["10.96.0.10".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(o.ports, vec![80]);
        let headless: Service = serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "data"},
            "spec": {"clusterIP": "None", "ports": [{"port": 5432}]},
        }))
        .expect("svc");
        assert!(service(&headless).cluster_ips.is_empty());

        let e: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "payments-x", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "payments"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.5"]}, {"addresses": ["10.1.0.6"]},
                          {"addresses": ["10.1.0.7"], "conditions": {"ready": false}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .expect("slice");
        let o = slice(&e).expect("a Service's slice");
        assert_eq!(o.service, "payments");
        assert_eq!(
            o.addresses.len(),
            3,
            "an unready endpoint is still who it is"
        );
        assert_eq!(
            o.ready,
            ["10.1.0.5", "10.1.0.6"].map(|a| a.parse::<IpAddr>().expect("ip")),
            "ready absent means ready"
        );
        assert_eq!(o.ports, vec![8080]);
        assert_eq!(o.port_names, vec!["http"]);
        let orphan: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "o", "namespace": "shop"}, "addressType": "FQDN",
            "endpoints": [{"addresses": ["example.com"]}],
        }))
        .expect("slice");
        assert!(slice(&orphan).is_none());
    }
}
