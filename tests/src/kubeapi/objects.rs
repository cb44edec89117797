//! The objects the fake API server serves, as the real one renders them: Pods (with owner
//! references, labels and their IP), Services (ClusterIP or headless) and EndpointSlices
//! (discovery.k8s.io/v1, labelled with their Service's name).

use serde_json::{json, Value};
use std::collections::BTreeMap;

/// A pod for [`super::FakeKubeApi::add_pod`].
#[derive(Clone, Debug)]
pub struct FakePod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    /// `status.podIP`.
    pub ip: String,
    /// The controller owner reference: (kind, name).
    pub owner: Option<(String, String)>,
}

impl FakePod {
    pub fn new(namespace: &str, name: &str, uid: &str, node: &str) -> Self {
        FakePod {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            node: node.into(),
            annotations: BTreeMap::new(),
            labels: BTreeMap::new(),
            host_network: false,
            ip: "10.77.0.10".into(),
            owner: None,
        }
    }

    pub fn annotate(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.into(), v.into());
        self
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }

    pub fn with_ip(mut self, ip: &str) -> Self {
        self.ip = ip.into();
        self
    }

    /// Owned by a controller, e.g. `("ReplicaSet", "payments-5f7c9")`.
    pub fn owned_by(mut self, kind: &str, name: &str) -> Self {
        self.owner = Some((kind.into(), name.into()));
        self
    }

    pub(super) fn to_json(&self) -> Value {
        let owners: Vec<Value> = self
            .owner
            .iter()
            .map(|(kind, name)| {
                json!({"apiVersion": "apps/v1", "kind": kind, "name": name,
                       "uid": format!("owner-{name}"), "controller": true})
            })
            .collect();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": self.name, "namespace": self.namespace, "uid": self.uid,
                "annotations": self.annotations, "labels": self.labels,
                "ownerReferences": owners,
                "creationTimestamp": "2024-01-01T00:00:00Z",
            },
            "spec": {
                "nodeName": self.node, "hostNetwork": self.host_network,
                "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
            },
            "status": {"phase": "Running", "podIP": self.ip, "podIPs": [{"ip": self.ip}]},
        })
    }
}

/// A Service: `cluster_ip` None is headless (`clusterIP: None`); `ports` are (port,
/// targetPort) pairs.
#[derive(Clone, Debug)]
pub struct FakeService {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Option<String>,
    pub ports: Vec<(u16, u16)>,
}

impl FakeService {
    pub(super) fn to_json(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|(p, t)| json!({"name": format!("p{p}"), "port": p, "targetPort": t, "protocol": "TCP"}))
            .collect();
        let ip = self.cluster_ip.clone().unwrap_or_else(|| "None".into());
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "uid": format!("svc-{}-{}", self.namespace, self.name)},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ports": ports,
                     "selector": {"app": self.name}},
        })
    }
}

/// An EndpointSlice of Service `service`: its endpoints' addresses on `port`.
#[derive(Clone, Debug)]
pub struct FakeSlice {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub addresses: Vec<String>,
    pub port: u16,
}

impl FakeSlice {
    pub(super) fn to_json(&self) -> Value {
        let endpoints: Vec<Value> = self
            .addresses
            .iter()
            .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "uid": format!("eps-{}-{}", self.namespace, self.name),
                         "labels": {"kubernetes.io/service-name": self.service}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": format!("p{}", self.port), "port": self.port, "protocol": "TCP"}],
        })
    }
}
